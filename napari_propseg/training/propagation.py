"""Training of the STCN propagation network (``propseg train propagation CONFIG``).

Two stages in one run, as in STCN:

* **stage 0** (``stage0_steps``): static clips made from single slices by random affine +
  elastic deformation, objects = organ masks or SLIC superpixels;
* **stage 1** (``stage1_steps``): clips of 3 axial slices with a curriculum of gaps.

See :mod:`napari_propseg.propagation.clips` for the clips. Loss: bootstrapped CE + Lovasz-
softmax (:mod:`napari_propseg.losses`). AdamW (lr 1e-4), step decay (the lr is
multiplied by ``gamma`` at each milestone, given as fractions of the current stage; it
starts again from the base lr at stage 1), gradient clipping, GroupNorm networks, CUDA
autocast (bf16 where supported, else fp16 with a GradScaler) only on CUDA.

Outputs in ``out_dir``: ``train_log.csv`` (losses), ``val_log.csv`` (validation Dice of
the k-anchor propagation on held-out volumes, by the shipped engine built through
:mod:`napari_propseg.pipeline` with the network being trained), ``checkpoints/step_NNNNNNN.pt`` and
``checkpoints/last.pt`` (resumable: model, optimizer, scheduler, step, config, RNG), and
the weights-only file (``weights_name``, default ``stcn_propagation.pt``) loadable with
:func:`napari_propseg.propagation.network.load_stcn`.

Launched under ``torchrun --nproc_per_node N``, every rank draws its own samples of each
step (see :class:`~napari_propseg.training.data.StepSampler`), gradients are averaged by
DistributedDataParallel, and only rank 0 logs, validates and saves.

Example:
    >>> weights = train_propagation("models/propagation/train_default.yaml", out_dir="runs/p")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..metrics import dice_from_counts
from ..progress import CancelFn, ProgressFn, check_cancel, report
from .common import (
    CSVLogger,
    barrier,
    ddp_cleanup,
    ddp_setup,
    load_checkpoint,
    read_config_file,
    save_checkpoint,
    seed_everything,
    unwrap,
)
from .data import ClipDataset, StepSampler, TrainingData, build_training_data, load_cache, resolve_data_config
from ..losses import propagation_loss

log = logging.getLogger(__name__)

#: Defaults of the training config (every key may be overridden in the YAML/JSON).
TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "resolution": 128,
    "network": "cpu",            # "default" | "cpu" (network.DEFAULT_CONFIG / CPU_CONFIG)
    "network_overrides": {},     # architecture keys changed on top of the named base
    "stage0_steps": 1000,
    "stage1_steps": 4000,
    "batch_size": 4,             # per process
    "num_workers": 0,
    "optimizer": {"lr": 1e-4, "weight_decay": 1e-7, "betas": [0.9, 0.999]},
    "lr_decay": {"milestones": [0.8], "gamma": 0.1},
    "amp": "auto",               # "auto" (bf16 if supported, else fp16) | "bf16" | "fp16" | "off"; CUDA only
    "grad_clip": 1.0,
    "lovasz_weight": 1.0,
    "log_every": 10,
    "val_every": 500,
    "ckpt_every": 500,
    "val": {"k": 5, "max_cases": None},
    "clips": {},
    "data": {},
    "weights_name": "stcn_propagation.pt",
    "weights_dtype": "float16",  # dtype of the exported weights (float16 halves the file; loading casts back)
    "keep_checkpoints": 2,       # step_*.pt files kept besides last.pt (0 keeps all)
    "find_unused_parameters": False,
}

TRAIN_FIELDS = ["step", "stage", "max_gap", "lr", "loss", "ce", "lovasz", "sec_per_step"]
VAL_FIELDS = ["step", "case", "k", "mean_dice", "sdf_dice", "n_labels", "seconds"]


# --------------------------------------------------------------------------- config


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k not in ("network_overrides",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_train_config(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    variant: str | None = None,
    data_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Full training config: defaults <- file <- ``variants[variant]`` <- ``overrides``.

    Args:
        config: a dict or the path of a YAML/JSON file.
        variant: name of an entry of the config's ``variants`` mapping (e.g. ``"cpu"``).
        data_root: overrides ``data.data_root`` (and ``$PROPSEG_DATA_ROOT``).
        overrides: last-word options (e.g. ``{"stage1_steps": 10}``).

    Returns:
        The merged config with absolute data paths and the resolved ``network`` dict
        under ``network_config``.
    """
    config_dir: Path | None = None
    if isinstance(config, (str, os.PathLike)):
        config_dir = Path(config).expanduser().resolve().parent
        raw = read_config_file(config, example="models/propagation/train_default.yaml")
    else:
        raw = copy.deepcopy(dict(config))
        if raw.get("_config_dir"):
            config_dir = Path(raw["_config_dir"])
    variants = raw.pop("variants", {}) or {}
    cfg = _merge(TRAIN_DEFAULTS, raw)
    if variant:
        if variant not in variants:
            raise InputError(f"The training config has no variant {variant!r}; its variants are: {', '.join(variants) or 'none'}.")
        cfg = _merge(cfg, variants[variant])
        cfg["variant"] = variant
    cfg = _merge(cfg, overrides or {})
    for key in ("stage0_steps", "stage1_steps", "batch_size", "log_every", "val_every", "ckpt_every", "resolution"):
        try:
            cfg[key] = int(cfg[key])
        except (TypeError, ValueError):
            raise InputError(f"Training option {key!r} must be a whole number, got {cfg[key]!r}.") from None
        if cfg[key] < (0 if key.endswith("steps") else 1):
            raise InputError(f"Training option {key!r} must be {'>= 0' if key.endswith('steps') else '>= 1'}, got {cfg[key]}.")
    if cfg["stage0_steps"] + cfg["stage1_steps"] == 0:
        raise InputError("The training config has stage0_steps = stage1_steps = 0; give at least one step.")
    if str(cfg["amp"]).lower() not in ("auto", "bf16", "fp16", "off", "none", "false"):
        raise InputError(f"Training option amp={cfg['amp']!r} is unknown; use auto, bf16, fp16 or off.")
    cfg["network_config"] = network_config(cfg)
    data = dict(cfg.get("data") or {})
    data.setdefault("resolution", cfg["resolution"])
    data["resolution"] = cfg["resolution"]
    cfg["data"] = resolve_data_config(data, config_dir=config_dir, data_root=data_root)
    cfg["_config_dir"] = str(config_dir) if config_dir else None
    return cfg


