"""Online adaptation: fine-tune a copy of the STCN network on one volume's own anchors.

Before propagating a volume, the network can be trained for a few steps on the slices the
user has already labelled (the anchors), so that it learns this patient's anatomy and
contrast. The clips are made from the anchor slices alone, with the clip sampler the
training uses (:class:`~.clips.ClipDataset` over a "volume" that holds only the anchors,
in slice order):

* **anchor clips**: ``num_frames`` anchors in slice order, consecutive anchors at most
  ``max_anchor_gap`` anchors apart, in either direction (random reversal), with one random
  affine transform and flip shared by the clip. The first anchor's masks are the memory,
  the other anchors' ground truth the targets: the network learns to carry this volume's
  organs from one anchor to the next, both upward and downward.
* **static clips** (a fraction ``static_fraction`` of the samples): one anchor turned into
  ``num_frames`` frames by independent random affine + elastic deformations (stage 0 of the
  training), which keeps the correspondence of small shifts.

The objects of a clip are one or two labels of its first frame (as in training), each
covering at least ``min_area_fraction`` of the slice. Loss, optimiser and normalisation are
those of the training (:func:`~napari_propseg.losses.propagation_loss`: bootstrapped
cross-entropy + Lovasz-softmax; AdamW; gradient clipping; GroupNorm, BatchNorm statistics
frozen), with a small learning rate and no schedule. The input network is never modified:
:func:`adapt_stcn` returns a fine-tuned copy.

Example:
    >>> net, info = adapt_stcn(model, frames, labels, steps=30)   # doctest: +SKIP
    >>> info.loss_before, info.loss_after                          # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..progress import CancelFn, ProgressFn, check_cancel, report
from ..losses import propagation_loss
from .clips import CaseData, ClipDataset, TrainingData

log = logging.getLogger(__name__)

#: Options of :func:`adapt_stcn` (and of ``PropagationEngine(adapt_options=...)``).
ADAPT_DEFAULTS: dict[str, Any] = {
    "lr": 2e-5,
    "weight_decay": 1e-7,
    "batch_size": 1,
    "num_frames": 2,
    "num_objects": 2,
    "max_anchor_gap": 2,
    "static_fraction": 0.25,
    "min_area_fraction": 5e-4,
    "grad_clip": 1.0,
    "lovasz_weight": 1.0,
    "seed": 0,
}


@dataclass
class AdaptResult:
    """What one adaptation did.

    Attributes:
        steps: optimisation steps taken.
        seconds: wall-clock seconds of the adaptation (evaluation of ``loss_before`` /
            ``loss_after`` included when asked for).
        anchors: number of anchor slices the clips were made from.
        losses: training loss of every step (each on its own random clips).
        loss_before: mean loss on ``eval_clips`` fixed clips before the adaptation (None
            unless asked for).
        loss_after: the same after the adaptation.
    """

    steps: int
    seconds: float
    anchors: int
    losses: list[float] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None


def adapt_options(options: dict | None) -> dict[str, Any]:
    """:data:`ADAPT_DEFAULTS` updated with ``options``, checked.

    Raises:
        InputError: an unknown option or a value out of range.
    """
    opts = dict(ADAPT_DEFAULTS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise InputError(f"Unknown adaptation option(s) {', '.join(sorted(unknown))}; known: {', '.join(ADAPT_DEFAULTS)}.")
    opts.update(options or {})
    if not float(opts["lr"]) > 0:
        raise InputError(f"The adaptation learning rate must be positive, got {opts['lr']}.")
    for key, low in (("batch_size", 1), ("num_frames", 2), ("num_objects", 1), ("max_anchor_gap", 1)):
        if int(opts[key]) < low:
            raise InputError(f"Adaptation option {key} must be at least {low}, got {opts[key]}.")
    if not 0.0 <= float(opts["static_fraction"]) <= 1.0:
        raise InputError(f"Adaptation option static_fraction must lie in [0, 1], got {opts['static_fraction']}.")
    return opts


class AnchorClips:
    """Random training clips made of one volume's anchor slices (see the module docstring).

    Args:
        frames: (N, 3, R, R) windowed anchor slices at the working resolution, in slice order.
        labels: (N, R, R) uint8 object ids of those slices (0 = background).
        steps: number of batches that will be drawn.
        options: :func:`adapt_options`.

    Raises:
        InputError: no anchor holds an object large enough to train on.
    """

    def __init__(self, frames: np.ndarray, labels: np.ndarray, *, steps: int, options: dict[str, Any]) -> None:
        res = int(frames.shape[-1])
        self.batch = int(options["batch_size"])
        self.seed = int(options["seed"])
        case = CaseData(name="anchors", image=np.asarray(frames, dtype=np.float16), labels=np.asarray(labels, dtype=np.uint8),
                        spacing=(1.0, 1.0, 1.0))
        data = TrainingData(resolution=res, cases=[case], crop="none")
        clips = {
            "seed": self.seed,
            "num_frames": int(options["num_frames"]),
            "num_objects": int(options["num_objects"]),
            "min_area_fraction": float(options["min_area_fraction"]),
            "static_label_prob": 1.0,  # objects are the anchors' labels, never superpixels
            "gaps": [int(options["max_anchor_gap"])],
            "gap_switch": [0.0],
            "gap_reference_mm": None,  # gaps count anchors, not millimetres
        }
        n = max(1, int(steps)) * self.batch
        self.static = ClipDataset(data, clips, stage0_steps=n, stage1_steps=0, global_batch=1)
        self.anchor = ClipDataset(data, clips, stage0_steps=0, stage1_steps=n, global_batch=1)
        usable = [z for z in range(case.depth) if self.static._present(case.labels[z])]
        if not usable:
            raise InputError("No anchor slice holds an organ large enough to adapt the network on; label more of the anchors or propagate without adaptation.")
        # anchor clips need num_frames slices and a labelled slice that can start one
        self.static_fraction = 1.0 if case.depth < int(options["num_frames"]) else float(options["static_fraction"])
        self.anchors = case.depth

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        """The ``step``-th batch (deterministic): items stacked along a new first axis."""
        rng = np.random.default_rng((self.seed, int(step)))
        items = []
        for b in range(self.batch):
            index = int(step) * self.batch + b
            item = None
            if rng.random() >= self.static_fraction:
                try:
                    item = self.anchor[index]
                except RuntimeError:  # no anchor of a usable size can start a clip of num_frames anchors
                    item = None
            items.append(item if item is not None else self.static[index])
        return torch.utils.data.default_collate(items)


def anchor_inputs(passes, labels: np.ndarray, anchors, locked: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The anchors as the engine feeds them to the network: (N, 3, R, R) frames
    (:meth:`~.stcn_passes.StcnPasses.frame`: body crop, resize, window) and (N, R, R) uint8
    compact object ids (body crop, locked labels left out, resized by nearest neighbour).

    Raises:
        InputError: more than 255 different labels on the anchors.
    """
    from ..preprocess import resize_slices

    with torch.inference_mode():
        frames = torch.cat([passes.frame(z) for z in anchors]).float().cpu().numpy()  # N, 3, R, R
    crops = np.stack([passes.crop.crop(np.where(np.isin(labels[z], locked), 0, labels[z]), 0) for z in anchors])
    ids, compact = np.unique(crops, return_inverse=True)
    if ids.size > 256:
        raise InputError(f"The anchors hold {ids.size - 1} different labels; adaptation handles at most 255.")
    compact = compact.reshape(crops.shape).astype(np.uint8)  # 0 stays 0: ids are sorted and 0 is the smallest
    if ids[0] != 0:
        compact += 1
    return frames, resize_slices(compact, (resolution, resolution), mode="nearest")


