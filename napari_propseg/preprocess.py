"""CT intensity windowing for the networks and display presets for napari (no Qt).

The networks see three CT windows stacked as channels (the seed pipeline's input):
channel 0 abdomen [-150, 250] HU, channel 1 chest [-1350, 225] HU, channel 2 bone
[-500, 1300] HU, each clipped and scaled linearly to [0, 1].

Example:
    >>> import numpy as np
    >>> window_ct(np.array([[-150.0, 250.0]])).shape
    (3, 1, 2)
"""
from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Network input windows, in channel order: name -> (low, high) HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-150.0, 250.0),
    "chest": (-1350.0, 225.0),
    "bone": (-500.0, 1300.0),
}

#: napari contrast limits (low, high) in HU for common radiology windows (W/L):
#: abdomen W400/L50, liver W150/L30, lung W1500/L-600, bone W1800/L400, brain W80/L40.
DISPLAY_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (-150.0, 250.0),
    "liver": (-45.0, 105.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
}


def window_ct(hu: ArrayLike, windows: Sequence[tuple[float, float]] | None = None) -> ArrayLike:
    """Stack CT windows as channels, each clipped and scaled to [0, 1].

    Args:
        hu: Hounsfield units, shape (..., Y, X): (Y, X) for a slice, (Z, Y, X) for a
            volume or a batch of slices. numpy array or torch tensor, any real dtype.
        windows: (low, high) HU pairs, one per output channel; defaults to
            ``WINDOWS.values()`` (abdomen, chest, bone).

    Returns:
        float32, same library (and torch device) as ``hu``, shape (..., C, Y, X) with the
        channel axis inserted before the last two: (Y, X) -> (3, Y, X),
        (Z, Y, X) -> (Z, 3, Y, X). A value equal to ``low`` maps to exactly 0, ``high``
        to exactly 1.

    Raises:
        ValueError: fewer than 2 dimensions, or a window with high <= low.
    """
    wins = list(WINDOWS.values()) if windows is None else [(float(lo), float(hi)) for lo, hi in windows]
    for lo, hi in wins:
        if not hi > lo:
            raise ValueError(f"window high must exceed low, got ({lo}, {hi})")
    if hu.ndim < 2:
        raise ValueError(f"window_ct needs at least (Y, X), got shape {tuple(hu.shape)}")
    if isinstance(hu, torch.Tensor):
        x = hu.to(torch.float32)
        chans = [((x - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in wins]
        return torch.stack(chans, dim=-3)
    x = np.asarray(hu, dtype=np.float32)
    out = np.empty(x.shape[:-2] + (len(wins),) + x.shape[-2:], dtype=np.float32)
    for c, (lo, hi) in enumerate(wins):
        ch = out[..., c, :, :]
        np.subtract(x, np.float32(lo), out=ch)
        np.divide(ch, np.float32(hi - lo), out=ch)
        np.clip(ch, 0.0, 1.0, out=ch)
    return out


def resize_slices(x: ArrayLike, size: tuple[int, int], *, mode: str = "bilinear") -> ArrayLike:
    """Resize the last two axes (Y, X) of images or label maps.

    Args:
        x: (..., Y, X) numpy array or torch tensor.
        size: target (H, W).
        mode: ``"bilinear"`` for intensities (output float32, antialiased when
            shrinking), ``"nearest"`` for label maps (dtype kept, exact ids).

    Returns:
        (..., H, W), same library (and device) as ``x``.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if x.ndim < 2:
        raise ValueError(f"resize_slices needs at least (Y, X), got shape {tuple(x.shape)}")
    size = (int(size[0]), int(size[1]))
    is_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    lead = t.shape[:-2]
    if tuple(t.shape[-2:]) == size:
        out = t if mode == "nearest" else t.to(torch.float32)
    else:
        flat = t.reshape((-1, 1) + tuple(t.shape[-2:]))
        if mode == "nearest":
            src_dtype = flat.dtype
            res = F.interpolate(flat.to(torch.float32), size=size, mode="nearest-exact")
            out = res.to(src_dtype)
        else:
            shrink = size[0] < flat.shape[-2] or size[1] < flat.shape[-1]
            out = F.interpolate(flat.to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=shrink)
        out = out.reshape(tuple(lead) + size)
    return out.numpy() if is_numpy else out
