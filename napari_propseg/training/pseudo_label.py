"""Uncertainty-scored pseudo-labels from an ensemble of reference networks.

For an unlabeled volume, M networks each segment every axial slice (their own argmax).
The pseudo-label is the argmax of the *averaged one-hot masks* (a majority vote; ties are
broken by the mean softmax probability). The volume's score is

    score = mean over models m and organs c of Dice(mask_m == c, pseudo == c)

with the volumetric Dice ``2|A∩B| / (|A| + |B|)`` (Dice, not IoU), over the organs that
at least one model or the pseudo-label contains (an organ nobody predicts carries no
information). Volumes whose score reaches ``threshold`` (0.9 default) are kept: their
pseudo-label is written next to a CSV of every score, ready to be fed back as labeled
data.

``folder`` may also be a dataset folder (:mod:`napari_propseg.datasets`, nnU-Net raw or
shared layout; every case, labelled or not, is scored): the output is then a dataset
folder of the same layout holding the cases that pass, their images (hard links where the
file system allows, else copies) and pseudo-labels, and its description (``dataset.json``,
or ``labels.json`` + ``manifest.json`` with each case's score and ``labels_present``).

A site runs this over thousands of volumes: :func:`pseudo_label_folder` shards the sorted
case list by ``RANK`` / ``WORLD_SIZE`` (as set by ``torchrun``), records each finished case
in ``DIR/records/<case>.json`` (so a rerun skips it: resumable, also across shard counts),
and every process merges the records it finds into ``DIR/scores.csv`` when it ends.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..filenames import split_extension
from ..progress import CancelFn, ProgressFn, check_cancel, report

log = logging.getLogger(__name__)

CSV_NAME = "scores.csv"
RECORDS = "records"
FIELDS = ["case", "image", "score", "kept", "n_slices", "organs", "seconds", "label_file", "image_file"]
LAYOUT_FILE = "layout.json"


@dataclass
class EnsembleResult:
    """Result of :func:`ensemble_pseudo_label` for one volume.

    Attributes:
        labels: ``(Z, Y, X)`` pseudo-label (argmax of the averaged one-hot masks).
        score: mean Dice between each model's mask and the pseudo-label (NaN if no organ).
        per_model_organ: ``{model index: {organ id: Dice}}``.
    """

    labels: np.ndarray
    score: float
    per_model_organ: dict[int, dict[int, float]]


def ensemble_pseudo_label(
    volume_hu,
    models: Sequence[nn.Module],
    *,
    device: str | torch.device = "auto",
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> EnsembleResult:
    """Average the one-hot masks of ``models`` on every slice and score the agreement.

    Args:
        volume_hu: ``(Z, Y, X)`` HU (canonical LPS) or a Volume.
        models: M reference networks with the same ``num_classes``.
        device, progress, cancel: as in :func:`napari_propseg.reference.inference.suggest_slices`.
    """
    from ..reference.inference import _as_hu, agreement_counts, agreement_dice, iter_slice_probabilities, load_models

    hu = _as_hu(volume_hu)
    nets = load_models(models)
    n_models = len(nets)
    n_classes = int(nets[0].config["num_classes"])
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    labels = np.zeros(hu.shape, dtype=dtype)
    inter = np.zeros((n_models, n_classes), dtype=np.int64)
    size_m = np.zeros((n_models, n_classes), dtype=np.int64)
    size_p = np.zeros(n_classes, dtype=np.int64)
    for z, probs in iter_slice_probabilities(hu, nets, range(hu.shape[0]), device=device, progress=progress, cancel=cancel):
        masks = [p.argmax(0) for p in probs]  # M x (Y, X)
        votes = torch.stack([torch.nn.functional.one_hot(m, n_classes) for m in masks]).float().mean(0)  # Y, X, C
        mean_prob = torch.stack(probs).mean(0).permute(1, 2, 0)  # Y, X, C
        # ties of the vote go to the class with the larger mean probability (< 1/M apart)
        pseudo = (votes + mean_prob * (0.5 / n_models)).argmax(-1)
        labels[z] = pseudo.numpy().astype(dtype)
        i, sm, sp = agreement_counts(masks, pseudo, n_classes)
        inter += i
        size_m += sm
        size_p += sp
    # an organ only another model predicts: this model agrees with the consensus (both empty)
    per = agreement_dice(inter, size_m, size_p)
    scores = [d for organs in per.values() for d in organs.values()]
    score = float(np.mean(scores)) if scores else float("nan")
    return EnsembleResult(labels, score, per)


def _case_name(path: Path) -> str:
    return split_extension(path.name, (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"))[0]


def list_cases(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(case name, path)`` of every readable CT file or DICOM folder in ``folder``, sorted.

    Raises:
        InputError: missing folder, or one without any readable volume.
    """
    from ..io import is_readable_path

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Input folder {folder} does not exist; pass a folder of CT volumes.")
    cases = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        try:
            ok = is_readable_path(p)
        except Exception:  # noqa: BLE001 - a file the reader refuses is just not a case
            ok = False
        if ok:
            cases.append((_case_name(p), p))
    if not cases:
        raise InputError(f"No CT volumes (NIfTI, NRRD, MHA or DICOM folders) found in {folder}; pass a folder of images.")
    names = [c for c, _ in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"Several files in {folder} share the case name(s) {sorted(dup)}; rename them so each case is unique.")
    return cases


