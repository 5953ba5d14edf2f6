"""Dataset folders: one reader for training, benchmarks and pseudo-labelling (no Qt).

Two layouts are recognised:

* **nnU-Net raw**: ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, ``dataset.json``
  with its ``labels`` map (name -> id), optional ``imagesTs/CASE_0000.nii.gz`` (unlabelled).
* **shared**: ``CASE_ct.nii.gz`` + ``CASE_labels.nii.gz`` in one folder, ``labels.json``
  (id -> name), optional ``manifest.json``: a list of ``{"case", "split",
  "labels_present": [names]}``.

Partial labels: a case lists the organs its label file holds (``labels_present``; an
nnU-Net case or a shared case without a manifest entry holds every organ of the map). An
organ outside that list is *unknown* in the case, neither background nor foreground; every
loss and every score must leave it out (:meth:`DatasetCase.present_ids`).

Example:
    >>> ds = read_dataset("../shared/data/openkbp")            # doctest: +SKIP
    >>> [c.name for c in ds.cases(split="validation-pats")][:2]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class DatasetCase:
    """One case of a dataset folder.

    Attributes:
        name: case identifier (file stem without the layout's suffix).
        image: CT file.
        labels: label file, or None for an unlabelled case.
        split: the dataset's split name ("" when it gives none).
        present: names of the organs the label file holds; None = every organ of the map.
    """

    name: str
    image: Path
    labels: Path | None
    split: str = ""
    present: tuple[str, ...] | None = None

    def present_ids(self, label_map: dict[int, str]) -> list[int]:
        """Foreground ids of ``label_map`` that this case's labels hold (sorted)."""
        if self.present is None:
            return sorted(i for i in label_map if i > 0)
        names = {n.lower() for n in self.present}
        return sorted(i for i, n in label_map.items() if i > 0 and n.lower() in names)


@dataclass
class Dataset:
    """A dataset folder: its layout, label map (id -> name) and cases."""

    root: Path
    layout: str
    label_map: dict[int, str]
    all_cases: list[DatasetCase] = field(default_factory=list)

    def cases(self, split: str | Iterable[str] | None = None, *, labeled: bool | None = None,
              names: Iterable[str] | None = None) -> list[DatasetCase]:
        """Cases filtered by split name(s), labelled-ness and/or explicit names (order kept)."""
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        wanted = None if names is None else set(names)
        out = []
        for c in self.all_cases:
            if splits is not None and c.split not in splits:
                continue
            if labeled is not None and (c.labels is not None) != labeled:
                continue
            if wanted is not None and c.name not in wanted:
                continue
            out.append(c)
        if wanted is not None:
            missing = sorted(wanted - {c.name for c in out})
            if missing:
                raise InputError(f"Dataset {self.root}: no case named {', '.join(missing)}; check the case names.")
        return out

    @property
    def splits(self) -> list[str]:
        return sorted({c.split for c in self.all_cases})


def _strip(name: str) -> str:
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Dataset {path.parent}: cannot read {what} {path.name} ({exc.__class__.__name__}); check the file.") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"Dataset {path.parent}: {what} {path.name} is not valid JSON (line {exc.lineno}); fix or remove it.") from exc


def _id_name_map(raw, path: Path) -> dict[int, str]:
    """``{id: name}`` from an id -> name or a name -> id mapping (nnU-Net writes the latter)."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"Dataset {path.parent}: {path.name} holds no label map; give it id -> name entries.")
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not str(k).lstrip("-").isdigit():
                out[int(v)] = str(k)  # nnU-Net: name -> id
            else:
                out[int(k)] = str(v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"Dataset {path.parent}: label map entry {k!r}: {v!r} in {path.name} is not an id and a name; fix it.") from exc
    out.setdefault(0, "background")
    return dict(sorted(out.items()))


def _find_image(folder: Path, stem: str) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def _read_nnunet(root: Path) -> Dataset:
    meta = _read_json(root / "dataset.json", "dataset description")
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(f"Dataset {root}: dataset.json has no 'labels' map; add one (name -> id, as nnU-Net writes it).")
    label_map = _id_name_map(meta["labels"], root / "dataset.json")
    cases: list[DatasetCase] = []
    for sub, split in (("imagesTr", "train"), ("imagesTs", "test")):
        folder = root / sub
        if not folder.is_dir():
            continue
        for img in sorted(folder.iterdir()):
            stem = _strip(img.name)
            if stem == img.name or not stem.endswith("_0000"):
                continue  # other channels (_0001...) or other files
            name = stem[: -len("_0000")]
            lab = _find_image(root / "labelsTr", name) if split == "train" else None
            if split == "train" and lab is None:
                raise InputError(f"Dataset {root}: case {name} has an image in imagesTr but no label file in labelsTr; add {name}.nii.gz or move the image to imagesTs.")
            cases.append(DatasetCase(name, img, lab, split))
    if not cases:
        raise InputError(f"Dataset {root}: imagesTr holds no CASE_0000 image; put the CTs there as CASE_0000.nii.gz.")
    return Dataset(root, "nnunet", label_map, cases)


def _read_shared(root: Path) -> Dataset:
    label_map = _id_name_map(_read_json(root / "labels.json", "label map"), root / "labels.json")
    manifest: dict[str, dict] = {}
    if (root / "manifest.json").is_file():
        raw = _read_json(root / "manifest.json", "manifest")
        entries = raw.get("cases", raw) if isinstance(raw, dict) else raw
        if isinstance(entries, dict):
            entries = [{"case": k, **v} for k, v in entries.items()]
        if not isinstance(entries, list):
            raise InputError(f"Dataset {root}: manifest.json must hold a list of cases; fix it or remove it.")
        for e in entries:
            if isinstance(e, dict) and "case" in e:
                manifest[str(e["case"])] = e
    known = {n.lower() for n in label_map.values()}
    cases: list[DatasetCase] = []
    for img in sorted(root.iterdir()):
        stem = _strip(img.name)
        if stem == img.name or not stem.endswith("_ct"):
            continue
        name = stem[: -len("_ct")]
        lab = _find_image(root, f"{name}_labels")
        entry = manifest.get(name, {})
        present = entry.get("labels_present")
        if present is not None:
            if not isinstance(present, list):
                raise InputError(f"Dataset {root}: labels_present of case {name} in manifest.json is not a list of organ names; fix it.")
            unknown = [p for p in present if str(p).lower() not in known]
            if unknown:
                raise InputError(f"Dataset {root}: case {name} lists {', '.join(map(str, unknown))} in labels_present, "
                                 "which labels.json does not name; fix manifest.json or labels.json.")
            present = tuple(str(p) for p in present)
        cases.append(DatasetCase(name, img, lab, str(entry.get("split", "")), present))
    if not cases:
        raise InputError(f"Dataset {root}: no CASE_ct.nii.gz file found; name the CTs CASE_ct.nii.gz and their labels CASE_labels.nii.gz.")
    return Dataset(root, "shared", label_map, cases)


def is_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder in one of the two layouts."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset.json").is_file() or (p / "labels.json").is_file())


def read_dataset(path: str | os.PathLike) -> Dataset:
    """Read a dataset folder (nnU-Net raw or shared layout).

    Raises:
        InputError: not a folder, neither layout, or a broken description / case.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InputError(f"Dataset {root} is not a folder; pass a dataset folder (nnU-Net imagesTr/labelsTr/dataset.json, or CASE_ct/CASE_labels with labels.json).")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return _read_nnunet(root)
    if (root / "labels.json").is_file():
        return _read_shared(root)
    raise InputError(f"Dataset {root} has neither dataset.json + imagesTr/ (nnU-Net) nor labels.json (CASE_ct/CASE_labels files); "
                     "add the description file of one layout.")


def write_dataset_description(root: Path, layout: str, label_map: dict[int, str], cases: list[dict]) -> None:
    """Write the description file(s) of a dataset folder the tool created (pseudo-labels).

    ``cases``: ``{"case", "split", "labels_present", ...}`` dicts (extra keys kept in the
    shared manifest).
    """
    from .atomic import atomic_write_text

    if layout == "nnunet":
        desc = {"channel_names": {"0": "CT"}, "labels": {n: i for i, n in sorted(label_map.items())},
                "numTraining": len(cases), "file_ending": ".nii.gz", "cases": cases}
        atomic_write_text(root / "dataset.json", json.dumps(desc, indent=1))
    else:
        atomic_write_text(root / "labels.json", json.dumps({str(i): n for i, n in sorted(label_map.items())}, indent=1))
        atomic_write_text(root / "manifest.json", json.dumps(cases, indent=1))
