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
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import Volume
from .labelmap import FLARE_NAMES
from .progress import CancelFn, ProgressFn, check_cancel, report

log = logging.getLogger(__name__)

#: Label ids the phantom paints -> FLARE names (plus 14 vertebrae).
PHANTOM_LABELS: dict[int, str] = {i: FLARE_NAMES[i] for i in (1, 2, 3, 4, 5, 6, 9, 11, 13, 14)}

LIVER, KIDNEY_R, SPLEEN, PANCREAS, AORTA, IVC, GALLBLADDER, STOMACH, KIDNEY_L, VERTEBRAE = (
    1, 2, 3, 4, 5, 6, 9, 11, 13, 14)

# ----------------------------------------------------------------------------- tissues
# (name, mean HU, texture amplitude in HU). The index is the tissue id.
_TISSUES: list[tuple[str, float, float]] = [
    ("air", -1000.0, 0.0),
    ("fat", -100.0, 8.0),
    ("muscle", 50.0, 9.0),
    ("skin", 30.0, 8.0),
    ("liver", 60.0, 7.0),
    ("liver_vessel", 135.0, 10.0),
    ("spleen", 52.0, 6.0),
    ("kidney_cortex", 155.0, 10.0),
    ("kidney_medulla", 85.0, 10.0),
    ("renal_sinus", -70.0, 20.0),
    ("renal_pelvis", 15.0, 6.0),
    ("aorta", 205.0, 8.0),
    ("ivc", 120.0, 8.0),
    ("cortical_bone", 800.0, 120.0),
    ("cancellous_bone", 210.0, 45.0),
    ("disc", 90.0, 10.0),
    ("csf", 12.0, 6.0),
    ("stomach_wall", 55.0, 8.0),
    ("stomach_fluid", 12.0, 5.0),
    ("gas", -900.0, 35.0),
    ("pancreas", 42.0, 16.0),
    ("gallbladder", 10.0, 4.0),
    ("lung", -850.0, 30.0),
    ("lung_vessel", -150.0, 60.0),
    ("bowel", 35.0, 12.0),
    ("table", -250.0, 25.0),
    ("table_shell", 150.0, 30.0),
    ("rib_marrow", 260.0, 50.0),
    ("iliac_vessel", 180.0, 8.0),
    ("endplate", 430.0, 60.0),
    ("heart_blood", 150.0, 8.0),
]
_T = {name: i for i, (name, _, _) in enumerate(_TISSUES)}
_HU_LUT = np.array([hu for _, hu, _ in _TISSUES], dtype=np.float32)
_TEX_LUT = np.array([amp for _, _, amp in _TISSUES], dtype=np.float32)

#: Physical scales (mm) of the image model.
_TEXTURE_MM = 1.6       # correlation length of parenchymal texture
_BLUR_MM = 0.55         # partial-volume / reconstruction blur (in-plane)
_NOISE_HU = 13.0        # quantum noise standard deviation after the blur
_COARSE_MM = 7.0        # cell size of the coarse fields (bowel loops, vessels)
_CHUNK = 16             # slices per chunk in the intensity passes
_MIN_PIECE_MM2 = 25.0    # organ fragments smaller than this (per slice) are removed
_VERTEBRA_PERIOD = 0.14  # vertebral level (body + disc) as a fraction of the z range
_DEFAULT_FOV_MM = 307.2  # in-plane field of view the anatomy below was tuned for


# ----------------------------------------------------------------------------- helpers
def _wobble(rng: np.random.Generator, t: np.ndarray, amp: float, n: int = 3,
            fmin: float = 0.4, fmax: float = 2.2) -> np.ndarray:
    """Smooth random function of ``t`` (sum of ``n`` sinusoids), peak amplitude ~``amp``.

    Args:
        t: (Z,) normalised z positions.

    Returns:
        (Z,) float64.
    """
    freqs = rng.uniform(fmin, fmax, n)
    phases = rng.uniform(0.0, 2 * np.pi, n)
    weights = rng.uniform(0.5, 1.0, n)
    weights = weights / weights.sum()
    return amp * np.sum(weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None]), axis=0)


def _envelope(t: np.ndarray, t0: float, t1: float, peak: float = 0.5, power: float = 0.5) -> np.ndarray:
    """Size profile of an organ along z: 0 outside (t0, t1), 1 at its widest level.

    ``sin(pi * s**g) ** power`` with ``s`` the position inside the organ's extent and
    ``g`` chosen so that the maximum sits at ``peak``; ``power`` 0.5 gives the rounded
    poles of an ellipsoid.
    """
    s = (t - t0) / max(t1 - t0, 1e-6)
    inside = (s > 0) & (s < 1)
    g = math.log(0.5) / math.log(min(max(peak, 0.05), 0.95))
    out = np.zeros_like(t)
    out[inside] = np.sin(np.pi * s[inside] ** g) ** power
    return out


