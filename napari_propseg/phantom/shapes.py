"""The phantom's building blocks: tissue look-up tables, label ids, physical scales and the
shape helpers (smooth z-profiles, implicit blobs, coordinate windows, coarse noise fields).

Part of :mod:`napari_propseg.phantom`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..labelmap import FLARE_NAMES

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