def clip_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device, lovasz_weight: float = 1.0,
              amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Training loss of ``model`` on a batch of clips (:class:`ClipDataset` items, stacked).

    Returns:
        ``{"loss", "ce", "lovasz"}`` scalars (see :func:`~napari_propseg.losses.propagation_loss`).
    """
    frames = batch["frames"].to(device)  # B, T, 3, R, R
    masks = batch["masks"].to(device)  # B, T, K, R, R
    target = batch["target"].to(device)  # B, T, R, R
    amp = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with amp:
        logits = model(frames, masks[:, 0], batch["num_objects"].to(device))  # B, T-1, K+1, R, R
    return propagation_loss(logits.float(), target[:, 1:], lovasz_weight=lovasz_weight)


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics fixed (eval mode) while the rest trains (GroupNorm has none)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _mean_loss(model: nn.Module, clips: AnchorClips, n: int, **kw) -> float:
    model.eval()
    with torch.inference_mode():
        vals = [float(clip_loss(model, clips.batch_at(i), **kw)["loss"]) for i in range(n)]
    return float(np.mean(vals))


def adapt_stcn(
    model: nn.Module,
    frames: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    options: dict | None = None,
    eval_clips: int = 0,
    device: torch.device | str | None = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> tuple[nn.Module, AdaptResult]:
    """Fine-tune a copy of an STCN on clips made of one volume's anchor slices.

    Args:
        model: the STCN to start from (left untouched).
        frames: (N, 3, R, R) windowed anchor slices at the network's working resolution,
            in slice order (what the engine feeds the network).
        labels: (N, R, R) integer object ids of the anchors (0 = background, at most 255
            distinct ids; values are only compared for equality).
        steps: optimisation steps (>= 0; 0 returns an unchanged copy).
        options: overrides of :data:`ADAPT_DEFAULTS` (``lr``, ``batch_size``,
            ``num_frames`` 2 = pairs / 3 = triples of anchors, ``static_fraction``, ...).
        eval_clips: if > 0, the mean loss on this many fixed clips (drawn like the
            training clips, with another seed) is measured before and after.
        device: where to train (default: the model's device). On CUDA, bf16 autocast
            where supported.
        progress: ``(step, total, message)`` callback, once per step.
        cancel: returns True to stop; :class:`~napari_propseg.errors.CancelledError` is
            raised between steps and nothing is returned.

    Returns:
        ``(adapted_copy, AdaptResult)``; the copy is in eval mode on ``device``.

    Raises:
        InputError: bad steps/options, or no anchor with an object large enough.
        CancelledError: ``cancel`` returned True.
    """
    t0 = time.perf_counter()
    if int(steps) < 0:
        raise InputError(f"The number of adaptation steps must be 0 or more, got {steps}.")
    steps = int(steps)
    opts = adapt_options(options)
    frames = np.asarray(frames)
    labels = np.asarray(labels)
    if frames.ndim != 4 or frames.shape[1] != 3 or labels.shape != (frames.shape[0],) + frames.shape[2:]:
        raise InputError(f"Adaptation needs (N, 3, R, R) frames and (N, R, R) labels, got {frames.shape} and {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InputError("Adaptation labels must be object ids between 0 and 255; map the label ids to a compact range first.")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    net = copy.deepcopy(model).to(dev)
    result = AdaptResult(steps=0, seconds=0.0, anchors=int(frames.shape[0]))
    if steps == 0:
        net.eval()
        result.seconds = time.perf_counter() - t0
        return net, result
    clips = AnchorClips(frames, labels.astype(np.uint8), steps=steps, options=opts)
    amp_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    kw = {"device": dev, "lovasz_weight": float(opts["lovasz_weight"]), "amp_dtype": amp_dtype}
    # fixed evaluation clips: drawn like the training clips, with another seed
    held = AnchorClips(frames, labels.astype(np.uint8), steps=eval_clips, options={**opts, "seed": int(opts["seed"]) + 1}) if eval_clips > 0 else None
    if held is not None:
        result.loss_before = _mean_loss(net, held, int(eval_clips), **kw)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    net.train()
    _freeze_batchnorm(net)
    for step in range(steps):
        check_cancel(cancel)
        losses = clip_loss(net, clips.batch_at(step), **kw)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if float(opts["grad_clip"]) > 0:
            torch.nn.utils.clip_grad_norm_(params, float(opts["grad_clip"]))
        optimizer.step()
        value = float(losses["loss"].detach())
        if not np.isfinite(value):
            raise RuntimeError(f"adaptation loss is not finite at step {step + 1}; lower the adaptation learning rate")
        result.losses.append(value)
        report(progress, step + 1, steps, f"adapting to the anchors, loss {value:.3f}")
    result.steps = steps
    if held is not None:
        result.loss_after = _mean_loss(net, held, int(eval_clips), **kw)
    net.eval()
    result.seconds = time.perf_counter() - t0
    log.info("adapted the propagation network on %d anchors: %d steps in %.1f s (first/last step loss %.3f / %.3f%s)",
             result.anchors, steps, result.seconds, result.losses[0], result.losses[-1],
             "" if result.loss_before is None else f"; fixed clips {result.loss_before:.3f} -> {result.loss_after:.3f}")
    return net, result
