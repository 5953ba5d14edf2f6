"""ResNet-v2 backbone of TransUNet's R50 hybrid encoder (torch only).

Big-Transfer style ResNet: weight-standardised convolutions followed by GroupNorm, three
stages of bottleneck units (3, 4, 9 units for R50-ViT-B/16) taking the image to stride 16.
The skip features for the cascaded decoder are returned alongside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: each output filter has zero mean, unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


class Bottleneck(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1, GroupNorm after each, projection shortcut.

    Args:
        cin: input channels.
        cout: output channels.
        cmid: bottleneck channels.
        stride: stride of the 3x3 convolution.
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn1 = _gn(cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn2 = _gn(cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.gn3 = _gn(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False)
            self.gn_proj = _gn(cout)
        else:
            self.downsample = None
            self.gn_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.downsample is not None:
            residual = self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class ResNetV2(nn.Module):
    """ResNet-v2 to stride 16 with skip features.

    Args:
        units: number of bottleneck units per stage, e.g. ``(3, 4, 9)``.
        width: root width (64 for R50); stage ``i`` outputs ``width * 4 * 2**i`` channels.
        in_channels: image channels.

    Shapes:
        input ``(B, in_channels, H, W)`` with H, W divisible by 16;
        output ``(B, 16*width, H/16, W/16)`` and skips
        ``[(B, 8*width, H/8, W/8), (B, 4*width, H/4, W/4), (B, width, H/2, W/2)]``.
    """

    def __init__(self, units: tuple[int, ...] = (3, 4, 9), width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if len(units) != 3:
            raise ValueError(f"ResNetV2 needs 3 stages of units, got {units!r}")
        self.width = width
        self.root = nn.Sequential(
            StdConv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            _gn(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        cin = width
        for i, n in enumerate(units):
            cout, cmid = width * 4 * 2**i, width * 2**i
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(cin, cout, cmid, stride)]
            blocks += [Bottleneck(cout, cout, cmid, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.body = nn.ModuleList(stages)
        self.out_channels = cin
        self.skip_channels = [width * 8, width * 4, width]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = self.root(x)  # B, w, H/2, W/2
        skips.append(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # B, w, H/4, W/4
        for stage in self.body[:-1]:
            x = stage(x)
            skips.append(x)  # B, 4w, H/4 ; B, 8w, H/8
        x = self.body[-1](x)  # B, 16w, H/16
        return x, skips[::-1]
