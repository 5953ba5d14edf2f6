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

Datasets: :class:`ClipDataset` and its clip stages live in
:mod:`napari_propseg.propagation.clips` (shared with online adaptation; see its docstring
for the seeding and the gap curriculum); the names are importable from here.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..crop import BodyCrop, body_bbox, crop_pad  # noqa: F401 - body_bbox: the box training and inference share
from ..errors import InputError
from ..preprocess import resize_slices, window_ct
# the volumes and the clip datasets live with online adaptation, which needs them too
from ..propagation.clips import (CLIP_DEFAULTS, DEFAULT_GAP_SWITCH, DEFAULT_GAPS, CaseData, ClipDataset,  # noqa: F401
                                 TrainingData, _elastic_field, _random_affine, warp)

log = logging.getLogger(__name__)

CACHE_FORMAT = "propseg-train-cache/1"


# --------------------------------------------------------------------------- volumes


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
    if crop not in ("body", "none"):
        raise InputError(f"Data option crop={crop!r} is unknown; use 'body' or 'none'.")
    box = BodyCrop.for_weights(crop, hu, spacing)
    hu_c = box.crop(np.asarray(hu), -1000)
    lab_c = box.crop(np.asarray(labels), 0)
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
