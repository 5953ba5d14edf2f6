"""Training data of the propagation network: volumes, preprocessing cache, clip datasets.

Config (the ``data`` part of a training YAML/JSON; see
``models/propagation/train_default.yaml``)::

    resolution: 128              # working size (H = W) every slice is resized to
    crop: body                   # "body" (bounding box of the body) or "none" (whole slice)
    data_root: ../../../shared/data   # optional; relative to the config file
    cases:                       # training volumes
      - image: totalseg_example/example_ct_dicom        # file or DICOM folder
        labels: totalseg_example/example_seg_dicom_on_ct_grid.nii.gz
        label_names: totalseg_v2 # "flare" | "totalseg_v1" | "totalseg_v2" | a JSON file
    validation:                  # held-out volumes (same keys), never trained on
      - {image: ..., labels: ..., label_names: totalseg_v1}
    phantoms: {count: 6, ratio: 0.3, shape: [64, 160, 160], spacing: [3.0, 2.0, 2.0], seed: 1000}

Relative paths are resolved against ``data_root`` if one is set (itself relative to the
config file; the environment variable ``PROPSEG_DATA_ROOT`` or the CLI's ``--data-root``
override it), else against the config file's folder. ``label_names``:

* ``"flare"``: the label file already holds FLARE ids (see ``docs/ARCHITECTURE.md``);
* ``"totalseg_v1"`` / ``"totalseg_v2"``: TotalSegmentator ids, translated by organ name
  with the ``labels.json`` found beside the label file (the map whose name contains
  ``v1`` / ``v2``); ``"totalseg_v1:PATH"`` names the JSON explicitly;
* a path to a JSON ``{"id": "name"}`` (``PATH#key`` picks one map of a multi-map file):
  translated by name, like TotalSegmentator.

Preprocessing (:func:`preprocess_volume`): the CT is cropped to the body's bounding box
(HU > -500 in at least 10 % of the slices, largest component, 4 % margin, made square in
millimetres, padded with air if needed), every axial slice is resized to
``resolution`` x ``resolution`` (bilinear on HU, rounded to int16), then windowed into 3
channels; images are kept in memory as float16 (Z, 3, R, R), labels as uint8 (Z, R, R)
FLARE ids. :func:`save_cache` / :func:`load_cache` store the int16 HU and labels as one
compressed ``.npz`` (a third of the windowed size) so that training elsewhere needs
neither SimpleITK nor the original files nor the phantom generator.

Datasets: :class:`ClipDataset` draws sample ``i`` from a numpy Generator seeded with
``(seed, i)``, so any worker count, any rank and any resume point gives the same samples.
Stage 0 (static): one slice becomes a 3-frame clip through 3 independent random affine +
elastic deformations; the objects are label masks or SLIC superpixels of the slice.
Stage 1: 3 axial slices of one volume, consecutive frames ``d`` slices apart with ``d``
drawn uniformly from ``[1, max_gap]``; ``max_gap`` follows the curriculum (seed
pipeline: 3, 4, 5, 7, 3 switching at 10/20/30/40/90 % of stage 1) and is counted in
slices of ``gap_reference_mm`` thickness (default 3 mm): a 2 mm volume gets
``round(gap * 3 / 2)`` slices, so the anatomy moves about as much between frames
whatever the slice thickness (``gap_reference_mm: null`` counts raw slices).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocess import resize_slices, window_ct

log = logging.getLogger(__name__)

#: Default curriculum of stage 1: maximum gaps and the fractions of stage 1 where they start.
DEFAULT_GAPS = (3, 4, 5, 7, 3)
DEFAULT_GAP_SWITCH = (0.1, 0.2, 0.3, 0.4, 0.9)
CACHE_FORMAT = "propseg-train-cache/1"


# --------------------------------------------------------------------------- volumes


@dataclass
class CaseData:
    """One preprocessed volume at the working resolution.

    Attributes:
        name: short name (file name or ``phantom_<seed>``).
        image: (Z, 3, R, R) float16 windowed CT in [0, 1].
        labels: (Z, R, R) uint8 FLARE ids.
        spacing: (sz, sy, sx) mm of the resized grid.
        kind: ``"real"`` or ``"phantom"``.
        hu: (Z, R, R) int16 HU after cropping and resizing (what the cache stores;
            ``image`` is its windowing), or None.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    kind: str = "real"
    hu: np.ndarray | None = None

    @property
    def depth(self) -> int:
        return int(self.image.shape[0])


