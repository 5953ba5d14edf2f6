"""``propseg export LABELS --image IMAGE --out OUT [--format F] [--label-map MAP.json]``.

Writes a label file drawn on IMAGE as a DICOM SEG, an RTSTRUCT, a 3D Slicer
``.seg.nrrd``, NIfTI or NRRD (:func:`napari_propseg.formats.export`). The format comes
from ``--format`` or from OUT's name (``.seg.nrrd`` -> seg-nrrd, ``.nrrd`` -> nrrd,
``.nii``/``.nii.gz`` -> nifti, ``.dcm`` -> dicom-seg). Label names come from
``--label-map``, else from the label map beside LABELS (``<stem>.labels.json``) or from
LABELS itself (SEG, RTSTRUCT, ``.seg.nrrd``), else ``label_<id>``.
"""
from __future__ import annotations

import argparse
import logging

from ..errors import InputError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``propseg`` parser."""
    from ..formats import FORMATS

    p = subparsers.add_parser(
        "export",
        help="write labels as DICOM SEG, RTSTRUCT, 3D Slicer .seg.nrrd, NIfTI or NRRD, with organ names and colours",
        description="Write a label file drawn on IMAGE in a clinical or research format, with the label names "
        "and colours in every format. DICOM SEG and RTSTRUCT need IMAGE to be the DICOM series the labels were "
        "drawn on (its folder); the SEG/RTSTRUCT references its study, series and instances.",
    )
    p.add_argument("labels", metavar="LABELS", help="label file on IMAGE's grid (NIfTI, NRRD, MHA, .seg.nrrd, SEG, RTSTRUCT)")
    p.add_argument("--image", required=True, metavar="IMAGE", help="the image the labels were drawn on (a DICOM series folder for SEG/RTSTRUCT)")
    p.add_argument("--out", required=True, metavar="OUT", help="file to write")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from OUT's name; .dcm means dicom-seg unless --format rtstruct)")
    p.add_argument("--label-map", metavar="MAP.json", default=None,
                   help="label map JSON (id -> name); default: <stem>.labels.json beside LABELS, else label_<id>")
    p.add_argument("--label-map-key", metavar="KEY", default=None,
                   help="which map to use when the label map JSON holds several")
    p.add_argument("--series", metavar="UID", default=None, help="SeriesInstanceUID to read when IMAGE's folder holds several")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Read IMAGE and LABELS, export, print what was written and what was left out."""
    from ..atomic import check_output_path
    from ..formats import export, format_from_path
    from ..formats import read_labels
    from ..io import read_volume
    from ..labelmap import read_label_map

    fmt = format_from_path(args.out, args.format)
    check_output_path(args.out, inputs=(args.labels, args.image, args.label_map), what=f"{fmt} file")
    names = read_label_map(args.label_map, key=args.label_map_key) if args.label_map else None
    image = read_volume(args.image, series_uid=args.series)
    if image.meta.get("notice"):
        log.warning("%s", image.meta["notice"])
    labels = read_labels(args.labels, like=image)
    notice = str(labels.meta.get("notice") or "")
    if "resampled" in notice:
        src = labels.meta.get("label_source") or {}
        raise InputError(f"Labels {args.labels} are not on the grid of {args.image} (shape {tuple(src.get('shape', ()))} "
                         f"vs {image.shape}); export labels drawn on this image (resample them onto it first).")
    if not names and labels.meta.get("label_names"):
        names = labels.meta["label_names"]  # a SEG/RTSTRUCT brings its own names
    result = export(labels.array, image, args.out, fmt, names, labels_path=args.labels)
    shown = ", ".join(f"{i} {n}" for i, n in result.names.items()) or "none"
    print(f"wrote {result.path} ({result.format}): {len(result.names)} labels ({shown})")
    if result.left_out and result.format in ("dicom-seg", "rtstruct", "seg-nrrd"):
        print("left out (no voxel): " + ", ".join(f"{i} {n}" for i, n in result.left_out.items()))
    for extra in result.extra_files:
        print(f"wrote {extra}")
    return 0