def _ramp(t: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Smoothstep from 0 (t <= t0) to 1 (t >= t1); ``t1 < t0`` gives a falling step."""
    s = np.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    return s * s * (3 - 2 * s)


@dataclass
class _Blob:
    """An organ part: a harmonically deformed super-ellipse whose parameters vary with z.

    All arrays are (Z,); ``harm`` is (M, Z) amplitudes of angular harmonics 2..M+1 and
    ``phase`` (M, Z) their phases. ``scale`` multiplies both semi-axes (0 = absent).
    """

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    scale: np.ndarray
    harm: np.ndarray
    phase: np.ndarray
    power: float = 2.0

    def present(self, k: int, min_size: float) -> bool:
        return bool(self.scale[k] * min(self.a[k], self.b[k]) > min_size)

    def extent(self, k: int) -> float:
        return float(self.scale[k] * max(self.a[k], self.b[k]) * (1.0 + np.abs(self.harm[:, k]).sum()) + 1e-3)


def _make_blob(rng: np.random.Generator, t: np.ndarray, *, cx, cy, a, b, theta=0.0, scale,
               harm_amp: float = 0.06, n_harm: int = 3, jitter_c: float = 0.02,
               wob_c: float = 0.015, wob_ab: float = 0.06, wob_theta: float = 0.08,
               power: float = 2.0) -> _Blob:
    """Build a :class:`_Blob` with per-seed jitter and smooth per-slice wobbles.

    ``cx, cy, a, b, theta`` may be scalars or (Z,) arrays (the deterministic anatomy);
    jitter and wobble are added on top.
    """
    z = t.shape[0]

    def arr(x):
        return np.broadcast_to(np.asarray(x, dtype=np.float64), (z,)).copy()

    cx = arr(cx) + rng.normal(0, jitter_c) + _wobble(rng, t, wob_c)
    cy = arr(cy) + rng.normal(0, jitter_c) + _wobble(rng, t, wob_c)
    a = arr(a) * rng.uniform(0.9, 1.1) * (1 + _wobble(rng, t, wob_ab))
    b = arr(b) * rng.uniform(0.9, 1.1) * (1 + _wobble(rng, t, wob_ab))
    theta = arr(theta) + rng.normal(0, 0.08) + _wobble(rng, t, wob_theta)
    harm = np.stack([np.abs(_wobble(rng, t, harm_amp / (m + 1), fmin=0.3, fmax=1.5)) + harm_amp * 0.15
                     for m in range(n_harm)])
    phase = np.stack([rng.uniform(0, 2 * np.pi) + _wobble(rng, t, 1.5, fmin=0.3, fmax=1.2)
                      for _ in range(n_harm)])
    return _Blob(cx, cy, a, b, theta, arr(scale), harm, phase, power)


class _Grid:
    """Normalised coordinates of one axial slice: ``u`` (X,) and ``v`` (Y,), increasing."""

    def __init__(self, u: np.ndarray, v: np.ndarray):
        self.u = u
        self.v = v
        self.du = float(u[1] - u[0]) if u.size > 1 else 1.0
        self.dv = float(v[1] - v[0]) if v.size > 1 else 1.0

    def window(self, cx: float, cy: float, rx: float, ry: float):
        """Index window covering the box ``[cx-rx, cx+rx] x [cy-ry, cy+ry]``.

        Returns:
            ``(sy, sx, U, V)``: slices into the (Y, X) slice, U (1, nx) and V (ny, 1)
            coordinates, or None when the box misses the slice.
        """
        x0, x1 = np.searchsorted(self.u, [cx - rx, cx + rx])
        y0, y1 = np.searchsorted(self.v, [cy - ry, cy + ry])
        x0, y0 = max(x0 - 1, 0), max(y0 - 1, 0)
        x1, y1 = min(x1 + 1, self.u.size), min(y1 + 1, self.v.size)
        if x1 <= x0 or y1 <= y0:
            return None
        return (slice(y0, y1), slice(x0, x1), self.u[None, x0:x1], self.v[y0:y1, None])


def _blob_field(blob: _Blob, k: int, U: np.ndarray, V: np.ndarray, *, dx: float = 0.0, dy: float = 0.0,
                grow: float = 1.0):
    """Normalised implicit value of ``blob`` at slice ``k``: < 1 inside.

    Args:
        U, V: broadcastable coordinate grids (1, nx) and (ny, 1).
        dx, dy: offset of the centre along the blob's own (rotated) axes, in units of
            its semi-axes.
        grow: factor on the semi-axes.

    Returns:
        ``(f, xl, yl)``: (ny, nx) implicit value and local coordinates in semi-axis units.
    """
    c, s = math.cos(blob.theta[k]), math.sin(blob.theta[k])
    a = blob.a[k] * blob.scale[k] * grow
    b = blob.b[k] * blob.scale[k] * grow
    x = U - blob.cx[k]
    y = V - blob.cy[k]
    xl = (x * c + y * s) / a - dx
    yl = (-x * s + y * c) / b - dy
    p = blob.power
    if p == 2.0:
        rho = np.sqrt(xl * xl + yl * yl)
    else:
        rho = (np.abs(xl) ** p + np.abs(yl) ** p) ** (1.0 / p)
    phi = np.arctan2(yl, xl)
    r = np.ones_like(rho)
    for m in range(blob.harm.shape[0]):
        r += blob.harm[m, k] * np.cos((m + 2) * phi + blob.phase[m, k])
    return rho / r, xl, yl


def _blob_window(grid: _Grid, blob: _Blob, k: int, pad: float = 1.0):
    e = blob.extent(k) * pad
    return grid.window(blob.cx[k], blob.cy[k], e, e)


class _CoarseField:
    """Smooth random 3-D field on a coarse grid (cell ``_COARSE_MM``), unit variance,
    sampled per slice by linear interpolation (cheap at any resolution)."""

    def __init__(self, rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                 cell_mm: float = _COARSE_MM, sigma_cells: float = 1.0):
        zz, yy, xx = shape
        sz, sy, sx = spacing
        cz = max(cell_mm, sz)  # never finer than a slice in z
        n = (int(math.ceil(zz * sz / cz)) + 4, int(math.ceil(yy * sy / cell_mm)) + 4,
             int(math.ceil(xx * sx / cell_mm)) + 4)
        f = ndimage.gaussian_filter(rng.standard_normal(n).astype(np.float32), sigma_cells, mode="wrap")
        self.f = f / max(float(f.std()), 1e-6)
        # fractional coarse indices of every voxel row / column / slice
        self.zi = np.arange(zz) * sz / cz + 1.5
        self.yi = np.arange(yy) * sy / cell_mm + 1.5
        self.xi = np.arange(xx) * sx / cell_mm + 1.5
        self._y0 = np.floor(self.yi).astype(int)
        self._x0 = np.floor(self.xi).astype(int)
        self._wy = (self.yi - self._y0).astype(np.float32)[:, None]
        self._wx = (self.xi - self._x0).astype(np.float32)[None, :]

    def slice(self, k: int) -> np.ndarray:
        """(Y, X) float32 field at slice ``k``."""
        z0 = int(self.zi[k])
        wz = np.float32(self.zi[k] - z0)
        plane = (1 - wz) * self.f[z0] + wz * self.f[z0 + 1]
        y0, x0 = self._y0, self._x0
        top = plane[y0][:, x0] * (1 - self._wx) + plane[y0][:, x0 + 1] * self._wx
        bot = plane[y0 + 1][:, x0] * (1 - self._wx) + plane[y0 + 1][:, x0 + 1] * self._wx
        return top * (1 - self._wy) + bot * self._wy


def _paint(tissue: np.ndarray, labels: np.ndarray, win, mask: np.ndarray, tissue_id: int, label_id: int | None):
    """Paint ``mask`` (window-sized) into the slice's tissue and label maps.

    ``label_id`` None leaves the labels untouched (sub-structures inside an organ).
    """
    sy, sx = win[0], win[1]
    if not mask.any():
        return
    tissue[sy, sx][mask] = tissue_id
    if label_id is not None:
        labels[sy, sx][mask] = label_id


def _gauss_noise_gain(sigmas: Sequence[float], truncate: float = 4.0) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter(sigma=sigmas)``."""
    g = 1.0
    for s in sigmas:
        if s <= 0:
            continue
        r = int(truncate * s + 0.5)
        x = np.arange(-r, r + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / s) ** 2)
        w /= w.sum()
        g *= float(np.sqrt(np.sum(w * w)))
    return g