@dataclass
class TrainingData:
    """Everything the trainer reads: training cases, phantoms, validation cases."""

    resolution: int
    cases: list[CaseData] = field(default_factory=list)
    phantoms: list[CaseData] = field(default_factory=list)
    validation: list[CaseData] = field(default_factory=list)
    phantom_ratio: float = 0.0
    crop: str = "body"

    def summary(self) -> str:
        def names(cs):
            return ", ".join(f"{c.name} {c.image.shape[0]}sl" for c in cs) or "none"

        return (f"resolution {self.resolution}; train: {names(self.cases)}; phantoms: {len(self.phantoms)} "
                f"(ratio {self.phantom_ratio:g}); validation: {names(self.validation)}")


def body_bbox(hu: np.ndarray, spacing: Sequence[float], *, threshold: float = -500.0, margin: float = 0.04) -> tuple[int, int, int, int]:
    """Square (in mm) bounding box of the body over all slices.

    Args:
        hu: (Z, Y, X) Hounsfield units.
        spacing: (sz, sy, sx) mm.
        threshold: body voxels are above this HU.
        margin: fraction of the box size added on every side.

    Returns:
        ``(y0, y1, x0, x1)`` half-open pixel bounds; they may lie outside the array
        (the caller pads with air).
    """
    from scipy import ndimage

    z = hu.shape[0]
    step = max(1, z // 64)
    frac = (hu[::step] > threshold).mean(axis=0)
    mask = frac > 0.1
    lab, n = ndimage.label(mask)
    if n == 0:
        return 0, hu.shape[1], 0, hu.shape[2]
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(mask)
    sy, sx = float(spacing[1]), float(spacing[2])
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    size_mm = max((ys.max() + 1 - ys.min()) * sy, (xs.max() + 1 - xs.min()) * sx) * (1 + 2 * margin)
    hy, hx = size_mm / sy / 2.0, size_mm / sx / 2.0
    return int(math.floor(cy - hy)), int(math.ceil(cy + hy)), int(math.floor(cx - hx)), int(math.ceil(cx + hx))


def _crop_pad(arr: np.ndarray, box: tuple[int, int, int, int], fill) -> np.ndarray:
    y0, y1, x0, x1 = box
    _, h, w = arr.shape
    pad = ((0, 0), (max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)))
    out = arr[:, max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    if any(p for ax in pad for p in ax):
        out = np.pad(out, pad, constant_values=fill)
    return out


def preprocess_volume(hu: np.ndarray, labels: np.ndarray, spacing: Sequence[float], resolution: int, *, name: str = "",
                      kind: str = "real", crop: str = "body") -> CaseData:
    """Crop to the body, resize every slice and window into 3 channels.

    Args:
        hu: (Z, Y, X) CT in HU (canonical LPS).
        labels: (Z, Y, X) integer FLARE ids on the same grid.
        spacing: (sz, sy, sx) mm.
        resolution: output slice size R.
        crop: ``"body"`` (:func:`body_bbox`) or ``"none"`` (whole slice, as an inference
            engine that does not crop sees it). Must match what inference does.

    Returns:
        :class:`CaseData` with (Z, 3, R, R) float16 image and (Z, R, R) uint8 labels.
    """
    if hu.shape != labels.shape:
        raise InputError(f"Image and labels of {name or 'a case'} have different shapes {hu.shape} and {labels.shape}; give labels on the image's grid.")
    if crop == "body":
        box = body_bbox(hu, spacing)
    elif crop == "none":
        box = (0, hu.shape[1], 0, hu.shape[2])
    else:
        raise InputError(f"Data option crop={crop!r} is unknown; use 'body' or 'none'.")
    hu_c = _crop_pad(np.asarray(hu), box, -1000)
    lab_c = _crop_pad(np.asarray(labels), box, 0)
    z = hu.shape[0]
    hu_r = np.empty((z, resolution, resolution), dtype=np.int16)
    for s in range(0, z, 16):  # chunks keep the float32 intermediate small
        res = resize_slices(hu_c[s:s + 16].astype(np.float32), (resolution, resolution))
        hu_r[s:s + 16] = np.clip(np.rint(res), -32768, 32767).astype(np.int16)
    lab = resize_slices(lab_c.astype(np.uint8), (resolution, resolution), mode="nearest").astype(np.uint8)
    sy = spacing[1] * hu_c.shape[1] / resolution
    sx = spacing[2] * hu_c.shape[2] / resolution
    return CaseData(name=name, image=window_slices(hu_r), labels=lab, spacing=(float(spacing[0]), float(sy), float(sx)), kind=kind, hu=hu_r)


def window_slices(hu: np.ndarray) -> np.ndarray:
    """(Z, R, R) HU -> (Z, 3, R, R) float16 network input (:func:`window_ct`), in chunks."""
    out = np.empty((hu.shape[0], 3) + hu.shape[1:], dtype=np.float16)
    for s in range(0, hu.shape[0], 32):
        out[s:s + 32] = window_ct(hu[s:s + 32].astype(np.float32)).astype(np.float16)
    return out


# --------------------------------------------------------------------------- config


def _resolve_path(p: str, base: Path) -> Path:
    q = Path(os.path.expandvars(str(p))).expanduser()
    return Path(os.path.normpath(q if q.is_absolute() else (base / q)))


def resolve_data_config(config: Mapping[str, Any], *, config_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None) -> dict:
    """Turn the relative paths of a data config into absolute ones.

    Args:
        config: dict with ``cases``, ``validation``, ``phantoms``, ``resolution``, optional
            ``data_root``.
        config_dir: folder of the config file (relative ``data_root`` / paths start there);
            current directory if None.
        data_root: overrides ``config["data_root"]`` and ``$PROPSEG_DATA_ROOT``.

    Returns:
        A copy with absolute ``image``/``labels``/``label_names`` paths and ``data_root``.
    """
    cfg = json.loads(json.dumps(dict(config)))
    base = Path(config_dir) if config_dir is not None else Path.cwd()
    root = data_root or os.environ.get("PROPSEG_DATA_ROOT") or cfg.get("data_root")
    root_path = _resolve_path(root, base) if root else base
    cfg["data_root"] = str(root_path)
    for section in ("cases", "validation"):
        items = cfg.get(section) or []
        if not isinstance(items, list):
            raise InputError(f"The data config's '{section}' must be a list of {{image, labels, label_names}} entries.")
        items = _expand_datasets(items, root_path)
        cfg[section] = items
        for i, case in enumerate(items):
            if not isinstance(case, dict) or "image" not in case or "labels" not in case:
                raise InputError(f"Entry {i} of '{section}' in the data config needs 'image' and 'labels' keys.")
            case["image"] = str(_resolve_path(case["image"], root_path))
            case["labels"] = str(_resolve_path(case["labels"], root_path))
            names = str(case.get("label_names", "flare"))
            if names.lower() not in ("flare", "totalseg_v1", "totalseg_v2"):
                if ":" in names and names.split(":", 1)[0].lower() in ("totalseg_v1", "totalseg_v2"):
                    kind, p = names.split(":", 1)
                    names = f"{kind}:{_resolve_path(p, root_path)}"
                else:
                    p, _, key = names.partition("#")
                    names = str(_resolve_path(p, root_path)) + (f"#{key}" if key else "")
            case["label_names"] = names
    return cfg


def _expand_datasets(items: list, root: Path) -> list:
    """Replace ``{dataset: DIR, split: NAME, limit: N}`` entries by one entry per labelled case.

    The objects of a clip are the organs a case holds; an organ the case's manifest does not
    list as present is simply not an object there (its voxels are 0 in the label file), so
    partial labels never enter the loss as wrong background of a known object.
    """
    from ..datasets import read_dataset

    out = []
    for e in items:
        if not (isinstance(e, dict) and "dataset" in e):
            out.append(e)
            continue
        ds = read_dataset(_resolve_path(str(e["dataset"]), root))
        cases = ds.cases(split=e.get("split"), labeled=True)
        if e.get("limit") is not None:
            cases = cases[: int(e["limit"])]
        if not cases:
            raise InputError(f"The data config's dataset {ds.root} has no labelled case in split {e.get('split')!r}; "
                             f"its splits are {', '.join(map(repr, ds.splits))}.")
        out += [{"image": str(c.image), "labels": str(c.labels), "label_names": "flare", "name": c.name,
                 "organs": c.present_ids(ds.label_map)} for c in cases]
    return out


def _label_table(label_names: str, labels_path: str) -> dict[int, str] | None:
    """Id -> name map to translate a label file, or None for FLARE ids."""
    from ..labelmap import read_label_map

    key = label_names.lower()
    if key == "flare":
        return None
    if key.startswith(("totalseg_v1", "totalseg_v2")):
        version = key[len("totalseg_"):len("totalseg_") + 2]
        json_path = label_names.split(":", 1)[1] if ":" in label_names else str(Path(labels_path).parent / "labels.json")
        if not Path(json_path).is_file():
            raise InputError(f"label_names {label_names!r} for {labels_path} needs a TotalSegmentator labels.json at {json_path}; add it or give 'totalseg_{version}:PATH'.")
        return read_label_map(json_path, key=version)
    path, _, map_key = label_names.partition("#")
    return read_label_map(path, key=map_key or None)


def load_case(case: Mapping[str, Any], resolution: int, *, crop: str = "body") -> CaseData:
    """Read, map to FLARE ids and preprocess one ``{image, labels, label_names}`` entry."""
    from ..formats import read_labels
    from ..io import read_volume
    from ..labelmap import map_totalsegmentator

    vol = read_volume(case["image"])
    lab = read_labels(case["labels"], like=vol)
    table = _label_table(str(case.get("label_names", "flare")), case["labels"])
    ids = lab.array if table is None else map_totalsegmentator(lab.array, table)
    if case.get("organs") is not None:  # partial labels: only the organs the case holds
        ids = np.where(np.isin(ids, [int(o) for o in case["organs"]]), ids, 0)
    if int(np.max(ids)) > 255:
        raise InputError(f"Labels {case['labels']} hold ids above 255; map them to FLARE ids with label_names.")
    name = case.get("name") or Path(case["image"]).name.split(".")[0]
    out = preprocess_volume(vol.array, ids.astype(np.uint8), vol.spacing, resolution, name=name, crop=crop)
    present = sorted(set(np.unique(out.labels).tolist()) - {0})
    log.info("case %s: %d slices, spacing %s, labels %s", name, out.depth, tuple(round(s, 2) for s in out.spacing), present)
    if not present:
        raise InputError(f"Labels {case['labels']} hold no FLARE organ after mapping with {case.get('label_names')!r}; check label_names.")
    return out


def make_phantom_cases(spec: Mapping[str, Any] | None, resolution: int, progress=None, *, crop: str = "body") -> list[CaseData]:
    """Synthetic phantoms ``{count, shape, spacing, seed}`` preprocessed like real cases."""
    from ..phantom import make_phantom

    spec = dict(spec or {})
    count = int(spec.get("count", 0))
    shape = tuple(int(v) for v in spec.get("shape", (64, 160, 160)))
    spacing = tuple(float(v) for v in spec.get("spacing", (3.0, 2.0, 2.0)))
    seed0 = int(spec.get("seed", 1000))
    out = []
    for i in range(count):
        ct, lab = make_phantom(shape, spacing, seed=seed0 + i)
        out.append(preprocess_volume(ct.array, lab.array, ct.spacing, resolution, name=f"phantom_{seed0 + i}", kind="phantom", crop=crop))
        if progress is not None:
            progress(i + 1, count, "phantoms")
    return out


def build_training_data(config: Mapping[str, Any], *, progress=None) -> TrainingData:
    """Read and preprocess every volume of a resolved data config (see module docstring)."""
    res = int(config.get("resolution", 128))
    if res < 32 or res % 16:
        raise InputError(f"resolution {res} is not usable; give a multiple of 16, at least 32 (e.g. 128).")
    ph = dict(config.get("phantoms") or {})
    crop = str(config.get("crop", "body"))
    data = TrainingData(resolution=res, phantom_ratio=float(ph.get("ratio", 0.0)), crop=crop)
    data.cases = [load_case(c, res, crop=crop) for c in config.get("cases") or []]
    data.validation = [load_case(c, res, crop=crop) for c in config.get("validation") or []]
    data.phantoms = make_phantom_cases(ph, res, progress=progress, crop=crop)
    if not data.cases and not data.phantoms:
        raise InputError("The data config lists no training case and no phantoms; add 'cases' or 'phantoms: {count: N}'.")
    if not data.cases:
        data.phantom_ratio = 1.0
    elif not data.phantoms:
        data.phantom_ratio = 0.0
    log.info("training data: %s", data.summary())
    return data


# --------------------------------------------------------------------------- cache


def save_cache(data: TrainingData, path: str | os.PathLike) -> Path:
    """Write preprocessed data as one compressed ``.npz`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": CACHE_FORMAT, "resolution": data.resolution, "phantom_ratio": data.phantom_ratio, "crop": data.crop, "sets": {}}
    for set_name in ("cases", "phantoms", "validation"):
        entries = []
        for i, c in enumerate(getattr(data, set_name)):
            if c.hu is None:
                raise ValueError(f"case {c.name} has no HU array to cache; build it with preprocess_volume")
            arrays[f"{set_name}_{i}_hu"] = c.hu
            arrays[f"{set_name}_{i}_labels"] = c.labels
            entries.append({"name": c.name, "spacing": list(c.spacing), "kind": c.kind})
        meta["sets"][set_name] = entries
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    log.info("training cache written to %s", path)
    return path


def load_cache(path: str | os.PathLike, *, resolution: int | None = None) -> TrainingData:
    """Read a cache written by :func:`save_cache`.

    Raises:
        InputError: missing/unreadable file, not a cache, or another resolution.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Training cache {path} does not exist; make one with 'propseg train propagation CONFIG --cache-out {path.name}'.")
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise InputError(f"Training cache {path} could not be read ({type(exc).__name__}); rebuild it with --cache-out.") from exc
    if meta.get("format") != CACHE_FORMAT:
        raise InputError(f"{path} is not a propseg training cache; rebuild it with --cache-out.")
    if resolution is not None and int(meta["resolution"]) != int(resolution):
        raise InputError(f"Training cache {path} was made at resolution {meta['resolution']}, the config asks for {resolution}; rebuild the cache or change the config.")
    data = TrainingData(resolution=int(meta["resolution"]), phantom_ratio=float(meta["phantom_ratio"]), crop=str(meta.get("crop", "body")))
    for set_name, entries in meta["sets"].items():
        getattr(data, set_name).extend(
            CaseData(name=e["name"], image=window_slices(z[f"{set_name}_{i}_hu"]), labels=z[f"{set_name}_{i}_labels"],
                     spacing=tuple(e["spacing"]), kind=e["kind"], hu=z[f"{set_name}_{i}_hu"])
            for i, e in enumerate(entries)
        )
    log.info("training cache %s: %s", path, data.summary())
    return data


# --------------------------------------------------------------------------- geometry helpers


def _random_affine(rng: np.random.Generator, *, rot_deg: float, scale: tuple[float, float], shear_deg: float, translate: float, flip: bool) -> torch.Tensor:
    """(2, 3) affine in normalised coordinates mapping output to input positions."""
    a = math.radians(rng.uniform(-rot_deg, rot_deg))
    sh = math.radians(rng.uniform(-shear_deg, shear_deg))
    s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shear = np.array([[1.0, math.tan(sh)], [0.0, 1.0]])
    m = rot @ shear / s
    if flip:
        fx = -1.0 if rng.random() < 0.5 else 1.0
        fy = -1.0 if rng.random() < 0.5 else 1.0
        m = m @ np.diag([fx, fy])
    t = rng.uniform(-translate, translate, size=2)
    return torch.tensor(np.concatenate([m, t[:, None]], axis=1), dtype=torch.float32)


def _elastic_field(rng: np.random.Generator, size: int, *, alpha: float, grid: int = 5) -> torch.Tensor:
    """(1, size, size, 2) smooth random displacement in normalised coordinates."""
    coarse = torch.from_numpy(rng.normal(0.0, alpha, size=(1, 2, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp(image: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, disp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an affine (+ displacement) to an image and its masks.

    Args:
        image: (C, H, W) float32.
        masks: (K, H, W) float32 0/1.
        theta: (2, 3) affine (output -> input, normalised coordinates).
        disp: (1, H, W, 2) extra displacement or None.

    Returns:
        ``(image, masks)`` of the same shapes; masks re-binarised at 0.5.
    """
    h, w = image.shape[-2:]
    g = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    if disp is not None:
        g = g + disp
    img = F.grid_sample(image[None], g, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if masks.shape[0]:
        m = F.grid_sample(masks[None], g, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        m = (m > 0.5).float()
    else:
        m = masks
    return img, m


# --------------------------------------------------------------------------- dataset


class ClipDataset(torch.utils.data.Dataset):
    """Training clips for both stages, sample ``i`` drawn from ``default_rng((seed, i))``.

    The global sample index encodes the optimisation step (``i // global_batch``), which
    picks the stage (``step < stage0_steps``: static clips) and the stage-1 gap.

    Args:
        data: preprocessed volumes.
        config: the training config's ``clips`` options merged with ``seed``,
            ``num_frames``, ``num_objects`` (see :data:`CLIP_DEFAULTS`).
        stage0_steps, stage1_steps: step counts of the stages.
        global_batch: samples per step over all ranks.

    Each item is a dict:
        ``frames`` (T, 3, R, R) float32, ``masks`` (T, K, R, R) float32 0/1 (``masks[0]``
        is the first-frame input), ``target`` (T, R, R) int64 ids 0..K, ``num_objects``
        int64, ``stage`` int64, ``gap`` int64 (max gap used; 0 in stage 0).
    """

    def __init__(self, data: TrainingData, config: Mapping[str, Any], *, stage0_steps: int, stage1_steps: int, global_batch: int):
        self.data = data
        self.cfg = {**CLIP_DEFAULTS, **dict(config)}
        self.stage0_steps = int(stage0_steps)
        self.stage1_steps = int(stage1_steps)
        self.global_batch = int(global_batch)
        self.res = data.resolution
        self.num_frames = int(self.cfg["num_frames"])
        self.k = int(self.cfg["num_objects"])
        self.min_area = max(4, int(self.cfg["min_area_fraction"] * self.res * self.res))
        # slices that show at least one labelled organ, per case
        self._fg = {id(c): np.nonzero(c.labels.reshape(c.depth, -1).max(1) > 0)[0] for c in data.cases + data.phantoms}

    def __len__(self) -> int:
        return (self.stage0_steps + self.stage1_steps) * self.global_batch

    # -- scheduling
    def max_gap(self, step: int) -> int:
        """Stage-1 maximum gap (in reference slices) at optimisation ``step``."""
        gaps = list(self.cfg["gaps"])
        switch = list(self.cfg["gap_switch"])
        frac = (step - self.stage0_steps) / max(1, self.stage1_steps)
        g = gaps[0]
        for gi, si in zip(gaps, switch):
            if frac >= si:
                g = gi
        return int(g)

    def _pick_case(self, rng: np.random.Generator) -> CaseData:
        use_ph = self.data.phantoms and (not self.data.cases or rng.random() < self.data.phantom_ratio)
        pool = self.data.phantoms if use_ph else self.data.cases
        return pool[int(rng.integers(len(pool)))]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((int(self.cfg["seed"]), int(index)))
        step = int(index) // self.global_batch
        for _ in range(20):
            item = self._static(rng) if step < self.stage0_steps else self._clip(rng, self.max_gap(step))
            if item is not None:
                item["stage"] = torch.tensor(0 if step < self.stage0_steps else 1)
                return item
        raise RuntimeError("could not draw a training clip with a visible object in 20 tries; check the training labels")

    # -- objects
    def _pack(self, frames: torch.Tensor, masks: torch.Tensor, gap: int) -> dict:
        """frames (T,3,R,R), masks (T,n,R,R) with n <= K -> padded item dict."""
        t, n = masks.shape[:2]
        full = torch.zeros((t, self.k, self.res, self.res), dtype=torch.float32)
        full[:, :n] = masks
        target = torch.zeros((t, self.res, self.res), dtype=torch.int64)
        for j in range(n):  # later objects win on overlap (none with exclusive labels)
            target[masks[:, j] > 0.5] = j + 1
        return {"frames": frames.float(), "masks": full, "target": target, "num_objects": torch.tensor(n), "gap": torch.tensor(gap)}

    def _choose_ids(self, rng: np.random.Generator, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        n = 2 if (self.k >= 2 and len(ids) >= 2 and rng.random() < self.cfg["two_object_prob"]) else 1
        return [int(v) for v in rng.choice(ids, size=n, replace=False)]

    def _present(self, lab: np.ndarray) -> list[int]:
        ids, counts = np.unique(lab, return_counts=True)
        return [int(i) for i, c in zip(ids, counts) if i != 0 and c >= self.min_area]

    def _superpixels(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        """(R, R) int region ids (0 = outside the body) from SLIC on the abdomen window."""
        from skimage.segmentation import slic

        body = img[1] > 0.3  # chest window: air is ~0.22, soft tissue ~0.85
        n_seg = int(rng.integers(self.cfg["superpixels"][0], self.cfg["superpixels"][1] + 1))
        seg = slic(img[0].astype(np.float64), n_segments=n_seg, compactness=float(self.cfg["slic_compactness"]),
                   channel_axis=None, start_label=1, mask=body if body.sum() > self.min_area else None)
        return seg.astype(np.int32)

    # -- stage 0
    def _static(self, rng: np.random.Generator) -> dict | None:
        case = self._pick_case(rng)
        use_labels = rng.random() < self.cfg["static_label_prob"]
        fg = self._fg[id(case)]
        if use_labels and len(fg):
            z = int(fg[rng.integers(len(fg))])
        else:
            z = int(rng.integers(case.depth))
        img = case.image[z].astype(np.float32)
        regions = case.labels[z] if use_labels else None
        ids = self._present(regions) if regions is not None else []
        if not ids:
            regions = self._superpixels(rng, img)
            ids = self._present(regions)
            if not ids:
                return None
        chosen = self._choose_ids(rng, ids)
        base_img = torch.from_numpy(img)
        base_masks = torch.from_numpy(np.stack([regions == v for v in chosen]).astype(np.float32))
        frames, masks = [], []
        c = self.cfg
        for _ in range(self.num_frames):
            theta = _random_affine(rng, rot_deg=c["static_rotation"], scale=tuple(c["static_scale"]), shear_deg=c["static_shear"],
                                   translate=c["static_translate"], flip=False)
            disp = _elastic_field(rng, self.res, alpha=c["elastic_alpha"])
            fi, mi = warp(base_img, base_masks, theta, disp)
            frames.append(fi)
            masks.append(mi)
        masks_t = torch.stack(masks)
        if masks_t[0].flatten(1).sum(1).min() < self.min_area // 2:
            return None
        return self._pack(self._intensity(rng, torch.stack(frames)), masks_t, 0)

    # -- stage 1
    def _clip(self, rng: np.random.Generator, max_gap: int) -> dict | None:
        case = self._pick_case(rng)
        ref = self.cfg["gap_reference_mm"]
        g = max_gap if not ref else max(1, int(round(max_gap * float(ref) / case.spacing[0])))
        g = max(1, min(g, (case.depth - 1) // (self.num_frames - 1)))
        if case.depth < self.num_frames:
            return None
        fg = self._fg[id(case)]
        steps = rng.integers(1, g + 1, size=self.num_frames - 1)
        span = int(steps.sum())
        starts = fg[fg + span < case.depth] if len(fg) else fg
        reverse = rng.random() < 0.5
        if reverse:
            starts = fg[fg - span >= 0] - span if len(fg) else fg
        if not len(starts):
            return None
        z0 = int(starts[rng.integers(len(starts))])
        idx = [z0] + list(z0 + np.cumsum(steps))
        if reverse:
            idx = idx[::-1]
        labs = case.labels[idx]
        ids = self._present(labs[0])
        if not ids:
            return None
        chosen = self._choose_ids(rng, ids)
        frames = torch.from_numpy(case.image[idx].astype(np.float32))
        masks = torch.from_numpy(np.stack([labs == v for v in chosen], axis=1).astype(np.float32))  # T, n, R, R
        c = self.cfg
        theta = _random_affine(rng, rot_deg=c["clip_rotation"], scale=tuple(c["clip_scale"]), shear_deg=0.0, translate=c["clip_translate"], flip=True)
        out_f, out_m = [], []
        for t in range(self.num_frames):
            fi, mi = warp(frames[t], masks[t], theta)
            out_f.append(fi)
            out_m.append(mi)
        masks_t = torch.stack(out_m)
        if masks_t[0].flatten(1).sum(1).min() < self.min_area // 2:
            return None
        return self._pack(self._intensity(rng, torch.stack(out_f)), masks_t, g)

    def _intensity(self, rng: np.random.Generator, frames: torch.Tensor) -> torch.Tensor:
        """Same random contrast/brightness on all frames of a clip, clipped to [0, 1]."""
        j = float(self.cfg["intensity_jitter"])
        if j <= 0:
            return frames
        a = 1.0 + rng.uniform(-j, j)
        b = rng.uniform(-j, j) / 2
        return (frames * a + b).clamp_(0.0, 1.0)


#: Defaults of the ``clips`` section of the training config.
CLIP_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_frames": 3,
    "num_objects": 2,
    "two_object_prob": 0.5,
    "min_area_fraction": 0.002,
    "gaps": list(DEFAULT_GAPS),
    "gap_switch": list(DEFAULT_GAP_SWITCH),
    "gap_reference_mm": 3.0,
    "static_label_prob": 0.5,
    "superpixels": [8, 32],
    "slic_compactness": 0.1,
    "static_rotation": 15.0,
    "static_scale": [0.9, 1.1],
    "static_shear": 8.0,
    "static_translate": 0.06,
    "elastic_alpha": 0.015,
    "clip_rotation": 10.0,
    "clip_scale": [0.8, 1.2],
    "clip_translate": 0.08,
    "intensity_jitter": 0.05,
}


class StepSampler(torch.utils.data.Sampler):
    """Sample indices of one rank, step by step from ``start_step``.

    Step ``s`` of rank ``r`` uses the global indices ``s * B * W + r * B + b`` for
    ``b < B`` (B: per-rank batch, W: world size): the ranks share the random stream
    without overlap, like a DistributedSampler over a random sampler.
    """

    def __init__(self, start_step: int, total_steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.total, self.b, self.rank, self.world = int(start_step), int(total_steps), int(batch_size), int(rank), int(world_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.b

    def __iter__(self) -> Iterator[int]:
        gb = self.b * self.world
        for s in range(self.start, self.total):
            base = s * gb + self.rank * self.b
            yield from range(base, base + self.b)
