"""The image-guided fill of one gap between two anchors, in numpy (no torch).

One place for what :func:`~.interp.sdf_interpolate_with_confidence` (``interp``),
:func:`~.appearance.choose_weight` (the automatic image weight) and the STCN engine
(:meth:`~.stcn_fusion.StcnFusion.guided_gap`, with the network's term as ``extra``) compute
on a slice between two anchors ``a < b``: per pixel ``argmax_c log prior_c + w log p(HU | c)`` with the shape
prior of :func:`~.appearance.prior_log_probs` and the intensity model of
:class:`~.appearance.GapAppearance`, then :func:`~.appearance.drop_islands`. The labels
are those of the torch formulation (up to floating-point rounding at exact ties); it is
faster because:

* **No normalisation.** ``log prior_c - logsumexp_c log prior_c``: the subtracted term is
  the same for every class at a pixel, so the arg-max does not need it.
* **Each label only where it can win** (:class:`GuidedGap`): a label ``l`` cannot beat
  background farther than ``(span + ln 2) tau + 2`` pixels from its masks on the two
  anchors (``span`` the largest log-likelihood ratio the image can add, see
  :func:`~.appearance.reach_box`), so its signed distances, prior and likelihood are only
  computed in its own box: the masks of ``l`` on both anchors grown by that margin. Signed
  distances of a mask cropped to a box that holds it with a 2-pixel margin equal the
  whole slice's inside the box (the nearest pixel of the other side is never farther than
  the box's edge). Background's prior ``log(1 - max_l q_l)`` takes the minimum blended
  distance over the labels whose box holds the pixel; where it misses a label that is
  nearer, every label is beyond its reach and background wins either way.
* Signed distances with the ``edt`` library when installed (exact: it gives the squared
  integer distances, whose square roots are scipy's), else scipy.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

try:  # one pass per transform, several times faster than scipy's feature transform
    import edt as _edt
except ImportError:  # pragma: no cover - edt is a dependency; scipy stays the fallback
    _edt = None

LN2 = math.log(2.0)
#: HU bin edges of the intensity model (values outside are clipped into the end bins).
HU_EDGES = np.arange(-300.0, 401.0, 10.0)
_HU_STEP = float(HU_EDGES[1] - HU_EDGES[0])
#: 8-connectivity of the island removal.
EIGHT = np.ones((3, 3), bool)


def stray_pieces(mask: np.ndarray, core: np.ndarray) -> np.ndarray | None:
    """The pixels of ``mask`` in 8-connected pieces that do not touch ``core`` (the label's
    shape prior, ``d < 0``); when no piece touches it (an organ that moved away from the
    blend) every piece but the largest. None when there is nothing to drop (one piece, or
    nothing outside the prior)."""
    if not mask.any() or not (mask & ~core).any():
        return None  # nothing outside the prior: one piece with it or inside it
    cc, n = ndimage.label(mask, structure=EIGHT)
    if n <= 1:
        return None  # one piece: an organ that moved is kept whole
    keep = np.zeros(n + 1, bool)
    keep[np.unique(cc[mask & core])] = True
    keep[0] = False
    if not keep.any():
        keep[1 + int(np.argmax(np.bincount(cc[mask])[1:]))] = True
    return mask & ~keep[cc]


def hu_bins(hu: np.ndarray) -> np.ndarray:
    """Bin index (int64) of each HU value in :data:`HU_EDGES`, clipped into the outer bins:
    ``searchsorted(HU_EDGES, hu, "right") - 1`` by arithmetic (float64, then one exact
    comparison with the edge, so rounding never moves a value across an edge; NaN goes
    to the last bin, as with searchsorted)."""
    v = np.asarray(hu, dtype=np.float32).astype(np.float64)
    nb = len(HU_EDGES) - 1
    with np.errstate(invalid="ignore"):
        k = np.floor((v - HU_EDGES[0]) / _HU_STEP)
        k = np.clip(np.nan_to_num(k, nan=float(nb)), 0, nb).astype(np.int64)
        k -= HU_EDGES[k] > v  # the division rounded up onto an edge
    return np.clip(k, 0, nb - 1)


def distance_inside(mask: np.ndarray) -> np.ndarray:
    """(Y, X) float64 Euclidean distance of each ``True`` pixel to the nearest ``False``
    pixel (0 on ``False``), exactly scipy's ``distance_transform_edt(mask)`` (also when
    every pixel is True: then scipy's convention)."""
    m = np.ascontiguousarray(mask, dtype=bool)
    if _edt is None or m.all():
        return ndimage.distance_transform_edt(m)
    return np.sqrt(_edt.edtsq(m, black_border=False, parallel=1).astype(np.float64))


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance in pixels, negative inside, positive outside, float32
    (see :func:`~.interp.signed_distance`)."""
    m = np.ascontiguousarray(mask, dtype=bool)
    inside = distance_inside(m)
    outside = distance_inside(~m)
    return (outside - inside + np.where(m, 0.5, -0.5)).astype(np.float32)


def bracket_sdf(ma: np.ndarray, mb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance maps of one label on two anchors; an empty side shrinks to nothing
    (see :func:`~.interp._bracket_sdf`)."""
    if ma.any() and mb.any():
        return signed_distance(ma), signed_distance(mb)
    if ma.any():
        da = signed_distance(ma)
        return da, da + (float(-da.min()) + 1.0)
    db = signed_distance(mb)
    return db + (float(-db.min()) + 1.0), db


