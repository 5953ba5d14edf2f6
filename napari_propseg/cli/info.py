"""``propseg info FILE``: shape, spacing, orientation, HU range (and DICOM series) of a CT;
the label ids present instead of the HU range for a label file."""
from __future__ import annotations

import argparse
import json

from ..io import read_volume, volume_info


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``info`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "info",
        help="print shape, spacing, orientation and HU range of a CT file or DICOM folder",
        description="Print shape, spacing, orientation and HU range of a CT volume "
        "(NIfTI, NRRD, MHA/MHD or a DICOM series folder), and the series found in a DICOM folder.",
    )
    p.add_argument("file", metavar="FILE", help="CT file or DICOM series folder")
    p.add_argument("--series", metavar="UID", default=None, help="SeriesInstanceUID to read from a DICOM folder")
    p.add_argument("--json", action="store_true", help="print the information as one JSON object")
    p.set_defaults(func=run)
    return p


def format_info(info: dict) -> str:
    """Human-readable lines for :func:`napari_propseg.io.volume_info`'s dict."""
    z, y, x = info["shape"]
    sz, sy, sx = info["spacing"]
    lines = [
        f"file:        {info['path']}",
        f"shape:       {z} x {y} x {x} voxels (z, y, x)",
        f"spacing:     {sz:.4g} x {sy:.4g} x {sx:.4g} mm (z, y, x)",
        f"extent:      {z * sz:.1f} x {y * sy:.1f} x {x * sx:.1f} mm",
        f"origin:      ({info['origin'][0]:.2f}, {info['origin'][1]:.2f}, {info['origin'][2]:.2f}) mm (LPS x, y, z)",
        f"orientation: {info['orientation']} in the file{' (oblique)' if info.get('oblique') else ''}; shown as LPS",
    ]
    ids = info.get("label_ids")
    if ids is not None:  # a label file (or a mask), not a CT: its values are ids, not HU
        shown = ", ".join(str(i) for i in ids[:40]) + (f", ... ({len(ids)} in all)" if len(ids) > 40 else "")
        lines.append(f"label ids:   {shown} present; values {info['hu_min']:g} .. {info['hu_max']:g} ({info['dtype']}), "
                     "so this looks like a label file, not a CT")
    else:
        lines.append(f"HU range:    {info['hu_min']:g} .. {info['hu_max']:g} ({info['dtype']})")
    series = info.get("series") or []
    if series:
        lines.append(f"DICOM series found: {len(series)}")
        for s in series:
            mark = "*" if s["uid"] == info.get("series_uid") else " "
            desc = f", {s['description']}" if s["description"] else ""
            lines.append(f"  {mark} {s['uid'] or '(no SeriesInstanceUID)'}: {s['n_slices']} slices{desc}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Read the volume and print its summary; InputError propagates to the dispatcher."""
    vol = read_volume(args.file, series_uid=args.series)
    info = volume_info(vol)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_info(info))
    return 0