# ----------------------------------------------------------------------------- anatomy
@dataclass
class _Anatomy:
    """All per-slice parameters of one phantom (arrays are (Z,))."""

    t: np.ndarray
    body_cx: np.ndarray | None = None
    body_cy: np.ndarray | None = None
    body_a: np.ndarray | None = None
    body_b_ant: np.ndarray | None = None
    body_b_post: np.ndarray | None = None
    fat: np.ndarray | None = None
    muscle: float = 0.045
    spine_u: np.ndarray | None = None
    spine_v: np.ndarray | None = None
    spine_a: np.ndarray | None = None
    spine_b: np.ndarray | None = None
    vert_phase: float = 0.0
    vert_period: float = _VERTEBRA_PERIOD
    blobs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _build_anatomy(rng: np.random.Generator, t: np.ndarray) -> _Anatomy:
    an = _Anatomy(t=t)
    J = lambda s: rng.normal(0.0, s)  # noqa: E731  (small per-seed jitter)

    # --- body outline: wider and deeper toward the chest, flat back, soft belly
    an.body_cx = _wobble(rng, t, 0.012)
    an.body_cy = 0.03 + _wobble(rng, t, 0.012)
    an.body_a = (0.84 + J(0.03)) * (1 + 0.05 * t + _wobble(rng, t, 0.025))
    an.body_b_ant = (0.56 + J(0.03)) * (1 + 0.06 * _ramp(t, 0.5, 1.0) + _wobble(rng, t, 0.03))
    an.body_b_post = (0.60 + J(0.015)) * (1 + _wobble(rng, t, 0.01))
    an.fat = np.clip(0.11 + J(0.025) + _wobble(rng, t, 0.015), 0.05, 0.2)
    an.muscle = 0.045 + abs(J(0.005))

    # --- spine: vertebral body centre, slight lordosis (more anterior low down)
    an.spine_u = _wobble(rng, t, 0.012, n=2)
    an.spine_v = 0.27 - 0.05 * (1 - t) + J(0.01)
    an.spine_a = (0.125 + J(0.006)) * (1 + 0.18 * (1 - t))
    an.spine_b = (0.105 + J(0.005)) * (1 + 0.12 * (1 - t))
    an.vert_phase = rng.uniform(0, 1)
    an.vert_period = _VERTEBRA_PERIOD * rng.uniform(0.93, 1.07)

    B = an.blobs
    # --- liver: big right lobe (posterolateral tip low, dome high), left lobe crossing
    # the midline anteriorly, whose lower part is a separate piece (ligamentum teres
    # fissure): the liver splits into two components on its lower left-lobe slices.
    lt0, lt1 = 0.40 + J(0.025), 0.99 + J(0.01)
    s = np.clip((t - lt0) / (lt1 - lt0), 0, 1)
    B["liver_r"] = _make_blob(rng, t, cx=-0.44 + 0.14 * s, cy=0.12 - 0.22 * s, a=0.36, b=0.40,
                              theta=-0.35 + 0.3 * s, scale=_envelope(t, lt0, lt1, peak=0.6, power=0.45),
                              harm_amp=0.08)
    llt0, llt1 = lt0 + 0.19 + J(0.02), lt1 - 0.04 + J(0.01)
    s2 = np.clip((t - llt0) / (llt1 - llt0), 0, 1)
    B["liver_l"] = _make_blob(rng, t, cx=0.13 + 0.04 * s2, cy=-0.33 + 0.06 * s2, a=0.27, b=0.13,
                              theta=-0.3, scale=_envelope(t, llt0, llt1, peak=0.7, power=0.5), harm_amp=0.07)
    an.extra["fissure_top"] = llt0 + 0.22 * (llt1 - llt0)
    # --- gallbladder under the liver, anterior-right
    gt0 = lt0 + 0.03 + J(0.015)
    gt1 = gt0 + 0.12 + J(0.01)
    B["gallbladder"] = _make_blob(rng, t, cx=-0.22, cy=-0.3, a=0.065, b=0.1, theta=0.6,
                                  scale=_envelope(t, gt0, gt1, peak=0.35, power=0.5), harm_amp=0.03)
    # --- spleen: posterolateral left crescent
    st0, st1 = 0.60 + J(0.03), 0.90 + J(0.02)
    s3 = np.clip((t - st0) / (st1 - st0), 0, 1)
    B["spleen"] = _make_blob(rng, t, cx=0.54 - 0.03 * s3, cy=0.22 - 0.14 * s3, a=0.16, b=0.27, theta=0.6,
                             scale=_envelope(t, st0, st1, peak=0.5, power=0.5), harm_amp=0.06)
    # --- stomach: fundus/body high on the left, antrum lower crossing to the right
    sb0, sb1 = 0.64 + J(0.02), 0.92 + J(0.015)
    s4 = np.clip((t - sb0) / (sb1 - sb0), 0, 1)
    B["stomach_body"] = _make_blob(rng, t, cx=0.30 - 0.04 * s4, cy=-0.18 + 0.12 * s4, a=0.19, b=0.16, theta=0.4,
                                   scale=_envelope(t, sb0, sb1, peak=0.45, power=0.5), harm_amp=0.07)
    sa0, sa1 = sb0 - 0.1 + J(0.015), sb0 + 0.05
    s5 = np.clip((t - sa0) / (sa1 - sa0), 0, 1)
    B["stomach_antrum"] = _make_blob(rng, t, cx=-0.02 + 0.2 * s5, cy=-0.36 + 0.05 * s5, a=0.14, b=0.065,
                                     theta=-0.15, scale=_envelope(t, sa0, sa1, peak=0.5, power=0.5), harm_amp=0.04)
    an.extra["gas_frac"] = rng.uniform(0.2, 0.45)  # fraction of the lumen depth filled with gas
    # --- pancreas: oblique band, head low near the IVC, tail high near the spleen
    pt0 = 0.50 + J(0.02)
    pt1 = pt0 + 0.14 + J(0.01)
    an.extra["pancreas"] = dict(t0=pt0, t1=pt1, dv=J(0.02), bend=0.55 + J(0.08), w=0.045 + abs(J(0.006)),
                                wob=_wobble(rng, t, 0.015), lob=rng.uniform(0, 2 * np.pi, 2))
    # --- kidneys: right lower than left; poles split into two lobules
    for name, side, k0 in (("kidney_r", -1, 0.22), ("kidney_l", 1, 0.28)):
        t0 = k0 + J(0.025)
        t1 = t0 + 0.37 + J(0.02)
        sk = np.clip((t - t0) / (t1 - t0), 0, 1)
        kw = dict(cx=side * (0.37 + 0.04 * (1 - sk)), cy=0.21 - 0.03 * (1 - sk), a=0.18, b=0.12,
                  theta=side * (-0.75 - 0.2 * (1 - sk)), harm_amp=0.03, wob_c=0.008)
        split_len = 0.08 + rng.uniform(0.0, 0.04)
        main0 = t0 + split_len * (t1 - t0)
        B[name] = _make_blob(rng, t, scale=_envelope(t, main0, t1, peak=0.5, power=0.5), **kw)
        lob = _envelope(t, t0, t0 + 3.2 * split_len * (t1 - t0), peak=0.45, power=0.5)
        B[name + "_lobe"] = _make_blob(rng, t, scale=lob, **{**kw, "a": 0.08, "b": 0.085, "harm_amp": 0.02})
        an.extra[name] = dict(t0=t0, t1=t1, side=side, sep=rng.uniform(0.95, 1.15))
    # --- psoas: appear mid-abdomen, grow inferiorly
    an.extra["psoas_top"] = 0.55 + J(0.02)
    # --- vessels
    tb = 0.12 + J(0.02)
    an.extra["aorta"] = dict(tb=tb, u=0.065 + J(0.01) + _wobble(rng, t, 0.02, n=2),
                             v=-0.055 + J(0.01) + _wobble(rng, t, 0.01, n=2) + 0.08 * _ramp(t, 0.8, 1.0),
                             r=(0.066 + J(0.004)) * (0.88 + 0.12 * t))
    an.extra["ivc"] = dict(tb=tb - 0.04, top=lt1 - 0.05 + J(0.01),
                           u=-0.13 + J(0.01) + _wobble(rng, t, 0.02, n=2) + 0.03 * _ramp(t, 0.75, 0.95),
                           v=-0.04 + J(0.01) + _wobble(rng, t, 0.01, n=2) - 0.11 * _ramp(t, 0.68, 0.92),
                           a=0.085 * (1 + _wobble(rng, t, 0.12)), b=0.052 * (1 + _wobble(rng, t, 0.2)),
                           theta=0.2 + _wobble(rng, t, 0.2))
    # --- lungs: posterior recesses first, growing toward the top slice
    lu0 = 0.80 + J(0.02)
    for name, side in (("lung_r", -1), ("lung_l", 1)):
        sl = np.clip((t - lu0) / (1.0 - lu0), 0, 1)
        B[name] = _make_blob(rng, t, cx=side * (0.42 - 0.05 * sl), cy=0.3 - 0.3 * sl, a=0.42, b=0.45,
                             theta=side * 0.4, scale=_ramp(t, lu0, lu0 + 0.17) * (t > lu0), harm_amp=0.05)
    # --- heart: apex and ventricles appear above the dome, anterior and left of midline
    he0 = 0.90 + J(0.015)
    B["heart"] = _make_blob(rng, t, cx=0.1, cy=-0.2, a=0.3, b=0.22, theta=0.5,
                            scale=_envelope(t, he0, he0 + 0.35, peak=0.5, power=0.5), harm_amp=0.04)
    # --- colon: ascending (right) and descending (left) with gas, lower abdomen
    for name, side in (("colon_r", -1), ("colon_l", 1)):
        ct0 = 0.0
        ct1 = (0.55 if side < 0 else 0.72) + J(0.03)
        B[name] = _make_blob(rng, t, cx=side * 0.55, cy=-0.05 + 0.05 * side, a=0.1, b=0.09,
                             scale=_envelope(t, ct0 - 0.3, ct1, peak=0.7, power=0.3), harm_amp=0.1)
    an.extra["bowel_top"] = 0.64 + J(0.02)
    # --- ribs: angles (from the lateral direction) of the lower ribs' cross sections
    an.extra["ribs"] = dict(offsets=rng.uniform(0, 1, 2), period=0.115 + J(0.006))
    return an


