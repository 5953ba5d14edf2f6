"""Classical label propagation between anchor slices: SDF interpolation and copy-nearest.

:func:`sdf_interpolate` is the shipped fallback (``--method interp``) and the baseline the
network must beat: per label, the signed distance maps (negative inside) of the two
bracketing anchor slices are blended linearly along z, and the label is where the blend
is negative. A label present on only one of the two anchors shrinks linearly to nothing
at the other. Several labels stay exclusive: a pixel takes the label with the most
negative blended distance. Anchors come back unchanged; nothing is written outside the
outermost anchors.

Example:
    >>> import numpy as np
    >>> lab = np.zeros((5, 32, 32), np.uint8)
    >>> yy, xx = np.mgrid[:32, :32]
    >>> lab[0][(yy - 16) ** 2 + (xx - 16) ** 2 <= 4 ** 2] = 1
    >>> lab[4][(yy - 16) ** 2 + (xx - 16) ** 2 <= 12 ** 2] = 1
    >>> out = sdf_interpolate(lab, [0, 4])
    >>> [int(out[z].sum()) for z in range(5)] == sorted(int(out[z].sum()) for z in range(5))
    True
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelFn, ProgressFn, check_cancel, report
from . import gap

log = logging.getLogger(__name__)


def check_anchors(anchors: Iterable[int], depth: int) -> list[int]:
    """Sorted, unique anchor indices, validated against the number of slices.

    Raises:
        InputError: no anchors, or an index outside ``[0, depth)``.
    """
    out = sorted({int(a) for a in anchors})
    if not out:
        raise InputError("No anchor slices were given; label at least one slice (or pass --slices) before propagating.")
    bad = [a for a in out if a < 0 or a >= depth]
    if bad:
        raise InputError(f"Anchor slice(s) {bad} lie outside the volume's {depth} slices; pick slices 0..{depth - 1}.")
    return out


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance in pixels, negative inside, positive outside.

    Measured from pixel centres to the nearest pixel of the other side, minus/plus 0.5
    so that the zero level lies on the boundary between inside and outside pixels
    (:func:`~.gap.signed_distance`: the ``edt`` library, exactly scipy's distances).

    Args:
        mask: (Y, X) bool, not empty.

    Returns:
        (Y, X) float32.
    """
    return gap.signed_distance(mask)


