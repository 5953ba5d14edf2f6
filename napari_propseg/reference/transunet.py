"""TransUNet R50-ViT-B/16 (Chen et al. 2021) with slice-position encoding, torch only.

Encoder: ResNet-v2 (units 3/4/9, stride 16) -> 1x1 patch embedding -> ViT (12 layers,
width 768, MLP 3072, 12 heads). Decoder: cascaded upsampling (256, 128, 64, 16) with
skips from the ResNet at strides 8, 4, 2. The learned position embedding is sized for
``img_size`` and bilinearly interpolated when the input has another size.

Slice-position encoding: the slice's relative axial position ``z / (Z - 1)`` (canonical
orientation, 0 = most inferior) is broadcast to a constant feature plane and concatenated
to the last decoder feature before the segmentation head (``use_position=False`` drops it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnetv2 import ResNetV2

TRANSUNET_DEFAULTS: dict = {
    "arch": "transunet",
    "num_classes": 14,
    "in_channels": 3,
    "img_size": 224,
    "resnet_units": [3, 4, 9],
    "resnet_width": 64,
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "mlp_dim": 3072,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "decoder_channels": [256, 128, 64, 16],
    "n_skip": 3,
    "use_position": True,
}


def position_plane(x: torch.Tensor, zpos: torch.Tensor | None) -> torch.Tensor:
    """Concatenate a constant plane holding each sample's relative slice position.

    Args:
        x: features ``(B, C, H, W)``.
        zpos: ``(B,)`` relative axial positions in [0, 1]; ``None`` means 0.5 (volume centre).

    Returns:
        ``(B, C + 1, H, W)``.
    """
    b, _, h, w = x.shape
    if zpos is None:
        zpos = x.new_full((b,), 0.5)
    zpos = torch.as_tensor(zpos, dtype=x.dtype, device=x.device).reshape(-1)
    if zpos.numel() == 1 and b > 1:
        zpos = zpos.expand(b)
    if zpos.numel() != b:
        raise ValueError(f"zpos has {zpos.numel()} values for a batch of {b}")
    plane = zpos.view(b, 1, 1, 1).expand(b, 1, h, w)
    return torch.cat([x, plane], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention. Input/output ``(B, N, D)``."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)  # B, h, N, d/h

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.out(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)). Shapes ``(B, N, D)``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attn_drop: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Conv2dReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, skip: int) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(cin + skip, cout)
        self.conv2 = Conv2dReLU(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    """TransUNet R50-ViT-B/16 with optional slice-position encoding.

    Args:
        config: architecture dict; missing keys take :data:`TRANSUNET_DEFAULTS`.

    Shapes:
        ``forward(x (B, in_channels, H, W), zpos (B,)) -> logits (B, num_classes, H, W)``;
        H and W must be multiples of 16.

    Example:
        >>> net = TransUNet({"num_classes": 3, "img_size": 64, "num_layers": 1, "hidden_size": 96,
        ...                  "num_heads": 4, "mlp_dim": 192, "resnet_width": 16, "resnet_units": [1, 1, 1],
        ...                  "decoder_channels": [32, 16, 16, 8]})
        >>> net(torch.zeros(1, 3, 64, 64), torch.tensor([0.5])).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = {**TRANSUNET_DEFAULTS, **(config or {})}
        cfg["arch"] = "transunet"
        self.config = cfg
        if cfg["img_size"] % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {cfg['img_size']}")
        d = cfg["hidden_size"]
        self.backbone = ResNetV2(tuple(cfg["resnet_units"]), cfg["resnet_width"], cfg["in_channels"])
        self.patch_embeddings = nn.Conv2d(self.backbone.out_channels, d, kernel_size=1)
        self.grid = cfg["img_size"] // 16
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid, d))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.embed_dropout = nn.Dropout(cfg["dropout"])
        self.layers = nn.ModuleList(
            Block(d, cfg["num_heads"], cfg["mlp_dim"], cfg["dropout"], cfg["attention_dropout"])
            for _ in range(cfg["num_layers"])
        )
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        dec = list(cfg["decoder_channels"])
        head_channels = 512 if dec[0] <= 512 else dec[0]
        self.conv_more = Conv2dReLU(d, head_channels)
        skip_ch = list(self.backbone.skip_channels) + [0]
        n_skip = cfg["n_skip"]
        skip_ch = [c if i < n_skip else 0 for i, c in enumerate(skip_ch)]
        ins = [head_channels] + dec[:-1]
        self.skip_channels = skip_ch
        self.blocks = nn.ModuleList(DecoderBlock(i, o, s) for i, o, s in zip(ins, dec, skip_ch))
        self.use_position = bool(cfg["use_position"])
        self.segmentation_head = nn.Conv2d(dec[-1] + int(self.use_position), cfg["num_classes"], 3, padding=1)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding ``(1, gh*gw, D)``, bilinearly resized from the trained grid."""
        pe = self.position_embeddings
        if gh == self.grid and gw == self.grid:
            return pe
        d = pe.shape[-1]
        pe = pe.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(gh, gw), mode="bilinear", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, gh * gw, d)

    def forward(self, x: torch.Tensor, zpos: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % 16 or w % 16:
            raise ValueError(f"TransUNet input must be a multiple of 16 pixels, got {h}x{w}")
        if c == 1 and self.config["in_channels"] == 3:
            x = x.repeat(1, 3, 1, 1)
        feat, skips = self.backbone(x)  # B, 1024, H/16, W/16
        tok = self.patch_embeddings(feat)  # B, D, gh, gw
        gh, gw = tok.shape[-2:]
        tok = tok.flatten(2).transpose(1, 2)  # B, N, D
        tok = self.embed_dropout(tok + self._pos_embed(gh, gw))
        for layer in self.layers:
            tok = layer(tok)
        tok = self.encoder_norm(tok)
        y = tok.transpose(1, 2).reshape(b, -1, gh, gw)  # B, D, gh, gw
        y = self.conv_more(y)
        for i, block in enumerate(self.blocks):
            skip = skips[i] if self.skip_channels[i] > 0 else None
            y = block(y, skip)
        if self.use_position:
            y = position_plane(y, zpos)
        return self.segmentation_head(y)


def n_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