# ----------------------------------------------------------------------------- painting
def _paint_slice(k: int, an: _Anatomy, grid: _Grid, U: np.ndarray, V: np.ndarray,
                 bowel_f: np.ndarray, vessel_f: np.ndarray, min_size: float, min_px: int):
    """Tissue and label maps of slice ``k``: two (Y, X) uint8 arrays."""
    t = an.t[k]
    ny, nx = grid.v.size, grid.u.size
    tissue = np.zeros((ny, nx), np.uint8)
    labels = np.zeros((ny, nx), np.uint8)
    full = (slice(0, ny), slice(0, nx))
    B = an.blobs

    # --- body: super-ellipse with a deeper belly than back
    du = (U - an.body_cx[k]) / an.body_a[k]
    dvv = V - an.body_cy[k]
    dv = dvv / np.where(dvv < 0, an.body_b_ant[k], an.body_b_post[k])
    rho = (np.abs(du) ** 2.4 + np.abs(dv) ** 2.4) ** (1 / 2.4)
    body = rho < 1.0
    inner_fat = 1.0 - an.fat[k]
    cavity_r = inner_fat - an.muscle
    # rectus abdominis: the wall is thicker anteriorly near the midline
    rectus = an.muscle * 1.2 * np.exp(-((U - an.body_cx[k]) / 0.2) ** 2) * (dvv < 0)
    cavity = rho < cavity_r - rectus
    # CT table under the patient
    v_tab = an.body_cy[k] + an.body_b_post[k] + 0.06
    tab_c = v_tab + 0.12 * U ** 2
    table = (V > tab_c) & (V < tab_c + 0.06) & (np.abs(U) < 0.95) & ~body
    _paint(tissue, labels, full, table, _T["table"], 0)
    _paint(tissue, labels, full, table & ((V < tab_c + 0.008) | (V > tab_c + 0.052)), _T["table_shell"], 0)
    _paint(tissue, labels, full, body, _T["fat"], 0)
    _paint(tissue, labels, full, body & (rho > 0.985), _T["skin"], 0)
    wall = (rho < inner_fat) & ~cavity
    _paint(tissue, labels, full, wall, _T["muscle"], 0)
    # linea alba: thin fat gap in the anterior wall
    _paint(tissue, labels, full, wall & (np.abs(U - an.body_cx[k]) < 0.012) & (dvv < 0), _T["fat"], 0)

    def blob_paint(name, tissue_id, label_id, clip=cavity, grow=1.0, dx=0.0, dy=0.0):
        blob = B[name]
        if not blob.present(k, min_size):
            return None
        win = _blob_window(grid, blob, k, pad=grow * (1 + abs(dx) + abs(dy)))
        if win is None:
            return None
        f, xl, yl = _blob_field(blob, k, win[2], win[3], dx=dx, dy=dy, grow=grow)
        m = f < 1.0
        if clip is not None:
            m &= clip[win[0], win[1]]
        _paint(tissue, labels, win, m, tissue_id, label_id)
        return win, m, f, xl, yl

    # --- lungs (bases): lateral and posterior, inside the rib cage
    for name in ("lung_r", "lung_l"):
        res = blob_paint(name, _T["lung"], 0, clip=cavity & (np.abs(U) > 0.1))
        if res is not None:
            win, m, *_ = res
            vf = vessel_f[win[0], win[1]]
            _paint(tissue, labels, win, m & (np.abs(vf) < 0.05), _T["lung_vessel"], 0)
    res = blob_paint("heart", _T["fat"], 0, grow=1.12)
    if res is not None:
        win, m, f, *_ = res
        _paint(tissue, labels, win, m & (f < 1.0 / 1.12), _T["muscle"], 0)
        _paint(tissue, labels, win, m & (f < 0.7 / 1.12), _T["heart_blood"], 0)

    # --- small bowel loops (mesenteric fat between), with gas in some loops
    if t < an.extra["bowel_top"] + 0.06:
        w_top = _ramp(np.array([t]), an.extra["bowel_top"] + 0.06, an.extra["bowel_top"] - 0.04)[0]
        thr = 0.25 + 1.5 * (1 - w_top)
        region = cavity & (V < an.spine_v[k] - 0.05) & (rho < cavity_r - 0.02)
        loops = region & (bowel_f > thr)
        _paint(tissue, labels, full, loops, _T["bowel"], 0)
        _paint(tissue, labels, full, loops & (bowel_f > thr + 0.9) & (vessel_f > 0.3), _T["gas"], 0)
        _paint(tissue, labels, full, loops & (bowel_f > thr + 0.5) & (bowel_f < thr + 0.9) & (vessel_f < -0.6),
               _T["stomach_fluid"], 0)
    # colon with gas and stool
    for name in ("colon_r", "colon_l"):
        res = blob_paint(name, _T["bowel"], 0)
        if res is not None:
            win, m, f, xl, yl = res
            lumen = m & (f < 0.8)
            _paint(tissue, labels, win, lumen & (yl < 0.1), _T["gas"], 0)
            _paint(tissue, labels, win, lumen & (yl >= 0.1) & (bowel_f[win[0], win[1]] > -0.2), _T["gas"], 0)

    # --- liver: right + left lobe minus the ligamentum-teres fissure on low slices
    res_r = blob_paint("liver_r", _T["liver"], LIVER)
    res_l = blob_paint("liver_l", _T["liver"], LIVER)
    if res_l is not None and t < an.extra["fissure_top"]:
        win, m, f, xl, yl = res_l
        # fat gap along the right (medial) edge of the left lobe separates the pieces
        gap = (xl < -0.55) & (xl > -1.6) & cavity[win[0], win[1]]
        _paint(tissue, labels, win, gap & (labels[win[0], win[1]] == LIVER), _T["fat"], 0)
    for res in (res_r, res_l):
        if res is not None:
            win = res[0]
            sub_l = labels[win[0], win[1]] == LIVER
            vf = vessel_f[win[0], win[1]]
            _paint(tissue, labels, win, sub_l & (np.abs(vf) < 0.09), _T["liver_vessel"], None)
    blob_paint("gallbladder", _T["gallbladder"], GALLBLADDER)

    # --- spleen crescent (concave hilum facing anteromedially)
    res = blob_paint("spleen", _T["spleen"], SPLEEN)
    if res is not None:
        win, m, f, xl, yl = res
        g, _, _ = _blob_field(B["spleen"], k, win[2], win[3], dx=-1.25, dy=0.0, grow=0.6)
        hilum = m & (g < 1.0)
        _paint(tissue, labels, win, hilum, _T["fat"], 0)

    # --- stomach: wall, gas anteriorly (patient supine: gas rises to low v), fluid
    for name in ("stomach_body", "stomach_antrum"):
        res = blob_paint(name, _T["stomach_wall"], STOMACH)
        if res is not None:
            win, m, f, xl, yl = res
            lumen = m & (f < 0.8)
            blob = B[name]
            depth = blob.scale[k] * max(blob.a[k], blob.b[k])
            level = blob.cy[k] - depth * (1 - 2 * an.extra["gas_frac"])
            _paint(tissue, labels, win, lumen, _T["stomach_fluid"], None)
            _paint(tissue, labels, win, lumen & (win[3] < level), _T["gas"], None)

    # --- pancreas: curved band, head near the IVC, tail toward the splenic hilum
    P = an.extra["pancreas"]
    if P["t0"] < t < P["t1"]:
        s = (t - P["t0"]) / (P["t1"] - P["t0"])
        uc = -0.16 + 0.62 * s
        half = 0.08 + 0.22 * math.sin(math.pi * s) ** 0.5
        win = grid.window(uc, 0.0, half + 0.01, 0.35)
        if win is not None:
            Uw, Vw = win[2], win[3]
            vc = -0.11 + P["dv"] + P["wob"][k] + P["bend"] * np.clip(Uw - 0.0, 0, None) ** 2 \
                - 0.25 * np.clip(-Uw - 0.08, 0, None)
            w = P["w"] * (1 + 0.9 * np.clip(-(Uw + 0.02) / 0.15, 0, 1)) \
                * (1 + 0.15 * np.sin(22 * Uw + P["lob"][0]) + 0.1 * np.sin(41 * Uw + P["lob"][1]))
            w = w * np.sqrt(np.clip(1 - ((Uw - uc) / half) ** 4, 0, 1))
            m = (np.abs(Vw - vc) < w) & cavity[win[0], win[1]]
            _paint(tissue, labels, win, m, _T["pancreas"], PANCREAS)
            # lobulation: fat clefts
            _paint(tissue, labels, win, m & (bowel_f[win[0], win[1]] > 1.3), _T["fat"], 0)

    # --- kidneys: cortex, medullary pyramids, sinus fat + pelvis, hilum notch
    for name, lab in (("kidney_r", KIDNEY_R), ("kidney_l", KIDNEY_L)):
        K = an.extra[name]
        for part, dx in ((name + "_lobe", -K["sep"]), (name + "_lobe", K["sep"]), (name, 0.0)):
            blob = B[part]
            if not blob.present(k, min_size):
                continue
            e = blob.extent(k) * (1 + abs(dx)) + abs(dx) * 0.5 * B[name].a[k]
            win = grid.window(blob.cx[k], blob.cy[k], e, e)
            if win is None:
                continue
            if dx != 0.0:  # lobule offset along the kidney's long axis, in main semi-axes
                shift = dx * B[name].a[k] * 0.55 / (blob.a[k] * max(blob.scale[k], 1e-6))
                f, xl, yl = _blob_field(blob, k, win[2], win[3], dx=shift)
            else:
                f, xl, yl = _blob_field(blob, k, win[2], win[3])
            m = (f < 1.0) & cavity[win[0], win[1]]
            _paint(tissue, labels, win, m, _T["kidney_cortex"], lab)
            phi = np.arctan2(yl, xl)
            med = m & (f > 0.3) & (f < 0.72) & (np.cos(7 * phi) > -0.2)
            _paint(tissue, labels, win, med, _T["kidney_medulla"], None)
            if dx == 0.0:
                s = (t - K["t0"]) / (K["t1"] - K["t0"])
                hil = math.sin(math.pi * min(max((s - 0.3) / 0.45, 0), 1))
                if hil > 0.05:
                    # hilum faces anteromedially: local -y side after rotation
                    g, _, _ = _blob_field(blob, k, win[2], win[3], dx=0.0, dy=-0.75, grow=0.55 * hil)
                    sinus = m & (g < 1.0)
                    _paint(tissue, labels, win, sinus, _T["renal_sinus"], None)
                    g2, _, _ = _blob_field(blob, k, win[2], win[3], dx=0.0, dy=-0.6, grow=0.3 * hil)
                    _paint(tissue, labels, win, m & (g2 < 1.0), _T["renal_pelvis"], None)
                    notch = m & (g < 1.0) & (yl < -0.88)
                    _paint(tissue, labels, win, notch, _T["fat"], 0)

    # --- muscles: psoas (grow inferiorly), paraspinal, quadratus
    su, sv = an.spine_u[k], an.spine_v[k]
    ps = _ramp(np.array([t]), an.extra["psoas_top"], an.extra["psoas_top"] - 0.35)[0]
    if ps > 0.02:
        for side in (-1, 1):
            cxp, cyp = su + side * (an.spine_a[k] + 0.02 + 0.06 * ps), sv - 0.01 - 0.03 * ps
            rx, ry = 0.025 + 0.075 * ps, 0.025 + 0.055 * ps
            win = grid.window(cxp, cyp, rx, ry)
            if win is not None:
                m = (((win[2] - cxp) / rx) ** 2 + ((win[3] - cyp) / ry) ** 2) < 1
                _paint(tissue, labels, win, m, _T["muscle"], 0)
    for side in (-1, 1):
        cxp, cyp = su + side * 0.16, sv + an.spine_b[k] + 0.13
        rx, ry = 0.125, 0.105
        win = grid.window(cxp, cyp, rx, ry)
        if win is not None:
            m = (((win[2] - cxp) / rx) ** 2 + ((win[3] - cyp) / ry) ** 2) < 1
            m &= body[win[0], win[1]] & (rho[win[0], win[1]] < 0.97)
            _paint(tissue, labels, win, m, _T["muscle"], 0)

    # --- vessels: IVC (right), aorta (left of midline), iliacs below the bifurcations
    A, I = an.extra["aorta"], an.extra["ivc"]
    if t > I["tb"] and t < I["top"]:
        taper = _ramp(np.array([t]), I["top"], I["top"] - 0.04)[0]
        cx, cy = I["u"][k], sv + I["v"][k] - 0.22
        a, b, th = I["a"][k] * (0.4 + 0.6 * taper), I["b"][k] * (0.4 + 0.6 * taper), I["theta"][k]
        win = grid.window(cx, cy, a + 0.01, a + 0.01)
        if win is not None:
            x, y = win[2] - cx, win[3] - cy
            xl, yl = x * math.cos(th) + y * math.sin(th), -x * math.sin(th) + y * math.cos(th)
            _paint(tissue, labels, win, (xl / a) ** 2 + (yl / b) ** 2 < 1, _T["ivc"], IVC)
    if t > A["tb"]:
        cx, cy, r = A["u"][k], sv + A["v"][k] - 0.2, A["r"][k]
        win = grid.window(cx, cy, r + 0.01, r + 0.01)
        if win is not None:
            _paint(tissue, labels, win, (win[2] - cx) ** 2 + (win[3] - cy) ** 2 < r * r, _T["aorta"], AORTA)
    for tb, cx0, r, tid in ((A["tb"], A["u"][k], 0.045, _T["aorta"]), (I["tb"], I["u"][k] + 0.05, 0.05, _T["iliac_vessel"])):
        if t <= tb:
            d = 0.035 + 1.6 * (tb - t)
            for side in (-1, 1):
                cx = cx0 * 0.3 + side * d
                cy = sv - 0.19 + 0.6 * (tb - t) + (0.05 if tid == _T["iliac_vessel"] else 0.0)
                win = grid.window(cx, cy, r + 0.01, r + 0.01)
                if win is not None:
                    _paint(tissue, labels, win, ((win[2] - cx) ** 2 + (win[3] - cy) ** 2 < r * r) & cavity[win[0], win[1]],
                           tid, 0)

    # --- vertebra: body (cortex + cancellous core) or disc, posterior arch, processes
    q = ((t - an.vert_phase) / an.vert_period) % 1.0
    a, b = an.spine_a[k], an.spine_b[k]
    win = grid.window(su, sv + 0.2, 0.32, 0.34)
    if win is not None:
        Uw, Vw = win[2] - su, win[3] - sv
        rb = np.sqrt((Uw / a) ** 2 + (Vw / b) ** 2)
        vb = rb < 1.0
        if q < 0.2:  # intervertebral disc
            _paint(tissue, labels, win, vb, _T["disc"], 0)
        else:
            endplate = q < 0.26 or q > 0.95
            _paint(tissue, labels, win, vb, _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, rb < 0.84, _T["endplate" if endplate else "cancellous_bone"], VERTEBRAE)
        cy_c = b + 0.075  # spinal canal centre behind the body
        rc = np.sqrt(Uw ** 2 + (Vw - cy_c) ** 2)
        arch = (rc < 0.1) & (rc >= 0.058) & (Vw > b * 0.6)
        if 0.12 < q < 0.97:
            _paint(tissue, labels, win, arch, _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, arch & (rc > 0.07) & (rc < 0.088), _T["cancellous_bone"], VERTEBRAE)
        else:  # disc level: only the facet joints / laminae behind the canal are bone
            _paint(tissue, labels, win, arch & (Vw > cy_c + 0.02), _T["cortical_bone"], VERTEBRAE)
            _paint(tissue, labels, win, arch & (Vw <= cy_c + 0.02), _T["muscle"], 0)
        _paint(tissue, labels, win, rc < 0.058, _T["csf"], 0)
        if 0.3 < q < 0.9:  # spinous process, angled downward: present late in the level
            sp = (np.abs(Uw) < 0.018 + 0.01 * (Vw - cy_c)) & (Vw > cy_c + 0.085) & (Vw < cy_c + 0.24)
            sp &= body[win[0], win[1]] & (rho[win[0], win[1]] < 0.95)
            _paint(tissue, labels, win, sp, _T["cortical_bone"], VERTEBRAE)
        if 0.35 < q < 0.62:  # transverse processes
            tp = (np.abs(Vw - cy_c + 0.01) < 0.022) & (np.abs(Uw) > 0.08) & (np.abs(Uw) < 0.27 - 0.05 * (1 - t))
            _paint(tissue, labels, win, tp, _T["cortical_bone"], VERTEBRAE)

    # --- ribs (unlabelled bone): cross sections along the wall of the upper abdomen
    R = an.extra["ribs"]
    if t > 0.45:
        for i in range(10):
            for side in (-1, 1):
                # angle measured from posterior; ribs reach further anteriorly higher up
                ang = 0.55 + i * 0.21
                # ribs slope down anteriorly: the phase along z advances with the angle, so
                # one slice cuts several ribs and each rib shows up periodically along z
                phase = (t / R["period"] + R["offsets"][int(side > 0)] + 1.3 * ang) % 1.0
                if phase > 0.42 or ang > 0.9 + 3.5 * (t - 0.45):
                    continue
                rr = inner_fat - an.muscle * 0.5
                cx = an.body_cx[k] + side * math.sin(ang) * rr * an.body_a[k]
                bb = an.body_b_post[k] if math.cos(ang) > 0 else an.body_b_ant[k]
                cy = an.body_cy[k] + math.cos(ang) * rr * bb
                win = grid.window(cx, cy, 0.05, 0.05)
                if win is None:
                    continue
                x, y = win[2] - cx, win[3] - cy
                tx, ty = math.cos(ang), -side * math.sin(ang)  # tangential direction
                xl = (x * tx + y * ty) / 0.04
                yl = (-x * ty + y * tx) / 0.016
                rr2 = xl * xl + yl * yl
                _paint(tissue, labels, win, rr2 < 1, _T["cortical_bone"], 0)
                _paint(tissue, labels, win, rr2 < 0.35, _T["rib_marrow"], 0)
    _remove_specks(tissue, labels, min_px)
    return tissue, labels


def _remove_specks(tissue: np.ndarray, labels: np.ndarray, min_px: int) -> None:
    """Turn organ fragments smaller than ``min_px`` pixels into fat (in place).

    Cutting organs by their neighbours leaves a few slivers of a pixel or two; they are
    not anatomy and would only make the labels noisy. Vertebrae keep every bone piece.
    """
    boxes = ndimage.find_objects(labels)
    for lid, box in enumerate(boxes, start=1):
        if box is None or lid == VERTEBRAE:
            continue
        sub = labels[box] == lid
        cc, n = ndimage.label(sub)
        if n < 2:
            continue
        sizes = np.bincount(cc.ravel())
        small = np.flatnonzero(sizes < min_px)
        small = small[small > 0]
        if small.size:
            kill = np.isin(cc, small)
            labels[box][kill] = 0
            tissue[box][kill] = _T["fat"]


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
