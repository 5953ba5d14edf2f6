"""PROTOCOL.md section 1: k-slice propagation, one round of the simulated clinician.

Given a CT volume and its ground truth GT (Z axial slices):

1. :func:`reference_slices` picks R = round(linspace(z_lo, z_hi, k)) over the axial
   extent of all foreground labels, plus each label's largest-area slice, deduplicated.
2. :func:`make_seeds`: GT on the slices of R (all labels at once), every other slice empty.
3. Every method fills the slices not in R from the same seeds.
4. :func:`score_k_slice`: Dice per label over the slices not in R, mean over the labels
   present there; the reference slices must come back unchanged (checked, reported).

:func:`run_k_slice` runs all methods for several k on one case, timing wall-clock seconds
and peak memory (see :class:`PeakMemory`); :func:`write_k_slice_report` writes the JSON,
the PNG plot (mean Dice vs k per method) and the markdown table.

Methods (``METHODS``), one name per algorithm as everywhere in the tool: ``stcn`` (the
memory-bank network with the guided prior, through
``napari_propseg.propagation.engine.PropagationEngine``; skipped with a logged note when
no trained weights exist), ``interp`` (the engine's guided interpolation without a network:
SDF shape prior x CT intensity model of the two anchors,
:mod:`napari_propseg.propagation.appearance`; what ``propseg propagate --method interp``
runs), ``sdf`` (plain per-label signed-distance interpolation, the classical baseline),
``copy_nearest`` and ``mci`` (ITK's MorphologicalContourInterpolator, the algorithm of
3D Slicer's "Fill between slices", here in :func:`mci_interpolate`). ``guided`` is the old
name of ``interp`` (accepted with a warning). ``stcn_noimg`` (not in the default set) is
``stcn`` without the intensity model (network + linear SDF prior), for ablations.
``stcn_adapt`` (not in the default set) is ``stcn`` with online adaptation: the engine
first fine-tunes a copy of the network for ``adapt_steps`` steps on the reference slices
(their seconds are in the method's ``seconds`` and, alone, in ``adapt_seconds``).

:func:`run_speed` is section 3 (every label through one volume, then re-propagation after
one corrected slice; wall seconds and peak resident memory).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..progress import check_cancel, report

log = logging.getLogger(__name__)

DEFAULT_KS = (3, 5, 9, 17)
ALL_METHODS = ("stcn", "interp", "sdf", "copy_nearest", "mci")
#: Old benchmark method names -> today's (one name per algorithm everywhere).
METHOD_ALIASES = {"guided": "interp"}
#: Adaptation steps of the ``stcn_adapt`` benchmark method unless told otherwise.
DEFAULT_ADAPT_STEPS = 30
CLASSICAL_METHODS = ("sdf", "copy_nearest", "mci")
#: Methods run through ``PropagationEngine`` (built once per run, outside the timing).
ENGINE_METHODS = ("stcn", "stcn_adapt", "stcn_noimg", "interp")


# --------------------------------------------------------------------------- protocol


def _check_gt(gt: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt)
    if gt.ndim != 3:
        raise InputError(f"The ground-truth label volume must be 3-D (Z, Y, X), got shape {gt.shape}.")
    if gt.dtype.kind not in "iu":
        raise InputError(f"The ground-truth label volume must hold integer ids, got pixel type {gt.dtype}.")
    return gt


def foreground_extent(gt: np.ndarray) -> tuple[int, int]:
    """First and last axial slice (inclusive) holding any foreground label.

    Raises:
        InputError: the label volume is empty.
    """
    zs = np.flatnonzero(np.asarray(gt).reshape(gt.shape[0], -1).any(axis=1))
    if zs.size == 0:
        raise InputError("The ground-truth label volume is empty; a benchmark case needs at least one labelled voxel.")
    return int(zs[0]), int(zs[-1])


def reference_slices(gt: np.ndarray, k: int) -> list[int]:
    """The reference slices R of PROTOCOL.md section 1.

    ``round(linspace(z_lo, z_hi, k))`` over the axial extent [z_lo, z_hi] of all
    foreground labels (numpy rounding, i.e. half to even), plus for every label the slice
    where its area is largest (the first such slice on ties), duplicates removed.

    Args:
        gt: ground-truth labels, shape (Z, Y, X), integer, 0 = background.
        k: number of evenly spaced slices, >= 1 (k = 1 takes the middle of the extent).

    Returns:
        Sorted slice indices; ``len(R)`` is between 1 and ``k + n_labels``.

    Example:
        >>> import numpy as np
        >>> gt = np.zeros((20, 4, 4), np.uint8); gt[5:16, 1:3, 1:3] = 1; gt[9, :, :] = 1
        >>> reference_slices(gt, 3)
        [5, 9, 10, 15]
    """
    gt = _check_gt(gt)
    if int(k) < 1:
        raise InputError(f"k = {k} reference slices makes no sense; pass k >= 1.")
    k = int(k)
    z_lo, z_hi = foreground_extent(gt)
    if k == 1:
        ref = {int(np.rint((z_lo + z_hi) / 2))}
    else:
        ref = {int(z) for z in np.rint(np.linspace(z_lo, z_hi, k))}
    flat = gt.reshape(gt.shape[0], -1)
    for lab in np.unique(flat[z_lo:z_hi + 1]):
        if lab == 0:
            continue
        areas = np.count_nonzero(flat == lab, axis=1)
        ref.add(int(np.argmax(areas)))
    return sorted(ref)


def start_slices(gt: np.ndarray, k: int) -> list[int]:
    """k evenly spaced slices over the foreground extent (numpy rounding), deduplicated."""
    z_lo, z_hi = foreground_extent(gt)
    if k < 1:
        raise InputError(f"k = {k} starting slices makes no sense; pass k >= 1.")
    if k == 1:
        return [int(np.rint((z_lo + z_hi) / 2))]
    return sorted({int(z) for z in np.rint(np.linspace(z_lo, z_hi, k))})


def volume_mean_dice(pred: np.ndarray, gt: np.ndarray, labels: Sequence[int]) -> float:
    """Mean over ``labels`` of each label's Dice over the whole volume."""
    d = dice_per_label(pred, gt, labels)
    return float(np.mean([d[int(i)] for i in labels])) if len(labels) else math.nan


