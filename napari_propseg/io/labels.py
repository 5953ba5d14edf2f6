"""Label volumes: id types, grid comparison and :func:`read_labels` (resampling onto an image).

Part of :mod:`napari_propseg.io`; import the public names from there."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .read import _canonicalize, _read_sitk
from .volume import _DIRECTION_ATOL, MIN_LABEL_COVERAGE, orientation_code, _ORIGIN_TOL_VOXELS, _SPACING_RTOL, Volume

log = logging.getLogger("napari_propseg.io")  # one logger for the io package

# --------------------------------------------------------------------------- labels


def label_dtype(max_id: int) -> np.dtype:
    """Narrowest integer type for label ids 0..max_id: uint8, uint16 or int32."""
    if max_id <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_id <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_id <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise InputError(f"Label id {max_id} is too large; label ids must fit in a 32-bit integer.")


def _as_label_array(arr: np.ndarray, what: str) -> np.ndarray:
    """Integer label array in the narrowest type, or InputError (negative / non-integral)."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{what} holds NaN or infinite values; a label map needs whole-number ids.")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(
                f"{what} holds non-integer values (e.g. probabilities); a label map needs whole-number ids, "
                "threshold or argmax it first."
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} has pixel type {arr.dtype}; a label map needs integer ids.")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(f"{what} holds negative label ids (min {lo}); label ids must be 0 (background) or positive.")
    return arr.astype(label_dtype(int(hi)), copy=False)


def _same_grid(a: Volume, b: Volume) -> bool:
    if a.shape != b.shape:
        return False
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        return False
    if not np.allclose(a.direction, b.direction, atol=_DIRECTION_ATOL, rtol=0):
        return False
    tol = _ORIGIN_TOL_VOXELS * float(min(sa.min(), sb.min()))
    return bool(np.all(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) <= tol))


def grid_difference(a: Volume, b: Volume) -> str:
    """What differs between the grids of ``a`` and ``b`` (the image), in words: e.g.
    ``"origin (400, 400, 400) mm vs the image's (-10, 5, 30) mm"``; shape, spacing,
    origin and direction are compared with the tolerances of the same-grid test."""

    def fmt(v) -> str:
        return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"

    parts = []
    if a.shape != b.shape:
        parts.append(f"shape {a.shape} vs the image's {b.shape}")
    sa, sb = np.asarray(a.spacing, float), np.asarray(b.spacing, float)
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        parts.append(f"spacing {fmt(sa)} mm vs the image's {fmt(sb)} mm")
    tol = _ORIGIN_TOL_VOXELS * float(min(sa.min(), sb.min()))
    if np.any(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) > tol):
        parts.append(f"origin {fmt(a.origin)} mm vs the image's {fmt(b.origin)} mm")
    if not np.allclose(a.direction, b.direction, atol=_DIRECTION_ATOL, rtol=0):
        da, db = orientation_code(a.direction), orientation_code(b.direction)
        parts.append(f"direction {da} vs the image's {db}" if da != db else "a rotated direction (oblique) vs the image's")
    return ", ".join(parts) or "the same grid"


def read_labels(path: str | os.PathLike, like: Volume) -> Volume:
    """Read a label file and put it on ``like``'s grid (canonical LPS).

    Same grid (up to float rounding): taken as is. Another grid covering the same
    physical space (at least :data:`MIN_LABEL_COVERAGE` of the image's extent along each
    axis): nearest-neighbour resampled onto ``like``'s grid, and ``meta['notice']`` says
    so. Otherwise refused.

    Args:
        path: label file (or DICOM folder) with integer ids; float files with whole-number
            values are accepted.
        like: the image the labels belong to.

    Returns:
        Volume with ``like``'s geometry and ``source`` (so writing restores the image's
        file layout) and an integer (Z, Y, X) array in the narrowest type.

    Raises:
        InputError: unreadable file, non-integral or negative values, or a grid that does
            not cover the image. (DICOM SEG and RTSTRUCT objects are read one layer up, by
            :func:`napari_propseg.formats.read_labels`, which falls back to this function.)
    """
    p = Path(path).expanduser()
    img, meta = _read_sitk(p, None)
    lab = _canonicalize(img, str(p), meta)
    what = f"Label file {p}"
    arr = _as_label_array(lab.array, what)
    out = like.like(np.zeros(like.shape, dtype=arr.dtype))
    out.path = str(p)
    out.meta = {"label_source": {"orientation": lab.orientation, "shape": lab.shape, "spacing": lab.spacing}}
    if _same_grid(lab, like):
        out.array = arr
        if lab.orientation != like.orientation:
            log.info("%s is stored as %s, the image as %s: reoriented without resampling", p, lab.orientation, like.orientation)
        return out

    lo_i, hi_i = like.physical_bounds()
    lo_l, hi_l = lab.physical_bounds()
    extent = hi_i - lo_i
    overlap = np.clip(np.minimum(hi_i, hi_l) - np.maximum(lo_i, lo_l), 0, None)
    coverage = overlap / np.maximum(extent, 1e-9)
    if np.any(coverage < MIN_LABEL_COVERAGE):
        raise InputError(
            f"{what} is on another grid ({grid_difference(lab, like)}) and covers only "
            f"{100 * float(coverage.min()):.0f}% of the image's extent along one axis; "
            "use a label file drawn on this image."
        )
    label_img = lab.to_sitk(arr)
    ref = like.to_sitk(np.zeros(like.shape, dtype=np.uint8))
    res = sitk.Resample(label_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_img.GetPixelID())
    out.array = sitk.GetArrayFromImage(res).astype(arr.dtype, copy=False)
    notice = (
        f"{what} is on another grid (shape {lab.shape}, spacing "
        f"{tuple(round(s, 3) for s in lab.spacing)} mm) than the image (shape {like.shape}, spacing "
        f"{tuple(round(s, 3) for s in like.spacing)} mm); it was resampled onto the image grid with nearest neighbour."
    )
    log.warning(notice)
    out.meta["notice"] = notice
    return out
