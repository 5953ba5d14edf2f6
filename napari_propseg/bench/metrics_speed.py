"""Timing of :func:`napari_propseg.metrics.compute_metrics` on a synthetic label pair
(``propseg bench metrics-speed``).

Part of :mod:`napari_propseg.bench`; also importable from :mod:`napari_propseg.bench.protocol`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .memory import PeakMemory


def synthetic_label_pair(shape: Sequence[int] = (300, 512, 512), n_labels: int = 13, spacing: Sequence[float] = (2.0, 0.8, 0.8),
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and a perturbed prediction of ``n_labels`` ellipsoids (organ-sized, in
    mm: semi-axes 16-120 mm along z, 12-88 mm in-plane), for timing the metrics.

    Returns:
        ``(pred, gt)``: two uint8 (Z, Y, X) volumes.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, float)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)

    def paint(vol: np.ndarray, lab: int, c: np.ndarray, a: np.ndarray) -> None:
        lo = np.maximum(np.floor(c - a).astype(int), 0)
        hi = np.minimum(np.ceil(c + a).astype(int) + 1, shape)
        g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        m = sum(((g[i] - c[i]) / a[i]) ** 2 for i in range(3)) <= 1
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][m] = lab

    for lab in range(1, n_labels + 1):
        a_mm = np.array([rng.uniform(16, 120), rng.uniform(12, 88), rng.uniform(12, 88)])
        a = np.minimum(a_mm / sp, np.asarray(shape) / 2 - 1)
        c = np.array([rng.uniform(a[i], shape[i] - a[i]) for i in range(3)])
        paint(gt, lab, c, a)
        paint(pred, lab, c + rng.uniform(-3, 3, 3), a * rng.uniform(0.9, 1.1, 3))
    return pred, gt


def run_metrics_speed(shape: Sequence[int] = (300, 512, 512), n_labels: int = 13,
                      spacing: Sequence[float] = (2.0, 0.8, 0.8), seed: int = 0) -> dict[str, Any]:
    """Wall-clock seconds of :func:`napari_propseg.metrics.compute_metrics` on a synthetic
    pair (:func:`synthetic_label_pair`), with its peak memory."""
    from ..metrics import compute_metrics

    pred, gt = synthetic_label_pair(shape, n_labels, spacing, seed)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        rows = compute_metrics(pred, gt, spacing)
        secs = time.perf_counter() - t0
    return {"shape": list(shape), "labels": len(rows), "spacing": list(spacing), "seconds": secs,
            "peak_mb": mem.peak_mb, "mean_dice": float(np.mean([r["dice"] for r in rows]))}