def network_config(cfg: Mapping[str, Any]) -> dict:
    """The STCN architecture config of a training config (named base + overrides + resolution)."""
    from ..propagation.network import CPU_CONFIG, DEFAULT_CONFIG

    net = cfg.get("network", "cpu")
    if isinstance(net, Mapping):
        base = dict(DEFAULT_CONFIG)
        base.update(net)
    elif str(net).lower() in ("default", "gpu"):
        base = dict(DEFAULT_CONFIG)
    elif str(net).lower() == "cpu":
        base = dict(CPU_CONFIG)
    else:
        raise InputError(f"Training option network={net!r} is unknown; use 'default', 'cpu' or a mapping of architecture keys.")
    base.update(cfg.get("network_overrides") or {})
    base["resolution"] = int(cfg["resolution"])
    return base


def lr_factor(step: int, stage0_steps: int, stage1_steps: int, milestones, gamma: float) -> float:
    """Step-decay factor at ``step``: ``gamma`` per milestone passed in the current stage."""
    if step < stage0_steps:
        frac = step / max(1, stage0_steps)
    else:
        frac = (step - stage0_steps) / max(1, stage1_steps)
    return float(gamma) ** sum(1 for m in milestones if frac >= float(m))


# --------------------------------------------------------------------------- validation


def anchor_slices(labels: np.ndarray, k: int) -> list[int]:
    """``round(linspace(z_lo, z_hi, k))`` over the axial extent of all foreground labels."""
    fg = np.nonzero(labels.reshape(labels.shape[0], -1).max(1) > 0)[0]
    if not len(fg):
        return []
    return sorted(set(int(round(v)) for v in np.linspace(fg[0], fg[-1], k)))


