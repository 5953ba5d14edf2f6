"""Propagation engine: labels from anchor slices through a CT volume (core, no Qt).

The user corrects a few axial slices (anchors); the engine fills every other slice. The
engine orchestrates; the work lives beside it:

* :mod:`.segments` - which runs of slices a (re)propagation fills,
* :mod:`.weighting` - the image weight chosen on the volume's own anchors,
* :mod:`.interp` / :mod:`.gap` - ``method="interp"``: the image-guided SDF fill (numpy),
* :mod:`.stcn_passes` - ``method="stcn"``: the network's passes and their caches,
* :mod:`.stcn_fusion` - how the passes become labels (between anchors, outward),
* :mod:`.adapt` - online adaptation of a copy of the network.

Semantics:

* **Anchors are hard constraints.** Anchor slices come back bit-identical (an empty anchor
  means "no organ here"); they are the only slices the memory is seeded from.
* **Between two anchors** every slice takes, per pixel, ``argmax_c log prior_c + a log
  p(HU | c) (+ n log max(p_net_c, 0.05) for STCN)`` (:mod:`.appearance`): the blended
  signed distances of the two anchors, a per-gap intensity model learnt from them and, for
  STCN, the two passes' fused probabilities. The image weight ``a`` is chosen per volume on
  its own anchors by every full propagation and kept by re-propagations until the labelled
  anchors have grown by half (:mod:`.weighting`). A fixed weight 0 restores the plain
  blends (``interp``: SDF interpolation; ``stcn``: the linear SDF prior).
* **Beyond the outermost anchors** STCN propagates the labels of that anchor outward until
  they stop; ``interp`` leaves those slices empty (:attr:`PropagationResult.left_empty`).
* **Re-propagation** after corrections recomputes only the gaps next to each changed slice
  (outward too when it is an outermost anchor); every other slice is returned unchanged.
  With the volume's image weight kept, the recomputed gaps are exactly those of a full
  propagation with that weight; cached passes make it cost about half of recomputing.
* **Locked labels** are never propagated or overwritten.

Per-slice **confidence** (``[0, 1]``, 1 on anchors, low = doubtful), for suggesting the next
slice to check, is the same for both methods: ``1 -`` :func:`~.doubt.slice_doubt`, the
expected gain in mean Dice from correcting a slice (each gap's anchor disagreement and
contour length, weighed by its length and by each label's size, peaking mid-gap; the
slices just beyond an outermost anchor that still holds labels count too), scaled so the
most doubtful slice is 0. :meth:`PropagationEngine.suggest_next` takes its minimum.

Example:
    >>> eng = PropagationEngine(volume_hu, method="interp")            # doctest: +SKIP
    >>> res = eng.propagate(labels, anchors=[10, 40, 70])              # doctest: +SKIP
    >>> res = eng.repropagate(res.labels, [10, 25, 40, 70], changed=[25])  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..crop import BodyCrop
from ..errors import InputError
from ..progress import CancelFn, ProgressFn
from .appearance import AppearanceOptions
from .doubt import slice_doubt
from .interp import check_anchors, sdf_interpolate_with_confidence
from .options import (DECODE_MARGIN, DEFAULT_ADAPT_STEPS, METHODS, NETWORK_WEIGHT, PRIORS, UNKNOWN_CONFIDENCE,  # noqa: F401 - re-exported
                      appearance_options, check_engine_options)
from .segments import Segment, affected_segments, all_segments  # noqa: F401 - re-exported
from .weighting import REWEIGH_GROWTH, WEIGHT_SCOPE, ImageWeight  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

    from .adapt import AdaptResult
    from .stcn_passes import NetworkPass, StcnPasses

log = logging.getLogger(__name__)


def default_weights_path() -> Path:
    """``models_dir()/propagation/stcn_default.pt`` (``$PROPSEG_MODELS`` overrides the folder)."""
    from ..weights import models_dir

    return models_dir() / "propagation" / "stcn_default.pt"


@dataclass
class PropagationResult:
    """Output of :meth:`PropagationEngine.propagate` / :meth:`PropagationEngine.repropagate`.

    Attributes:
        labels: (Z, Y, X) integer labels, the input's dtype; anchor slices bit-identical to
            the input.
        confidence: (Z,) float32 in [0, 1]; 1.0 on anchors; low = doubtful.
        computed: slice indices (re)computed by this call, ascending.
        seconds: wall-clock seconds of the call.
        left_empty: slices outside the outermost anchors that the method left empty
            although a label runs on to that outermost anchor (``interp`` does not
            extrapolate; STCN propagates outward, so there it is empty), ascending, over
            the whole returned volume.
        image_weight: the CT intensity weight in use for the volume after this call.
        image_weight_auto: True when that weight was chosen on the anchors (leave one out).
        method: ``"stcn"`` or ``"interp"``.
    """

    labels: np.ndarray
    confidence: np.ndarray
    computed: list[int]
    seconds: float
    left_empty: list[int] = field(default_factory=list)
    image_weight: float | None = None
    image_weight_auto: bool = False
    method: str = ""


class PropagationEngine:
    """Propagate labels from anchor slices through one CT volume.

    Args:
        volume_hu: (Z, Y, X) CT in Hounsfield units (canonical LPS, slice axis first).
        method: ``"stcn"`` (memory network) or ``"interp"`` (signed-distance interpolation).
        weights: STCN weight file; None takes :func:`default_weights_path`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        memory_every: a propagated slice enters the memory every this many slices (the
            default 10 adds none inside gaps under 10 slices).
        memory_cap: most slices in the memory of one pass (its anchor included).
        stop_threshold: a label is "absent" on a slice when its probability is below this
            on every pixel.
        stop_patience: outward propagation of a label stops after this many consecutive
            absent slices.
        spacing: (sz, sy, sx) mm of the volume (the body crop is square in mm; the image
            model's softness is in mm); square 1 mm pixels if None.
        prior: ``"none"`` or ``"sdf"``: the shape prior fused with the STCN probabilities
            between anchors (:mod:`.stcn_fusion`); the image-guided fusion needs ``"sdf"``.
        prior_weight: weight of the linear SDF prior (image weight fixed at 0), in [0, 1].
        prior_small_cells: objects covering fewer than this many memory cells (1/16 of
            the working resolution) on both bracketing anchors follow the prior alone
            (0 turns this off).
        adapt_steps: if > 0, :meth:`propagate` first fine-tunes a copy of the network for
            this many steps on the anchors it is given (:meth:`adapt`; skipped when the
            anchors are those of the last adaptation). 0 (default): the loaded weights.
        adapt_options: overrides of :data:`~.adapt.ADAPT_DEFAULTS`.
        appearance: :class:`~.appearance.AppearanceOptions` (or a dict of its fields) of
            the image-guided fusion; default: the weight chosen per volume by
            leave-one-anchor-out, 0.5 with fewer than three anchors. A dict holding
            ``weight`` alone fixes it (``{"weight": 0}`` switches the image off).
        network_weight: exponent of the network's probabilities in that fusion (STCN only;
            0 = the image-guided prior alone between anchors, and no pass runs there).
        pass_cache_mb: most megabytes of pass outputs kept for reuse (0 turns it off).
        network_pass: stands in for one pass of the network (see
            :class:`~.stcn_passes.NetworkPass`; tests and experiments).
        weight_scope: ``"volume"`` (default) or ``"gap"`` (:mod:`.weighting`).
        decode_margin: memory cells around an object's extent on the previous slice in
            which the decoder works (:mod:`.stcn_passes`); None decodes whole slices.
        model: an STCN to propagate with instead of loading ``weights`` (training
            validation); used as given, on ``device``, in the caller's train/eval mode.

    Raises:
        InputError: bad volume or parameter, an unknown method or device, no trained
            weights for ``method="stcn"``, or weights that do not match the architecture.
    """

    def __init__(self, volume_hu: np.ndarray, *, method: str = "stcn", weights: str | None = None, device: str = "auto",
                 memory_every: int = 10, memory_cap: int = 16, stop_threshold: float = 0.5, stop_patience: int = 3,
                 spacing: Sequence[float] | None = None, prior: str = "sdf", prior_weight: float = 0.7,
                 prior_small_cells: float = 4.0, adapt_steps: int = 0, adapt_options: dict | None = None,
                 pass_cache_mb: float = 768.0, appearance: AppearanceOptions | dict | None = None,
                 network_weight: float = NETWORK_WEIGHT, network_pass: NetworkPass | None = None,
                 weight_scope: str = WEIGHT_SCOPE, model=None, decode_margin: int | None = DECODE_MARGIN) -> None:
        vol = np.asarray(volume_hu)
        if vol.ndim != 3 or min(vol.shape) < 1:
            raise InputError(f"The CT volume must be a non-empty (Z, Y, X) array, got shape {vol.shape}.")
        check_engine_options(method=method, memory_every=memory_every, memory_cap=memory_cap, stop_threshold=stop_threshold,
                             stop_patience=stop_patience, prior=prior, prior_weight=prior_weight,
                             prior_small_cells=prior_small_cells, pass_cache_mb=pass_cache_mb, adapt_steps=adapt_steps,
                             network_weight=network_weight, decode_margin=decode_margin)
        #: image-guided fusion between anchors (:mod:`.appearance`); weight 0 switches it off.
        self.appearance: AppearanceOptions = appearance_options(appearance)
        self.volume_hu = vol
        self.method = method
        self.spacing = tuple(float(v) for v in spacing) if spacing is not None else (1.0, 1.0, 1.0)
        self.prior = prior
        self.network_weight = float(network_weight)
        self.weighting = ImageWeight(self.appearance, vol, self.spacing, weight_scope)
        self.adapt_steps = int(adapt_steps)
        # checked now when given (or for STCN); the defaults are read on first use, so
        # ``interp`` never imports torch
        self._adapt_options = _adapt_options(adapt_options) if adapt_options is not None or method == "stcn" else None
        #: the last :class:`~.adapt.AdaptResult` (None while the loaded weights are in use).
        self.adaptation: AdaptResult | None = None
        self._adapt_digest: bytes | None = None
        self._device_name = device
        self._device = None
        self.weights_path: Path | None = None
        #: the network's passes and caches (None for ``method="interp"``).
        self.network: StcnPasses | None = None
        self._base_model = None  # the loaded weights; adaptation trains copies
        self.crop = BodyCrop(None)
        #: counters for tests and benchmarks: keys encoded, values encoded, largest memory bank.
        self.stats = {"keys_encoded": 0, "values_encoded": 0, "memory_peak": 0, "passes_run": 0, "passes_reused": 0}
        if method == "stcn":
            self._load_network(weights, model, spacing, dict(memory_every=memory_every, memory_cap=memory_cap,
                                                      stop_threshold=stop_threshold, stop_patience=stop_patience,
                                                      pass_cache_mb=pass_cache_mb, network_pass=network_pass,
                                                      decode_margin=decode_margin),
                               prior_weight, prior_small_cells)
        elif str(device).strip().lower() not in ("auto", "cpu") and not str(device).strip().lower().startswith("cuda"):
            from ..device import resolve_device

            resolve_device(device)  # the unknown-device message (interp needs no device otherwise)

    def _load_network(self, weights, model, spacing, pass_options: dict, prior_weight: float, prior_small_cells: float) -> None:
        from .stcn_fusion import FusionSettings, StcnFusion
        from .stcn_passes import StcnPasses, open_network

        model, self.weights_path, crop = open_network(weights, model, self.device, default_weights_path)
        self._base_model = model
        self.crop = BodyCrop.for_weights(crop, self.volume_hu, spacing)
        self.network = StcnPasses(model, self.volume_hu, self.crop, self.device, stats=self.stats, **pass_options)
        settings = FusionSettings(self.prior, float(prior_weight), float(prior_small_cells), self.network_weight)
        self._fusion = StcnFusion(self.network, self.volume_hu, self.spacing, settings)

    # ------------------------------------------------------------------ public API
    @property
    def device(self) -> torch.device:
        """The torch device (resolved on first use for ``interp``, which needs none)."""
        if self._device is None:
            from ..device import resolve_device

            self._device = resolve_device(self._device_name)
        return self._device

    @property
    def device_name(self) -> str:
        """The device as asked for (``"auto"``, ``"cpu"``, ``"cuda"``, ...)."""
        return str(self._device_name)

    @property
    def model(self):
        """The STCN in use (the adapted copy after :meth:`adapt`); None for ``interp``."""
        return None if self.network is None else self.network.model

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """The body crop ``(y0, y1, x0, x1)`` the network works on (None: the whole slice)."""
        return self.crop.box

    @property
    def image_weight(self) -> float | None:
        """The image weight in use for this volume (set by each (re)propagation; None before)."""
        return self.weighting.weight

    @property
    def image_weight_scores(self) -> dict[float, float]:
        """Leave-one-anchor-out mean Dice per candidate weight behind an automatic choice."""
        return self.weighting.scores

    @property
    def gap_weights(self) -> dict[tuple[int, int], float]:
        """The automatic image weight of each gap ``(a, b)`` (scope ``"gap"``; else empty)."""
        return self.weighting.gap_weights

    @property
    def adapt_options(self) -> dict:
        """The online-adaptation options in use (:data:`~.adapt.ADAPT_DEFAULTS` overridden)."""
        if self._adapt_options is None:
            self._adapt_options = _adapt_options(None)
        return self._adapt_options

    @property
    def resolution(self) -> int | None:
        """Working resolution of the network (None for ``method="interp"``)."""
        return None if self.model is None else self.model.resolution

    def propagate(self, labels: np.ndarray, anchors: Sequence[int], *, locked_labels: Iterable[int] = (),
                  progress: ProgressFn = None, cancel: CancelFn = None) -> PropagationResult:
        """Fill every non-anchor slice from the anchors.

        Args:
            labels: (Z, Y, X) integer labels on the volume's grid; the anchor slices are
                read, other slices only for the locked labels.
            anchors: anchor slice indices (hard constraints; may be empty slices).
            locked_labels: ids kept exactly as in ``labels`` on every slice.
            progress: ``(step, total, message)`` callback, once per slice and pass.
            cancel: returns True to stop; raises :class:`CancelledError` between slices.
        """
        labels, anchors, locked = self._check(labels, anchors, locked_labels)
        if self.adapt_steps > 0 and _anchor_digest(labels, anchors, locked) != self._adapt_digest:
            self.adapt(labels, anchors, locked_labels=locked, progress=progress, cancel=cancel)
        self.weighting.prune_sdf_cache(labels, anchors)
        self.weighting.choose(labels, anchors, locked, cancel)
        return self._run(labels, anchors, all_segments(anchors, labels.shape[0]), locked, progress, cancel)

    def repropagate(self, labels: np.ndarray, anchors: Sequence[int], changed: Iterable[int], *,
                    locked_labels: Iterable[int] = (), progress: ProgressFn = None, cancel: CancelFn = None) -> PropagationResult:
        """Recompute only what the edits of ``changed`` slices affect.

        Only the gaps between the anchors neighbouring each changed slice are recomputed
        (and the outward run when a changed slice is the lowest/highest anchor); all other
        slices are returned unchanged from ``labels``.

        Args:
            labels: (Z, Y, X) current labels (e.g. the previous result with corrections).
            anchors: all anchor slices, including the newly corrected ones.
            changed: slices edited since the last (re)propagation.
            locked_labels, progress, cancel: as :meth:`propagate`.
        """
        labels, anchors, locked = self._check(labels, anchors, locked_labels)
        segs = affected_segments(anchors, changed, labels.shape[0])
        self.weighting.prune_sdf_cache(labels, anchors)
        self.weighting.choose(labels, anchors, locked, cancel, segs)
        return self._run(labels, anchors, segs, locked, progress, cancel)

    def adapt(self, labels: np.ndarray, anchors: Sequence[int], *, steps: int | None = None, locked_labels: Iterable[int] = (),
              eval_clips: int = 0, progress: ProgressFn = None, cancel: CancelFn = None) -> AdaptResult:
        """Fine-tune a copy of the loaded network on clips of the anchors (online adaptation).

        Always starts from the loaded weights (earlier adaptations are discarded), so the
        result depends only on these anchors. The anchors are preprocessed exactly as for
        propagation (body crop, resize, window; labels resized by nearest neighbour); the
        locked labels are left out. Every later (re)propagation uses the adapted copy,
        until :meth:`reset_adaptation` or the next adaptation; the key and value caches are
        emptied. See :mod:`~.adapt` for the clips and the loss.

        Args:
            labels: (Z, Y, X) integer labels; only the anchor slices are read.
            anchors: anchor slice indices.
            steps: optimisation steps (default: the engine's ``adapt_steps``, else 30).
            locked_labels: ids not trained on (they are never propagated either).
            eval_clips: if > 0, also measure the loss on this many fixed anchor clips
                before and after (:attr:`AdaptResult.loss_before` / ``loss_after``).
            progress: ``(step, total, message)`` callback, once per step.
            cancel: returns True to stop; raises :class:`CancelledError` between steps and
                the engine keeps the weights it had.

        Raises:
            InputError: ``method="interp"``, bad steps, or no anchor holds an object
                large enough to train on.
        """
        if self.network is None:
            raise InputError("Online adaptation fine-tunes the STCN network; this engine uses method='interp'.")
        from .adapt import adapt_stcn, anchor_inputs

        labels, anchors, locked = self._check(labels, anchors, locked_labels)
        steps = (self.adapt_steps or DEFAULT_ADAPT_STEPS) if steps is None else int(steps)
        frames, small = anchor_inputs(self.network, labels, anchors, locked, self._base_model.resolution)
        model, result = adapt_stcn(self._base_model, frames, small, steps=steps, options=self.adapt_options, eval_clips=eval_clips,
                                   device=self.device, progress=progress, cancel=cancel)
        self.network.use_model(model)
        self.network.clear()
        self.adaptation = result
        self._adapt_digest = _anchor_digest(labels, anchors, locked)
        return result

    def reset_adaptation(self) -> None:
        """Propagate with the loaded weights again (drops the adapted copy and the caches)."""
        if self.network is not None:
            self.network.use_model(self._base_model)
        self.adaptation = None
        self._adapt_digest = None

    def suggest_next(self, confidence: np.ndarray, anchors: Sequence[int]) -> int:
        """The least confident non-anchor slice (the one to check next).

        Args:
            confidence: (Z,) per-slice confidence (NaN counts as unknown, 0.5).
            anchors: anchor slices, never suggested.

        Raises:
            InputError: every slice is already an anchor.
        """
        conf = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=UNKNOWN_CONFIDENCE)
        candidates = np.setdiff1d(np.arange(conf.shape[0]), np.asarray(list(anchors), dtype=np.int64))
        if candidates.size == 0:
            raise InputError("Every slice is already an anchor; there is no slice left to check.")
        return int(candidates[np.argmin(conf[candidates])])

    # ------------------------------------------------------------------ driver
    def _check(self, labels, anchors, locked_labels) -> tuple[np.ndarray, list[int], np.ndarray]:
        labels = np.asarray(labels)
        if labels.shape != self.volume_hu.shape:
            raise InputError(f"The label volume's shape {labels.shape} differs from the CT's {self.volume_hu.shape}; put the labels on the image grid.")
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.mod(labels, 1) == 0):
                raise InputError("The label volume holds non-integer values; pass integer label ids.")
            labels = labels.astype(np.int32)
        anchors = check_anchors(anchors, labels.shape[0])
        locked = np.array(sorted({int(v) for v in locked_labels}), dtype=np.int64)
        return labels, anchors, locked

    def _run(self, labels, anchors, segs, locked, progress, cancel) -> PropagationResult:
        t0 = time.perf_counter()
        out = labels.copy()
        computed = sorted(z for s in segs for z in s.slices)
        if self.method == "interp":
            self._run_interp(labels, anchors, segs, locked, out, progress, cancel)
        else:
            self.network.prune(labels, anchors, locked)
            guided = self.appearance.enabled and self.prior == "sdf"  # also when auto chose weight 0
            self._fusion.run(labels, segs, locked, out, progress, cancel, guided=guided,
                             gap_options=self.weighting.options_of_gap)
        # Check next's expected-gain model (doubt.py): read from the anchors alone, so it is
        # the same for both methods and for a full run and a re-propagation
        confidence = 1.0 - slice_doubt(out, anchors, locked_labels=locked.tolist())
        confidence[anchors] = 1.0
        left_empty = _left_empty(out, anchors, locked) if self.method == "interp" else []
        seconds = time.perf_counter() - t0
        log.info("%s: %d slices computed in %.2f s", self.method, len(computed), seconds)
        return PropagationResult(out, confidence, computed, seconds, left_empty, image_weight=self.image_weight,
                                 image_weight_auto=bool(self.image_weight_scores), method=self.method)

    def _run_interp(self, labels, anchors, segs, locked, out, progress, cancel) -> np.ndarray:
        gaps = [(s.lo, s.hi) for s in segs if s.kind == "between"]
        interp, conf = sdf_interpolate_with_confidence(labels, anchors, locked_labels=locked, progress=progress, cancel=cancel, ranges=gaps,
                                                       image=self.volume_hu, spacing=self.spacing,
                                                       appearance=self.weighting.effective(),
                                                       gap_weights={g: self.weighting.of_gap(*g) for g in gaps},
                                                       sdf_cache=self.weighting.sdf_cache)
        for s in segs:
            zs = s.slices
            out[zs] = interp[zs]
            if s.kind != "between":
                anchor = s.hi if s.kind == "below" else s.lo
                has = bool(np.any((labels[anchor] != 0) & ~np.isin(labels[anchor], locked)))
                conf[zs] = UNKNOWN_CONFIDENCE if has else 1.0
        return conf


def _adapt_options(options: dict | None) -> dict:
    from .adapt import adapt_options

    return adapt_options(options)


def _anchor_digest(labels: np.ndarray, anchors: Sequence[int], locked: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(anchors, dtype=np.int64).tobytes() + locked.tobytes())
    for z in anchors:
        h.update(np.ascontiguousarray(labels[z]).tobytes())
    return h.digest()


def _left_empty(out: np.ndarray, anchors: Sequence[int], locked: np.ndarray) -> list[int]:
    """Slices outside the outermost anchors holding no (unlocked) label while that anchor
    holds one (see :attr:`PropagationResult.left_empty`)."""

    def holds(z: int) -> bool:
        sl = out[z]
        return bool(np.any((sl != 0) & ~np.isin(sl, locked))) if locked.size else bool(sl.any())

    empty = []
    if anchors[0] > 0 and holds(anchors[0]):
        empty += [z for z in range(anchors[0]) if not holds(z)]
    if anchors[-1] < out.shape[0] - 1 and holds(anchors[-1]):
        empty += [z for z in range(anchors[-1] + 1, out.shape[0]) if not holds(z)]
    return empty