class SliceSDF:
    """Signed distances of the labels of one (anchor) label slice, computed on demand on
    the boxes asked for and kept: a later box inside one already computed is cut from it
    (exact: on a box holding the whole mask with a 2-pixel margin the distances are the
    whole slice's), a larger one recomputes on the union of both.

    Each anchor's distances serve both gaps next to it and the leave-one-out predictions
    of its neighbours (:func:`~.appearance.anchor_triples`)."""

    def __init__(self, lab: np.ndarray) -> None:
        self.lab = lab
        self._masks: dict[int, tuple | None] = {}  # label -> bbox of its mask (None: absent)
        self._have: dict[int, tuple[tuple[int, int, int, int], np.ndarray]] = {}

    def box_of(self, label: int) -> tuple[int, int, int, int] | None:
        """Bounding box of ``label`` on this slice (None: absent)."""
        if label not in self._masks:
            self._masks[label] = bbox(self.lab == label)
        return self._masks[label]

    def get(self, label: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """(h, w) float32 signed distance of ``label`` on ``box`` (which must hold the
        label's mask with a 2-pixel margin, or reach the slice's edge)."""
        y0, y1, x0, x1 = box
        have = self._have.get(label)
        if have is not None:
            (hy0, hy1, hx0, hx1), sdf = have
            if hy0 <= y0 and y1 <= hy1 and hx0 <= x0 and x1 <= hx1:
                return sdf[y0 - hy0:y1 - hy0, x0 - hx0:x1 - hx0]
            y0, y1, x0, x1 = min(y0, hy0), max(y1, hy1), min(x0, hx0), max(x1, hx1)
        sdf = signed_distance(self.lab[y0:y1, x0:x1] == label)
        self._have[label] = ((y0, y1, x0, x1), sdf)
        by0, by1, bx0, bx1 = box
        return sdf[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0]


def bracket_sdf_on(sa: SliceSDF, sb: SliceSDF, label: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bracket_sdf` of ``label`` on ``box`` from two anchors' cached distances."""
    on_a, on_b = sa.box_of(label) is not None, sb.box_of(label) is not None
    if on_a and on_b:
        return sa.get(label, box), sb.get(label, box)
    if on_a:
        da = sa.get(label, box)
        return da, da + (float(-da.min()) + 1.0)
    db = sb.get(label, box)
    return db + (float(-db.min()) + 1.0), db


def slice_sdf(cache: dict | None, labels: np.ndarray, z: int) -> SliceSDF:
    """The :class:`SliceSDF` of slice ``z`` of ``labels``, from ``cache`` (a dict the caller
    keeps, keyed by the slice and a digest of its labels) when given."""
    if cache is None:
        return SliceSDF(labels[z])
    import hashlib

    key = (int(z), hashlib.blake2b(np.ascontiguousarray(labels[z]).tobytes(), digest_size=16).digest())
    hit = cache.get(key)
    if hit is None:  # a copy: the caller may edit its labels in place later
        hit = cache[key] = SliceSDF(np.array(labels[z], copy=True))
    return hit


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` of the True pixels (half-open), None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def grow(box: tuple[int, int, int, int], margin: int, shape: Sequence[int]) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` pixels on every side, clipped to ``shape``."""
    y0, y1, x0, x1 = box
    return max(0, y0 - margin), min(int(shape[0]), y1 + margin), max(0, x0 - margin), min(int(shape[1]), x1 + margin)


def reach_margin(span: float, tau_px: float) -> int:
    """Pixels beyond its masks where a label can still beat background (see the module)."""
    return int(math.ceil((span + LN2) * tau_px)) + 2


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """``log(1 / (1 + exp(-x)))``, stable, in the dtype of ``x`` (+inf gives 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


class GuidedGap:
    """Per-label boxes and signed distances of a gap ``(a, b)`` for the guided fusion.

    Args:
        lab_a, lab_b: (Y, X) integer labels of the two anchors, or their :class:`SliceSDF`
            (whose distances are reused).
        ids: the K label ids of the gap (channel ``i + 1`` = ``ids[i]``).
        span: largest log-likelihood ratio the image can add (``LOGLIK_SPAN * weight``).
        tau_px: largest prior softness of the slices to be filled (mid-gap).
        crop: False computes every label on the whole slice (for tests).
    """

    def __init__(self, lab_a: np.ndarray | SliceSDF, lab_b: np.ndarray | SliceSDF, ids: Sequence[int], span: float,
                 tau_px: float, crop: bool = True) -> None:
        sa = lab_a if isinstance(lab_a, SliceSDF) else SliceSDF(lab_a)
        sb = lab_b if isinstance(lab_b, SliceSDF) else SliceSDF(lab_b)
        lab_a, lab_b = sa.lab, sb.lab
        self.shape = tuple(lab_a.shape)
        self.ids = [int(i) for i in ids]
        margin = reach_margin(span, tau_px)
        whole = (0, self.shape[0], 0, self.shape[1])
        self.boxes: list[tuple[int, int, int, int]] = []
        self.da: list[np.ndarray] = []
        self.db: list[np.ndarray] = []
        for i in self.ids:
            boxes = [bx for bx in (sa.box_of(i), sb.box_of(i)) if bx is not None]
            if not boxes:  # on neither anchor: it cannot appear
                box = (0, 0, 0, 0)
            elif crop:
                box = grow((min(bx[0] for bx in boxes), max(bx[1] for bx in boxes), min(bx[2] for bx in boxes),
                            max(bx[3] for bx in boxes)), margin, self.shape)
            else:
                box = whole
            y0, y1, x0, x1 = box
            if y1 > y0 and x1 > x0:
                da, db = bracket_sdf_on(sa, sb, i, box)
            else:
                da = db = np.zeros((0, 0), np.float32)
            self.boxes.append(box)
            self.da.append(da)
            self.db.append(db)
        live = [b for b in self.boxes if b[1] > b[0] and b[3] > b[2]]
        #: (y0, y1, x0, x1) of the part of the slice any label can reach (empty: nothing).
        self.union = (min(b[0] for b in live), max(b[1] for b in live), min(b[2] for b in live),
                      max(b[3] for b in live)) if live else (0, 0, 0, 0)

    def fill(self, wa: float, tau_px: float, image: np.ndarray | None, logh: np.ndarray | None,
             weights: Sequence[float], extra: np.ndarray | None = None) -> list[np.ndarray]:
        """Class indices (0 = background, ``i + 1`` = ``ids[i]``) of one slice on
        :attr:`union`, one array per image weight in ``weights``, islands dropped.

        Args:
            wa: blend weight of anchor a (``d = wa da + (1 - wa) db``).
            tau_px: prior softness of this slice, pixels.
            image: (Y, X) HU of the slice, on the grid of the anchors (None: no image term).
            logh: (K+1, B) float32 ``log p(bin | class)`` of this slice (None: no image term).
            weights: image weights (0: the prior alone, i.e. SDF interpolation).
            extra: (K+1, Y, X) float32 log scores added as they are (the STCN network's
                term); ``span`` must then include their largest spread between classes.
        """
        uy0, uy1, ux0, ux1 = self.union
        h, w = uy1 - uy0, ux1 - ux0
        if h <= 0 or w <= 0:
            return [np.zeros((0, 0), np.int64) for _ in weights]
        ub = hu_bins(image[uy0:uy1, ux0:ux1]) if image is not None and logh is not None else None
        image = ub is not None
        wb = 1.0 - wa
        inv = np.float32(1.0 / tau_px)
        dmin = np.full((h, w), np.inf, np.float32)
        blended = []
        for (y0, y1, x0, x1), da, db in zip(self.boxes, self.da, self.db):
            if y1 <= y0 or x1 <= x0:
                blended.append(None)
                continue
            d = wa * da + wb * db
            sub = dmin[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0]
            np.minimum(sub, d, out=sub)
            blended.append(d)
        bg_prior = log_sigmoid(dmin * inv)
        bg_ll = logh[0][ub] if image else None
        if extra is not None:
            bg_prior = bg_prior + extra[0, uy0:uy1, ux0:ux1]
        priors, lls = [], []
        for k, ((y0, y1, x0, x1), d) in enumerate(zip(self.boxes, blended)):
            if d is None:
                priors.append(None)
                lls.append(None)
                continue
            prior = log_sigmoid(-d * inv)
            priors.append(prior if extra is None else prior + extra[k + 1, y0:y1, x0:x1])
            lls.append(logh[k + 1][ub[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0]] if image else None)
        out = []
        for wt in weights:
            wt = float(wt)
            use = image and wt > 0
            best = bg_prior + np.float32(wt) * bg_ll if use else bg_prior.copy()
            idx = np.zeros((h, w), np.int64)
            for k, ((y0, y1, x0, x1), p) in enumerate(zip(self.boxes, priors)):
                if p is None:
                    continue
                s = p + np.float32(wt) * lls[k] if use else p
                sl = (slice(y0 - uy0, y1 - uy0), slice(x0 - ux0, x1 - ux0))
                bsub = best[sl]
                win = s > bsub
                if win.any():
                    bsub[win] = s[win]
                    idx[sl][win] = k + 1
            self._drop_islands(idx, blended)
            out.append(idx)
        return out

    def _drop_islands(self, idx: np.ndarray, blended: list) -> None:
        """:func:`~.appearance.drop_islands` in place, each label inside its own box."""
        uy0, _, ux0, _ = self.union
        for k, ((y0, y1, x0, x1), d) in enumerate(zip(self.boxes, blended)):
            if d is None:
                continue
            sub = idx[y0 - uy0:y1 - uy0, x0 - ux0:x1 - ux0]
            stray = stray_pieces(sub == k + 1, d < 0)
            if stray is not None:
                sub[stray] = 0
