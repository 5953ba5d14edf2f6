"""``propseg pseudo-label FOLDER --models M1 M2 ... --out DIR``: confident pseudo-labels.

Each model segments every volume; the pseudo-label is the vote of their one-hot masks and
the volume's score the mean Dice between each model's mask and the vote (see
:mod:`napari_propseg.training.pseudo_label`). Volumes scoring at least ``--threshold``
are written to DIR; DIR/scores.csv lists every score. Rerunning skips finished volumes.
Under ``torchrun --nproc_per_node N propseg pseudo-label ...`` each process takes every
N-th volume (RANK / WORLD_SIZE from the environment).
"""
from __future__ import annotations

import argparse

from ..errors import InputError
from .suggest import stderr_bar


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pseudo-label`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "pseudo-label",
        help="pseudo-label a folder of CT volumes with an ensemble, keep the confident ones",
        description="Run M reference models on every volume of FOLDER, average their one-hot masks, score each "
        "volume by the mean Dice between each model's mask and the average, keep volumes scoring at least "
        "--threshold, and write a CSV of scores. Resumable; shards across processes under torchrun.",
    )
    p.add_argument("folder", metavar="FOLDER", help="folder of CT files / DICOM series folders, or a dataset folder (nnU-Net raw or CASE_ct layout): then OUT becomes a dataset folder of the same layout holding the cases that pass, with each score")
    p.add_argument("--models", metavar="FILE", nargs="+", required=True, help="reference weight files (two or more)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=0.9, help="keep volumes whose score is at least this (default: 0.9)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..training.pseudo_label import pseudo_label_folder

    from pathlib import Path

    from . import check_output_folder

    if len(args.models) < 2:
        raise InputError("Pseudo-label scoring compares models; pass at least two weight files with --models.")
    for m in args.models:
        if not Path(m).expanduser().is_file():
            what = "is a folder" if Path(m).expanduser().is_dir() else "does not exist"
            raise InputError(f"The --models file {m} {what}; pass existing reference weight files (two or more) with --models.")
    out = check_output_folder(args.out)
    if Path(args.folder).expanduser().resolve() == out.resolve():
        raise InputError(f"--out {args.out} is the input FOLDER; write the pseudo-labels to another folder.")
    recs = pseudo_label_folder(args.folder, args.models, args.out, threshold=args.threshold, device=args.device,
                               progress=stderr_bar)
    kept = sum(1 for r in recs if r["kept"])
    print(f"scored {len(recs)} volumes, kept {kept} (threshold {args.threshold}); scores in {args.out}/scores.csv")
    return 0