@torch.inference_mode()
def propagate_between_anchors(model: torch.nn.Module, image: np.ndarray, labels: np.ndarray, anchors: list[int], *, device: torch.device, amp_dtype=None) -> np.ndarray:
    """Minimal 2-anchor propagation with the training network (validation only).

    Between consecutive anchors ``a < b`` the network propagates the anchor labels
    forward from ``a`` and backward from ``b`` (each with a memory of every slice it has
    passed); the two probability maps are mixed with linear weights ``(b - z) / (b - a)``
    and ``(z - a) / (b - a)`` and the arg-max is taken. Slices outside the anchors stay 0.

    Args:
        model: an :class:`~napari_propseg.propagation.network.STCN`.
        image: (Z, 3, R, R) windowed slices.
        labels: (Z, R, R) ids; only the anchor slices are read.
        anchors: sorted slice indices.

    Returns:
        (Z, R, R) uint8 labels with the anchors copied and the gaps filled.
    """
    out = np.zeros(labels.shape, dtype=np.uint8)
    for a in anchors:
        out[a] = labels[a]
    amp = torch.autocast(device_type="cuda", dtype=amp_dtype) if (amp_dtype is not None and device.type == "cuda") else nullcontext()
    for a, b in zip(anchors[:-1], anchors[1:]):
        if b - a < 2:
            continue
        ids = sorted(set(np.unique(labels[a]).tolist()) | set(np.unique(labels[b]).tolist()) - {0})
        ids = [i for i in ids if i != 0]
        if not ids:
            continue
        frames = torch.from_numpy(image[a:b + 1].astype(np.float32)).to(device)[None]  # 1, T, 3, R, R
        probs = []
        for seq, first in ((frames, labels[a]), (frames.flip(1), labels[b])):
            m = torch.from_numpy(np.stack([first == i for i in ids]).astype(np.float32)).to(device)[None]  # 1, K, R, R
            with amp:
                logits = model(seq, m)  # 1, T-1, K+1, R, R
            probs.append(torch.softmax(logits.float(), dim=2)[0])
        pf = probs[0][:-1]  # slices a+1..b-1
        pb = probs[1].flip(0)[1:]  # backward output covers b-1..a -> a..b-1, drop a
        t = torch.arange(1, b - a, device=device, dtype=torch.float32)[:, None, None, None]
        w = (b - a - t) / (b - a)
        fused = w * pf + (1 - w) * pb  # T-2, K+1, R, R
        arg = fused.argmax(1).cpu().numpy()
        lut = np.array([0] + ids, dtype=np.uint8)
        out[a + 1:b] = lut[arg]
    return out


def _dice_between(labels: np.ndarray, pred: np.ndarray, anchors: list[int]) -> dict[int, float]:
    """Per-label Dice over the non-anchor slices, labels present in the ground truth there."""
    keep = np.ones(labels.shape[0], dtype=bool)
    keep[anchors] = False
    gt, pr = labels[keep], pred[keep]
    per = {}
    for i in sorted(set(np.unique(gt).tolist()) - {0}):
        g, p = gt == i, pr == i
        per[int(i)] = float(dice_from_counts(np.logical_and(g, p).sum(), g.sum(), p.sum()))
    return per


def validation_dice(model: torch.nn.Module | None, case, *, k: int, device: torch.device, amp_dtype=None, method: str = "stcn") -> dict:
    """Mean Dice of the k-anchor propagation on one preprocessed validation volume.

    PROTOCOL.md section 1 with linspace anchors only (no per-label largest-area slices),
    scored at the working resolution over the non-anchor slices, labels present in the
    ground truth there.

    Args:
        model: the network (ignored for ``method="sdf"``), in eval mode.
        case: a :class:`~napari_propseg.training.data.CaseData`.
        k: number of anchors.
        method: ``"stcn"``: the shipped engine with this network, built through
            :func:`napari_propseg.pipeline.make_engine` with the default settings (image
            weight chosen on the anchors, guided fusion, outward propagation) on the case's
            cropped and resized HU (``case.hu``); a case without ``hu`` falls back to
            :func:`propagate_between_anchors`. ``"sdf"``: the classical signed-distance
            interpolation baseline on the same anchors.

    Returns:
        ``{"mean_dice", "n_labels", "per_label": {id: dice}, "anchors": [...]}``.
    """
    anchors = anchor_slices(case.labels, k)
    seeds = np.zeros_like(case.labels)
    seeds[anchors] = case.labels[anchors]
    if method == "sdf":
        from ..propagation.interp import sdf_interpolate

        pred = sdf_interpolate(seeds, anchors)
    elif case.hu is not None and anchors:
        from ..pipeline import EngineSettings, propagate

        settings = EngineSettings(method="stcn", device=device, options={"model": unwrap(model), "pass_cache_mb": 0})
        pred = propagate(case.hu, seeds, anchors, settings, spacing=case.spacing).labels
    else:
        pred = propagate_between_anchors(unwrap(model), case.image, case.labels, anchors, device=device, amp_dtype=amp_dtype)
    per = _dice_between(case.labels, pred, anchors)
    mean = float(np.mean(list(per.values()))) if per else float("nan")
    return {"mean_dice": mean, "n_labels": len(per), "per_label": per, "anchors": anchors}


