"""Semi-supervised training of the reference pair by Cross Pseudo Supervision (CPS).

Two networks (by default TransUNet and DeepLabV3+, any two reference configs) see the
same batch of labeled + unlabeled axial slices. Each is supervised on the labeled slices
(Dice + CE, GODC + CE or another loss of :mod:`napari_propseg.reference.losses`; the
target adaptive loss for sources that label only some organs) and is also trained with CE
on the other network's argmax over all slices of the batch (Chen et al. 2021):

    L = sup(A) + sup(B) + lambda(step) * [CE(A, argmax B) + CE(B, argmax A)]

``lambda`` ramps from 0 to ``lambda_max`` over ``warmup_steps`` (linear, as 3D-CPS does
from 0 to 0.5, or the sigmoid ramp ``exp(-5 (1 - t)^2)``). AdamW with a polynomial
learning-rate decay. Checkpoints (both networks, optimizer, scheduler, step, config, RNG)
and the CSV log follow :mod:`napari_propseg.training.common`; DDP under ``torchrun``.

Config (YAML or JSON; relative paths are relative to the config file)::

    out: runs/reference              # output folder
    steps: 2000
    batch_labeled: 4
    batch_unlabeled: 4
    img_size: 256                    # training slice size (both networks)
    num_classes: 15                  # 0 background, FLARE 1-13, 14 vertebrae
    lr: 1.0e-4
    weight_decay: 1.0e-4
    loss: dice_ce                    # dice_ce | godc_ce | lovasz_ce | dice | ce | lovasz
    cps: {lambda_max: 0.5, warmup_steps: 500, ramp: linear}   # or ramp: sigmoid
    augment_scale: [0.85, 1.15]      # random zoom range (scanner field-of-view differences)
    augment_aspect: 0.0              # random x/y stretch exp(+-u), u <= this
    models:
      - {preset: transunet-small}
      - {preset: deeplabv3plus-small, ife: curvature}
    data:
      labeled:                       # image/label pairs and their label maps
        - image: ../shared/data/totalseg_example/example_ct.nii.gz
          labels: ../shared/data/totalseg_example/example_seg_v1.nii.gz
          label_map: ../shared/data/totalseg_example/labels.json   # TotalSegmentator names
          label_map_key: v1
        - {image: ct.nii.gz, labels: seg.nii.gz, label_map: flare, organs: [1, 2, 3]}
      unlabeled: [{image: other_ct.nii.gz}]
      phantoms: {count: 4, ratio: 0.5, shape: [64, 192, 192], spacing: [2.5, 1.6, 1.6], seed: 100}
      val: [{image: ..., labels: ..., label_map: ...}]
    seed: 0
    device: auto
    log_every: 10
    checkpoint_every: 200

``label_map: flare`` means the label file already holds FLARE ids; a JSON path means
TotalSegmentator class names, converted by :func:`napari_propseg.labelmap.map_totalsegmentator`.
``organs`` lists the ids a source labels (default: every id its label map can produce);
sources that do not label every class are trained with the target adaptive loss.
``phantoms.ratio`` is the fraction of labeled slices drawn from phantoms.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CancelledError, InputError
from ..progress import CancelFn, ProgressFn, report
from ..reference import build_reference_model, resolve_config, save_reference_model
from ..reference.losses import LOSSES, supervised_loss
from .common import read_config_file

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "out": "runs/reference",
    "steps": 2000,
    "batch_labeled": 4,
    "batch_unlabeled": 4,
    "img_size": 256,
    "num_classes": 15,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "poly_power": 0.9,
    "loss": "dice_ce",
    "cps": {"lambda_max": 0.5, "warmup_steps": 500, "ramp": "linear"},
    "models": [{"preset": "transunet-small"}, {"preset": "deeplabv3plus-small"}],
    "data": {"labeled": [], "unlabeled": [], "phantoms": None, "val": []},
    "foreground_fraction": 0.7,
    "augment": True,
    "augment_scale": [0.85, 1.15],
    "augment_aspect": 0.0,
    "seed": 0,
    "device": "auto",
    "log_every": 10,
    "checkpoint_every": 200,
    "val_every": 0,
    "windows": None,
    "label_names": None,
    "time_limit": 0,
}

LOG_FIELDS = ["step", "loss", "sup_a", "sup_b", "cps", "lambda", "lr", "seconds", "val_dice_a", "val_dice_b", "val_dice_ens"]


# --------------------------------------------------------------------------- config


def load_config(config: dict | str | os.PathLike) -> tuple[dict, Path]:
    """Read a YAML/JSON config (or take a dict), fill defaults; returns ``(cfg, base dir)``.

    Raises:
        InputError: unreadable file or invalid values.
    """
    base = Path.cwd()
    if not isinstance(config, dict):
        path = Path(config).expanduser()
        raw = read_config_file(path)
        base = path.resolve().parent
        config = raw
    cfg = json.loads(json.dumps({**DEFAULTS, **config}))  # deep copy, JSON-able
    cfg["cps"] = {**DEFAULTS["cps"], **(config.get("cps") or {})}
    cfg["data"] = {**DEFAULTS["data"], **(config.get("data") or {})}
    if cfg["loss"] not in LOSSES:
        raise InputError(f"Training config: loss {cfg['loss']!r} is unknown; use one of {', '.join(LOSSES)}.")
    if cfg["cps"]["ramp"] not in ("linear", "sigmoid"):
        raise InputError(f"Training config: cps.ramp must be 'linear' or 'sigmoid', got {cfg['cps']['ramp']!r}.")
    if len(cfg["models"]) != 2:
        raise InputError(f"Training config: CPS trains exactly two models, got {len(cfg['models'])}.")
    if int(cfg["img_size"]) % 16:
        raise InputError(f"Training config: img_size must be a multiple of 16, got {cfg['img_size']}.")
    sc = cfg["augment_scale"]
    if not (isinstance(sc, (list, tuple)) and len(sc) == 2 and 0 < float(sc[0]) <= float(sc[1])):
        raise InputError(f"Training config: augment_scale must be [low, high] with 0 < low <= high, got {sc}.")
    if float(cfg["augment_aspect"]) < 0:
        raise InputError(f"Training config: augment_aspect must be 0 or more, got {cfg['augment_aspect']}.")
    for key in ("steps", "batch_labeled", "num_classes"):
        if int(cfg[key]) < 1:
            raise InputError(f"Training config: {key} must be at least 1, got {cfg[key]}.")
    if not cfg["data"]["labeled"] and not cfg["data"].get("phantoms"):
        raise InputError("Training config: data needs labeled cases or phantoms; add data.labeled or data.phantoms.")
    return cfg, base


def cps_weight(step: int, lambda_max: float, warmup_steps: int, ramp: str = "linear") -> float:
    """CPS weight at ``step``: 0 -> ``lambda_max`` over ``warmup_steps`` (linear or sigmoid)."""
    if warmup_steps <= 0:
        return float(lambda_max)
    t = min(1.0, max(0.0, step / warmup_steps))
    if ramp == "sigmoid":
        return float(lambda_max * math.exp(-5.0 * (1.0 - t) ** 2))
    return float(lambda_max * t)


# --------------------------------------------------------------------------- data


@dataclass
class Case:
    """One training volume: HU ``(Z, Y, X)`` int16, labels ``(Z, Y, X)`` uint8 or None,
    ``labeled (C,)`` bool of the classes its source labels, foreground slice indices."""

    name: str
    hu: np.ndarray
    labels: np.ndarray | None
    labeled: np.ndarray
    fg_slices: np.ndarray


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def expand_entries(entries: list, base: Path, *, with_labels: bool) -> list[dict]:
    """Expand ``{dataset: DIR, split: NAME | [NAMES], limit: N}`` entries into one entry per case.

    Labelled entries carry the case's ``organs`` (its ``labels_present`` ids: the other
    organs are unknown in the case and left out of the loss by the target adaptive loss).
    Other entries pass through unchanged.
    """
    from ..datasets import read_dataset

    out: list[dict] = []
    for e in entries or []:
        if not isinstance(e, dict) or "dataset" not in e:
            out.append(e)
            continue
        ds = read_dataset(_resolve(base, str(e["dataset"])))
        cases = ds.cases(split=e.get("split"), labeled=True if with_labels else None)
        if e.get("limit") is not None:
            cases = cases[: int(e["limit"])]
        if not cases:
            raise InputError(f"Training config: dataset {ds.root} has no {'labelled ' if with_labels else ''}case in split {e.get('split')!r}; "
                             f"its splits are {', '.join(map(repr, ds.splits))}.")
        for c in cases:
            item = {"image": str(c.image), "name": c.name}
            if with_labels:
                item.update({"labels": str(c.labels), "label_map": "flare", "organs": c.present_ids(ds.label_map)})
            out.append(item)
    return out


def _load_case(entry: dict, base: Path, num_classes: int, *, with_labels: bool) -> Case:
    from ..formats import read_labels
    from ..io import read_volume
    from ..labelmap import map_totalsegmentator, read_label_map, totalsegmentator_to_flare

    if "image" not in entry:
        raise InputError(f"Training config: data entry {entry} has no 'image'.")
    vol = read_volume(_resolve(base, entry["image"]))
    hu = np.clip(vol.array, -32768, 32767).astype(np.int16)
    labels = None
    labeled = np.zeros(num_classes, dtype=bool)
    labeled[0] = True
    if with_labels:
        if "labels" not in entry:
            raise InputError(f"Training config: labeled entry {entry['image']} has no 'labels'.")
        lab = read_labels(_resolve(base, entry["labels"]), vol).array
        lmap = entry.get("label_map", "flare")
        if lmap == "flare":
            arr = lab.astype(np.int64)
            ids = set(range(1, num_classes))
        else:
            names = read_label_map(_resolve(base, lmap), entry.get("label_map_key"))
            arr = map_totalsegmentator(lab, names).astype(np.int64)
            ids = set(totalsegmentator_to_flare(names).values())
        if arr.max(initial=0) >= num_classes:
            raise InputError(f"Labels of {entry['labels']} hold id {int(arr.max())} but num_classes is {num_classes}; raise num_classes.")
        organs = entry.get("organs")
        ids = set(int(i) for i in organs) if organs is not None else ids
        arr[~np.isin(arr, list(ids | {0}))] = 0  # ids the source does not claim to label
        for i in ids:
            if 0 < i < num_classes:
                labeled[i] = True
        labels = arr.astype(np.uint8)
    fg = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1)) if labels is not None else np.arange(0)
    return Case(str(entry.get("name") or Path(entry["image"]).name), hu, labels, labeled, fg)


def _phantom_cases(spec: dict, num_classes: int) -> list[Case]:
    from ..phantom import PHANTOM_LABELS, make_phantom

    out = []
    count = int(spec.get("count", 2))
    seed0 = int(spec.get("seed", 1000))
    shape = tuple(spec.get("shape", (64, 192, 192)))
    spacing = tuple(spec.get("spacing", (2.5, 1.6, 1.6)))
    for i in range(count):
        ct, lab = make_phantom(shape, spacing, seed0 + i)
        labeled = np.zeros(num_classes, dtype=bool)
        labeled[0] = True
        for k in PHANTOM_LABELS:
            if k < num_classes:
                labeled[k] = True
        arr = lab.array.astype(np.uint8)
        arr[arr >= num_classes] = 0
        fg = np.flatnonzero(arr.reshape(arr.shape[0], -1).any(1))
        out.append(Case(f"phantom_{seed0 + i}", ct.array.astype(np.int16), arr, labeled, fg))
    return out


class SliceSampler:
    """Draws windowed, resized (and augmented) axial slices from cases.

    Args:
        cases: labeled or unlabeled cases.
        size: output H = W.
        rng: numpy Generator.
        foreground_fraction: probability of drawing a slice with labels (labeled cases).
        augment: random scale/rotation/shift and intensity jitter.
        scale: range of the random zoom factor (field-of-view differences between scanners).
        aspect: random anisotropic stretch, x and y scaled by ``exp(+-u)``, ``u`` uniform in
            ``[-aspect, aspect]`` (non-square slices are resized to a square input).
    """

    def __init__(self, cases: list[Case], size: int, rng: np.random.Generator, *, foreground_fraction: float = 0.7,
                 augment: bool = True, scale: tuple[float, float] = (0.85, 1.15), aspect: float = 0.0,
                 windows=None) -> None:
        self.cases = cases
        self.windows = windows
        self.size = size
        self.rng = rng
        self.fg = foreground_fraction
        self.augment = augment
        self.scale = (float(scale[0]), float(scale[1]))
        self.aspect = float(aspect)

    def _pick(self) -> tuple[Case, int]:
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        if case.labels is not None and len(case.fg_slices) and self.rng.random() < self.fg:
            return case, int(self.rng.choice(case.fg_slices))
        return case, int(self.rng.integers(case.hu.shape[0]))

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """``{"x": (n, 3, S, S), "y": (n, S, S) long, "z": (n,), "labeled": (n, C) bool}``."""
        from ..preprocess import window_ct

        xs, ys, zs, ls = [], [], [], []
        for _ in range(n):
            case, z = self._pick()
            x = torch.from_numpy(window_ct(case.hu[z].astype(np.float32), self.windows))[None]  # 1, 3, Y, X
            y = torch.from_numpy(case.labels[z].astype(np.int64))[None, None].float() if case.labels is not None else None
            x, y = self._geometry(x, y)
            if self.augment:
                x = (x * float(self.rng.uniform(0.9, 1.1)) + float(self.rng.uniform(-0.05, 0.05))).clamp(0, 1)
            xs.append(x[0])
            ys.append(y[0, 0].long() if y is not None else torch.zeros(self.size, self.size, dtype=torch.long))
            zs.append(0.5 if case.hu.shape[0] <= 1 else z / (case.hu.shape[0] - 1))
            ls.append(torch.from_numpy(case.labeled))
        return {"x": torch.stack(xs), "y": torch.stack(ys), "z": torch.tensor(zs, dtype=torch.float32),
                "labeled": torch.stack(ls)}

    def _geometry(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resize to S x S through one affine resampling (random when augmenting)."""
        s = self.size
        if self.augment:
            scale = float(self.rng.uniform(*self.scale))
            stretch = math.exp(float(self.rng.uniform(-self.aspect, self.aspect))) if self.aspect > 0 else 1.0
            ang = math.radians(float(self.rng.uniform(-10, 10)))
            tx, ty = (float(v) for v in self.rng.uniform(-0.08, 0.08, 2))
        else:
            scale, stretch, ang, tx, ty = 1.0, 1.0, 0.0, 0.0, 0.0
        c, sn = math.cos(ang) / scale, math.sin(ang) / scale
        sx, sy = 1.0 / stretch, stretch  # output x/y sample the input at these relative rates
        theta = torch.tensor([[[c * sx, -sn * sy, tx], [sn * sx, c * sy, ty]]], dtype=torch.float32)
        grid = F.affine_grid(theta, (1, 1, s, s), align_corners=False)
        if max(x.shape[-2:]) > 2 * s:  # antialias before sampling a much smaller grid
            x = F.interpolate(x, size=(2 * s, 2 * s), mode="bilinear", antialias=True, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if y is not None:
            y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return x, y


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_pair(pair: nn.ModuleDict, cases: list[Case], size: int, device: torch.device, num_classes: int,
                  windows=None) -> dict[str, float]:
    """Mean Dice over organs (labeled by the case and present in it) of A, B and the ensemble."""
    from ..preprocess import window_ct

    inter = np.zeros((3, num_classes))
    tot = np.zeros((3, num_classes))
    organs = np.zeros(num_classes, dtype=bool)
    for m in pair.values():
        m.eval()
    for case in cases:
        z_n = case.hu.shape[0]
        organs |= case.labeled & (np.bincount(case.labels.ravel(), minlength=num_classes)[:num_classes] > 0)
        for z0 in range(0, z_n, 8):
            zs = list(range(z0, min(z_n, z0 + 8)))
            x = torch.from_numpy(window_ct(case.hu[zs].astype(np.float32), windows)).to(device)
            h, w = x.shape[-2:]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=max(h, w) > size)
            zpos = torch.tensor([z / max(z_n - 1, 1) for z in zs], dtype=torch.float32, device=device)
            probs = [F.interpolate(m(x, zpos).float().softmax(1), size=(h, w), mode="bilinear", align_corners=False) for m in pair.values()]
            preds = [p.argmax(1).cpu().numpy() for p in (probs[0], probs[1], probs[0] + probs[1])]
            gt = case.labels[zs]
            for i, p in enumerate(preds):
                inter[i] += np.bincount(p[p == gt], minlength=num_classes)[:num_classes]
                tot[i] += np.bincount(p.ravel(), minlength=num_classes)[:num_classes] + np.bincount(gt.ravel(), minlength=num_classes)[:num_classes]
    organs[0] = False
    if not organs.any():
        return {}
    dice = 2 * inter[:, organs] / np.maximum(tot[:, organs], 1)
    return {"val_dice_a": float(dice[0].mean()), "val_dice_b": float(dice[1].mean()), "val_dice_ens": float(dice[2].mean())}


