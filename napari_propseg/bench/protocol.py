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

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..metrics import DICE_BOTH_EMPTY, dice_from_counts
from ..progress import check_cancel, report
from ..slices import spread_slices
from .memory import PeakMemory
from .metrics_speed import run_metrics_speed, synthetic_label_pair  # noqa: F401  (re-exported)
from .report import (  # noqa: F401  (re-exported)
    _fmt,
    _json_default,
    k_slice_markdown,
    machine_description,
    mean_over_cases,
    plot_k_slice,
    save_figure,
    write_json,
    write_k_slice_report,
    write_report,
)

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
    ref = set(spread_slices(z_lo, z_hi, k))
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
    return spread_slices(z_lo, z_hi, k)


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
        if lab >= n:  # absent from both
            out[lab] = DICE_BOTH_EMPTY
            continue
        out[lab] = dice_from_counts(conf[lab, lab], g_cnt[lab], p_cnt[lab])
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
    from ..pipeline import EngineSettings, make_engine

    appearance = dict(appearance or {})
    image_weight = appearance.pop("weight", None) if set(appearance) <= {"weight"} else None
    options = {"appearance": appearance} if appearance else {}
    return make_engine(image_hu, EngineSettings(method=method, device=device, weights=weights, adapt_steps=adapt_steps,
                                                image_weight=image_weight, options=options), spacing=spacing)


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

