"""Image-guided fusion between two anchors: a shape prior times a CT intensity model.

Signed-distance interpolation (:mod:`.interp`) only knows the shapes drawn on the two
bracketing anchors; the CT between them is never looked at, so an organ that bends,
splits or ends between the anchors is missed wherever the blend of the two contours
goes wrong. This module lets the image correct the blended contour near its boundary:

* **Shape prior.** Per label, ``q_l = sigmoid(-d_l / tau)`` of the linearly blended signed
  distance ``d_l`` (pixels, negative inside); background ``1 - max_l q_l``; normalised over
  the K+1 classes. Its arg-max is exactly SDF interpolation (the label with the most
  negative blended distance, background where none is negative), whatever ``tau``. The
  softness ``tau`` (mm) grows with the distance to the nearer anchor, ``tau = tau_mm +
  tau_growth * (mm to the nearer anchor)``: next to a drawn slice the contour is trusted,
  mid-gap much less; it decides how far the image may move the contour.
* **Intensity model** (:class:`GapAppearance`), learnt per gap from the two anchors: a
  histogram of HU per label (10 HU bins over [-300, 400), smoothed, floored) and one of the
  unlabelled pixels within ``band_mm`` of a label (the background the organs border on).
  On a slice between the anchors the two anchors' histograms are blended with the same
  weights as the distances (the nearer anchor counts more).
* **Fusion**: ``argmax_c log prior_c + weight * log p(HU | c)``. The prior's log-odds grow
  linearly with the distance from the blended contour (``d / tau``), the likelihood's are
  bounded (``weight * ln(1 / floor)``, about ``weight * 7``), so the image can move a
  contour by at most about ``7 * weight * tau``: at weight 0.5 about 3.5 tau (5 mm next to
  an anchor; 31 mm in the middle of a 50-slice gap of 3 mm slices, where tau is 9 mm). It
  refines boundaries and follows an organ that drifts; it does not label a look-alike
  organ farther away (a test checks both sides of that bound). Only labels of the two
  anchors can appear, and pieces of a label that do not touch its blended contour are
  dropped when another piece does (:func:`drop_islands`): no specks.

Every gap fill is computed by :class:`~.gap.GuidedGap` (numpy: no normalisation, each label
only in the box it can reach, the anchors' signed distances shared): the slices of
``interp``, the leave-one-out predictions of the weight choice and the STCN engine's gaps
(:mod:`.stcn_fusion`, which adds the network's term). :func:`guided_slice` /
:func:`guided_indices` are the same fusion written plainly in torch, the reference the
tests compare it with.

Defaults were picked on the DICOM case and two phantoms; measurements in the README and
``docs/ARCHITECTURE.md`` (history).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..progress import check_cancel
from .gap import HU_EDGES, GuidedGap, bbox, distance_inside, grow, hu_bins, slice_sdf, stray_pieces  # noqa: F401  (HU_EDGES: the bins)

if TYPE_CHECKING:  # torch is imported where it is used, so the widget can read the defaults cheaply
    import torch

#: Largest log-likelihood ratio the intensity model can give one class over another:
#: histograms are floored at 1e-3 of a normalised row before renormalising, so ln(1001).
LOGLIK_SPAN = float(np.log(1001.0))
#: Work is restricted to the anchors' labels grown by what the image can reach (exact,
#: see :func:`reach_box`); tests switch it off to check that.
CROP_TO_REACH = True



@dataclass(frozen=True)
class AppearanceOptions:
    """Parameters of the image-guided fusion.

    Attributes:
        weight: exponent of the intensity likelihood (0 switches the image off: pure
            shape prior, the arg-max of which is SDF interpolation).
        tau_mm: softness of the shape prior next to an anchor, mm.
        tau_growth: mm of softness added per mm of distance to the nearer anchor.
        band_mm: unlabelled pixels within this distance of a label form the background
            histogram.
        auto: pick the weight per volume from ``candidates`` by leave-one-anchor-out
            (:func:`choose_weight`) when there are at least three anchors; ``weight`` is
            the fallback otherwise. Off: ``weight`` always.
        candidates: the weights ``auto`` chooses from.
    """

    weight: float = 0.5
    tau_mm: float = 1.5
    tau_growth: float = 0.1
    band_mm: float = 30.0
    auto: bool = True
    candidates: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        try:
            cands = tuple(float(c) for c in self.candidates)
        except (TypeError, ValueError):
            cands = ()
        if not cands or not all(np.isfinite(c) and c >= 0 for c in cands):
            raise InputError(f"appearance candidates must be finite numbers >= 0, got {self.candidates}.")
        object.__setattr__(self, "candidates", cands)
        for name in ("weight", "tau_growth"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v >= 0):
                raise InputError(f"appearance {name} must be a finite number >= 0, got {v}.")
        for name in ("tau_mm", "band_mm"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v > 0):
                raise InputError(f"appearance {name} must be a finite number > 0, got {v}.")

    @property
    def enabled(self) -> bool:
        """The image can enter the fusion (a fixed weight above 0, or ``auto`` with a
        candidate above 0)."""
        return self.weight > 0 or (self.auto and max(self.candidates) > 0)


#: Bin index of each HU value (clipped into the outer bins): :func:`~.gap.hu_bins`.
_hu_bins = hu_bins


def _histograms(image: np.ndarray, lab: np.ndarray, objects: Sequence[int], band_px: float) -> np.ndarray:
    """(K+1, B) normalised HU histograms of one anchor: background band, then each object.

    A class with no pixels on this anchor gets an all-zero row (it contributes nothing to
    the blend; the other anchor's row carries it)."""
    nb = len(HU_EDGES) - 1
    fg = np.isin(lab, list(objects))
    box = bbox(fg)
    rows = []
    if box is None:
        return np.zeros((len(objects) + 1, nb), np.float64)
    # every pixel within band_px of a label lies in its bounding box grown by the band
    # (+2: the distances there are those of the whole slice)
    y0, y1, x0, x1 = grow(box, int(np.ceil(band_px)) + 2, fg.shape)
    fg, lab = fg[y0:y1, x0:x1], lab[y0:y1, x0:x1]
    bins = hu_bins(image[y0:y1, x0:x1])
    near = distance_inside(~fg) <= band_px
    rows.append(np.bincount(bins[near & ~fg], minlength=nb))
    rows += [np.bincount(bins[lab == i], minlength=nb) for i in objects]
    h = np.stack(rows).astype(np.float64)
    tot = h.sum(axis=1, keepdims=True)
    return np.where(tot > 0, h / np.maximum(tot, 1), 0.0)


class GapAppearance:
    """Intensity model of one gap between anchors ``a`` and ``b``.

    Args:
        image_a, image_b: (Y, X) HU of the two anchor slices.
        lab_a, lab_b: (Y, X) integer labels of the two anchors.
        objects: the K label ids of the gap (channel order of the fusion).
        pixel_mm: in-plane pixel size, mm (for the background band).
        options: :class:`AppearanceOptions`.
    """

    def __init__(self, image_a, image_b, lab_a, lab_b, objects: Sequence[int], pixel_mm: float,
                 options: AppearanceOptions) -> None:
        band = options.band_mm / max(float(pixel_mm), 1e-6)
        self.objects = [int(i) for i in objects]
        self.ha = _histograms(np.asarray(image_a), np.asarray(lab_a), self.objects, band)
        self.hb = _histograms(np.asarray(image_b), np.asarray(lab_b), self.objects, band)

    def log_table(self, wa: float) -> np.ndarray:
        """(K+1, B) float32 ``log p(bin | class)`` of a slice where anchor a weighs ``wa``.

        Rows absent from one anchor take the other's; a class seen on neither (cannot
        happen for the gap's own objects) is flat."""
        ha, hb = self.ha, self.hb
        has_a, has_b = ha.sum(1, keepdims=True) > 0, hb.sum(1, keepdims=True) > 0
        w = np.where(has_a & has_b, wa, np.where(has_a, 1.0, 0.0))
        h = w * ha + (1.0 - w) * hb
        h = ndimage.gaussian_filter1d(h, 1.0, axis=1, mode="nearest") + 1e-3
        return np.log(h / h.sum(axis=1, keepdims=True)).astype(np.float32)

    def log_likelihood(self, image: np.ndarray, wa: float) -> np.ndarray:
        """(K+1, Y, X) float32 ``log p(HU | class)`` on one slice; ``wa`` weighs anchor a
        (:meth:`log_table` looked up at each pixel's HU bin)."""
        return self.log_table(wa)[:, _hu_bins(image)]


def prior_log_probs(d: torch.Tensor, tau_px: float) -> torch.Tensor:
    """(K+1, Y, X) log class probabilities of blended signed distances ``d`` (K, Y, X)
    in pixels, with softness ``tau_px`` (see the module docstring)."""
    import torch

    logq = torch.nn.functional.logsigmoid(-d / tau_px)  # log q_l
    bg = torch.nn.functional.logsigmoid(d.min(dim=0, keepdim=True).values / tau_px)  # log (1 - max_l q_l)
    lp = torch.cat([bg, logq], dim=0)
    return lp - torch.logsumexp(lp, dim=0, keepdim=True)


def reach_box(mask: np.ndarray, span: float, tau_px: float) -> tuple[slice, slice]:
    """The part of a slice where a label can win: ``mask`` (the labels of the gap's anchors)
    grown by ``(span + ln 2) * tau_px + 2`` pixels.

    Outside every label, by ``d`` pixels from the nearest, a label's log-odds against
    background are at most ``-d / tau + ln 2`` by the prior, and the image (and network)
    terms add at most ``span``; so farther away background wins, and computing only inside
    this box gives the very same labels as the whole slice (blended signed distances of
    the cropped masks equal the full ones there: every mask pixel lies inside the box).
    The whole slice when ``CROP_TO_REACH`` is off or the mask is empty."""
    h, w = mask.shape
    if not CROP_TO_REACH or not mask.any():
        return slice(0, h), slice(0, w)
    m = int(np.ceil((span + np.log(2.0)) * tau_px)) + 2
    ys, xs = np.nonzero(mask)
    return (slice(max(0, int(ys.min()) - m), min(h, int(ys.max()) + m + 1)),
            slice(max(0, int(xs.min()) - m), min(w, int(xs.max()) + m + 1)))


def guided_indices(d: torch.Tensor, image: np.ndarray, model: GapAppearance | None, wa: float, tau_px: float,
                   weight: float, extra: torch.Tensor | None = None) -> np.ndarray:
    """(Y, X) class indices of one slice (0 = background, i = the i-th label of ``d``): the
    arg-max of :func:`guided_slice` without stray islands (:func:`drop_islands`)."""
    import torch

    lp = guided_slice(d, image, model, wa, tau_px, weight, extra)
    return drop_islands(torch.max(lp, dim=0).indices.cpu().numpy(), d.cpu().numpy())


def drop_islands(idx: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Class indices ``idx`` (Y, X; 0 = background, i = the i-th label) without stray
    islands: of a label in several 8-connected pieces, only the pieces that touch its shape
    prior (``d < 0``, the blended contour of the anchors) are kept, or the largest piece
    when none does (an organ that moved away from the blend); the rest becomes background.
    The image may move a contour, not scatter specks of an organ around it."""
    out = idx.copy()
    for i in range(1, d.shape[0] + 1):
        stray = stray_pieces(idx == i, d[i - 1] < 0)
        if stray is not None:
            out[stray] = 0
    return out


def tau_pixels(options: AppearanceOptions, z: int, a: int, b: int, spacing: Sequence[float]) -> float:
    """Prior softness on slice ``z`` of the gap ``(a, b)``, in in-plane pixels."""
    sz, sy, sx = (float(s) for s in spacing)
    mm = options.tau_mm + options.tau_growth * sz * min(z - a, b - z)
    return mm / max(0.5 * (sy + sx), 1e-6)


def guided_slice(d: torch.Tensor, image: np.ndarray, model: GapAppearance | None, wa: float, tau_px: float,
                 weight: float, extra: torch.Tensor | None = None) -> torch.Tensor:
    """(K+1, Y, X) fused log scores of one slice (arg-max over dim 0 = class channel).

    ``d`` blended signed distances (K, Y, X) at the slice's resolution; ``image`` its HU;
    ``extra`` optional (K+1, Y, X) log scores added as they are (the network's term)."""
    import torch

    lp = prior_log_probs(d, tau_px)
    if model is not None and weight > 0:
        lp = lp + weight * torch.from_numpy(model.log_likelihood(image, wa)).to(lp.device)
    if extra is not None:
        lp = lp + extra
    return lp


def choose_weight(image: np.ndarray, labels: np.ndarray, anchors: Sequence[int], spacing: Sequence[float],
                  options: AppearanceOptions, locked: Sequence[int] = (),
                  cache: dict | None = None, cancel=None) -> tuple[float, dict[float, float]]:
    """The image weight for this volume, chosen on its own anchors (leave one anchor out).

    Each inner anchor ``m`` (with neighbours ``a < m < b``) is predicted from ``a`` and
    ``b`` alone with every candidate weight, exactly as a slice of the gap ``(a, b)``
    would be, and scored against what the clinician drew on ``m``: per label, Dice over all
    left-out anchors together, then the mean over labels (the benchmark's way of scoring a
    volume). The candidate with the best mean wins (ties: the one nearest
    ``options.weight``). Only the left-out slices are computed, so this costs a few slices'
    work. Where intensities do not separate the organs (thin noisy slices, labels that do
    not follow the image) it falls back to shapes alone (weight 0).

    ``cache`` (a dict the caller keeps, e.g. the engine) holds each anchor triple's pixel
    counts keyed by the three slices' labels, so after a correction only the triples around
    it are computed again. ``cancel`` is checked once per triple.

    Returns:
        ``(weight, {candidate: mean Dice})``; ``(options.weight, {})`` with fewer than
        three anchors holding labels.
    """
    triples = anchor_triples(image, labels, anchors, spacing, options, locked, cache, cancel)
    return pick_weight(list(triples.values()), options)


def gap_weights(triples: dict[tuple[int, int, int], dict], anchors: Sequence[int],
                options: AppearanceOptions) -> dict[tuple[int, int], tuple[float, dict[float, float]]]:
    """The image weight of each gap ``(a, b)`` between consecutive anchors, chosen on that
    gap's own neighbourhood: the left-out predictions of ``a`` (from its lower neighbour
    and ``b``) and of ``b`` (from ``a`` and its upper neighbour), scored as in
    :func:`choose_weight` (:func:`pick_weight`); ``options.weight`` where neither exists
    (fewer than three anchors) or holds a label.

    So a gap's weight depends only on the four anchors around it, and a correction changes
    the weights of the gaps next to it and their neighbours, never the rest of the volume.

    Returns:
        ``{(a, b): (weight, {candidate: mean Dice})}``.
    """
    anchors = list(anchors)
    out = {}
    for j, (a, b) in enumerate(zip(anchors[:-1], anchors[1:])):
        near = []
        if j >= 1:
            near.append(triples.get((anchors[j - 1], a, b), {}))
        if j + 2 < len(anchors):
            near.append(triples.get((a, b, anchors[j + 2]), {}))
        out[(a, b)] = pick_weight(near, options)
    return out


def pick_weight(triples: Sequence[dict], options: AppearanceOptions) -> tuple[float, dict[float, float]]:
    """The candidate weight with the best mean Dice over the left-out anchors of
    ``triples`` (:func:`anchor_triples` values): per label, Dice of the pooled pixel counts,
    then the mean over labels; ties go to the candidate nearest ``options.weight``.
    ``(options.weight, {})`` when no triple holds a label."""
    # per candidate and label: [overlap, predicted, true] pixel counts summed over the
    # left-out anchors, so the score is each label's Dice over all of them (as the
    # benchmark scores a volume), averaged over labels; a label nobody drew nor predicted
    # does not count, one predicted where none was drawn scores 0.
    counts: dict[float, dict[int, np.ndarray]] = {w: {} for w in options.candidates}
    used = 0
    for triple in triples:
        if triple:
            used += 1
        for w, per_label in triple.items():
            for i, c in per_label.items():
                counts[w][i] = counts[w].get(i, np.zeros(3, np.int64)) + c
    if not used:
        return float(options.weight), {}
    means = {}
    for w, per_label in counts.items():
        dice = [2.0 * c[0] / (c[1] + c[2]) for c in per_label.values() if c[1] + c[2] > 0]
        means[w] = float(np.mean(dice)) if dice else 1.0
    best = max(means, key=lambda w: (round(means[w], 6), -abs(w - options.weight)))
    return float(best), means


def anchor_triples(image: np.ndarray, labels: np.ndarray, anchors: Sequence[int], spacing: Sequence[float],
                   options: AppearanceOptions, locked: Sequence[int] = (), cache: dict | None = None,
                   cancel=None, only: set | None = None, sdf_cache: dict | None = None) -> dict[tuple[int, int, int], dict[float, dict[int, np.ndarray]]]:
    """Leave-one-anchor-out pixel counts of every inner anchor: ``{(a, m, b): {weight:
    {label: [overlap, predicted, true]}}}`` for consecutive anchors ``a < m < b``, ``m``
    predicted from ``a`` and ``b`` with each candidate weight ({} when ``a``/``b`` hold
    no label). ``cache``: see :func:`choose_weight`. ``only``: compute just these triples;
    the others are returned only when the cache holds them. ``sdf_cache``: the anchors'
    signed distances, shared with the gaps (:func:`~.gap.slice_sdf`)."""
    import hashlib

    locked = set(int(v) for v in locked)
    px = 0.5 * (float(spacing[1]) + float(spacing[2]))
    anchors = list(anchors)
    digests = {}
    if cache is not None:
        for z in anchors:
            digests[z] = hashlib.blake2b(np.ascontiguousarray(labels[z]).tobytes(), digest_size=16).digest()
    out = {}
    for a, m, b in zip(anchors[:-2], anchors[1:-1], anchors[2:]):
        if only is not None and (a, m, b) not in only and cache is None:
            continue
        check_cancel(cancel)
        key = None
        if cache is not None:
            key = (a, m, b, digests[a], digests[m], digests[b], tuple(sorted(locked)), options.candidates,
                   options.tau_mm, options.tau_growth, options.band_mm)
        triple = cache.get(key) if key is not None else None
        if triple is None:
            if only is not None and (a, m, b) not in only:
                continue
            triple = _triple_counts(image, labels, a, m, b, spacing, options, locked, px, sdf_cache)
            if key is not None:
                cache[key] = triple
        out[(a, m, b)] = triple
    return out


def _triple_counts(image, labels, a: int, m: int, b: int, spacing, options: AppearanceOptions, locked: set,
                   px: float, sdf_cache: dict | None = None) -> dict[float, dict[int, np.ndarray]]:
    """Anchor ``m`` predicted from ``a`` and ``b`` with each candidate weight:
    ``{weight: {label: [overlap, predicted, true]}}`` ({} when ``a``/``b`` hold no label)."""
    la, lb, lm = labels[a], labels[b], labels[m]
    ids = [int(i) for i in np.union1d(np.unique(la), np.unique(lb)) if i != 0 and int(i) not in locked]
    if not ids:
        return {}
    truth = [int(i) for i in np.unique(lm) if i != 0 and int(i) not in locked]
    scored = sorted(set(ids) | set(truth))
    wa = (b - m) / (b - a)
    tau = tau_pixels(options, m, a, b, spacing)
    gap = GuidedGap(slice_sdf(sdf_cache, labels, a), slice_sdf(sdf_cache, labels, b), ids, LOGLIK_SPAN * max(options.candidates),
                    tau, crop=CROP_TO_REACH)
    logh = GapAppearance(image[a], image[b], la, lb, ids, px, options).log_table(wa)
    preds = gap.fill(wa, tau, image[m], logh, options.candidates)
    uy0, uy1, ux0, ux1 = gap.union
    lm_u = lm[uy0:uy1, ux0:ux1]
    true = {i: int(np.count_nonzero(lm == i)) for i in scored}
    code = {i: k + 1 for k, i in enumerate(ids)}
    out = {}
    for w, pred in zip(options.candidates, preds):
        per = {}
        for i in scored:
            if i in code and pred.size:
                p = pred == code[i]
                per[i] = np.array([np.count_nonzero(p & (lm_u == i)), np.count_nonzero(p), true[i]], np.int64)
            else:
                per[i] = np.array([0, 0, true[i]], np.int64)
        out[w] = per
    return out
