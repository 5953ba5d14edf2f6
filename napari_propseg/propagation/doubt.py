"""Check next: which slice is most worth the clinician's look.

The score is the expected gain in mean Dice from correcting one slice, estimated from what
the tool can see (the labels it filled in and the anchors), never from a ground truth.

Model. Between two anchors ``a < b`` (gap length ``L = b - a``) a label ``l`` filled by
interpolation is expected to be wrong, at relative position ``t`` in the gap, by about
``4 t (1 - t) (alpha m_l + beta p_l L)`` pixels, where ``m_l`` is the number of pixels in
which the two anchors disagree about ``l`` (shape change the fill must bridge) and ``p_l``
the label's mean contour length on the two anchors (drift the anchors do not show, which
grows with the distance to them). Correcting the middle slice halves both terms on each
side, which removes about a third of the gap's expected error, ``L (alpha m_l + beta p_l L)
/ 3``. Mean Dice weighs every label equally, so each label's error is divided by its
volume (estimated from the anchors' areas). The gap with the largest gain is chosen, and in
it the middle slice. Only the anchor slices are read, so the score costs milliseconds on
any volume and is the same whatever method filled the gaps.

Beyond the outermost anchors the labels stop (``interp``) or are carried on (``stcn``);
either may be wrong where the outermost anchor still holds a label: that region counts as a
gap whose far end holds nothing, limited to ``outer_reach`` slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError

__all__ = ["CheckNextModel", "gap_gains", "suggest_slice", "slice_doubt"]


@dataclass(frozen=True)
class CheckNextModel:
    """Weights of the expected-error model (see the module docstring)."""

    alpha: float = 1.0  # per pixel of anchor disagreement
    beta: float = 0.1  # per contour pixel and slice of distance
    outer_reach: int = 3  # slices beyond an outermost anchor that count as doubtful
    outer_weight: float = 0.5  # chance that a label on the outermost anchor runs on


def _counts(sl: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(sl.ravel(), minlength=n)[:n]


def _contour(sl: np.ndarray, n: int) -> np.ndarray:
    """Per label id: pixels of the label with a 4-neighbour of another id (its contour)."""
    edge = np.zeros(sl.shape, dtype=bool)
    dy = sl[1:, :] != sl[:-1, :]
    dx = sl[:, 1:] != sl[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return np.bincount(sl[edge].ravel(), minlength=n)[:n]


def _disagreement(la: np.ndarray, lb: np.ndarray, n: int) -> np.ndarray:
    diff = la != lb
    return np.bincount(la[diff], minlength=n)[:n] + np.bincount(lb[diff], minlength=n)[:n]


def gap_gains(labels: np.ndarray, anchors: Sequence[int], *, model: CheckNextModel = CheckNextModel(),
              locked_labels: Sequence[int] = ()) -> list[tuple[float, int, int]]:
    """Expected mean-Dice gain of correcting the middle of each gap.

    Args:
        labels: (Z, Y, X) integer labels (the last propagation's result).
        anchors: anchor slices.
        model: the error model's weights.
        locked_labels: label ids the clinician locked (not propagated, not scored).

    Returns:
        ``(gain, lo, hi)`` per gap with at least one slice strictly inside ``(lo, hi)``;
        ``lo = -1`` / ``hi = Z`` mark the regions beyond the outermost anchors.
    """
    labels = labels if hasattr(labels, "ndim") else np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"Check next needs a (Z, Y, X) label volume, not shape {labels.shape}.")
    z = labels.shape[0]
    anchors = sorted({int(a) for a in anchors if 0 <= int(a) < z})
    if not anchors:
        return []
    slices = {a: np.asarray(labels[a]) for a in anchors}
    for a, sl in slices.items():
        if sl.dtype.kind not in "iu" or (sl.size and sl.min() < 0):
            slices[a] = np.clip(sl, 0, None).astype(np.int64)
    n = max(int(sl.max()) if sl.size else 0 for sl in slices.values()) + 1
    area = {a: _counts(sl, n).astype(np.float64) for a, sl in slices.items()}
    contour = {a: _contour(sl, n).astype(np.float64) for a, sl in slices.items()}
    # each label's volume, estimated from the anchors (trapezoids between them): what the
    # errors are divided by, as mean Dice divides each label's errors by its size
    volume = 0.5 * (area[anchors[0]] + area[anchors[-1]])
    for a, b in zip(anchors[:-1], anchors[1:]):
        volume = volume + 0.5 * (area[a] + area[b]) * (b - a)
    scored = volume > 0
    scored[0] = False
    for lab in locked_labels:
        if 0 <= int(lab) < n:
            scored[int(lab)] = False
    weight = np.zeros(n)
    weight[scored] = 1.0 / volume[scored]
    gains: list[tuple[float, int, int]] = []
    for a, b in zip(anchors[:-1], anchors[1:]):
        length = b - a
        if length < 2:
            continue
        m = _disagreement(slices[a], slices[b], n).astype(np.float64)
        p = 0.5 * (contour[a] + contour[b])
        err = length * (model.alpha * m + model.beta * p * length) / 3.0
        gains.append((float(np.dot(err, weight)), a, b))
    reach = int(model.outer_reach)
    for end, lo, hi in ((anchors[0], max(-1, anchors[0] - reach - 1), anchors[0]),
                        (anchors[-1], anchors[-1], min(z, anchors[-1] + reach + 1))):
        length = hi - lo
        if length < 2 or not reach:
            continue
        m = area[end] * model.outer_weight
        err = length * (model.alpha * m + model.beta * contour[end] * model.outer_weight * length) / 3.0
        gains.append((float(np.dot(err, weight)), lo, hi))
    return gains


def suggest_slice(labels: np.ndarray, anchors: Sequence[int], *, model: CheckNextModel = CheckNextModel(),
                  locked_labels: Sequence[int] = (), exclude: Sequence[int] = ()) -> int | None:
    """The slice most worth checking: the middle of the gap with the largest expected gain.

    Returns None when no slice outside ``anchors`` and ``exclude`` is left.
    """
    z = np.asarray(labels).shape[0]
    taken = {int(a) for a in anchors} | {int(e) for e in exclude}
    for gain, lo, hi in sorted(gap_gains(labels, anchors, model=model, locked_labels=locked_labels), reverse=True):
        if gain <= 0:
            break
        mid = (lo + hi) / 2.0
        inside = [s for s in range(max(lo + 1, 0), min(hi, z)) if s not in taken]
        if inside:
            return min(inside, key=lambda s: (abs(s - mid), s))
    free = [s for s in range(z) if s not in taken]
    if not free:
        return None
    # nothing doubtful by the model: bisect the longest stretch without an anchor
    marks = sorted(taken | {-1, z})
    lo, hi = max(zip(marks[:-1], marks[1:]), key=lambda g: g[1] - g[0])
    mid = (lo + hi) / 2.0
    inside = [s for s in range(lo + 1, hi) if s not in taken] or free
    return min(inside, key=lambda s: (abs(s - mid), s))


def slice_doubt(labels: np.ndarray, anchors: Sequence[int], *, model: CheckNextModel = CheckNextModel(),
                locked_labels: Sequence[int] = ()) -> np.ndarray:
    """(Z,) per-slice doubt in [0, 1]: each gap's expected gain, shaped ``4 t (1 - t)``
    across the gap and scaled so the most doubtful slice is 1; 0 on anchors. Its maximum is
    the slice :func:`suggest_slice` names (when no gap is doubtful, both fall back to the
    middle of the longest stretch without an anchor)."""
    z = np.asarray(labels).shape[0]
    doubt = np.zeros(z, dtype=np.float64)
    for gain, lo, hi in gap_gains(labels, anchors, model=model, locked_labels=locked_labels):
        for s in range(max(lo + 1, 0), min(hi, z)):
            t = (s - lo) / (hi - lo)
            doubt[s] = max(doubt[s], gain * 4.0 * t * (1.0 - t))
    peak = doubt.max()
    if peak <= 0:  # nothing doubtful by the model: the same fallback as suggest_slice
        marks = np.array(sorted({int(a) for a in anchors if 0 <= int(a) < z} | {-1, z}))
        s = np.arange(z)
        doubt = np.min(np.abs(s[:, None] - marks[None, :]), axis=1).astype(np.float64)
        doubt[[m for m in marks if 0 <= m < z]] = 0.0
        peak = doubt.max()
    return (doubt / peak if peak > 0 else doubt).astype(np.float32)