# --------------------------------------------------------------------------- training


def _common():
    """The shared checkpoint/log/DDP helpers (napari_propseg.training.common)."""
    from . import common

    return common


def _build_pair(cfg: dict, size: int, n_cls: int, windows) -> nn.ModuleDict:
    """The two reference networks ``a`` and ``b`` of the config's ``models`` (on the CPU)."""
    model_cfgs = []
    for m in cfg["models"]:
        mc = resolve_config({"img_size": size, **m, "num_classes": n_cls})
        if windows:
            mc["windows"] = [list(w) for w in windows]
        if cfg.get("label_names"):
            mc["label_names"] = {str(k): str(v) for k, v in cfg["label_names"].items()}
        model_cfgs.append(mc)
    return nn.ModuleDict({"a": build_reference_model(model_cfgs[0]), "b": build_reference_model(model_cfgs[1])})


def _sample_batch(rng: np.random.Generator, bl: int, bu: int, ratio: float, samp_real, samp_ph, samp_un):
    """One training batch: ``(lab, x, z)``, the labelled part (``bl`` slices, real and phantom
    mixed by ``ratio``) and the inputs with ``bu`` unlabelled slices appended."""
    n_ph = int(rng.binomial(bl, ratio)) if samp_ph is not None and samp_real is not None else (bl if samp_ph else 0)
    parts = []
    if bl - n_ph > 0:
        parts.append(samp_real.sample(bl - n_ph))
    if n_ph > 0:
        parts.append(samp_ph.sample(n_ph))
    lab = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    unl = samp_un.sample(bu) if bu > 0 else None
    x = torch.cat([lab["x"], unl["x"]]) if unl is not None else lab["x"]
    z = torch.cat([lab["z"], unl["z"]]) if unl is not None else lab["z"]
    return lab, x, z