# --------------------------------------------------------------------------- training


def _amp_dtype(cfg: Mapping[str, Any], device: torch.device):
    mode = str(cfg.get("amp", "auto")).lower()
    if device.type != "cuda" or mode in ("off", "none", "false"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"{world} x CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_propagation(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    device: str | torch.device = "auto",
    variant: str | None = None,
    data_root: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    data: TrainingData | None = None,
    on_step: Callable[[int, torch.nn.Module, dict], None] | None = None,
    time_limit: float | None = None,
) -> Path:
    """Train the STCN propagation network (stage 0, then stage 1) and export its weights.

    Args:
        config: training config (dict or YAML/JSON path; see ``models/propagation/train_default.yaml``).
        resume: a checkpoint from an earlier run; training continues at its step with its
            model, optimizer, scheduler and RNG state (the architecture must match).
        out_dir: output folder (default: the config's ``out_dir``, else the resumed
            checkpoint's run folder, else ``runs/propagation``).
        progress: ``(step, total, message)`` callback, called after every step.
        cancel: returns True to stop; a checkpoint is written, then
            :class:`~napari_propseg.errors.CancelledError` is raised.
        device: ``"auto" | "cpu" | "cuda"``; under torchrun each rank takes ``cuda:LOCAL_RANK``.
        variant: a named entry of the config's ``variants`` (e.g. ``"cpu"``).
        data_root: folder the relative data paths are resolved against.
        cache: a ``.npz`` from :func:`napari_propseg.training.data.save_cache`; the
            volumes are then not read again (no SimpleITK needed).
        overrides: options that win over the file (e.g. ``{"stage1_steps": 100}``).
        data: already loaded :class:`TrainingData` (tests); wins over ``cache``.
        on_step: called on every rank after every optimisation step with
            ``(step, model, losses)`` (the unwrapped model, this rank's loss tensors), e.g.
            to inspect the weights.
        time_limit: stop after this many seconds (checked between steps): a checkpoint
            and the weights so far are written (``meta["complete"] = False``) and
            ``--resume`` continues exactly where it stopped. For machines that run one
            command for a limited time.

    Returns:
        Path of the weights-only file (``kind="stcn"``).

    Raises:
        InputError: bad config, data or checkpoint.
        CancelledError: ``cancel`` returned True.
    """
    t_start = time.time()
    cfg = load_train_config(config, variant=variant, data_root=data_root, overrides=overrides)
    rank, world, _local_rank, dev = ddp_setup(device)
    main = rank == 0
    try:
        return _train(cfg, _Run(resume=resume, out_dir=out_dir, progress=progress, cancel=cancel, dev=dev, rank=rank, world=world,
                                main=main, cache=cache, data=data, t_start=t_start, on_step=on_step, time_limit=time_limit))
    finally:
        ddp_cleanup()


@dataclass
class _Run:
    """How one training run was launched (see :func:`train_propagation`)."""

    resume: str | os.PathLike | None
    out_dir: str | os.PathLike | None
    progress: ProgressFn
    cancel: CancelFn
    dev: torch.device
    rank: int
    world: int
    main: bool
    cache: str | os.PathLike | None
    data: TrainingData | None
    t_start: float
    on_step: Callable[[int, torch.nn.Module, dict], None] | None
    time_limit: float | None


