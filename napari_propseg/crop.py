"""The body crop: one square (in mm) box per volume, shared by training and inference.

Weights trained on body crops (``crop: body`` in the training data config) see every slice
cut to the body's bounding box; the engine must cut the same box at inference. Both use
:class:`BodyCrop` (numpy and scipy only, no torch):

* :func:`body_bbox` finds the box (HU > -500 in at least 10 % of the slices, largest
  component, 4 % margin, made square in millimetres); it may reach outside the slice,
* :meth:`BodyCrop.crop` cuts an array's last two axes to the box, padding with a fill
  value (air for HU, background for labels) where the box leaves the slice,
* :meth:`BodyCrop.place` puts a crop back onto a full slice (background outside the box).

Example:
    >>> import numpy as np
    >>> bc = BodyCrop((-1, 3, 0, 2))
    >>> bc.crop(np.ones((2, 2), np.int16), 0).shape
    (4, 2)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


def body_bbox(hu: np.ndarray, spacing: Sequence[float], *, threshold: float = -500.0, margin: float = 0.04) -> Box:
    """Square (in mm) bounding box of the body over all slices.

    Args:
        hu: (Z, Y, X) Hounsfield units.
        spacing: (sz, sy, sx) mm.
        threshold: body voxels are above this HU.
        margin: fraction of the box size added on every side.

    Returns:
        ``(y0, y1, x0, x1)`` half-open pixel bounds; they may lie outside the array
        (the caller pads with air).
    """
    from scipy import ndimage

    z = hu.shape[0]
    step = max(1, z // 64)
    frac = (hu[::step] > threshold).mean(axis=0)
    mask = frac > 0.1
    lab, n = ndimage.label(mask)
    if n == 0:
        return 0, hu.shape[1], 0, hu.shape[2]
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(mask)
    sy, sx = float(spacing[1]), float(spacing[2])
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    size_mm = max((ys.max() + 1 - ys.min()) * sy, (xs.max() + 1 - xs.min()) * sx) * (1 + 2 * margin)
    hy, hx = size_mm / sy / 2.0, size_mm / sx / 2.0
    return int(math.floor(cy - hy)), int(math.ceil(cy + hy)), int(math.floor(cx - hx)), int(math.ceil(cx + hx))


def crop_pad(arr: np.ndarray, box: Box, fill) -> np.ndarray:
    """``arr`` (..., Y, X) cut to ``box`` on its last two axes, padded with ``fill`` where the
    box leaves the array (a view when nothing is padded)."""
    y0, y1, x0, x1 = box
    h, w = arr.shape[-2:]
    out = arr[..., max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    pad = ((0, 0),) * (arr.ndim - 2) + ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)))
    if any(p for ax in pad for p in ax):
        out = np.pad(out, pad, constant_values=fill)
    return out


@dataclass(frozen=True)
class BodyCrop:
    """The crop box of one volume; ``box`` None is the whole slice (no crop)."""

    box: Box | None = None

    @classmethod
    def of_volume(cls, hu: np.ndarray, spacing: Sequence[float] | None = None) -> "BodyCrop":
        """The body crop of a (Z, Y, X) HU volume (:func:`body_bbox`; square pixels if no spacing)."""
        box = body_bbox(hu, tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0))
        log.info("body crop y %d:%d, x %d:%d", *box)
        return cls(box)

    @classmethod
    def for_weights(cls, crop: str, hu: np.ndarray, spacing: Sequence[float] | None = None) -> "BodyCrop":
        """The crop a network trained with ``crop`` (``"body"`` or ``"none"``) expects.

        Raises:
            ValueError: an unknown crop mode.
        """
        if crop == "none":
            return cls(None)
        if crop != "body":
            raise ValueError(f"unknown crop {crop!r}")
        return cls.of_volume(hu, spacing)

    def bounds(self, shape: Sequence[int]) -> Box:
        """The box on a slice of ``shape`` (Y, X): the whole slice when there is no crop."""
        return self.box if self.box is not None else (0, int(shape[-2]), 0, int(shape[-1]))

    def size(self, shape: Sequence[int]) -> tuple[int, int]:
        """(h, w) of a crop of a slice of ``shape``."""
        y0, y1, x0, x1 = self.bounds(shape)
        return y1 - y0, x1 - x0

    def crop(self, arr: np.ndarray, fill) -> np.ndarray:
        """``arr`` (..., Y, X) cut to the box (padded with ``fill``); ``arr`` itself without a crop."""
        return arr if self.box is None else crop_pad(arr, self.box, fill)

    def place(self, crop: np.ndarray, shape: Sequence[int], dtype, fill=0) -> np.ndarray:
        """A (Y, X) slice of ``shape`` holding ``crop`` (h, w) where the box lies on it and
        ``fill`` elsewhere (the inverse of :meth:`crop` inside the slice)."""
        h, w = int(shape[-2]), int(shape[-1])
        y0, y1, x0, x1 = self.bounds(shape)
        out = np.full((h, w), fill, dtype=dtype)
        out[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = \
            crop[max(0, -y0):crop.shape[0] - max(0, y1 - h), max(0, -x0):crop.shape[1] - max(0, x1 - w)]
        return out
