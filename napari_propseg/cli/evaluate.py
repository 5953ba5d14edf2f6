"""``propseg evaluate PRED GT --out report.csv``: per-label metrics of label files.

PRED and GT are two label files, or two folders of label files matched by case name (the
file name without its extension, so ``a.nii.gz`` matches ``a.nrrd``). The ground truth
defines the grid: each prediction is read with :func:`napari_propseg.io.read_labels`
onto it (taken as is on the same grid, nearest-neighbour resampled when it covers the same
physical space on another grid, refused otherwise). Metrics are in mm from the GT spacing;
see :mod:`napari_propseg.metrics` for the definitions and the empty-mask conventions.

The CSV has one row per case and label (labels present in the prediction or the ground
truth) and a ``mean`` row per case.

Ground truth numbered differently from the prediction (e.g. TotalSegmentator's own ids
against FLARE-id predictions) is translated by class name with ``--gt-labels MAP.json``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, Jaccard, NSD, HD95, ASD, RVD per label of predictions against ground truth",
        description="Score predicted label volumes against ground truth, per label, in physical units "
        "(Dice, Jaccard, normalised surface Dice, HD95, HD, ASD, RVD). PRED and GT are label files or "
        "folders of label files with matching names. Writes a CSV with one row per case and label and "
        "a mean row per case.",
    )
    p.add_argument("pred", metavar="PRED", help="predicted label file, or folder of label files")
    p.add_argument("gt", metavar="GT", help="ground-truth label file, or folder of label files with the same names")
    p.add_argument("--labels", metavar="MAP.json", default=None,
                   help="label map JSON (id -> name) for the 'name' column (default: the FLARE-13 names)")
    p.add_argument("--labels-key", metavar="KEY", default=None,
                   help="which map to use when the JSON file holds several (e.g. v1)")
    p.add_argument("--gt-labels", metavar="MAP.json", default=None,
                   help="label map JSON (id -> name) of the ground truth's ids when they differ from the "
                   "prediction's (e.g. a TotalSegmentator labels.json): GT ids are translated by class name "
                   "to the ids of --labels (FLARE by default); classes without a counterpart become background")
    p.add_argument("--gt-labels-key", metavar="KEY", default=None,
                   help="which map of --gt-labels to use when the JSON file holds several (e.g. v1)")
    p.add_argument("--tolerance", metavar="MM", type=float, default=None,
                   help="NSD tolerance in mm (default 1)")
    p.add_argument("--out", metavar="CSV", required=True, help="report CSV to write")
    p.set_defaults(func=run)
    return p


def _case_name(path: Path) -> str:
    from ..filenames import split_extension

    stem, ext = split_extension(path.name)
    return stem if ext else path.stem


def _label_files(folder: Path) -> dict[str, Path]:
    from ..io import VOLUME_EXTENSIONS

    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and any(f.name.lower().endswith(e) for e in VOLUME_EXTENSIONS):
            name = _case_name(f)
            if name in out:
                raise InputError(f"Folder {folder} holds two label files for case {name!r} ({out[name].name}, {f.name}); keep one.")
            out[name] = f
    return out


def pair_cases(pred: str | Path, gt: str | Path) -> list[tuple[str, Path, Path]]:
    """``[(case, pred_path, gt_path)]`` for two files or two folders.

    Raises:
        InputError: missing paths, a file paired with a folder, an empty GT folder, or GT
            cases without a prediction.
    """
    pred, gt = Path(pred), Path(gt)
    for p, what in ((pred, "Prediction"), (gt, "Ground truth")):
        if not p.exists():
            raise InputError(f"{what} path {p} does not exist; check the path.")
    if pred.is_dir() != gt.is_dir():
        raise InputError(f"PRED {pred} and GT {gt} must both be files or both be folders.")
    if not gt.is_dir():
        return [(_case_name(gt), pred, gt)]
    gts = _label_files(gt)
    preds = _label_files(pred)
    if not gts:
        raise InputError(f"Ground-truth folder {gt} holds no label files (.nii, .nii.gz, .nrrd, .mha, ...).")
    missing = [c for c in gts if c not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"Prediction folder {pred} has no file for {len(missing)} ground-truth case(s) ({shown}); "
                         "name each prediction like its ground-truth file.")
    extra = sorted(set(preds) - set(gts))
    if extra:
        log.warning("predictions without ground truth are ignored: %s", ", ".join(extra))
    return [(c, preds[c], gts[c]) for c in gts]


def evaluate(pred: str | Path, gt: str | Path, out: str | Path, *, label_names: dict[int, str] | None = None,
             gt_label_names: dict[int, str] | None = None, tolerance_mm: float | None = None,
             progress=None, cancel=None) -> list[dict]:
    """Score PRED against GT (files or folders) and write the CSV; returns the report rows.

    ``gt_label_names`` (id -> name of the GT files' ids) translates the ground truth by
    class name to the ids of ``label_names`` first (:func:`~napari_propseg.labelmap.translate_by_name`);
    predicted classes without a counterpart in that map are then left out of the scores.
    """
    from ..atomic import check_output_path
    from ..formats import read_labels
    from ..io import read_volume
    from ..labelmap import relabel, translate_by_name
    from ..metrics import DEFAULT_TOLERANCE_MM, MetricAccumulator

    check_output_path(out, inputs=(pred, gt), what="report")  # before the work, not after

    if label_names is None:
        from ..labelmap import FLARE_NAMES

        label_names = dict(FLARE_NAMES)
    table = None
    if gt_label_names is not None:
        table = translate_by_name(gt_label_names, label_names)
        if not table:
            raise InputError("No class of the ground truth's label map has a name in the prediction's label map; "
                             "check --gt-labels and --labels.")
        unmatched = sorted(set(gt_label_names) - set(table) - {0})
        log.info("ground truth: %d classes translated by name, %d without a counterpart (background)", len(table), len(unmatched))
    acc = MetricAccumulator(tolerance_mm=DEFAULT_TOLERANCE_MM if tolerance_mm is None else tolerance_mm,
                            label_names=label_names)
    pairs = pair_cases(pred, gt)
    for i, (case, p, g) in enumerate(pairs):
        ref = read_volume(g)
        gt_arr = read_labels(g, like=ref).array
        gt_had_labels = bool(gt_arr.any())
        if not gt_had_labels:
            log.warning("%s: the ground truth %s holds no label (every voxel is background); only false positives "
                        "can be scored", case, g)
        if table is not None:
            gt_arr = relabel(gt_arr, table)
            if gt_had_labels and not gt_arr.any():
                log.warning("%s: no class of the ground truth %s has a counterpart in the prediction's label map; "
                            "check --gt-labels and --labels", case, g)
        from ..formats import align_label_ids  # a SEG/RTSTRUCT prediction: its ids matched by segment name

        pr_arr = align_label_ids(read_labels(p, like=ref), label_names)
        if not pr_arr.any():
            log.warning("%s: the prediction %s holds no label (every voxel is background)", case, p)
        if table is not None:
            pr_arr = _only_comparable(pr_arr, set(table.values()), case)
        acc.update(pr_arr, gt_arr, ref.spacing, case=case)
        if progress is not None:
            progress(i + 1, len(pairs), case)
        if cancel is not None and cancel():
            from ..errors import CancelledError

            raise CancelledError("cancelled by the user")
    acc.to_csv(out)
    return acc.report_rows()


def _only_comparable(pred, comparable: set[int], case: str):
    """``pred`` with the ids the ground truth's label map cannot hold set to background:
    a class the annotators never drew is not a false positive."""
    import numpy as np

    present = {int(v) for v in np.unique(pred)} - {0}
    dropped = sorted(present - comparable)
    if not dropped:
        return pred
    log.warning("%s: predicted label(s) %s have no class in the ground truth's label map; not scored", case, dropped)
    return np.where(np.isin(pred, dropped), 0, pred)


def _f(v) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def run(args: argparse.Namespace) -> int:
    """CLI entry: evaluate, write the CSV, print each case's mean row."""
    from ..labelmap import read_label_map

    names = read_label_map(args.labels, key=args.labels_key) if args.labels else None
    gt_names = read_label_map(args.gt_labels, key=args.gt_labels_key) if args.gt_labels else None
    if args.tolerance is not None and (not math.isfinite(args.tolerance) or args.tolerance < 0):
        raise InputError(f"--tolerance {args.tolerance} is not a non-negative number of mm; pass e.g. --tolerance 1.")
    from . import check_outputs

    (out,) = check_outputs((args.out, "report"), inputs=(args.pred, args.gt, args.labels, args.gt_labels))

    def bar(step: int, total: int, msg: str) -> None:
        if not sys.stderr.isatty():  # only on a terminal: a script reading stderr gets the error alone
            return
        print(f"\r[{step}/{total}] {msg}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    rows = evaluate(args.pred, args.gt, out, label_names=names, gt_label_names=gt_names, tolerance_mm=args.tolerance, progress=bar)
    print("case\tdice\tjaccard\tnsd\thd95\tasd\trvd")
    for r in rows:
        if r["label"] == "mean":
            print("\t".join([str(r["case"])] + [_f(r[k]) for k in ("dice", "jaccard", "nsd", "hd95", "asd", "rvd")]))
    print(f"wrote {out}")
    return 0