def _check_resume(cfg, resume) -> dict | None:
    """The checkpoint to resume from, read once (read-only) to check its architecture."""
    if resume is None:
        return None
    payload = load_checkpoint(resume, restore_rng=False)  # read-only first: config check
    old_net = payload["config"].get("network_config")
    if old_net is not None and old_net != cfg["network_config"]:
        raise InputError(f"Checkpoint {resume} was trained with another architecture ({old_net}); resume with the config it was trained with.")
    return payload


def _out_folder(cfg, run: _Run) -> Path:
    out_dir = run.out_dir
    if out_dir is None:
        out_dir = cfg.get("out_dir") or (Path(run.resume).resolve().parent.parent if run.resume is not None else Path("runs/propagation"))
        if cfg.get("out_dir") and cfg.get("_config_dir") and not Path(out_dir).is_absolute():
            out_dir = Path(cfg["_config_dir"]) / out_dir
    out = Path(out_dir)
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _training_data(cfg, run: _Run) -> TrainingData:
    data = run.data
    if data is None:
        data = load_cache(run.cache, resolution=cfg["resolution"]) if run.cache is not None else build_training_data(cfg["data"])
    if data.resolution != cfg["resolution"]:
        raise InputError(f"The training data are at resolution {data.resolution} but the config asks for {cfg['resolution']}; rebuild the cache.")
    if data.crop != str(cfg["data"].get("crop", "body")):
        raise InputError(f"The training data were cropped with crop={data.crop!r} but the config asks for {cfg['data'].get('crop', 'body')!r}; rebuild the cache.")
    return data


def _train(cfg, run: _Run) -> Path:
    payload = _check_resume(cfg, run.resume)
    out = _out_folder(cfg, run)
    data = _training_data(cfg, run)
    trainer = _Trainer(cfg, run, data, out, payload)
    return trainer.export(trainer.loop())