def _bracket_sdf(ma: np.ndarray, mb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance maps of one label on two anchors; an empty side shrinks to nothing.

    The empty side gets the other side's map shifted up by ``depth + 1`` (depth = deepest
    inside distance), so the blend ``d + w * (depth + 1)`` erodes the shape at a constant
    rate and it vanishes exactly at the empty anchor.
    """
    return gap.bracket_sdf(ma, mb)


def anchor_disagreement(lab_a: np.ndarray, lab_b: np.ndarray, ids: Iterable[int]) -> float:
    """``sum_l |A_l xor B_l| / sum_l |A_l or B_l|`` over the labels ``ids`` of two anchor
    slices (0 when neither holds any): how much the anatomy changes across the gap."""
    dis = uni = 0
    for i in ids:
        ma, mb = lab_a == i, lab_b == i
        dis += int(np.count_nonzero(ma ^ mb))
        uni += int(np.count_nonzero(ma | mb))
    return dis / uni if uni else 0.0


def gap_confidence(wa: float, disagreement: float) -> float:
    """Confidence of a slice between two anchors: ``1 - 4 w_a w_b D`` with blend weights
    ``w_a = 1 - w_b`` and the anchors' :func:`anchor_disagreement` ``D``; lowest (``1 - D``)
    mid-gap, where whatever fills the slice is furthest from anything drawn, 1 next to an
    anchor or when both anchors agree."""
    return float(1.0 - 4.0 * wa * (1.0 - wa) * disagreement)


def sdf_interpolate_with_confidence(
    labels: np.ndarray,
    anchors: Sequence[int],
    *,
    locked_labels: Iterable[int] = (),
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    image: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    appearance=None,
    gap_weights: dict[tuple[int, int], float] | None = None,
    sdf_cache: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SDF interpolation between bracketing anchors, with a per-slice confidence.

    With ``image`` and ``appearance`` (an enabled
    :class:`~.appearance.AppearanceOptions`) the blended signed distances become a shape
    prior fused with an intensity model of the two anchors (:mod:`.appearance`): the CT
    moves the interpolated contours near their boundary. Without them (the default) this
    is plain SDF interpolation.

    Args:
        labels: (Z, Y, X) integer labels; only the anchor slices are read (and the
            locked labels everywhere).
        anchors: anchor slice indices.
        locked_labels: label ids kept exactly as in ``labels`` on every slice and never
            interpolated.
        progress: ``(step, total, message)`` callback, once per interpolated slice.
        cancel: returns True to stop (raises :class:`CancelledError` between slices).
        ranges: optional list of ``(a, b)`` pairs of consecutive anchors whose gap is to be
            computed; default all gaps.
        image: (Z, Y, X) CT in HU on the labels' grid, for the image-guided fusion.
        spacing: (sz, sy, sx) mm (default 1 mm) for the fusion's mm parameters.
        appearance: :class:`~.appearance.AppearanceOptions`, used with its fixed ``weight``
            (the engine resolves ``auto`` first); None or weight 0: plain SDF.
        gap_weights: optional image weight per gap ``(a, b)`` (the engine's per-gap
            choice), overriding ``appearance.weight`` there; 0: plain SDF in that gap.
        sdf_cache: optional dict kept by the caller: the anchors' signed distances, reused
            by later calls while an anchor's labels stay the same (:func:`~.gap.slice_sdf`).

    Returns:
        ``(out, confidence)``: out (Z, Y, X) of ``labels``' dtype, anchors bit-identical,
        slices outside the outermost anchors 0 (locked labels kept); confidence (Z,)
        float32: 1 on anchors and outside, and between anchors
        ``1 - 4 w_a w_b * |A xor B| / |A or B|`` pooled over labels, where ``w_a, w_b`` are
        the blend weights and ``A, B`` the label's masks on the two anchors: low in the
        middle of gaps over which the anchors disagree, where the interpolated boundary
        is furthest from anything drawn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"Labels must be a (Z, Y, X) volume, got shape {labels.shape}.")
    anchors = check_anchors(anchors, labels.shape[0])
    locked = np.array(sorted({int(v) for v in locked_labels}), dtype=np.int64)
    out = np.zeros_like(labels)
    for a in anchors:
        out[a] = labels[a]
    confidence = np.ones(labels.shape[0], dtype=np.float32)
    gaps = [(a, b) for a, b in zip(anchors[:-1], anchors[1:]) if b - a > 1]
    if ranges is not None:
        wanted = {(int(a), int(b)) for a, b in ranges}
        gaps = [g for g in gaps if g in wanted]
    guided = image is not None and appearance is not None and (
        appearance.weight > 0 or any(w > 0 for w in (gap_weights or {}).values()))  # (auto is the engine's)
    if guided:
        image = np.asarray(image)
        if image.shape != labels.shape:
            raise InputError(f"The CT's shape {image.shape} differs from the labels' {labels.shape}; put the labels on the image grid.")
        spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    total = sum(b - a - 1 for a, b in gaps)
    step = 0
    for a, b in gaps:
        ids = np.union1d(np.unique(labels[a]), np.unique(labels[b]))
        ids = ids[(ids != 0) & ~np.isin(ids, locked)]
        disagree = anchor_disagreement(labels[a], labels[b], ids)
        weight = float((gap_weights or {}).get((a, b), appearance.weight)) if guided else 0.0
        if weight > 0 and len(ids):
            fill = _guided_gap(labels, image, a, b, ids, spacing, appearance, weight, sdf_cache)
        else:
            fill = _sdf_gap(labels, a, b, ids, sdf_cache)
        for z in range(a + 1, b):
            check_cancel(cancel)
            wb = (z - a) / (b - a)
            wa = 1.0 - wb
            out[z] = fill(z, wa, wb)
            confidence[z] = gap_confidence(wa, disagree)
            step += 1
            report(progress, step, total, f"interpolating slice {z}")
    if locked.size:
        keep = np.isin(labels, locked)
        out[keep] = labels[keep]
    return out, confidence


def _sdf_gap(labels: np.ndarray, a: int, b: int, ids: Sequence[int], sdf_cache: dict | None = None):
    """``fill(z, wa, wb)`` -> slice ``z`` of plain SDF interpolation between anchors ``a`` and ``b``:
    each label where its blended signed distance is negative and the most negative.

    A label's blend can be negative only on its masks, so its signed distances are
    computed on their bounding box grown by 2 pixels (where they equal the whole slice's)."""
    shape = labels.shape[1:]
    sa, sb = gap.slice_sdf(sdf_cache, labels, a), gap.slice_sdf(sdf_cache, labels, b)
    parts = []
    for i in ids:
        boxes = [bx for bx in (sa.box_of(int(i)), sb.box_of(int(i))) if bx is not None]
        if not boxes:
            continue
        box = gap.grow((min(bx[0] for bx in boxes), max(bx[1] for bx in boxes), min(bx[2] for bx in boxes),
                        max(bx[3] for bx in boxes)), 2, shape)
        y0, y1, x0, x1 = box
        parts.append((i, (slice(y0, y1), slice(x0, x1)), *gap.bracket_sdf_on(sa, sb, int(i), box)))

    def fill(z: int, wa: float, wb: float) -> np.ndarray:
        best = np.zeros(shape, dtype=np.float32)  # most negative blended distance so far
        sl = np.zeros(shape, dtype=labels.dtype)
        for i, box, da, db in parts:
            d = wa * da + wb * db
            sub = best[box]
            sl[box][d < sub] = i
            np.minimum(sub, d, out=sub)
        return sl

    return fill


def _guided_gap(labels: np.ndarray, image: np.ndarray, a: int, b: int, ids: Sequence[int], spacing, appearance,
                weight: float, sdf_cache: dict | None = None):
    """``fill(z, wa, wb)`` -> slice ``z`` of the image-guided interpolation between anchors ``a``
    and ``b`` with image weight ``weight``: arg-max of shape prior x intensity model,
    without islands away from the prior (:class:`~.gap.GuidedGap`)."""
    from .appearance import CROP_TO_REACH, LOGLIK_SPAN, GapAppearance, tau_pixels

    model = GapAppearance(image[a], image[b], labels[a], labels[b], ids, 0.5 * (spacing[1] + spacing[2]), appearance)
    lut = np.concatenate([[0], ids]).astype(labels.dtype)
    # each label only where it can win (exact; the widest reach is mid-gap)
    g = gap.GuidedGap(gap.slice_sdf(sdf_cache, labels, a), gap.slice_sdf(sdf_cache, labels, b), ids, LOGLIK_SPAN * weight, tau_pixels(appearance, a + (b - a) // 2, a, b, spacing),
                      crop=CROP_TO_REACH)
    y0, y1, x0, x1 = g.union

    def fill(z: int, wa: float, wb: float) -> np.ndarray:  # (the guided blend uses 1 - wa, as always)
        sl = np.zeros(labels.shape[1:], dtype=labels.dtype)
        if y1 > y0 and x1 > x0:
            idx = g.fill(wa, tau_pixels(appearance, z, a, b, spacing), image[z], model.log_table(wa), [weight])[0]
            sl[y0:y1, x0:x1] = lut[idx]
        return sl

    return fill


def sdf_interpolate(labels: np.ndarray, anchors: Sequence[int], *, progress: ProgressFn = None, cancel: CancelFn = None) -> np.ndarray:
    """Per-label linear interpolation of signed distance maps between bracketing anchors.

    Args:
        labels: (Z, Y, X) integer labels holding the anchor slices.
        anchors: anchor slice indices (an empty anchor means "no label here").
        progress: ``(step, total, message)`` callback, once per slice.
        cancel: returns True to stop.

    Returns:
        (Z, Y, X) labels, same dtype: anchors unchanged, gaps interpolated, slices outside
        the outermost anchors 0.

    Raises:
        InputError: no anchors or anchors out of range.
    """
    return sdf_interpolate_with_confidence(labels, anchors, progress=progress, cancel=cancel)[0]


def copy_nearest(labels: np.ndarray, anchors: Sequence[int]) -> np.ndarray:
    """Every slice takes the labels of its nearest anchor (ties go to the lower slice).

    Args:
        labels: (Z, Y, X) integer labels holding the anchor slices.
        anchors: anchor slice indices.

    Returns:
        (Z, Y, X) labels, same dtype; slices outside the outermost anchors copy the
        outermost anchor.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"Labels must be a (Z, Y, X) volume, got shape {labels.shape}.")
    anchors_arr = np.array(check_anchors(anchors, labels.shape[0]))
    z = np.arange(labels.shape[0])
    nearest = anchors_arr[np.argmin(np.abs(z[:, None] - anchors_arr[None, :]), axis=1)]
    return labels[nearest].copy()