def make_seeds(gt: np.ndarray, ref: Iterable[int]) -> np.ndarray:
    """Seed volume: GT on the slices of ``ref`` (all labels), zeros elsewhere. Shape of gt."""
    gt = _check_gt(gt)
    seeds = np.zeros_like(gt)
    idx = list(ref)
    seeds[idx] = gt[idx]
    return seeds


def dice_per_label(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int] | None = None,
                   slices: np.ndarray | Sequence[int] | None = None) -> dict[int, float]:
    """Dice of every label over a set of axial slices, from one confusion count.

    Args:
        pred: predicted labels (Z, Y, X). gt: ground truth, same shape.
        labels: ids to score (default: every id > 0 in ``gt`` or ``pred`` on those slices).
        slices: slice indices or a boolean mask of length Z (default all slices).

    Returns:
        {label: dice}; a label empty in both gets 1.0 (the metrics module's convention).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"Prediction shape {pred.shape} differs from ground-truth shape {gt.shape}.")
    if slices is not None:
        pred = pred[slices]
        gt = gt[slices]
    n = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    conf = np.bincount(gt.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel(), minlength=n * n).reshape(n, n)
    g_cnt = conf.sum(axis=1)
    p_cnt = conf.sum(axis=0)
    if labels is None:
        labels = [i for i in range(1, n) if g_cnt[i] or p_cnt[i]]
    out: dict[int, float] = {}
    for lab in labels:
        lab = int(lab)
        if lab >= n:
            out[lab] = 1.0
            continue
        denom = g_cnt[lab] + p_cnt[lab]
        out[lab] = 1.0 if denom == 0 else float(2 * conf[lab, lab] / denom)
    return out


def score_k_slice(pred: np.ndarray, gt: np.ndarray, ref: Sequence[int]) -> dict[str, Any]:
    """PROTOCOL section 1 step 4: Dice per label over the slices not in ``ref``.

    The mean is over the labels present in GT on the scored slices (a label drawn only on
    reference slices has nothing to score). ``per_label`` also holds labels the prediction
    invented (Dice 0) so that false positives are visible; they do not enter the mean.

    Returns:
        ``{"mean_dice", "per_label": {label: dice}, "labels_scored": [...],
        "anchors_unchanged": bool}``.
    """
    keep = np.ones(gt.shape[0], bool)
    keep[list(ref)] = False
    if not keep.any():
        raise InputError("Every slice is a reference slice; there is nothing left to score.")
    gt_s = gt[keep]
    present = sorted(int(v) for v in np.unique(gt_s) if v != 0)
    per_label = dice_per_label(pred, gt, None, keep)
    mean = float(np.mean([per_label[i] for i in present])) if present else math.nan
    return {
        "mean_dice": mean,
        "per_label": {int(k): float(v) for k, v in per_label.items()},
        "labels_scored": present,
        "anchors_unchanged": bool(np.array_equal(pred[list(ref)], gt[list(ref)])),
    }


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a block of code, in MB.

    Two measurements, both reported:

    * ``traced_mb``: :mod:`tracemalloc`'s peak of memory allocated during the block
      (Python objects and numpy arrays; not torch tensors nor ITK buffers). Exact, even
      when freed pages are reused (which hides allocations from the RSS).
    * ``rss_delta_mb``: growth of the process's resident set size during the block: with
      psutil installed, a background thread samples the RSS every ``interval`` seconds
      (``method`` ``"tracemalloc+psutil-rss"``); without psutil, the growth of
      ``resource.getrusage(...).ru_maxrss`` (``"tracemalloc+ru_maxrss"``, only visible
      when the block raises the process's lifetime peak). Catches native allocations
      (torch, ITK), misses reuse of memory the process already held.

    ``peak_mb`` is the larger of the two; ``peak_rss_mb`` the absolute peak RSS seen.
    tracemalloc costs a little time per Python allocation; the numpy/torch/ITK-bound code
    benchmarked here is slowed by a few percent at most.

    Example:
        >>> import numpy as np
        >>> with PeakMemory() as mem:
        ...     _ = np.ones(2**20)
        >>> mem.peak_mb >= 8
        True
    """

    def __init__(self, interval: float = 0.005, *, trace: bool = True):
        self.interval = interval
        self.trace = trace
        self.peak_mb = math.nan
        self.traced_mb = math.nan
        self.rss_delta_mb = math.nan
        self.peak_rss_mb = math.nan
        try:
            import psutil  # noqa: F401

            rss = "psutil-rss"
        except ImportError:
            rss = "ru_maxrss"
        self.method = f"tracemalloc+{rss}" if trace else rss

    def __enter__(self) -> "PeakMemory":
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._thread = None
        if self.method.endswith("psutil-rss"):
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    rss = self._proc.memory_info().rss
                    if rss > self._peak:
                        self._peak = rss
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        if self.trace:
            self._started = not tracemalloc.is_tracing()
            if self._started:
                tracemalloc.start()
            tracemalloc.reset_peak()
            self._traced0 = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        if self.trace:
            self.traced_mb = max(0, tracemalloc.get_traced_memory()[1] - self._traced0) / 2**20
            if self._started:
                tracemalloc.stop()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.rss_delta_mb = (self._peak - self._base) / 2**20
            self.peak_rss_mb = self._peak / 2**20
        else:
            self.rss_delta_mb = (maxrss - self._maxrss0) / 1024
            self.peak_rss_mb = maxrss / 1024
        self.peak_mb = float(np.nanmax([self.traced_mb, self.rss_delta_mb]))


