"""A deterministic, procedural abdominal CT phantom with FLARE-style organ labels.

The phantom is the project's sample data, the default input of the main job and the
fixture of many tests, so it is built to look like a contrast-enhanced (portal-venous)
abdominal CT and to behave like one along z: organs appear, grow, drift, deform, split
into several pieces and vanish at different levels, differently for every seed.

How it is built:

* Anatomy lives in normalised coordinates. In-plane, ``u = x / S`` and ``v = y / S`` with
  ``S`` half the smaller in-plane field of view in mm, so shapes are round in millimetres
  whatever the (anisotropic) spacing and the same anatomy fills any field of view; ``u``
  runs toward the patient's left, ``v`` toward posterior (canonical LPS). Along z,
  ``t = (k + 0.5) / Z`` runs from 0 (most inferior slice, lower abdomen) to 1 (lung bases
  and liver dome), so every volume covers the same anatomical range.
* Every organ is an implicit shape (a super-ellipse whose radius is modulated by a few
  angular harmonics) whose centre, semi-axes, rotation and harmonics are smooth functions
  of ``t`` (an ellipsoid-like envelope times random low-frequency wobbles). Each slice
  evaluates the shapes on coordinate grids restricted to their bounding boxes and paints a
  tissue map and a label map in anatomical order; the labels are therefore mutually
  exclusive and exactly consistent with the tissue that produced the intensities.
* Intensities: a per-tissue HU look-up, per-tissue texture (smoothed 3-D noise),
  curvilinear vessels in liver and lungs, bowel loops with gas, a slight partial-volume
  blur and spatially correlated quantum noise. Air outside the body is -1000 HU.

Example:
    >>> from napari_propseg.phantom import make_phantom, PHANTOM_LABELS
    >>> ct, lab = make_phantom((24, 64, 64), (10.0, 4.8, 4.8), seed=1)
    >>> ct.array.shape, ct.array.dtype.name, lab.array.dtype.name
    ((24, 64, 64), 'int16', 'uint8')
    >>> sorted(set(lab.array.ravel().tolist()) - {0}) == sorted(PHANTOM_LABELS)
    True
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io import Volume
from ..progress import CancelFn, ProgressFn, check_cancel, report
from .anatomy import _Anatomy, _build_anatomy  # noqa: F401
from .paint import _paint_slice, _remove_specks  # noqa: F401
from .shapes import (  # noqa: F401
    _BLUR_MM, _CHUNK, _COARSE_MM, _DEFAULT_FOV_MM, _HU_LUT, _MIN_PIECE_MM2, _NOISE_HU, _T, _TEX_LUT, _TEXTURE_MM,
    _TISSUES, _VERTEBRA_PERIOD, AORTA, GALLBLADDER, IVC, KIDNEY_L, KIDNEY_R, LIVER, PANCREAS, PHANTOM_LABELS,
    SPLEEN, STOMACH, VERTEBRAE, _Blob, _blob_field, _blob_window, _CoarseField, _envelope, _gauss_noise_gain,
    _Grid, _make_blob, _paint, _ramp, _wobble,
)

log = logging.getLogger(__name__)

__all__ = ["PHANTOM_LABELS", "make_phantom", "LIVER", "KIDNEY_R", "SPLEEN", "PANCREAS", "AORTA", "IVC", "GALLBLADDER",
           "STOMACH", "KIDNEY_L", "VERTEBRAE"]


# ----------------------------------------------------------------------------- public
def _check_args(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    try:
        shp = tuple(int(s) for s in shape)
        spc = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"Phantom shape {shape!r} / spacing {spacing!r} must be three numbers each "
                         f"(Z Y X voxels, sz sy sx mm).") from None
    if len(shp) != 3 or len(spc) != 3:
        raise InputError(f"Phantom shape {shp} and spacing {spc} must have three entries each (Z, Y, X); "
                         f"pass e.g. --shape 96 256 256 --spacing 2.5 1.2 1.2.")
    if min(shp) < 8 or shp[1] < 32 or shp[2] < 32:
        raise InputError(f"Phantom shape {shp} is too small; use at least 8 slices of 32 x 32 voxels.")
    if np.prod(shp, dtype=np.int64) > 1024 * 1024 * 1024:
        raise InputError(f"Phantom shape {shp} has more than 2**30 voxels; choose a smaller shape.")
    if not all(np.isfinite(spc)) or min(spc) <= 0 or max(spc) > 50:
        raise InputError(f"Phantom spacing {spc} must be positive millimetres (at most 50); "
                         f"pass e.g. --spacing 2.5 1.2 1.2.")
    return shp, spc


def make_phantom(
    shape: Sequence[int] = (96, 256, 256),
    spacing: Sequence[float] = (2.5, 1.2, 1.2),
    seed: int = 0,
    *,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> tuple[Volume, Volume]:
    """Make a synthetic contrast-enhanced abdominal CT and its organ labels.

    Args:
        shape: (Z, Y, X) voxels. The volume always spans the same anatomy, from the lower
            abdomen (slice 0) to the lung bases and liver dome (last slice); in-plane, the
            body fills about 85 % of the smaller field of view.
        spacing: (sz, sy, sx) in mm. Shapes are defined in millimetres, so anisotropic
            voxels do not distort them.
        seed: seed of the numpy Generator; the same (shape, spacing, seed) always gives
            identical arrays, another seed another patient (organ positions, sizes,
            z-extents, shapes, texture and noise).
        progress: optional ``(step, total, message)`` callback, called once per slice.
        cancel: optional callable; returning True stops the job with
            :class:`napari_propseg.errors.CancelledError`.

    Returns:
        ``(ct, labels)``: two canonical-LPS :class:`~napari_propseg.io.Volume` objects on
        the same grid; ``ct.array`` (Z, Y, X) int16 HU (air -1000), ``labels.array``
        (Z, Y, X) uint8 with the ids of :data:`PHANTOM_LABELS` (0 background). The image
        is centred on x = y = 0; ``meta`` holds the seed and the label names.

    Raises:
        InputError: a shape or spacing that is not three sensible numbers.
    """
    shp, spc = _check_args(shape, spacing)
    Z, Y, X = shp
    sz, sy, sx = spc
    rng = np.random.default_rng(seed)
    total = Z + 2

    scale_mm = 0.5 * min(Y * sy, X * sx)  # normalised unit in mm
    u = ((np.arange(X) - (X - 1) / 2) * sx / scale_mm).astype(np.float32)
    v = ((np.arange(Y) - (Y - 1) / 2) * sy / scale_mm).astype(np.float32)
    grid = _Grid(u, v)
    U, V = u[None, :], v[:, None]
    t = (np.arange(Z) + 0.5) / Z

    an = _build_anatomy(rng, t)
    bowel = _CoarseField(rng, shp, spc, cell_mm=_COARSE_MM * scale_mm / (0.5 * _DEFAULT_FOV_MM))
    vessels = _CoarseField(rng, shp, spc, cell_mm=1.6 * _COARSE_MM * scale_mm / (0.5 * _DEFAULT_FOV_MM))
    min_size = 0.5 * min(sx, sy) / scale_mm
    min_px = max(3, int(round(_MIN_PIECE_MM2 / (sx * sy))))

    tissue = np.empty(shp, np.uint8)
    labels = np.empty(shp, np.uint8)
    for k in range(Z):
        check_cancel(cancel)
        tissue[k], labels[k] = _paint_slice(k, an, grid, U, V, bowel.slice(k), vessels.slice(k), min_size, min_px)
        report(progress, k + 1, total, f"phantom: slice {k + 1}/{Z}")

    # --- intensities: HU look-up + per-tissue texture (smoothed 3-D noise)
    check_cancel(cancel)
    sig_tex = (_TEXTURE_MM / sz, _TEXTURE_MM / sy, _TEXTURE_MM / sx)
    tex = rng.standard_normal(shp, dtype=np.float32)
    tex = ndimage.gaussian_filter(tex, sig_tex, output=tex, mode="nearest")
    tex *= np.float32(1.0 / _gauss_noise_gain(sig_tex))
    hu = _HU_LUT[tissue]
    for z0 in range(0, Z, _CHUNK):  # chunked to keep the peak memory low
        c = slice(z0, z0 + _CHUNK)
        hu[c] += _TEX_LUT[tissue[c]] * tex[c]
    del tex
    report(progress, Z + 1, total, "phantom: texture")

    # --- partial-volume blur with correlated quantum noise (added before the blur and
    # scaled so that its standard deviation after the blur is _NOISE_HU)
    check_cancel(cancel)
    sig_pv = (0.35 / sz if sz < 1.0 else 0.0, max(_BLUR_MM / sy, 0.5), max(_BLUR_MM / sx, 0.5))
    noise_scale = np.float32(_NOISE_HU / _gauss_noise_gain(sig_pv))
    for z0 in range(0, Z, _CHUNK):
        c = slice(z0, z0 + _CHUNK)
        hu[c] += noise_scale * rng.standard_normal(hu[c].shape, dtype=np.float32)
    hu = ndimage.gaussian_filter(hu, sig_pv, output=hu, mode="nearest")
    np.clip(hu, -1024, 3071, out=hu)
    ct = np.rint(hu, out=hu).astype(np.int16)
    del hu
    report(progress, total, total, "phantom: done")

    origin = (-(X - 1) / 2 * sx, -(Y - 1) / 2 * sy, -(Z - 1) / 2 * sz)
    meta = {"phantom_seed": int(seed), "label_names": dict(PHANTOM_LABELS), "modality": "CT"}
    log.debug("phantom %s spacing %s seed %d: labels %s", shp, spc, seed, np.unique(labels).tolist())
    return (Volume.from_array(ct, spc, origin, meta=dict(meta)),
            Volume.from_array(labels, spc, origin, meta=dict(meta)))
