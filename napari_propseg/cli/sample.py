"""``propseg sample --out DIR``: write the synthetic abdominal CT phantom and its labels.

Writes ``phantom_ct.nii.gz`` (int16 HU), ``phantom_labels.nii.gz`` (uint8 FLARE ids) and
``labels.json`` (id -> organ name) into DIR, and optionally a PNG preview of three axial
slices.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InputError
from ..io import write_labels, write_volume
from ..labelmap import write_label_map
from ..phantom import PHANTOM_LABELS, make_phantom

log = logging.getLogger(__name__)

CT_NAME = "phantom_ct.nii.gz"
LABELS_NAME = "phantom_labels.nii.gz"
LABEL_MAP_NAME = "labels.json"
PREVIEW_NAME = "phantom_preview.png"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sample`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "sample",
        help="write the synthetic abdominal CT phantom (CT, labels, label map)",
        description="Write a deterministic synthetic contrast-enhanced abdominal CT with organ labels "
        f"(FLARE ids: {', '.join(f'{i} {n}' for i, n in PHANTOM_LABELS.items())}) into DIR as "
        f"{CT_NAME}, {LABELS_NAME} and {LABEL_MAP_NAME}.",
    )
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (created if missing)")
    p.add_argument("--shape", metavar=("Z", "Y", "X"), nargs=3, type=int, default=(96, 256, 256),
                   help="volume size in voxels (default: 96 256 256)")
    p.add_argument("--spacing", metavar=("SZ", "SY", "SX"), nargs=3, type=float, default=(2.5, 1.2, 1.2),
                   help="voxel size in mm (default: 2.5 1.2 1.2)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="random seed: one seed, one patient (default: 0)")
    p.add_argument("--preview", action="store_true", help=f"also write {PREVIEW_NAME} (three axial slices)")
    p.set_defaults(func=run)
    return p


def _stderr_progress(step: int, total: int, message: str) -> None:
    """Minimal progress bar on stderr (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return
    width = 30
    done = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {message:<30}")
    if step >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def write_preview(ct, labels, path: Path) -> Path:
    """Save a PNG of three axial slices (abdomen window) with the label outlines.

    Args:
        ct: the phantom's CT Volume, (Z, Y, X) HU.
        labels: its label Volume, (Z, Y, X).
        path: PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    z_n = ct.array.shape[0]
    sz, sy, sx = ct.spacing
    ys, xs = ct.array.shape[1:]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, frac in zip(axes, (0.35, 0.6, 0.8)):
        k = min(int(frac * z_n), z_n - 1)
        extent = (0, xs * sx, ys * sy, 0)
        ax.imshow(ct.array[k], cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="nearest")
        lab = labels.array[k]
        if lab.any():
            ax.contour(np.linspace(0, xs * sx, xs), np.linspace(0, ys * sy, ys), lab,
                       levels=np.arange(0.5, lab.max() + 1), cmap="tab20", linewidths=0.8)
        ax.set_title(f"slice {k} (of {z_n}), W400 L40", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    from ..atomic import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), suffix=".png", what="preview")
    finally:
        plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Make the phantom and write it; InputError propagates to the dispatcher."""
    from . import check_output_folder, check_outputs

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; pass a folder to write the phantom into.")
    check_output_folder(out)  # before the work: a folder that cannot be written fails at once
    ct, labels = make_phantom(tuple(args.shape), tuple(args.spacing), args.seed, progress=_stderr_progress)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}); pick a writable folder.") from None
    try:
        check_outputs((out / CT_NAME, "image"), (out / LABELS_NAME, "label file"), (out / LABEL_MAP_NAME, "label map"),
                      (out / PREVIEW_NAME if args.preview else None, "preview"))
        # each file is written atomically: a full disk leaves the files before it complete
        # and no half-written one
        ct_path = write_volume(ct.array, ct, out / CT_NAME, what="phantom CT")
        lab_path = write_labels(labels.array, ct, out / LABELS_NAME, what="phantom label file")
        map_path = write_label_map(PHANTOM_LABELS, out / LABEL_MAP_NAME)
    except BaseException:
        if created:  # the folder this run made, if nothing could be written into it
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    print(f"phantom CT:     {ct_path}")
    print(f"phantom labels: {lab_path}")
    print(f"label map:      {map_path}")
    if args.preview:
        print(f"preview:        {write_preview(ct, labels, out / PREVIEW_NAME)}")
    log.info("phantom %s spacing %s seed %d written to %s", ct.array.shape, ct.spacing, args.seed, out)
    return 0
