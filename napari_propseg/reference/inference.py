"""Reference-slice suggestion: segment k sampled axial slices with the network pair.

:func:`suggest_slices` samples k uniformly spaced axial slices, runs every network of the
ensemble (normally TransUNet + DeepLabV3+) on the three-window input, sums their softmax
probabilities and takes the argmax. Besides the uniform slices it reports, for every
organ, the sampled slice where that organ's predicted area is largest (the seed
pipeline's reference selection); the suggestion is the union of both, ordered along z.

Each network sees its slice resized to its own ``config["img_size"]`` (bilinear, after
windowing) and the relative axial position ``z / (Z - 1)`` of the slice in the canonical
LPS array (slice 0 most inferior); probabilities are resized back to the image grid.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import InputError
from ..metrics import dice_from_counts
from ..preprocess import window_ct
from ..progress import CancelFn, ProgressFn, check_cancel, report
from ..slices import uniform_slices  # noqa: F401  (re-exported: napari_propseg.reference.inference.uniform_slices)
from ..weights import models_dir
from . import load_reference_model

log = logging.getLogger(__name__)

MAX_DEFAULT_K = 64


@dataclass
class Suggestion:
    """Result of :func:`suggest_slices`.

    Attributes:
        slices: suggested slice indices, ascending (uniform samples + per-organ best).
        labels: ``(Z, Y, X)`` predicted labels, non-zero only on ``slices``.
        per_organ_best: organ id -> sampled slice with the largest predicted area.
        sampled: the k uniformly spaced slices.
        areas: ``(len(processed), C)`` predicted pixel count per processed slice and class.
        seconds: wall-clock time of the network passes.
        processed: every slice that went through the networks (``sampled`` plus the scan).
        agreement: slice -> agreement of the networks on it, in [0, 1]: the mean over
            networks and classes present of Dice(network's argmax, ensemble argmax), 1.0
            when nothing is predicted (the pseudo-label score of one slice). Low values are
            the suggested slices most worth checking first.
        dropped: slice -> organs left out of that slice's suggestion because the two
            networks disagreed strongly on them (the clinician is told).
        label_map: ``{id: name}`` of the model's classes.
    """

    slices: list[int]
    labels: np.ndarray
    per_organ_best: dict[int, int]
    sampled: list[int] = field(default_factory=list)
    areas: np.ndarray | None = None
    seconds: float = 0.0
    processed: list[int] = field(default_factory=list)
    agreement: dict[int, float] = field(default_factory=dict)
    dropped: dict[int, list[int]] = field(default_factory=dict)
    label_map: dict[int, str] = field(default_factory=dict)


def default_k(n_slices: int) -> int:
    """``min(Z // 5, 64)``, at least 1."""
    return max(1, min(n_slices // 5, MAX_DEFAULT_K))


def default_weight_paths(folder: str | os.PathLike | None = None, *, model: str | None = None) -> list[Path]:
    """The reference weight files (``*.pt``) of a model.

    Args:
        folder: a folder holding the pair's ``*.pt`` files (a model folder, or an old-style
            flat folder); when None, the installed model ``model``.
        model: name of an installed model (default ``abdomen``), see
            :mod:`napari_propseg.reference.models`.

    Raises:
        InputError: when the folder or model holds no weight file.
    """
    from .models import find_model, reference_root

    if folder is None:
        root = reference_root()
        named = model is not None and (root / model).is_dir()
        flat = sorted(root.glob("*.pt")) if root.is_dir() and not named else []
        if flat:  # an old flat models/reference/*.pt layout ($PROPSEG_MODELS of an earlier version)
            return flat
        return list(find_model(model).weights)
    folder = Path(folder)
    paths = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not paths:
        raise InputError(
            f"No reference weights found in {folder}; train them with 'propseg train reference CONFIG' "
            "or pass weight files with --weights A B."
        )
    return paths


def load_models(models: Sequence[nn.Module | str | os.PathLike] | None, *, model: str | None = None) -> list[nn.Module]:
    """Turn a list of modules and/or weight-file paths (or None = the installed ``model``) into modules."""
    if models is None:
        models = default_weight_paths(model=model)
    if isinstance(models, (str, os.PathLike, nn.Module)):
        models = [models]
    out = []
    for m in models:
        out.append(m if isinstance(m, nn.Module) else load_reference_model(m))
    if not out:
        raise InputError("No reference networks were given; pass at least one weight file with --weights.")
    n = {int(m.config["num_classes"]) for m in out}
    if len(n) != 1:
        raise InputError(f"The reference networks predict different numbers of classes ({sorted(n)}); pass a matching pair.")
    return out


def body_mask(hu_slice: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """``(Y, X)`` bool: the patient, i.e. everything but the air below ``threshold`` HU
    that is connected to the slice border (air inside the body, lungs and airways, stays)."""
    from scipy import ndimage

    air = np.asarray(hu_slice) < threshold
    if not air.any():
        return np.ones(air.shape, dtype=bool)
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border = border[border > 0]
    return ~np.isin(lab, border)


def drop_disagreeing(ens: np.ndarray, masks: Sequence[np.ndarray], n_classes: int, min_dice: float) -> list[int]:
    """Set to background (in place) each class of ``ens`` on which two networks'
    argmax masks overlap with Dice below ``min_dice``; returns the dropped classes."""
    if len(masks) < 2 or min_dice <= 0:
        return []
    dropped = []
    for c in np.unique(ens):
        c = int(c)
        if c == 0:
            continue
        a, b = masks[0] == c, masks[1] == c
        n_a, n_b = int(a.sum()), int(b.sum())
        if n_a + n_b and dice_from_counts(int((a & b).sum()), n_a, n_b) < min_dice:
            ens[ens == c] = 0
            dropped.append(c)
    return dropped


def model_windows(model: nn.Module) -> list[tuple[float, float]] | None:
    """The CT windows a reference network was trained on (its config's ``windows``), or
    None for the default three (:data:`napari_propseg.preprocess.WINDOWS`)."""
    win = getattr(model, "config", {}).get("windows")
    return [(float(a), float(b)) for a, b in win] if win else None


def _as_hu(volume_hu) -> np.ndarray:
    arr = getattr(volume_hu, "array", volume_hu)
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InputError(f"Expected a 3-D CT volume (Z, Y, X), got an array of shape {arr.shape}; pass a 3-D image.")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"The CT volume has non-numeric type {arr.dtype}; pass an image in Hounsfield units.")
    return arr


def relative_position(z: int, n_slices: int) -> float:
    """``z / (Z - 1)`` (0.5 for a single slice)."""
    return 0.5 if n_slices <= 1 else float(z) / float(n_slices - 1)


def iter_slice_probabilities(
    volume_hu,
    models: Sequence[nn.Module],
    slices: Sequence[int],
    *,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(z, [probs_m (C, Y, X) float32 on the CPU for each model m])`` slice by slice.

    Args:
        volume_hu: ``(Z, Y, X)`` HU array (or a Volume).
        models: reference networks (moved to ``device``, put in eval mode).
        slices: slice indices to process.
        device: ``"auto" | "cpu" | "cuda"``.
        batch_size: slices per forward pass (default 1 on CPU, 8 on CUDA).
        progress, cancel: callbacks, called once per slice.
    """
    hu = _as_hu(volume_hu)
    dev = resolve_device(device)
    z_total, h, w = hu.shape
    bs = batch_size or (8 if dev.type == "cuda" else 1)
    for m in models:
        m.to(dev).eval()
    slices = list(slices)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(slices), bs):
            check_cancel(cancel)
            zs = slices[start:start + bs]
            raw = torch.from_numpy(hu[zs].astype(np.float32)).to(dev)  # n, Y, X
            windowed: dict = {}
            zpos = torch.tensor([relative_position(z, z_total) for z in zs], dtype=torch.float32, device=dev)
            per_model = []
            for m in models:
                s = int(m.config["img_size"])
                win = model_windows(m)
                key = tuple(win) if win else None
                if key not in windowed:
                    windowed[key] = window_ct(raw, win)  # n, 3, Y, X
                x = windowed[key]
                xi = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=max(h, w) > s)
                with torch.autocast("cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
                    logits = m(xi, zpos)
                p = logits.float().softmax(1)
                if (s, s) != (h, w):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
                per_model.append(p.cpu())  # n, C, Y, X
            for i, z in enumerate(zs):
                done += 1
                report(progress, done, len(slices), f"slice {z}")
                yield z, [p[i] for p in per_model]


def suggest_slices(
    volume_hu,
    models: Sequence[nn.Module | str | os.PathLike] | None = None,
    *,
    k: int | None = None,
    scan: int | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    model: str | None = None,
    body_only: bool = True,
    min_agreement: float | None = None,
) -> Suggestion:
    """Segment k uniformly sampled slices with the ensemble and suggest reference slices.

    Args:
        volume_hu: ``(Z, Y, X)`` CT in HU, canonical LPS (slice 0 most inferior), or a Volume.
        models: networks and/or weight files; ``None`` loads the installed ``model``.
        k: number of uniformly spaced slices; default ``min(Z // 5, 64)`` (at least 1).
        scan: also run the networks on every ``scan``-th slice when looking for each
            organ's largest slice (``Z / scan`` more passes). ``None`` (default) looks
            only among the k sampled slices, as the seed pipeline does; the suggestion is
            then the k sampled slices themselves.
        device: ``"auto" | "cpu" | "cuda"``.
        progress: ``(step, total, message)`` callback, once per sampled slice.
        cancel: returns True to stop (raises :class:`~napari_propseg.errors.CancelledError`).
        model: installed model name (``abdomen`` by default, ``head_neck``, ...) when
            ``models`` is None.
        body_only: nothing is suggested outside the patient's body (:func:`body_mask`).
        min_agreement: an organ whose two networks' masks overlap with Dice below this on
            a slice is left out of that slice (listed in ``Suggestion.dropped``); 0 keeps all.
            Default: the installed model's ``min_agreement`` (``model.json``), else 0.1.

    Returns:
        :class:`Suggestion` with the union of the uniform slices and, per organ, the sampled
        slice where its predicted area is largest; ``labels`` holds the prediction on them.

    Raises:
        InputError: no weights, mismatched networks, a bad volume or k.
    """
    hu = _as_hu(volume_hu)
    nets = load_models(models, model=model)
    from .models import find_model, model_label_map

    info = None
    if models is None:
        try:
            info = find_model(model)
        except InputError:  # an old flat folder of weights
            info = None
    if min_agreement is None:
        min_agreement = info.min_agreement if info is not None else 0.1
    z_total = hu.shape[0]
    if k is None:
        k = default_k(z_total)
    sampled = uniform_slices(z_total, int(k))
    if scan is not None and int(scan) < 1:
        raise InputError(f"scan must be a positive slice step, got {scan}; pass 1 or more.")
    processed = sorted(set(sampled) | (set(range(0, z_total, int(scan))) if scan else set()))
    n_classes = int(nets[0].config["num_classes"])
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    pred = np.zeros((len(processed),) + hu.shape[1:], dtype=dtype)
    agreement: dict[int, float] = {}
    dropped: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for i, (z, probs) in enumerate(iter_slice_probabilities(hu, nets, processed, device=device, progress=progress, cancel=cancel)):
        total = torch.stack(probs).sum(0)  # C, Y, X: summed softmax of the ensemble
        ens = torch.max(total, dim=0).indices  # = argmax(0), much faster on the CPU
        masks = [torch.max(p, dim=0).indices for p in probs]
        agreement[int(z)] = slice_agreement(masks, ens, n_classes)
        lab = ens.numpy().astype(dtype)
        if body_only:
            lab[~body_mask(hu[z])] = 0
        gone = drop_disagreeing(lab, [m.numpy() for m in masks], n_classes, float(min_agreement))
        if gone:
            dropped[int(z)] = gone
        pred[i] = lab
    seconds = time.perf_counter() - t0
    areas = np.stack([np.bincount(p.ravel(), minlength=n_classes)[:n_classes] for p in pred])  # n, C
    per_organ_best: dict[int, int] = {}
    for c in range(1, n_classes):
        if areas[:, c].max() > 0:
            per_organ_best[c] = int(processed[int(np.argmax(areas[:, c]))])  # first maximum along z
    chosen = sorted(set(sampled) | set(per_organ_best.values()))
    labels = np.zeros(hu.shape, dtype=dtype)
    index = {z: i for i, z in enumerate(processed)}
    for z in chosen:
        labels[z] = pred[index[z]]
    log.info("suggested %d slices (%d sampled) in %.2f s", len(chosen), len(sampled), seconds)
    return Suggestion(chosen, labels, per_organ_best, sampled, areas, seconds, processed, agreement,
                      {z: d for z, d in dropped.items() if z in set(chosen)}, model_label_map(nets, info))


def agreement_counts(masks: Sequence[torch.Tensor], ensemble: torch.Tensor, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts for the networks' agreement with their ensemble.

    Args:
        masks: M argmax label maps (any shape, the same for all), one per network.
        ensemble: the ensemble's label map, same shape.
        n_classes: number of classes.

    Returns:
        ``inter`` (M, C) ``|mask_m == c and ensemble == c|``, ``size_m`` (M, C) ``|mask_m == c|``
        and ``size_e`` (C,) ``|ensemble == c|``, int64; they add up over slices.
    """
    ens = ensemble.reshape(-1)
    size_e = torch.bincount(ens, minlength=n_classes)[:n_classes].numpy().astype(np.int64)
    inter = np.zeros((len(masks), n_classes), dtype=np.int64)
    size_m = np.zeros((len(masks), n_classes), dtype=np.int64)
    for m, mask in enumerate(masks):
        mk = mask.reshape(-1)
        size_m[m] = torch.bincount(mk, minlength=n_classes)[:n_classes].numpy()
        inter[m] = torch.bincount(mk[mk == ens], minlength=n_classes)[:n_classes].numpy()
    return inter, size_m, size_e


def agreement_dice(inter: np.ndarray, size_m: np.ndarray, size_e: np.ndarray) -> dict[int, dict[int, float]]:
    """``{network: {class: Dice with the ensemble}}`` from :func:`agreement_counts`, over
    the foreground classes any map holds; a class only other maps hold counts as agreement
    (both empty: Dice 1)."""
    present = [c for c in range(1, size_e.shape[0]) if size_e[c] > 0 or size_m[:, c].any()]
    out: dict[int, dict[int, float]] = {}
    for m in range(size_m.shape[0]):
        out[m] = {}
        for c in present:
            out[m][c] = dice_from_counts(inter[m, c], size_m[m, c], size_e[c])
    return out


def slice_agreement(masks: Sequence[torch.Tensor], ensemble: torch.Tensor, n_classes: int) -> float:
    """Mean Dice between each network's mask and the ensemble mask on one slice.

    Args:
        masks: M ``(Y, X)`` argmax label maps, one per network.
        ensemble: ``(Y, X)`` argmax of the summed probabilities.
        n_classes: number of classes (0 = background, not scored).

    Returns:
        Mean over networks and foreground classes present in any map of the Dice with the
        ensemble; 1.0 when no map holds foreground.
    """
    scores = [d for per in agreement_dice(*agreement_counts(masks, ensemble, n_classes)).values() for d in per.values()]
    return float(np.mean(scores)) if scores else 1.0


def segment_volume(
    volume_hu,
    models: Sequence[nn.Module | str | os.PathLike] | None = None,
    *,
    slices: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    model: str | None = None,
) -> list[np.ndarray]:
    """Each network's own argmax on the given slices (all by default).

    Returns:
        One ``(Z, Y, X)`` label array per network (zeros on slices not processed); used by
        the pseudo-label scoring, which compares the networks' masks.
    """
    hu = _as_hu(volume_hu)
    nets = load_models(models, model=model)
    n_classes = int(nets[0].config["num_classes"])
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    out = [np.zeros(hu.shape, dtype=dtype) for _ in nets]
    zs = range(hu.shape[0]) if slices is None else slices
    for z, probs in iter_slice_probabilities(hu, nets, zs, device=device, progress=progress, cancel=cancel):
        for m, p in enumerate(probs):
            out[m][z] = p.argmax(0).numpy().astype(dtype)
    return out