def shard(items: list, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"Invalid RANK={rank} / WORLD_SIZE={world_size}; they are set by torchrun.")
    return items[rank::world_size]


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _layout_paths(out: Path, layout: str, case: str, image: Path) -> tuple[Path, Path]:
    """(image path, label path) of a kept case in an output dataset folder."""
    from ..datasets import IMAGE_SUFFIXES

    suffix = split_extension(image.name, IMAGE_SUFFIXES)[1] or ".nii.gz"
    if layout == "nnunet":
        return out / "imagesTr" / f"{case}_0000{suffix}", out / "labelsTr" / f"{case}.nii.gz"
    return out / f"{case}_ct{suffix}", out / f"{case}_labels.nii.gz"


def _place_image(src: Path, dst: Path) -> Path:
    """Hard-link (else copy) the image into the output dataset, atomically."""
    import shutil

    from ..atomic import atomic_write

    if dst.exists():
        return dst

    def _w(tmp: Path) -> None:
        try:
            tmp.unlink()
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    return atomic_write(dst, _w, what="dataset image")


def _write_description(out: Path, rows: list[dict]) -> None:
    """The output dataset's description files, from the kept records."""
    from ..datasets import write_dataset_description

    layout_file = out / LAYOUT_FILE
    if not layout_file.is_file():
        return
    info = json.loads(layout_file.read_text())
    names = {int(k): v for k, v in info["label_map"].items()}
    present = [n for i, n in sorted(names.items()) if i > 0]
    cases = [{"case": r["case"], "split": "pseudo", "score": r["score"], "labels_present": present,
              "source_image": r["image"]} for r in sorted(rows, key=lambda r: r["case"]) if r.get("kept") in (True, "True")]
    write_dataset_description(out, info["layout"], names, cases)


def merge_records(out: str | os.PathLike) -> Path:
    """Write ``scores.csv`` (and, for a dataset input, the output dataset's description)
    from every record in ``out/records`` (atomic replace)."""
    out = Path(out)
    rows = []
    for rec in sorted((out / RECORDS).glob("*.json")):
        try:
            rows.append(json.loads(rec.read_text()))
        except (OSError, json.JSONDecodeError):  # another process is writing it
            continue
    path = out / CSV_NAME
    tmp = out / f".{CSV_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["case"]):
            w.writerow(r)
    os.replace(tmp, path)
    _write_description(out, rows)
    return path


def pseudo_label_folder(
    folder: str | os.PathLike,
    models: Sequence[nn.Module | str | os.PathLike],
    out: str | os.PathLike,
    *,
    threshold: float = 0.9,
    device: str | torch.device = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
) -> list[dict]:
    """Pseudo-label every volume of ``folder`` (this process's shard), keep the confident ones.

    Args:
        folder: CT files / DICOM folders.
        models: M weight files or networks.
        out: output folder: ``<case>.nii.gz`` for kept cases, ``records/<case>.json`` for
            every case done, ``scores.csv`` for all.
        threshold: keep a volume when its score is at least this.
        device: ``"auto" | "cpu" | "cuda"``; under torchrun with CUDA, ``cuda:LOCAL_RANK``.
        rank, world_size: shard; default from the ``RANK`` / ``WORLD_SIZE`` environment.
        progress: ``(case index, cases in shard, message)``.
        cancel: stop between slices.

    Returns:
        The records written by this call (skipped cases are not repeated).
    """
    from ..io import read_volume, write_labels
    from ..reference.inference import load_models

    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The score threshold must be between 0 and 1, got {threshold}.")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if device == "auto" and torch.cuda.is_available() and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    from ..datasets import is_dataset, read_dataset
    from ..reference.models import model_label_map

    nets = load_models(models)
    out = Path(out)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    layout = None
    if is_dataset(folder):
        ds = read_dataset(folder)
        layout = ds.layout
        all_cases = [(c.name, c.image) for c in ds.all_cases]
        if layout == "nnunet":
            (out / "imagesTr").mkdir(exist_ok=True)
            (out / "labelsTr").mkdir(exist_ok=True)
        if rank == 0:
            from ..atomic import atomic_write_text

            atomic_write_text(out / LAYOUT_FILE, json.dumps({"layout": layout, "source": str(ds.root),
                                                             "label_map": {str(k): v for k, v in model_label_map(nets).items()}}))
    else:
        all_cases = list_cases(folder)
    mine = shard(all_cases, rank, world_size)
    todo = [(c, p) for c, p in mine if not (out / RECORDS / f"{c}.json").is_file()]
    log.info("rank %d/%d: %d cases, %d already done", rank, world_size, len(mine), len(mine) - len(todo))
    records = []
    for i, (case, path) in enumerate(todo):
        check_cancel(cancel)
        report(progress, i, len(todo), case)
        t0 = time.perf_counter()
        try:
            vol = read_volume(path)
        except InputError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        res = ensemble_pseudo_label(vol.array, nets, device=device, cancel=cancel)
        kept = bool(not math.isnan(res.score) and res.score >= threshold)
        label_file = image_file = ""
        if kept and layout is not None:
            img_dst, lab_dst = _layout_paths(out, layout, case, Path(path))
            label_file = str(write_labels(res.labels, vol, lab_dst))
            image_file = str(_place_image(Path(path), img_dst))
        elif kept:
            label_file = str(write_labels(res.labels, vol, out / f"{case}.nii.gz"))
        rec = {
            "case": case, "image": str(path), "score": round(res.score, 6) if not math.isnan(res.score) else "nan",
            "kept": kept, "n_slices": int(vol.array.shape[0]),
            "organs": " ".join(str(c) for c in sorted(res.per_model_organ.get(0, {}))),
            "seconds": round(time.perf_counter() - t0, 3), "label_file": label_file, "image_file": image_file,
        }
        _write_json_atomic(out / RECORDS / f"{case}.json", rec)
        records.append(rec)
        log.info("%s: score %.4f %s", case, res.score, "kept" if kept else "rejected")
    report(progress, len(todo), len(todo), "done")
    merge_records(out)
    return records