# --------------------------------------------------------------------------- methods


def _as_label_array(result: Any) -> np.ndarray:
    """Accept a label array or an object with a ``labels`` attribute (engine result)."""
    arr = getattr(result, "labels", result)
    return np.asarray(arr)


def mci_interpolate(labels: np.ndarray, anchors: Sequence[int], *, axis: int = 0,
                    progress=None, cancel=None) -> np.ndarray:
    """ITK's MorphologicalContourInterpolator (3D Slicer's "Fill between slices") per label.

    Each label is interpolated on its own binary image, along the slice axis, from the
    anchor slices only (``SetUseCustomSlicePositions``): an anchor on which the label is
    absent counts as "drawn empty", so the label shrinks toward it, exactly as the other
    methods treat empty anchors. Like Slicer, MCI does not extrapolate beyond a label's
    outermost drawn slice. Labels are merged in ascending id order; a voxel claimed by
    two labels keeps the lower id.

    Args:
        labels: (Z, Y, X) integer volume holding the anchor slices (other slices ignored).
        anchors: anchor slice indices along ``axis``.
        axis: numpy slice axis (0 = axial).

    Returns:
        (Z, Y, X) label volume, same dtype as ``labels``.

    Raises:
        InputError: the ``itk`` package with the MorphologicalContourInterpolator module
            is not installed.
    """
    try:
        import itk  # pip package itk-morphologicalcontourinterpolation
        mci_cls = itk.MorphologicalContourInterpolator
    except (ImportError, AttributeError) as exc:
        raise InputError("The 'mci' baseline needs ITK's MorphologicalContourInterpolator; "
                         "pip install itk-morphologicalcontourinterpolation.") from exc
    labels = np.asarray(labels)
    anchors = sorted({int(a) for a in anchors})
    itk_axis = labels.ndim - 1 - axis  # ITK index order is (x, y, z)
    out = np.zeros_like(labels)
    anchor_block = np.take(labels, anchors, axis=axis)
    ids = [int(v) for v in np.unique(anchor_block) if v != 0]
    # ITK's multi-threaded MorphologicalContourInterpolator corrupts the heap (glibc
    # aborts with "malloc_consolidate(): unaligned fastbin chunk detected" or segfaults,
    # often only at interpreter exit) after a few calls in one process; reproduced with
    # itk alone, no torch/SimpleITK. One ITK thread avoids it; the previous global
    # default is restored afterwards.
    mt = itk.MultiThreaderBase
    n_threads = mt.GetGlobalDefaultNumberOfThreads()
    mt.SetGlobalDefaultNumberOfThreads(1)
    try:
        for step, lab in enumerate(ids):
            check_cancel(cancel)
            out = _mci_one_label(itk, mci_cls, labels, anchor_block, anchors, axis, itk_axis, lab, out)
            report(progress, step + 1, len(ids), f"mci label {lab}")
    finally:
        mt.SetGlobalDefaultNumberOfThreads(n_threads)
    return out


