"""``propseg segment IMAGE --out OUT``: fully automatic segmentation.

Suggest reference slices with the reference networks (as ``propseg suggest``), then
propagate their labels through the volume with the propagation engine, and write the
result on the image's own grid. ``--seeds`` also keeps the seed label file and its JSON.
"""
from __future__ import annotations

import argparse
import logging

from ..errors import InputError
from ._args import k_or_all
from .suggest import add_model_args, label_map_path, report_left_out, stderr_bar, write_suggestion

log = logging.getLogger(__name__)


_k_arg = k_or_all  # the argparse type of --k (cli/_args.py)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``segment`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "segment",
        help="suggest reference slices, then propagate them through the volume (fully automatic)",
        description="Segment a CT volume without interaction: the reference networks label k sampled slices, "
        "the propagation engine fills the others. The result is written on the image grid.",
    )
    p.add_argument("image", metavar="IMAGE", help="CT file or DICOM series folder")
    p.add_argument("--out", metavar="OUT", required=True, help="label file to write (.nii.gz, .nii or .nrrd)")
    p.add_argument("--k", type=_k_arg, default=None,
                   help="number of uniformly spaced reference slices, or 'all' (default: the model's setting, else min(Z // 5, 64))")
    p.add_argument("--largest-component", dest="largest_component", action="store_true", default=None,
                   help="keep each organ's largest 3-D connected piece (default: the model's setting)")
    p.add_argument("--all-components", dest="largest_component", action="store_false",
                   help="keep every piece of each organ")
    p.add_argument("--scan", type=int, default=None, metavar="N",
                   help="also look at every N-th slice for each organ's largest slice")
    p.add_argument("--method", default="interp", help="propagation method: interp (signed-distance interpolation guided by the CT intensities, the weight chosen per volume; default: as accurate as the shipped starter STCN weights on real CT, in a fraction of the time) or stcn (memory network)")
    p.add_argument("--seeds", metavar="SEEDS", default=None, help="also write the reference-slice labels here")
    p.add_argument("--series", metavar="UID", default=None, help="SeriesInstanceUID to read from a DICOM folder")
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def segment(volume_hu, *, weights=None, k=None, scan=None, method="stcn", device="auto", spacing=None, progress=None, cancel=None,
            model=None, min_agreement=None, largest_component=None):
    """Suggest then propagate (:func:`napari_propseg.pipeline.segment`; ``weights``: the
    reference networks' files). Returns ``(labels (Z, Y, X), Suggestion)``.

    ``k`` and ``largest_component`` default to the installed model's ``segment_k`` and
    ``largest_component`` (``model.json``) when ``weights`` is None; ``k="all"`` runs the
    reference pair on every slice (propagation then has nothing left to fill).
    """
    from ..pipeline import EngineSettings, segment as run_segment

    return run_segment(volume_hu, EngineSettings(method=method, device=device), spacing=spacing, reference_weights=weights,
                       k=k, scan=scan, model=model, min_agreement=min_agreement, largest_component=largest_component,
                       progress=progress, cancel=cancel)


def run(args: argparse.Namespace) -> int:
    from ..io import read_volume, write_labels
    from . import check_outputs
    from .suggest import slices_json_path

    check_outputs((args.out, "label file"), (label_map_path(args.out), "label map"),  # before any work
                  (args.seeds, "seed label file"), (args.seeds and slices_json_path(args.seeds), "slices JSON"),
                  (args.seeds and label_map_path(args.seeds), "label map"), inputs=(args.image, *(args.weights or ())))

    if isinstance(args.k, int) and args.k < 1:
        raise InputError(f"--k must be at least 1, got {args.k}.")
    from ..labelmap import write_label_map

    if args.weights and args.model:
        raise InputError("Pass either --model or --weights, not both.")
    vol = read_volume(args.image, series_uid=args.series)
    labels, sug = segment(vol.array, weights=args.weights, k=args.k, scan=args.scan, method=args.method, spacing=vol.spacing,
                          device=args.device, progress=stderr_bar, model=args.model,
                          min_agreement=args.min_agreement, largest_component=args.largest_component)
    if args.seeds:
        write_suggestion(sug, vol, args.seeds, args.weights)
    path = write_labels(labels, vol, args.out)
    map_path = write_label_map(sug.label_map, label_map_path(args.out)) if sug.label_map else None
    report_left_out(sug)
    shown = sug.slices if len(sug.slices) <= 20 else f"({'every slice' if len(sug.slices) >= vol.array.shape[0] else 'see --seeds'})"
    print(f"segmented {vol.array.shape[0]} slices from {len(sug.slices)} reference slices {shown}; wrote {path}"
          + (f" and its label map {map_path}" if map_path else ""))
    return 0
