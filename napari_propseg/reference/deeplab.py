"""DeepLabV3+ (Chen et al. 2018) with a ResNet encoder, optional IFE and slice position.

Encoder: ResNet (basic blocks for depth 18/34, bottlenecks for 50/101) at output stride 16
(last stage dilated). ASPP: 1x1 conv, three 3x3 atrous convs (rates 6/12/18) and image
pooling, fused by a 1x1 conv to ``aspp_channels`` (256). Decoder: the stride-4 low-level
feature is reduced by a 1x1 conv to ``low_level_channels`` (48), concatenated with the
upsampled ASPP output, refined by two 3x3 convs. Options:

* IFE (:mod:`.ife`) on the low-level (48) and ASPP (256) features: the top ``r`` channels
  by mean curvature or 2-D entropy are concatenated to the raw features.
* slice-position encoding: a constant plane holding ``z / (Z - 1)`` concatenated before
  the segmentation head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ife import IFE
from .transunet import position_plane

DEEPLAB_DEFAULTS: dict = {
    "arch": "deeplabv3plus",
    "num_classes": 14,
    "in_channels": 3,
    "img_size": 512,
    "encoder_depth": 50,
    "encoder_width": 64,
    "aspp_channels": 256,
    "aspp_rates": [6, 12, 18],
    "low_level_channels": 48,
    "decoder_channels": 256,
    "dropout": 0.1,
    "ife": None,
    "ife_ratio": [0.75, 0.75],
    "ife_bins": 32,
    "use_position": True,
}

_LAYOUTS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3])}


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + idt, inplace=True)


class BottleneckBlock(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        return F.relu(self.bn3(self.conv3(y)) + idt, inplace=True)


class ResNetEncoder(nn.Module):
    """ResNet at output stride 16 (layer4 dilated by 2).

    Shapes:
        ``(B, in_channels, H, W) -> low (B, c1, H/4, W/4), high (B, c4, H/16, W/16)``.
    """

    def __init__(self, depth: int = 50, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"encoder_depth must be one of {sorted(_LAYOUTS)}, got {depth}")
        kind, layers = _LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else BottleneckBlock
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        cin = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i in (0, 3) else 2
            dilation = 2 if i == 3 else 1
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, dilation))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.low_channels = width * block.expansion
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = self.layer1(x)  # B, c1, H/4, W/4
        x = self.layer4(self.layer3(self.layer2(low)))  # B, c4, H/16, W/16
        return low, x


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling. ``(B, cin, h, w) -> (B, cout, h, w)``."""

    def __init__(self, cin: int, cout: int, rates: list[int], dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_cbr(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x) if x.shape[0] > 1 or not self.training else self._pool_single(x)
        outs.append(F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))

    def _pool_single(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm cannot train on one 1x1 value; use running stats for a batch of one.
        avg, conv, bn, relu = self.pool
        y = conv(avg(x))
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return relu(y)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with optional IFE and slice-position encoding.

    Args:
        config: architecture dict; missing keys take :data:`DEEPLAB_DEFAULTS`.

    Shapes:
        ``forward(x (B, in_channels, H, W), zpos (B,)) -> logits (B, num_classes, H, W)``;
        H and W multiples of 16.

    Example:
        >>> net = DeepLabV3Plus({"num_classes": 3, "encoder_depth": 18, "encoder_width": 8,
        ...                      "aspp_channels": 32, "low_level_channels": 12, "decoder_channels": 32,
        ...                      "ife": "curvature"})
        >>> net.eval()(torch.zeros(1, 3, 64, 64), torch.tensor([0.5])).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = {**DEEPLAB_DEFAULTS, **(config or {})}
        cfg["arch"] = "deeplabv3plus"
        self.config = cfg
        self.encoder = ResNetEncoder(cfg["encoder_depth"], cfg["encoder_width"], cfg["in_channels"])
        ac, lc, dc = cfg["aspp_channels"], cfg["low_level_channels"], cfg["decoder_channels"]
        self.aspp = ASPP(self.encoder.out_channels, ac, list(cfg["aspp_rates"]), cfg["dropout"])
        self.low_proj = _cbr(self.encoder.low_channels, lc, 1)
        if cfg["ife"]:
            ratio = cfg["ife_ratio"]
            r_low, r_aspp = (ratio, ratio) if isinstance(ratio, (int, float)) else tuple(ratio)
            self.ife_low: nn.Module = IFE(lc, r_low, cfg["ife"], cfg["ife_bins"])
            self.ife_aspp: nn.Module = IFE(ac, r_aspp, cfg["ife"], cfg["ife_bins"])
            lc_out, ac_out = self.ife_low.out_channels, self.ife_aspp.out_channels
        else:
            self.ife_low = self.ife_aspp = nn.Identity()
            lc_out, ac_out = lc, ac
        self.decoder = nn.Sequential(_cbr(lc_out + ac_out, dc, 3), _cbr(dc, dc, 3))
        self.use_position = bool(cfg["use_position"])
        self.head = nn.Conv2d(dc + int(self.use_position), cfg["num_classes"], 1)

    def forward(self, x: torch.Tensor, zpos: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"DeepLabV3+ input must be a multiple of 16 pixels, got {h}x{w}")
        if x.shape[1] == 1 and self.config["in_channels"] == 3:
            x = x.repeat(1, 3, 1, 1)
        low, high = self.encoder(x)
        a = self.ife_aspp(self.aspp(high))  # B, ac(+k), H/16, W/16
        low = self.ife_low(self.low_proj(low))  # B, lc(+k), H/4, W/4
        a = F.interpolate(a, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([a, low], dim=1))  # B, dc, H/4, W/4
        if self.use_position:
            y = position_plane(y, zpos)
        y = self.head(y)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
