"""The image weight of a volume (or of each gap), chosen on its own anchors (no torch).

The weight ``a`` of the CT intensity model in the image-guided fusion (:mod:`.appearance`)
is chosen by leave-one-anchor-out over the candidates (0, 0.25, 0.5, 1), 0.5 with fewer
than three anchors. :class:`ImageWeight` keeps the choice between calls:

* scope ``"volume"`` (default): one weight for the volume from every inner anchor, chosen
  by each full propagation and kept by re-propagations until the labelled anchors have
  grown by :data:`REWEIGH_GROWTH` (or half of them were replaced), so that one correction
  changes only the gaps next to it;
* scope ``"gap"``: each gap its own weight from the left-out predictions of its two anchors
  (:func:`~.appearance.gap_weights`); local, but noisier on the k-slice benchmark, so not
  the default (see ``docs/ARCHITECTURE.md``, history).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelFn
from .appearance import AppearanceOptions, anchor_triples, gap_weights, pick_weight

log = logging.getLogger(__name__)

#: Default scope of the automatic image weight: ``"volume"`` or ``"gap"`` (see the module).
WEIGHT_SCOPE = "volume"
SCOPES = ("volume", "gap")
#: A re-propagation chooses the volume's weight again once the labelled anchors number this
#: many times those it was chosen on (and when fewer than half of those are still anchors).
REWEIGH_GROWTH = 1.5


class ImageWeight:
    """The image weight(s) in use for one volume (see the module docstring).

    Args:
        appearance: the engine's :class:`~.appearance.AppearanceOptions`.
        volume_hu: (Z, Y, X) HU; spacing: (sz, sy, sx) mm.
        scope: ``"volume"`` or ``"gap"``.
    """

    def __init__(self, appearance: AppearanceOptions, volume_hu: np.ndarray, spacing: Sequence[float],
                 scope: str = WEIGHT_SCOPE) -> None:
        if scope not in SCOPES:
            raise InputError(f"Unknown image weight scope {scope!r}; use one of {', '.join(SCOPES)}.")
        self.appearance = appearance
        self.volume_hu = volume_hu
        self.spacing = tuple(spacing)
        self.scope = scope
        #: the image weight in use for this volume (set by each (re)propagation; None before).
        self.weight: float | None = None
        #: leave-one-anchor-out mean Dice per candidate weight behind an automatic choice.
        self.scores: dict[float, float] = {}
        #: the automatic image weight of each gap ``(a, b)`` (scope ``"gap"``; else empty).
        self.gap_weights: dict[tuple[int, int], float] = {}
        self._basis: set[int] | None = None  # the labelled anchors the volume's weight was chosen on
        self._loo_cache: dict = {}  # anchor triple -> leave-one-out scores (see choose_weight)
        #: (anchor, digest of its labels) -> its signed distances (see gap.slice_sdf)
        self.sdf_cache: dict = {}

    def choose(self, labels: np.ndarray, anchors: Sequence[int], locked: np.ndarray, cancel: CancelFn = None,
               segs: Sequence | None = None) -> None:
        """Set the image weights (``appearance.auto``: leave-one-anchor-out on these anchors;
        else the fixed weight for every gap). ``segs``: the segments a re-propagation
        computes (None: a full propagation).

        Scope ``"volume"``: one weight (:attr:`weight`), chosen by every full propagation
        from all anchors and kept by re-propagations until the labelled anchors changed a
        lot (:data:`REWEIGH_GROWTH`; then it applies to the slices that call computes, the
        others keep their results). Scope ``"gap"``: each gap ``(a, b)`` its own weight
        (:attr:`gap_weights`) from the left-out predictions of ``a`` and ``b``; a
        re-propagation computes only the triples its gaps need (each triple's counts are
        cached) and :attr:`weight` is the weight pooled over all known triples, for display."""
        self.gap_weights = {}
        if not self.appearance.enabled:
            self.weight, self.scores = 0.0, {}
            return
        if not self.appearance.auto:
            self.weight, self.scores = self.appearance.weight, {}
            log.info("image weight %.2f (fixed)", self.weight)
            return
        if self.scope == "volume":
            labelled = {z for z in anchors if np.any((labels[z] != 0) & ~np.isin(labels[z], locked))}
            basis = self._basis
            if segs is not None and basis is not None and self.weight is not None \
                    and len(labelled) < REWEIGH_GROWTH * len(basis) and 2 * len(labelled & basis) >= len(basis):
                log.info("image weight %.2f kept (chosen on %d labelled anchors, %d now)", self.weight, len(basis), len(labelled))
                return
            triples = anchor_triples(self.volume_hu, labels, anchors, self.spacing, self.appearance, locked,
                                     cache=self._loo_cache, cancel=cancel, sdf_cache=self.sdf_cache)
            self.weight, self.scores = pick_weight(list(triples.values()), self.appearance)
            self._basis = labelled
            log.info("image weight %.2f (auto, %d labelled anchors)", self.weight, len(labelled))
            return
        only = None
        if segs is not None:
            pos = {z: j for j, z in enumerate(anchors)}
            only = set()
            for s in segs:
                if s.kind != "between":
                    continue
                j = pos[s.lo]
                if j >= 1:
                    only.add((anchors[j - 1], s.lo, s.hi))
                if j + 2 < len(anchors):
                    only.add((s.lo, s.hi, anchors[j + 2]))
        triples = anchor_triples(self.volume_hu, labels, anchors, self.spacing, self.appearance, locked,
                                 cache=self._loo_cache, cancel=cancel, only=only, sdf_cache=self.sdf_cache)
        self.weight, self.scores = pick_weight(list(triples.values()), self.appearance)
        self.gap_weights = {g: w for g, (w, _) in gap_weights(triples, anchors, self.appearance).items()}
        log.info("image weight %.2f (auto); per gap %s", self.weight, self.gap_weights)

    def of_gap(self, a: int, b: int) -> float:
        """The image weight of the gap between anchors ``a`` and ``b``."""
        w = self.gap_weights.get((a, b))
        if w is not None:
            return float(w)
        return float(self.appearance.weight if self.weight is None else self.weight)

    def effective(self) -> AppearanceOptions:
        """The appearance options with the weight in use for this volume."""
        w = self.appearance.weight if self.weight is None else self.weight
        return dataclasses.replace(self.appearance, weight=w, auto=False)

    def options_of_gap(self, a: int, b: int) -> AppearanceOptions:
        """The appearance options of the gap ``(a, b)`` (its own weight)."""
        return dataclasses.replace(self.effective(), weight=self.of_gap(a, b))

    def prune_sdf_cache(self, labels: np.ndarray, anchors: Sequence[int]) -> None:
        """Forget the signed distances of slices that are no longer anchors or whose labels changed."""
        if not self.sdf_cache:
            return
        import hashlib

        current = {(int(z), hashlib.blake2b(np.ascontiguousarray(labels[z]).tobytes(), digest_size=16).digest()) for z in anchors}
        for key in [k for k in self.sdf_cache if k not in current]:
            del self.sdf_cache[key]
