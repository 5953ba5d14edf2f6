"""Instructive feature enhancement (IFE, Liu et al., MICCAI 2023), torch only.

Each channel of a feature map is scored by how much structure it carries, the top ``r``
fraction of channels is selected per sample, and the selected channels are concatenated
to the raw features (so the next layer sees ``C + round(r * C)`` channels).

Two scores:

* ``"curvature"``: the mean-curvature filter
  ``[[-1/16, 5/16, -1/16], [5/16, -1, 5/16], [-1/16, 5/16, -1/16]]`` applied to every
  channel, absolute response summed over the plane.
* ``"entropy"``: 2-D information entropy of the joint histogram of (pixel value,
  3x3 neighbourhood mean), both quantised to ``bins`` levels after a per-channel
  min-max rescaling: ``H = -sum p_ij log2 p_ij``.

Scores are computed without gradient (selection is discrete); the gathered channels carry
the gradient of the features themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CURVATURE_KERNEL = torch.tensor(
    [[-1 / 16, 5 / 16, -1 / 16], [5 / 16, -1.0, 5 / 16], [-1 / 16, 5 / 16, -1 / 16]], dtype=torch.float32
)
METHODS = ("curvature", "entropy")


@torch.no_grad()
def curvature_score(x: torch.Tensor) -> torch.Tensor:
    """Sum of |mean-curvature filter response| per channel.

    Args:
        x: ``(B, C, H, W)``.

    Returns:
        ``(B, C)`` scores.
    """
    b, c, h, w = x.shape
    k = CURVATURE_KERNEL.to(x.device, x.dtype).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    resp = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return resp.abs().sum(dim=(2, 3))


@torch.no_grad()
def entropy_score(x: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """2-D information entropy (bits) per channel from the (value, 3x3 mean) histogram.

    Args:
        x: ``(B, C, H, W)``.
        bins: quantisation levels for the value and the neighbourhood mean.

    Returns:
        ``(B, C)`` entropies in bits, in ``[0, 2 log2(bins)]``.
    """
    b, c, h, w = x.shape
    x = x.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = (hi - lo).clamp_min(1e-12)
    xn = (x - lo) / scale  # [0, 1]
    mean = F.avg_pool2d(F.pad(xn, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    qi = (xn * bins).long().clamp_(0, bins - 1)
    qj = (mean * bins).long().clamp_(0, bins - 1)
    idx = (qi * bins + qj).view(b * c, h * w)
    offs = torch.arange(b * c, device=x.device).view(-1, 1) * (bins * bins)
    hist = torch.bincount((idx + offs).reshape(-1), minlength=b * c * bins * bins).view(b * c, bins * bins)
    p = hist.float() / float(h * w)
    ent = -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)
    return ent.view(b, c).to(x.dtype)


class IFE(nn.Module):
    """Select the top ``ratio`` of channels by a structure score and concatenate them.

    Args:
        channels: input channels C.
        ratio: fraction r of channels selected (0 < r <= 1).
        method: ``"curvature"`` or ``"entropy"``.
        bins: histogram levels for ``"entropy"``.

    Shapes:
        ``(B, C, H, W) -> (B, C + round(r * C), H, W)``; ``out_channels`` holds the result.
    """

    def __init__(self, channels: int, ratio: float = 0.75, method: str = "curvature", bins: int = 32) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"IFE method must be one of {METHODS}, got {method!r}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"IFE ratio must be in (0, 1], got {ratio}")
        self.channels = channels
        self.k = max(1, int(round(ratio * channels)))
        self.method = method
        self.bins = bins
        self.out_channels = channels + self.k

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel scores ``(B, C)``."""
        if self.method == "curvature":
            return curvature_score(x)
        return entropy_score(x, self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        idx = self.scores(x.detach()).topk(self.k, dim=1).indices  # B, k
        sel = torch.gather(x, 1, idx.view(b, self.k, 1, 1).expand(b, self.k, h, w))
        return torch.cat([x, sel], dim=1)