def _mci_one_label(itk, mci_cls, labels, anchor_block, anchors, axis, itk_axis, lab, out):
    """Interpolate one label with MCI and merge it into ``out`` (lower ids win)."""
    binary = np.zeros(labels.shape, np.uint8)
    sl = [slice(None)] * labels.ndim
    sl[axis] = anchors
    binary[tuple(sl)] = (anchor_block == lab)
    img = itk.image_from_array(binary)
    filt = mci_cls.New(img)
    filt.SetAxis(itk_axis)
    filt.SetLabel(1)
    filt.SetUseCustomSlicePositions(True)
    filt.SetLabeledSliceIndices(itk_axis, 1, anchors)
    filt.Update()
    res = itk.array_from_image(filt.GetOutput()).astype(bool)
    out[res & (out == 0)] = lab
    return out


_ITK_WARM = False


def _warm_itk() -> None:
    """Load ITK's lazily imported module once, outside the timed block (~10 s)."""
    global _ITK_WARM
    if not _ITK_WARM:
        a = np.zeros((3, 4, 4), np.uint8)
        a[0, 1:3, 1:3] = 1
        a[2, 1:3, 1:3] = 1
        mci_interpolate(a, [0, 2])
        _ITK_WARM = True


def _method_sdf(image_hu, seeds, anchors, **_) -> np.ndarray:
    from ..propagation.interp import sdf_interpolate

    return _as_label_array(sdf_interpolate(seeds, anchors))


def _method_copy_nearest(image_hu, seeds, anchors, **_) -> np.ndarray:
    from ..propagation.interp import copy_nearest

    return _as_label_array(copy_nearest(seeds, anchors))


def _method_mci(image_hu, seeds, anchors, **_) -> np.ndarray:
    return mci_interpolate(seeds, anchors, axis=0)


def make_stcn_engine(image_hu: np.ndarray, *, method: str = "stcn", weights=None, device: str = "cpu", spacing=None,
                     adapt_steps: int = 0, appearance: dict | None = None):
    """Build a ``PropagationEngine``; raises ``InputError`` (e.g. no weights) or ImportError.

    ``spacing`` (sz, sy, sx) in mm is forwarded when given (the engine's body crop needs it
    for non-square pixels); ``adapt_steps > 0`` turns on online adaptation.
    """
    from ..propagation.engine import PropagationEngine

    kwargs: dict[str, Any] = {"method": method, "device": device}
    if weights is not None:
        kwargs["weights"] = weights
    if spacing is not None:
        kwargs["spacing"] = tuple(float(v) for v in spacing)
    if adapt_steps:
        kwargs["adapt_steps"] = int(adapt_steps)
    if appearance is not None:
        kwargs["appearance"] = dict(appearance)
    return PropagationEngine(image_hu, **kwargs)


def _method_stcn(image_hu, seeds, anchors, *, engine=None, **_) -> np.ndarray:
    return _as_label_array(engine.propagate(seeds, list(anchors)))