class _Trainer:
    """One training run: model, optimisation, logs, checkpoints, validation (see :func:`train_propagation`)."""

    def __init__(self, cfg, run: _Run, data: TrainingData, out: Path, payload: dict | None) -> None:
        from ..propagation.network import build_stcn

        self.cfg, self.run, self.data, self.out = cfg, run, data, out
        dev, world, rank = run.dev, run.world, run.rank
        self.s0, self.s1 = cfg["stage0_steps"], cfg["stage1_steps"]
        self.total = self.s0 + self.s1
        seed_everything(cfg["seed"])
        self.model = model = build_stcn(cfg["network_config"]).to(dev)
        model.train()
        opt_cfg = cfg["optimizer"]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=float(opt_cfg["lr"]), weight_decay=float(opt_cfg.get("weight_decay", 0.0)),
                                           betas=tuple(float(b) for b in opt_cfg.get("betas", (0.9, 0.999))))
        decay = cfg["lr_decay"]
        s0, s1 = self.s0, self.s1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, s0, s1, decay.get("milestones", []), float(decay.get("gamma", 0.1))))
        self.amp_dtype = _amp_dtype(cfg, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.start = 0
        if payload is not None:
            payload = load_checkpoint(run.resume, model=model, optimizer=self.optimizer, scheduler=self.scheduler, restore_rng=True)
            self.start = int(payload["step"])
            if self.scaler is not None and payload.get("extra", {}).get("scaler"):
                self.scaler.load_state_dict(payload["extra"]["scaler"])
            log.info("resumed from %s at step %d", run.resume, self.start)
            if self.start >= self.total:
                log.warning("checkpoint %s is at step %d, the config asks for %d steps: only exporting weights", run.resume,
                            self.start, self.total)
        if world > 1:
            torch.manual_seed(int(cfg["seed"]) * 1000 + rank + self.start)  # rank-specific torch RNG (model init already broadcast)
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=bool(cfg["find_unused_parameters"]))
        else:
            self.ddp_model = model
        batch = cfg["batch_size"]
        clip_cfg = {**dict(cfg.get("clips") or {}), "seed": cfg["seed"]}
        self.dataset = ClipDataset(data, clip_cfg, stage0_steps=s0, stage1_steps=s1, global_batch=batch * world)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch, sampler=StepSampler(self.start, self.total, batch, rank, world),
            num_workers=int(cfg["num_workers"]), pin_memory=dev.type == "cuda", persistent_workers=False, drop_last=False,
            # own generator: creating the iterator must not consume the global torch RNG (resume
            # would then diverge from an uninterrupted run); samples depend only on their index
            generator=torch.Generator().manual_seed(int(cfg["seed"])))
        self.train_log = CSVLogger(out / "train_log.csv", TRAIN_FIELDS, resume_step=self.start) if run.main else None
        self.val_log = CSVLogger(out / "val_log.csv", VAL_FIELDS, resume_step=self.start) if run.main else None
        self.ckpt_dir = out / "checkpoints"
        self.last_val: dict[str, float] = {}
        self.baseline: dict[tuple[str, int], float] = {}
        ks = cfg["val"].get("k", 5)
        self.ks = [int(v) for v in (ks if isinstance(ks, (list, tuple)) else [ks])]
        self.sums = {"loss": 0.0, "ce": 0.0, "lovasz": 0.0}
        self.n_sum = 0
        self.t_log = time.time()

    def checkpoint(self, step: int) -> None:
        if not self.run.main:
            return
        extra = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        p = save_checkpoint(self.ckpt_dir / f"step_{step:07d}.pt", model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=step, config=_jsonable(self.cfg), extra=extra)
        tmp = self.ckpt_dir / ".last.pt.tmp"
        tmp.write_bytes(p.read_bytes())
        os.replace(tmp, self.ckpt_dir / "last.pt")
        keep = int(self.cfg.get("keep_checkpoints") or 0)
        if keep > 0:
            for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink()

    def validate(self, step: int) -> None:
        if not self.run.main or not self.data.validation:
            return
        dev, baseline = self.run.dev, self.baseline
        self.model.eval()
        cases = self.data.validation[: self.cfg["val"].get("max_cases") or None]
        for case in cases:
            for k in self.ks:
                if (case.name, k) not in baseline:
                    baseline[(case.name, k)] = validation_dice(None, case, k=k, device=dev, method="sdf")["mean_dice"]
                t0 = time.time()
                res = validation_dice(self.model, case, k=k, device=dev, amp_dtype=self.amp_dtype)
                self.val_log.log({"step": step, "case": case.name, "k": k, "mean_dice": res["mean_dice"],
                                  "sdf_dice": baseline[(case.name, k)], "n_labels": res["n_labels"], "seconds": time.time() - t0})
                self.last_val[f"{case.name}@k{k}"] = res["mean_dice"]
                log.info("step %d validation %s k=%d: mean Dice %.4f (SDF interpolation %.4f) over %d labels",
                         step, case.name, k, res["mean_dice"], baseline[(case.name, k)], res["n_labels"])
        self.model.train()

    def flush_log(self, at: int, lr: float) -> None:
        """Write the mean losses since the last row (mean over ranks too); every rank calls it."""
        if self.n_sum == 0:
            return
        sums = self.sums
        vals = torch.tensor([sums["loss"], sums["ce"], sums["lovasz"]], dtype=torch.float64, device=self.run.dev) / self.n_sum
        if self.run.world > 1:
            torch.distributed.all_reduce(vals)
            vals /= self.run.world
        if self.run.main:
            self.train_log.log({"step": at, "stage": int(at > self.s0), "max_gap": self.dataset.max_gap(at - 1) if at > self.s0 else 0,
                                "lr": lr, "loss": float(vals[0]), "ce": float(vals[1]), "lovasz": float(vals[2]),
                                "sec_per_step": (time.time() - self.t_log) / self.n_sum})
        self.sums = dict.fromkeys(sums, 0.0)
        self.n_sum = 0
        self.t_log = time.time()

    def train_step(self, item: dict) -> dict:
        """One optimisation step on a batch; returns this rank's loss tensors."""
        dev, cfg, scaler, optimizer = self.run.dev, self.cfg, self.scaler, self.optimizer
        frames = item["frames"].to(dev, non_blocking=True)  # B, T, 3, R, R
        masks = item["masks"].to(dev, non_blocking=True)  # B, T, K, R, R
        target = item["target"].to(dev, non_blocking=True)  # B, T, R, R
        nobj = item["num_objects"].to(dev)
        amp = torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        with amp:
            logits = self.ddp_model(frames, masks[:, 0], nobj)  # B, T-1, K+1, R, R
        losses = propagation_loss(logits.float(), target[:, 1:], lovasz_weight=float(cfg["lovasz_weight"]))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
        else:
            losses["loss"].backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg["grad_clip"]))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        return losses

    def time_is_up(self, step: int) -> bool:
        run, cfg = self.run, self.cfg
        if run.time_limit is None or step >= self.total or not (run.world == 1 or step % cfg["log_every"] == 0):
            return False
        over = torch.tensor(float(time.time() - run.t_start > float(run.time_limit)), device=run.dev)
        if run.world > 1:
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        return over.item() > 0

    def loop(self) -> int:
        """Train from the start step to the end (or the time limit); returns the last step."""
        cfg, run, total = self.cfg, self.run, self.total
        step = self.start
        lr_now = self.optimizer.param_groups[0]["lr"]
        it = iter(self.loader)
        while step < total:
            if run.cancel is not None and run.cancel():
                self.flush_log(step, lr_now)
                self.checkpoint(step)
                barrier()
                check_cancel(run.cancel)
            item = next(it)
            lr_now = self.optimizer.param_groups[0]["lr"]
            losses = self.train_step(item)
            step += 1
            for key in self.sums:
                self.sums[key] += float(losses[key].detach())
            self.n_sum += 1
            if not math.isfinite(self.sums["loss"]):
                raise RuntimeError(f"training loss is not finite at step {step}; lower the learning rate or use amp: bf16/off")
            if step % cfg["log_every"] == 0 or step == total:
                self.flush_log(step, lr_now)
            synced = False
            if step % cfg["val_every"] == 0 or step == total:
                self.validate(step)
                synced = True
            if step % cfg["ckpt_every"] == 0 or step == total:
                self.checkpoint(step)
                synced = True
            if synced:
                barrier()  # the other ranks wait while rank 0 validates / saves
            if run.on_step is not None:
                run.on_step(step, self.model, {k: v.detach() for k, v in losses.items()})
            report(run.progress, step, total, f"stage {int(step > self.s0)} loss {float(losses['loss'].detach()):.3f}")
            if self.time_is_up(step):
                log.warning("time limit of %.0f s reached at step %d of %d: checkpoint written, resume with --resume %s",
                            float(run.time_limit), step, total, self.ckpt_dir / "last.pt")
                self.flush_log(step, lr_now)
                self.checkpoint(step)
                barrier()
                break
        return step

    def export(self, step: int) -> Path:
        """Write the weights-only file (rank 0) with the run's metadata; returns its path."""
        from ..weights import save_weights

        cfg, data, run, model = self.cfg, self.data, self.run, self.model
        if self.start >= self.total:
            self.checkpoint(step)
        weights = self.out / cfg["weights_name"]
        if run.main:
            meta = {
                "trained_steps": step,
                "complete": step >= self.total,
                "stage0_steps": self.s0,
                "stage1_steps": self.s1,
                "resolution": cfg["resolution"],
                "variant": cfg.get("variant"),
                "train_cases": [c.name for c in data.cases],
                "phantoms": len(data.phantoms),
                "validation_cases": [c.name for c in data.validation],
                "validation_mean_dice": self.last_val,
                "hardware": _hardware(run.dev, run.world),
                "wall_seconds_this_session": round(time.time() - run.t_start, 1),
                "torch": str(torch.__version__),
                "preprocessing": {
                    "crop": data.crop,  # "body": crop.body_bbox (HU > -500 in >= 10% of slices, largest component, 4% margin, square in mm, air padding); "none": whole slice
                    "resize": "bilinear on HU to resolution x resolution, then window_ct (abdomen, chest, bone)",
                },
            }
            wdtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(str(cfg.get("weights_dtype", "float16")))
            if wdtype is None:
                raise InputError(f"Training option weights_dtype={cfg.get('weights_dtype')!r} is unknown; use float16, bfloat16 or float32.")
            state = {k: (v.to(wdtype) if v.is_floating_point() else v) for k, v in unwrap(model).state_dict().items()}
            meta["weights_dtype"] = str(cfg.get("weights_dtype", "float16"))
            save_weights(weights, kind="stcn", config=unwrap(model).config, state_dict=state, meta=_jsonable(meta))
            log.info("weights written to %s", weights)
        barrier()
        return weights


def _jsonable(obj: Any) -> Any:
    """A JSON-round-tripped copy (plain types only, safe for ``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(obj, default=str))
