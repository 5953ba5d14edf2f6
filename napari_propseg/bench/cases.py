"""Benchmark cases: the shared real CTs and synthetic phantoms.

Real cases are read from the shared data folder beside the repository
(``../shared/data``, or ``$PROPSEG_SHARED_DATA``) and never copied into it:

* ``totalseg_ct``: ``totalseg_example/example_ct.nii.gz`` with
  ``example_seg_v1.nii.gz`` (TotalSegmentator v1 output, 3 mm isotropic), mapped to the
  FLARE-13 organ ids by name.
* ``totalseg_dicom``: the 20-slice DICOM series ``totalseg_example/example_ct_dicom`` with
  ``example_seg_dicom_on_ct_grid.nii.gz`` (TotalSegmentator v2 names), mapped likewise.

Their labels are model output, not manual ground truth: good for comparing methods on the
same seeds, not for absolute accuracy claims.

Phantoms come from :func:`napari_propseg.phantom.make_phantom` (seeded, reproducible).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

CASE_GROUPS = ("real", "phantom")
REAL_CASES = ("totalseg_ct", "totalseg_dicom")


@dataclass
class BenchCase:
    """One benchmark case.

    Attributes:
        name: case name used in reports.
        image_hu: (Z, Y, X) CT in HU, canonical LPS.
        labels: (Z, Y, X) integer ground truth (FLARE ids), same grid.
        spacing: (sz, sy, sx) in mm.
        label_names: id -> organ name for the ids present.
        note: provenance in one line.
    """

    name: str
    image_hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    label_names: dict[int, str] = field(default_factory=dict)
    note: str = ""


def shared_data_dir() -> Path:
    """``$PROPSEG_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("PROPSEG_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _flare_case(name: str, image_path: Path, seg_path: Path, map_key: str, note: str, *, organs_only: bool = True) -> BenchCase:
    from ..formats import read_labels
    from ..io import read_volume
    from ..labelmap import FLARE_NAMES, map_totalsegmentator, read_label_map

    for p in (image_path, seg_path):
        if not p.exists():
            raise InputError(f"Benchmark case {name} needs {p}, which does not exist; set PROPSEG_SHARED_DATA to the shared data folder.")
    ct = read_volume(image_path)
    seg = read_labels(seg_path, like=ct)
    names = read_label_map(seg_path.parent / "labels.json", key=map_key)
    flare = map_totalsegmentator(seg.array, names, vertebrae=not organs_only)
    present = sorted(int(v) for v in np.unique(flare) if v != 0)
    log.info("case %s: %s, FLARE labels %s", name, ct.shape, present)
    return BenchCase(name, np.asarray(ct.array), flare, tuple(float(s) for s in ct.spacing),
                     {i: FLARE_NAMES[i] for i in present}, note)


def load_real_case(name: str, data_dir: str | os.PathLike | None = None) -> BenchCase:
    """Load one of :data:`REAL_CASES` from the shared data folder (FLARE-13 organ ids).

    Raises:
        InputError: unknown name or missing files.
    """
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    ts = root / "totalseg_example"
    if name == "totalseg_ct":
        return _flare_case(name, ts / "example_ct.nii.gz", ts / "example_seg_v1.nii.gz", "v1",
                           "TotalSegmentator example CT, 3 mm, TotalSegmentator v1 labels (model output)")
    if name == "totalseg_dicom":
        return _flare_case(name, ts / "example_ct_dicom", ts / "example_seg_dicom_on_ct_grid.nii.gz", "v2",
                           "TotalSegmentator DICOM example, 20 slices of 2 mm, v2 labels (model output)")
    raise InputError(f"Unknown real benchmark case {name!r}; choose from {', '.join(REAL_CASES)}.")


def make_phantom_case(shape: Sequence[int] = (64, 128, 128), spacing: Sequence[float] = (2.5, 2.4, 2.4),
                      seed: int = 0) -> BenchCase:
    """A synthetic phantom case (labels include 14 = vertebrae)."""
    from ..phantom import make_phantom

    ct, lab = make_phantom(tuple(shape), tuple(spacing), seed)
    names = lab.meta.get("label_names") or {}
    present = sorted(int(v) for v in np.unique(lab.array) if v != 0)
    if not names:
        from ..labelmap import FLARE_NAMES

        names = FLARE_NAMES
    names = {int(k): str(v) for k, v in dict(names).items()}
    return BenchCase(f"phantom_s{seed}_{'x'.join(map(str, shape))}", np.asarray(ct.array), np.asarray(lab.array),
                     tuple(float(s) for s in ct.spacing), {i: names.get(i, f"label_{i}") for i in present},
                     f"synthetic phantom, seed {seed}")


def load_cases(groups: Sequence[str] = CASE_GROUPS, *, data_dir: str | os.PathLike | None = None,
               phantom_shape: Sequence[int] = (64, 128, 128), phantom_spacing: Sequence[float] = (2.5, 2.4, 2.4),
               phantom_seeds: Sequence[int] = (0,)) -> list[BenchCase]:
    """Cases of the named groups (``real``, ``phantom``) or single real case names.

    Raises:
        InputError: an unknown group or case, or missing shared data for ``real``.
    """
    cases: list[BenchCase] = []
    for g in groups:
        g = g.strip()
        if g == "real":
            cases += [load_real_case(n, data_dir) for n in REAL_CASES]
        elif g in REAL_CASES:
            cases.append(load_real_case(g, data_dir))
        elif g == "phantom":
            cases += [make_phantom_case(phantom_shape, phantom_spacing, s) for s in phantom_seeds]
        else:
            raise InputError(f"Unknown benchmark case group {g!r}; choose from real, phantom, {', '.join(REAL_CASES)}.")
    return cases


def dataset_case(dataset, case) -> BenchCase:
    """A labelled case of a dataset folder (:mod:`napari_propseg.datasets`) as a BenchCase.

    Only the organs the case lists as present keep their ids (PROTOCOL.md section 4):
    the others are unknown there, so they are neither seeded nor scored.
    """
    from ..formats import read_labels
    from ..io import read_volume

    ct = read_volume(case.image)
    lab = np.asarray(read_labels(case.labels, like=ct).array)
    present = case.present_ids(dataset.label_map)
    lab = np.where(np.isin(lab, present), lab, 0)
    ids = sorted(int(v) for v in np.unique(lab) if v != 0)
    names = {i: dataset.label_map.get(i, f"label_{i}") for i in ids}
    return BenchCase(case.name, np.asarray(ct.array), lab, tuple(float(s) for s in ct.spacing), names,
                     f"dataset {dataset.root.name}, split {case.split or '-'}")


def iter_dataset_cases(path: str | os.PathLike, *, split: str | None = None, names: Sequence[str] | None = None,
                       limit: int | None = None, skip: int = 0):
    """Yield the labelled cases of a dataset folder one at a time (memory stays one case).

    Args:
        path: dataset folder (nnU-Net raw or shared layout).
        split: only this split (e.g. ``validation-pats``); None = every labelled case.
        names: only these cases.
        limit: at most this many cases (in the dataset's order), after ``skip``.
        skip: leave out the first ``skip`` cases (e.g. the ones used to tune a choice).

    Raises:
        InputError: a bad folder or no labelled case.
    """
    from ..datasets import read_dataset

    ds = read_dataset(path)
    cases = ds.cases(split=split, labeled=True, names=names)[int(skip):]
    if limit is not None:
        cases = cases[: int(limit)]
    if not cases:
        raise InputError(f"Dataset {ds.root} has no labelled case{f' in split {split!r}' if split else ''}; "
                         f"its splits are {', '.join(repr(s) for s in ds.splits)}.")
    for c in cases:
        yield dataset_case(ds, c)