def _save_pair(pair: nn.ModuleDict, out: Path, meta: dict) -> list:
    """Write the two weight files (``<arch>.pt``, or ``<arch>_a/_b.pt`` when both share one)."""
    meta = json.loads(json.dumps(meta))  # plain types only: weight files load with weights_only=True
    names = [m.config["arch"] for m in pair.values()]
    if names[0] == names[1]:
        names = [f"{names[0]}_a", f"{names[1]}_b"]
    return [save_reference_model(out / f"{name}.pt", m, meta=meta) for name, m in zip(names, pair.values())]


def train_reference(
    config: dict | str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    time_limit: float | None = None,
) -> dict:
    """Train the reference pair with CPS; write checkpoints, a CSV log and two weight files.

    Args:
        config: dict or YAML/JSON path (see the module docstring).
        resume: a checkpoint (``OUT/checkpoints/last.pt``) to continue from.
        progress: ``(step, steps, message)`` once per step.
        cancel: returns True to stop; a checkpoint is written first, then
            :class:`~napari_propseg.errors.CancelledError` is raised.
        time_limit: seconds of training after which the run stops cleanly: checkpoint,
            validation and weight files of the current step (continue with ``resume``).
            Default: the config's ``time_limit`` (0 = none).

    Returns:
        ``{"weights": [path A, path B], "checkpoint": path, "log": path, "step": int, "val": dict,
        "stopped_early": bool}``.
    """
    common = _common()
    cfg, base = load_config(config)
    rank, world, _, device = common.ddp_setup(cfg["device"])
    main = common.is_main_process()
    out = _resolve(base, cfg["out"])
    common.seed_everything(int(cfg["seed"]) + rank)
    rng = np.random.default_rng(int(cfg["seed"]) + 7919 * rank)
    size, n_cls = int(cfg["img_size"]), int(cfg["num_classes"])

    data = cfg["data"]
    windows = [tuple(map(float, w)) for w in cfg["windows"]] if cfg.get("windows") else None
    labeled = [_load_case(e, base, n_cls, with_labels=True) for e in expand_entries(data["labeled"], base, with_labels=True)]
    phantoms = _phantom_cases(data["phantoms"], n_cls) if data.get("phantoms") else []
    unlabeled = [_load_case(e, base, n_cls, with_labels=False) for e in expand_entries(data.get("unlabeled"), base, with_labels=False)]
    val = [_load_case(e, base, n_cls, with_labels=True) for e in expand_entries(data.get("val"), base, with_labels=True)]
    log.info("training data: %d labelled, %d unlabelled, %d validation cases, %d phantoms", len(labeled), len(unlabeled), len(val), len(phantoms))
    ratio = float((data.get("phantoms") or {}).get("ratio", 0.5)) if labeled and phantoms else (1.0 if phantoms else 0.0)
    kw = {"foreground_fraction": float(cfg["foreground_fraction"]), "augment": bool(cfg["augment"]),
          "scale": tuple(cfg["augment_scale"]), "aspect": float(cfg["augment_aspect"]), "windows": windows}
    samp_real = SliceSampler(labeled, size, rng, **kw) if labeled else None
    samp_ph = SliceSampler(phantoms, size, rng, **kw) if phantoms else None
    # unlabeled slices: the unlabeled cases, else slices of the labeled ones (labels unused)
    samp_un = SliceSampler(unlabeled or labeled or phantoms, size, rng, **{**kw, "foreground_fraction": 0.0})

    pair = _build_pair(cfg, size, n_cls, windows).to(device)
    opt = torch.optim.AdamW(pair.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    steps = int(cfg["steps"])
    power = float(cfg["poly_power"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps) ** power)
    step = 0
    if resume is not None:
        ck = common.load_checkpoint(resume, model=pair, optimizer=opt, scheduler=sched)
        step = int(ck["step"])
        if ck.get("extra", {}).get("sampler_rng"):
            rng.bit_generator.state = json.loads(ck["extra"]["sampler_rng"])
        log.info("resumed from %s at step %d", resume, step)
    fwd_a, fwd_b = pair["a"], pair["b"]
    if world > 1:  # one DDP wrapper per network so each backward syncs its gradients
        ids = [device.index] if device.type == "cuda" else None
        fwd_a = torch.nn.parallel.DistributedDataParallel(pair["a"], device_ids=ids)
        fwd_b = torch.nn.parallel.DistributedDataParallel(pair["b"], device_ids=ids)

    ckpt_path = out / "checkpoints" / "last.pt"
    logger = common.CSVLogger(out / "train_log.csv", LOG_FIELDS, resume_step=step) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    bl, bu = int(cfg["batch_labeled"]), int(cfg["batch_unlabeled"])
    t_start = time.perf_counter()
    last_val: dict = {}
    limit = float(time_limit if time_limit is not None else cfg.get("time_limit") or 0)
    stopped_early = False

    def save() -> None:
        if main:
            common.save_checkpoint(ckpt_path, model=pair, optimizer=opt, scheduler=sched, step=step, config=cfg,
                                   extra={"sampler_rng": json.dumps(rng.bit_generator.state)})

    while step < steps:
        if cancel is not None and cancel():
            save()
            raise CancelledError(f"training cancelled at step {step}; resume with --resume {ckpt_path}")
        pair.train()
        lab, x, z = _sample_batch(rng, bl, bu, ratio, samp_real, samp_ph, samp_un)
        x, z = x.to(device), z.to(device)
        y, lmask = lab["y"].to(device), lab["labeled"].to(device)
        lam = cps_weight(step, float(cfg["cps"]["lambda_max"]), int(cfg["cps"]["warmup_steps"]), cfg["cps"]["ramp"])
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            la, lb = fwd_a(x, z), fwd_b(x, z)  # B, C, S, S each
        la, lb = la.float(), lb.float()
        sup_a = supervised_loss(la[:bl], y, kind=cfg["loss"], labeled=lmask)
        sup_b = supervised_loss(lb[:bl], y, kind=cfg["loss"], labeled=lmask)
        pa, pb = la.detach().argmax(1), lb.detach().argmax(1)
        cps = F.cross_entropy(la, pb) + F.cross_entropy(lb, pa)
        loss = sup_a + sup_b + lam * cps
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        if not torch.isfinite(loss):
            raise RuntimeError(f"reference training diverged at step {step} (loss {loss.item()}); lower lr")
        row = None
        if main and (step % int(cfg["log_every"]) == 0 or step == steps):
            row = {"step": step, "loss": loss.item(), "sup_a": sup_a.item(), "sup_b": sup_b.item(), "cps": cps.item(),
                   "lambda": lam, "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t_start}
        if val and int(cfg["val_every"]) > 0 and step % int(cfg["val_every"]) == 0 and main:
            last_val = evaluate_pair(pair, val, size, device, n_cls, windows)
            row = {**(row or {"step": step}), **last_val}
        if row is not None:
            logger.log(row)
            log.info("step %d loss %.4f (sup %.4f/%.4f cps %.4f lambda %.3f)", step, loss.item(), sup_a.item(), sup_b.item(), cps.item(), lam)
        if step % int(cfg["checkpoint_every"]) == 0 or step == steps:
            save()
        report(progress, step, steps, f"loss {loss.item():.4f}")
        if limit > 0 and time.perf_counter() - t_start >= limit and step < steps:
            save()
            stopped_early = True
            log.info("time limit of %.0f s reached at step %d of %d; continue with --resume %s", limit, step, steps, ckpt_path)
            break

    weights = []
    if main:
        if val and (not last_val or stopped_early):
            last_val = evaluate_pair(pair, val, size, device, n_cls, windows)
        meta = {
            "trainer": "cps", "steps": step, "loss": cfg["loss"], "cps": cfg["cps"], "img_size": size,
            "data": {"labeled": [e.get("image") for e in data["labeled"]], "unlabeled": [e.get("image") for e in data.get("unlabeled") or []],
                     "phantoms": data.get("phantoms")},
            "val": last_val, "device": str(device), "world_size": world, "host": platform.node(),
            "seconds": round(time.perf_counter() - t_start, 1), "torch": str(torch.__version__),
        }
        weights = _save_pair(pair, out, meta)
    common.barrier()
    common.ddp_cleanup()
    return {"weights": weights, "checkpoint": ckpt_path, "log": out / "train_log.csv", "step": step, "val": last_val,
            "stopped_early": stopped_early}
