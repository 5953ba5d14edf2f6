"""``propseg suggest IMAGE --out SEEDS``: segment k sampled slices and suggest reference slices.

Writes SEEDS, a label file on the image's grid holding the prediction on the suggested
slices only, and ``SEEDS`` with ``.slices.json`` in place of its extension: the suggested
slice indices (canonical order, 0 = most inferior), each one's physical z in mm, the
uniformly sampled slices, the per-organ best slice and the weights used.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._args import fraction

log = logging.getLogger(__name__)


def stderr_bar(step: int, total: int, message: str) -> None:
    """Progress bar on stderr (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {message:<24}")
    if step >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def slices_json_path(seeds: str | Path) -> Path:
    """``seeds.nii.gz`` -> ``seeds.slices.json``."""
    p = Path(seeds)
    name = p.name
    for ext in (".nii.gz", ".nii", ".nrrd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + ".slices.json")


def label_map_path(out: str | Path) -> Path:
    """``seg.nii.gz`` -> ``seg.labels.json`` (the label map written beside a label file)."""
    return slices_json_path(out).with_name(slices_json_path(out).name[: -len(".slices.json")] + ".labels.json")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", default=None,
                   help="installed reference model (see 'propseg models'; default abdomen)")
    p.add_argument("--weights", metavar="FILE", nargs="+", default=None,
                   help="reference weight files, instead of an installed --model")
    p.add_argument("--min-agreement", type=fraction, default=None, metavar="D",
                   help="leave an organ out of a slice when the two networks' masks of it overlap with Dice below D "
                   "(default: the model's own setting, 0.1 for abdomen; 0 keeps every organ)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``suggest`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "suggest",
        help="segment k sampled axial slices and suggest the reference slices to correct",
        description="Run the reference networks on k uniformly spaced axial slices (default min(Z // 5, 64)), "
        "write their prediction on the suggested slices as a label file on the image grid, and the slice "
        "indices as JSON.",
    )
    p.add_argument("image", metavar="IMAGE", help="CT file or DICOM series folder")
    p.add_argument("--out", metavar="SEEDS", required=True, help="label file to write (.nii.gz, .nii or .nrrd)")
    p.add_argument("--k", type=int, default=None, help="number of uniformly spaced slices (default: min(Z // 5, 64))")
    p.add_argument("--scan", type=int, default=None, metavar="N",
                   help="also look at every N-th slice for each organ's largest slice (default: only the k slices)")
    p.add_argument("--series", metavar="UID", default=None, help="SeriesInstanceUID to read from a DICOM folder")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def slice_positions_mm(vol, slices: list[int]) -> list[float]:
    """Physical LPS z (mm) of the centre of each canonical slice."""
    origin = np.asarray(vol.origin, dtype=float)
    direction = np.asarray(vol.direction, dtype=float)
    return [float(origin[2] + direction[2, 2] * z * vol.spacing[0]) for z in slices]


def write_suggestion(sug, vol, out: str | Path, weights) -> tuple[Path, Path]:
    """Write the seed label file, its label map and its slices JSON; returns the label
    file's and the slices JSON's paths."""
    from ..atomic import atomic_write_text
    from ..io import write_labels
    from ..labelmap import write_label_map

    out = Path(out)
    path = write_labels(sug.labels, vol, out)
    if sug.label_map:
        write_label_map(sug.label_map, label_map_path(out))
    info = {
        "image": str(vol.path) if vol.path else None,
        "labels": str(path),
        "axis": "canonical LPS z (0 = most inferior slice)",
        "slices": [int(z) for z in sug.slices],
        "z_mm": slice_positions_mm(vol, sug.slices),
        "sampled": [int(z) for z in sug.sampled],
        "per_organ_best": {str(c): int(z) for c, z in sug.per_organ_best.items()},
        "left_out": {str(z): [sug.label_map.get(c, str(c)) for c in cs] for z, cs in sug.dropped.items()},
        "weights": [str(w) for w in weights] if weights else "default",
        "seconds": round(sug.seconds, 3),
    }
    jpath = slices_json_path(out)
    atomic_write_text(jpath, json.dumps(info, indent=1), what="slices JSON")
    return path, jpath


def report_left_out(sug) -> None:
    """Print the organs left out of suggested slices (the networks disagreed on them)."""
    if sug.dropped:
        parts = [f"slice {z}: {', '.join(sug.label_map.get(c, str(c)) for c in cs)}" for z, cs in sorted(sug.dropped.items())]
        print(f"left out where the two networks disagree strongly ({len(parts)} slices): {'; '.join(parts[:8])}"
              + (" ..." if len(parts) > 8 else ""))


def run(args: argparse.Namespace) -> int:
    from ..io import read_volume
    from ..reference.inference import default_k, suggest_slices
    from . import check_outputs

    check_outputs((args.out, "label file"), (slices_json_path(args.out), "slices JSON"), (label_map_path(args.out), "label map"),
                  inputs=(args.image, *(args.weights or ())))  # before any work

    if args.k is not None and args.k < 1:
        raise InputError(f"--k must be at least 1, got {args.k}.")
    vol = read_volume(args.image, series_uid=args.series)
    if args.weights and args.model:
        raise InputError("Pass either --model or --weights, not both.")
    print(f"segmenting {args.k or default_k(vol.array.shape[0])} of {vol.array.shape[0]} slices with the reference model "
          f"{'(given weights)' if args.weights else repr(args.model or 'abdomen')}...", flush=True)
    sug = suggest_slices(vol.array, args.weights, k=args.k, scan=args.scan, device=args.device, progress=stderr_bar,
                         model=args.model, min_agreement=args.min_agreement)
    path, jpath = write_suggestion(sug, vol, args.out, args.weights)
    report_left_out(sug)
    print(f"suggested slices {sug.slices} ({len(sug.slices)} of {vol.array.shape[0]}); wrote {path} and {jpath}")
    return 0