METHODS: dict[str, Callable[..., np.ndarray]] = {
    "stcn": _method_stcn,
    "stcn_adapt": _method_stcn,
    "stcn_noimg": _method_stcn,
    "interp": _method_stcn,
    "sdf": _method_sdf,
    "copy_nearest": _method_copy_nearest,
    "mci": _method_mci,
}


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = [_alias(m) for m in methods]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"Unknown benchmark method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}.")
    return methods


def _alias(m: str) -> str:
    if m in METHOD_ALIASES:
        log.warning("benchmark method %r is now called %r (the engine's guided interpolation); %r still works but will go",
                    m, METHOD_ALIASES[m], m)
        return METHOD_ALIASES[m]
    return m


# --------------------------------------------------------------------------- runner


def run_k_slice(
    image_hu: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    ks: Sequence[int] = DEFAULT_KS,
    methods: Sequence[str] = ALL_METHODS,
    *,
    case: str = "case",
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    label_names: Mapping[int, str] | None = None,
    progress=None,
    cancel=None,
    adapt_steps: int = DEFAULT_ADAPT_STEPS,
) -> dict[str, Any]:
    """PROTOCOL section 1 on one case: every method, every k, the same seeds.

    Args:
        image_hu: CT volume in HU, shape (Z, Y, X) (only ``stcn`` looks at it).
        gt: ground-truth labels, shape (Z, Y, X), integer.
        spacing: (sz, sy, sx) in mm (recorded, and given to the STCN engine).
        ks: numbers of evenly spaced reference slices.
        methods: subset of :data:`ALL_METHODS`.
        case: case name for the report.
        weights: STCN weight file (``None``: the engine's default lookup).
        device: ``auto|cpu|cuda`` for STCN.
        label_names: id -> name for the report.
        progress: ``(step, total, message)`` callback, once per (k, method).
        cancel: callable returning True to stop.
        adapt_steps: online adaptation steps of the ``stcn_adapt`` method (>= 1).

    Returns:
        A JSON-able dict: case info and ``runs``, one per k, each with ``ref`` (R),
        ``n_ref``, ``ref_fraction`` (|R|/Z) and ``methods`` ``{name: {mean_dice,
        per_label, labels_scored, anchors_unchanged, seconds, setup_seconds, peak_mb,
        traced_mb, rss_delta_mb, peak_rss_mb}}`` (see :class:`PeakMemory`) or ``{name: {"skipped": reason}}``. Seconds are wall-clock of the
        propagation call only (ITK's one-off lazy module load and the STCN engine's
        construction, reported as ``setup_seconds``, are outside it).
    """
    gt = _check_gt(gt)
    image_hu = np.asarray(image_hu)
    if image_hu.shape != gt.shape:
        raise InputError(f"Image shape {image_hu.shape} differs from label shape {gt.shape} in case {case}; put both on one grid.")
    methods = _check_methods(methods)
    if "stcn_adapt" in methods and int(adapt_steps) < 1:
        raise InputError(f"The stcn_adapt method needs at least 1 adaptation step, got {adapt_steps}.")
    names = dict(label_names or {})
    z = gt.shape[0]
    res: dict[str, Any] = {
        "case": case,
        "shape": list(gt.shape),
        "spacing": [float(s) for s in spacing],
        "labels": {int(i): names.get(int(i), f"label_{int(i)}") for i in np.unique(gt) if i != 0},
        "methods": methods,
        "memory_method": PeakMemory().method,
        "runs": [],
    }
    skipped: dict[str, str] = {}
    total = len(ks) * len(methods)
    step = 0
    for k in ks:
        ref = reference_slices(gt, k)
        seeds = make_seeds(gt, ref)
        run: dict[str, Any] = {"k": int(k), "ref": ref, "n_ref": len(ref), "ref_fraction": len(ref) / z, "methods": {}}
        for m in methods:
            check_cancel(cancel)
            step += 1
            report(progress, step, total, f"{case}: k={k} {m}")
            if m in skipped:
                run["methods"][m] = {"skipped": skipped[m]}
                continue
            extra: dict[str, Any] = {}
            setup = 0.0
            try:
                if m in ENGINE_METHODS:
                    t0 = time.perf_counter()
                    extra["engine"] = make_stcn_engine(image_hu, weights=weights, device=device, spacing=spacing,
                                                       method="interp" if m == "interp" else "stcn",
                                                       adapt_steps=int(adapt_steps) if m == "stcn_adapt" else 0,
                                                       appearance={"weight": 0.0} if m == "stcn_noimg" else None)
                    setup = time.perf_counter() - t0
                elif m == "mci":
                    _warm_itk()
            except (InputError, ImportError) as exc:
                reason = str(exc) if isinstance(exc, InputError) else f"not available ({exc})"
                log.warning("benchmark %s: method %s skipped: %s", case, m, reason)
                skipped[m] = reason
                run["methods"][m] = {"skipped": reason}
                continue
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                pred = METHODS[m](image_hu, seeds.copy(), ref, spacing=spacing, **extra)
                seconds = time.perf_counter() - t0
            adaptation = getattr(extra.get("engine"), "adaptation", None)
            extra.clear()
            if pred.shape != gt.shape:
                raise RuntimeError(f"method {m} returned shape {pred.shape}, expected {gt.shape}")
            sc = score_k_slice(pred, gt, ref)
            if not sc["anchors_unchanged"]:
                log.error("benchmark %s: method %s changed the reference slices at k=%d", case, m, k)
            sc.update(seconds=seconds, setup_seconds=setup, peak_mb=mem.peak_mb, traced_mb=mem.traced_mb,
                      rss_delta_mb=mem.rss_delta_mb, peak_rss_mb=mem.peak_rss_mb)
            if adaptation is not None:
                sc.update(adapt_steps=adaptation.steps, adapt_seconds=adaptation.seconds)
            run["methods"][m] = sc
            log.info("%s k=%d |R|=%d %s: mean Dice %.4f in %.2f s", case, k, len(ref), m, sc["mean_dice"], seconds)
        res["runs"].append(run)
    return res


# --------------------------------------------------------------------------- reports


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (non-finite floats as ``Infinity``/``NaN``, as Python does)."""
    from ..atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n", what="benchmark JSON")


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def k_slice_markdown(results: Sequence[Mapping[str, Any]], machine: str = "") -> str:
    """Markdown tables: a summary (mean Dice, |R|, |R|/Z, seconds, peak MB per method and
    k) and per-label Dice, for every case."""
    lines: list[str] = ["# k-slice propagation benchmark (PROTOCOL.md section 1)", ""]
    if machine:
        lines += [f"Machine: {machine}", ""]
    summary = mean_over_cases(results)
    if len(results) > 1 and summary:
        methods = list(dict.fromkeys(m for per_k in summary.values() for m in per_k))
        lines += [f"## Mean over cases ({len(results)} cases; each case's mean Dice over its labels, then the mean over cases)", "",
                  "| k | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for k, per in sorted(summary.items()):
            lines.append(f"| {k} | " + " | ".join(f"{_fmt(per[m]['mean'])} (n={per[m]['n']})" if m in per else "-" for m in methods) + " |")
        lines += ["", "| case | " + " | ".join(f"k={k} {m}" for k in sorted(summary) for m in methods) + " |",
                  "|---|" + "---|" * (len(summary) * len(methods))]
        for res in results:
            by_k = {run["k"]: run["methods"] for run in res["runs"]}
            cells = []
            for k in sorted(summary):
                for m in methods:
                    r = by_k.get(k, {}).get(m, {})
                    cells.append(_fmt(r.get("mean_dice")) if "mean_dice" in r else "-")
            lines.append(f"| {res['case']} | " + " | ".join(cells) + " |")
        lines.append("")
    for res in results:
        lines += [f"## {res['case']}  (shape {tuple(res['shape'])}, spacing {tuple(round(s, 3) for s in res['spacing'])} mm)", ""]
        lines += ["| k | \\|R\\| | \\|R\\|/Z | method | mean Dice | seconds | peak MB | refs unchanged |",
                  "|---|---|---|---|---|---|---|---|"]
        skipped: dict[str, str] = {}
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "skipped" in r:
                    skipped.setdefault(m, r["skipped"])
                else:
                    lines.append(f"| {run['k']} | {run['n_ref']} | {run['ref_fraction']:.3f} | {m} | {_fmt(r['mean_dice'])} | "
                                 f"{_fmt(r['seconds'], 2)} | {_fmt(r['peak_mb'], 0)} | {'yes' if r['anchors_unchanged'] else 'NO'} |")
        lines.append("")
        for m, why in skipped.items():
            lines += [f"Skipped {m}: {why}", ""]
        labs = sorted(int(i) for i in res["labels"])
        names = [res["labels"][i] if i in res["labels"] else res["labels"].get(str(i), str(i)) for i in labs]
        lines += ["Per-label Dice (slices not in R):", "",
                  "| k | method | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(labs)]
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "skipped" in r:
                    continue
                pl = {int(a): b for a, b in r["per_label"].items()}
                scored = set(int(x) for x in r["labels_scored"])
                cells = [_fmt(pl.get(i)) if i in scored else "-" for i in labs]
                lines.append(f"| {run['k']} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def mean_over_cases(results: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """``{k: {method: {"mean": mean over cases of the case's mean Dice, "n": cases}}}``
    (PROTOCOL.md section 4: per case first, then over cases; skipped runs left out)."""
    acc: dict[int, dict[str, list[float]]] = {}
    for res in results:
        for run in res["runs"]:
            for m, r in run["methods"].items():
                if "mean_dice" in r and r["mean_dice"] is not None and not (isinstance(r["mean_dice"], float) and math.isnan(r["mean_dice"])):
                    acc.setdefault(int(run["k"]), {}).setdefault(m, []).append(float(r["mean_dice"]))
    return {k: {m: {"mean": float(np.mean(v)), "n": len(v)} for m, v in per.items()} for k, per in acc.items()}


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib ``Figure`` and write it atomically to ``path`` (parents created)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def write_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, section: str, machine: str,
                 stem: str, plot: Callable[[Sequence[Mapping[str, Any]], Path], Path],
                 markdown: Callable[[Sequence[Mapping[str, Any]], str], str], extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write a benchmark's ``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` into ``out_dir``.

    Args:
        results: one result dict per case.
        out_dir: folder (created).
        section: the protocol section, recorded in the JSON.
        machine: machine description, recorded in the JSON and the markdown.
        stem: file name stem.
        plot: ``(results, png_path) -> png_path``.
        markdown: ``(results, machine) -> markdown text``.
        extra: more top-level JSON entries (e.g. the mean over cases).

    Returns:
        ``{"json": path, "png": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"protocol": section, "machine": machine,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **dict(extra or {}), "cases": list(results)}
    paths = {"json": write_json(payload, out / f"{stem}.json"), "png": plot(results, out / f"{stem}.png")}
    md = out / f"{stem}.md"
    md.write_text(markdown(results, machine) + "\n", encoding="utf-8")
    paths["md"] = md
    return paths


def plot_k_slice(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: mean Dice against k, one line per method, one panel per case (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = max(1, len(results))
    fig = Figure(figsize=(4.5 * n, 3.8), dpi=110)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, res in zip(axes, results):
        methods = res["methods"]
        for m in methods:
            ks, ds = [], []
            for run in res["runs"]:
                r = run["methods"].get(m, {})
                if "mean_dice" in r:
                    ks.append(run["k"])
                    ds.append(r["mean_dice"])
            if ks:
                ax.plot(ks, ds, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks([run["k"] for run in res["runs"]], [str(run["k"]) for run in res["runs"]])
        ax.set_xlabel("k (evenly spaced reference slices)")
        ax.set_ylabel("mean Dice (non-reference slices)")
        ax.set_title(res["case"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_k_slice_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                         machine: str = "", stem: str = "k_slice") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.png`` and ``<stem>.md`` into ``out_dir``.

    Returns:
        ``{"json": path, "png": path, "md": path}``.
    """
    summary = {str(k): v for k, v in sorted(mean_over_cases(results).items())}
    return write_report(results, out_dir, section="PROTOCOL.md section 1", machine=machine, stem=stem,
                        plot=plot_k_slice, markdown=k_slice_markdown, extra={"mean_over_cases": summary})


def machine_description() -> str:
    """One line naming the CPU, core count and torch threads (and the GPU if any)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical cores"
    try:
        import torch

        desc += f", torch {torch.__version__} with {torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return desc


# --------------------------------------------------------------------------- speed (section 3)


def run_speed(
    image_hu: np.ndarray,
    gt: np.ndarray,
    *,
    method: str = "stcn",
    k: int = 3,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    threads: int | None = 2,
    case: str = "case",
    spacing: Sequence[float] | None = None,
    protocol_seeds: bool = False,
) -> dict[str, Any]:
    """PROTOCOL.md section 3: propagate every label through a volume, then re-propagate
    after one corrected slice; wall-clock seconds and peak resident memory.

    Anchors are k evenly spaced ground-truth slices over the foreground extent; the
    corrected slice is the middle slice between the first two anchors (ground truth put
    in, ``repropagate(..., changed=[z])``). With ``protocol_seeds`` (a real case) the
    anchors are PROTOCOL.md section 1's reference slices (:func:`reference_slices`) and the
    corrected slice is the one the tool's Check next names (``engine.suggest_next``), as a
    clinician would go.

    Args:
        image_hu: CT in HU, shape (Z, Y, X). gt: labels, same shape.
        method: engine method (``stcn`` or ``interp``).
        k: number of anchor slices (>= 2).
        weights, device: for the engine.
        threads: torch CPU threads (PROTOCOL: 2); ``None`` leaves them as they are.
        case: name for the report.
        spacing: (sz, sy, sx) in mm of the volume, for the engine's body crop
            (``None``: the engine's default).

    Returns:
        ``{"case", "shape", "method", "device", "threads", "anchors", "setup_seconds",
        "propagate_seconds", "propagate_peak_rss_mb", "propagate_peak_delta_mb",
        "repropagate_slice", "repropagate_seconds", "repropagate_peak_rss_mb",
        "memory_method", "full_s", "repropagate_s", "slices_recomputed", "peak_rss_mb",
        "mean_dice_full", "mean_dice_after"}`` (``full_s`` = ``propagate_seconds``,
        ``repropagate_s`` = ``repropagate_seconds``, ``peak_rss_mb`` the larger peak).

    Raises:
        InputError: no weights / engine unavailable, fewer than 2 anchors.
    """
    import torch

    gt = _check_gt(gt)
    if threads is not None and str(device) == "cpu":
        torch.set_num_threads(int(threads))
    anchors = reference_slices(gt, k) if protocol_seeds else start_slices(gt, k)
    if len(anchors) < 2:
        raise InputError(f"The speed benchmark needs at least two anchor slices, got {anchors}; pass k >= 2.")
    seeds = make_seeds(gt, anchors)
    t0 = time.perf_counter()
    try:
        engine = make_stcn_engine(np.asarray(image_hu), method=method, weights=weights, device=device, spacing=spacing)
    except ImportError as exc:
        raise InputError(f"The propagation engine is not available ({exc}); install napari-propseg completely.") from exc
    setup = time.perf_counter() - t0
    with PeakMemory(trace=False) as mem:  # resident memory, torch included
        t0 = time.perf_counter()
        res = engine.propagate(seeds, list(anchors))
        t_prop = time.perf_counter() - t0
    pred = _as_label_array(res)
    zc = (anchors[0] + anchors[1]) // 2
    if protocol_seeds:
        try:
            zc = int(engine.suggest_next(res.confidence, list(anchors)))
        except InputError:  # every slice is an anchor
            pass
    labels = pred.copy()
    labels[zc] = gt[zc]
    new_anchors = sorted(set(anchors) | {zc})
    with PeakMemory(trace=False) as mem2:
        t0 = time.perf_counter()
        res2 = engine.repropagate(labels, new_anchors, changed=[zc])
        t_re = time.perf_counter() - t0
    present = [int(v) for v in np.unique(gt) if v != 0]
    out = {
        "case": case, "shape": list(gt.shape), "method": method, "device": str(device),
        "threads": torch.get_num_threads(), "anchors": anchors, "setup_seconds": setup,
        "propagate_seconds": t_prop, "propagate_peak_rss_mb": mem.peak_rss_mb, "propagate_peak_delta_mb": mem.peak_mb,
        "repropagate_slice": int(zc), "repropagate_seconds": t_re, "repropagate_peak_rss_mb": mem2.peak_rss_mb,
        "memory_method": mem.method,
        "full_s": t_prop, "repropagate_s": t_re, "slices_recomputed": [int(z) for z in getattr(res2, "computed", [])],
        "peak_rss_mb": max(v for v in (mem.peak_rss_mb, mem2.peak_rss_mb) if v is not None) if (mem.peak_rss_mb or mem2.peak_rss_mb) else None,
        "mean_dice_full": volume_mean_dice(pred, gt, present),
        "mean_dice_after": volume_mean_dice(_as_label_array(res2), gt, present),
    }
    log.info("speed %s %s on %s: propagate %.1f s, re-propagate %.1f s, peak RSS %.0f MB", case, method, device,
             t_prop, t_re, mem.peak_rss_mb)
    return out


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
