"""``propseg propagate IMAGE --seeds SEEDS --out OUT``: fill a label volume from anchor slices.

SEEDS is a label file on the image's grid holding the corrected (anchor) slices; without
``--slices`` the anchors are the slices holding any label. The result is written with the
image's geometry and file orientation. Bad input exits with code 2 and one sentence.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TextIO

import numpy as np

from ..errors import InputError
from ..formats import read_labels
from ..io import read_volume, write_labels
from ..propagation.appearance import AppearanceOptions
from ..pipeline import EngineSettings, make_engine
from ..propagation.engine import PropagationEngine
from ..propagation.options import METHODS, NETWORK_WEIGHT
from ._args import image_weight, int_at_least, non_negative_float, non_negative_int, parse_ids  # noqa: F401  (argument types, also importable from here)

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``propagate`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "propagate",
        help="propagate labels from anchor slices through a CT volume",
        description="Propagate the labels of anchor slices (SEEDS) through the CT volume IMAGE with the STCN "
        "memory network or signed-distance interpolation, and write the label volume OUT on the image's grid. "
        "Anchor slices come back unchanged.",
    )
    p.add_argument("image", metavar="IMAGE", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--seeds", required=True, metavar="SEEDS", help="label file on IMAGE's grid holding the anchor slices")
    p.add_argument("--out", required=True, metavar="OUT", help="output label file (.nii.gz, .nii or .nrrd)")
    p.add_argument("--slices", default=None, metavar="Z,Z,...",
                   help="anchor slice indices (axial, 0 = most inferior); default: every slice of SEEDS holding a label")
    p.add_argument("--method", default=None, choices=METHODS, help="stcn (memory-bank network; the default when --weights or --adapt-steps is given) or interp (signed-distance interpolation guided by the CT intensities, see --appearance; the default otherwise: on real CT it is as accurate as the shipped starter STCN weights in a fraction of the time, see models/propagation/stcn_default.md)")
    p.add_argument("--weights", default=None, metavar="PATH", help="STCN weight file (default: the shipped models/propagation/stcn_default.pt)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (default), cpu or cuda")
    p.add_argument("--adapt-steps", type=non_negative_int, default=0, metavar="N",
                   help="online adaptation: first fine-tune a copy of the STCN network for N steps on the anchors "
                   "(0 = off, the default; implies --method stcn; see models/propagation/stcn_default.md for whether it helps)")
    p.add_argument("--appearance", type=image_weight, default="auto", metavar="auto|W",
                   help="weight of the CT intensity model between anchors (shape prior x p(HU | organ) learnt from the two "
                   "bracketing anchors): auto (default) picks it for this volume from "
                   f"{', '.join(f'{w:g}' for w in AppearanceOptions().candidates)} by predicting each inner anchor from its "
                   f"neighbours ({AppearanceOptions.weight:g} with fewer than three anchors); a number fixes it; 0 = plain "
                   "signed-distance interpolation / the network with the linear SDF prior")
    p.add_argument("--network-weight", type=non_negative_float, default=NETWORK_WEIGHT, metavar="W",
                   help=f"with --method stcn: exponent of the network's probabilities in that fusion (default {NETWORK_WEIGHT})")
    p.add_argument("--lock", default=None, metavar="ID,ID,...", help="label ids kept exactly as in SEEDS on every slice")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def seeded_slices(labels: np.ndarray) -> list[int]:
    """Indices of the slices of a (Z, Y, X) label volume that hold any label."""
    return [int(z) for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]


class ProgressBar:
    """A text progress bar on a stream (stderr), redrawn in place; usable as ``progress``.

    Drawn only when the stream is a terminal (``always=True`` draws it anyway), so that a
    script reading stderr gets the one-sentence error and nothing else.
    """

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30, label: str = "propagate", *, always: bool = False) -> None:
        self.stream, self.width, self.label = stream, width, label
        self.t0 = time.perf_counter()
        self._last = -1.0
        try:
            self.enabled = always or bool(stream.isatty())
        except (AttributeError, ValueError):
            self.enabled = always

    def __call__(self, step: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if step < total and now - self._last < 0.1:
            return
        self._last = now
        frac = step / total if total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {step}/{total} {now - self.t0:5.1f}s {message[:40]:<40}")
        if step >= total:
            self.stream.write("\n")
        self.stream.flush()


def slice_ranges(slices) -> str:
    """``[0, 1, 2, 6, 9, 10]`` -> ``"0-2, 6 and 9-10"``."""
    zs = sorted(int(z) for z in slices)
    runs: list[list[int]] = []
    for z in zs:
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _anchor_slices(args: argparse.Namespace, seeds: np.ndarray, depth: int) -> list[int]:
    """The anchor slices: --slices (duplicates merged, with a notice) or every labelled slice."""
    if args.slices is None:
        return seeded_slices(seeds)
    given = parse_ids(args.slices, "--slices")
    bad = [z for z in given if z >= depth]
    if bad:
        raise InputError(f"--slices {bad} lie outside the image's {depth} slices; pick slices 0..{depth - 1}.")
    anchors = sorted(set(given))
    if len(anchors) < len(given):
        twice = sorted({z for z in given if given.count(z) > 1})
        log.warning("--slices lists slice(s) %s more than once; propagating from the %d distinct anchor slice(s) %s",
                    ", ".join(map(str, twice)), len(anchors), ", ".join(map(str, anchors)))
    return anchors


def describe_result(labels: np.ndarray, computed, anchors, method: str) -> tuple[int, str]:
    """How many computed slices hold a label, and a note naming the computed slices left empty."""
    holding = set(seeded_slices(labels))
    filled = [z for z in computed if z in holding]
    empty = [z for z in computed if z not in holding]
    if not empty:
        return len(filled), ""
    lo, hi = min(anchors), max(anchors)
    outside = [z for z in empty if z < lo or z > hi]
    between = [z for z in empty if lo < z < hi]
    notes = []
    if outside:
        verb = "lie" if len(outside) > 1 else "lies"
        if method == "interp":
            notes.append(f"slice{'s' if len(outside) > 1 else ''} {slice_ranges(outside)} {verb} outside the outermost anchors "
                         "and were left empty (interp does not extrapolate; add an anchor slice there to label them)")
        else:
            notes.append(f"slice{'s' if len(outside) > 1 else ''} {slice_ranges(outside)} outside the outermost anchors came out empty")
    if between:
        notes.append(f"slice{'s' if len(between) > 1 else ''} {slice_ranges(between)} between anchors came out empty")
    return len(filled), "; " + "; ".join(notes)


def run(args: argparse.Namespace) -> int:
    """Read IMAGE and SEEDS, propagate, write OUT; InputError goes to the dispatcher (exit 2)."""
    from . import check_outputs

    check_outputs((args.out, "label file"), inputs=(args.image, args.seeds, args.weights))
    image = read_volume(args.image)
    seeds = read_labels(args.seeds, like=image)  # a resampling notice is logged there
    depth = image.shape[0]
    anchors = _anchor_slices(args, seeds.array, depth)
    if not anchors:
        raise InputError(f"The seed file {args.seeds} holds no labelled slice; label at least one slice or pass --slices.")
    labelled = [z for z in anchors if seeds.array[z].any()]
    if not labelled:
        raise InputError(f"The seed file {args.seeds} holds no label on the anchor slice(s) {slice_ranges(anchors)}; "
                         "label at least one of them or pass other --slices.")
    locked = parse_ids(args.lock, "--lock")
    args.method = args.method or ("stcn" if args.weights or args.adapt_steps else "interp")
    if args.adapt_steps and args.method != "stcn":
        raise InputError(f"--adapt-steps fine-tunes the STCN network; it cannot be used with --method {args.method}.")
    if args.method == "interp" and len(anchors) < 2:
        where = f"--slices gives slice {anchors[0]} only" if args.slices is not None else \
            f"{args.seeds} holds labels on slice {anchors[0]} only"
        raise InputError(f"Propagation by interpolation needs labels on at least two slices, and {where}; "
                         "label a second slice, add to --slices an empty slice where the organs end, or use --method stcn.")
    settings = EngineSettings(method=args.method, device=args.device, weights=args.weights, adapt_steps=args.adapt_steps,
                              image_weight=None if args.appearance == "auto" else float(args.appearance),
                              network_weight=args.network_weight)
    engine = make_engine(image.array, settings, spacing=image.spacing, engine_factory=PropagationEngine)
    progress = None if args.quiet else ProgressBar(sys.stderr)
    if args.adapt_steps:
        engine.adapt(seeds.array, anchors, locked_labels=locked, progress=None if args.quiet else ProgressBar(sys.stderr, label="adapt"))
    result = engine.propagate(seeds.array, anchors, locked_labels=locked, progress=progress)
    out = write_labels(result.labels, image, args.out)
    n_filled, empty_note = describe_result(result.labels, result.computed, anchors, args.method)
    worst = engine.suggest_next(result.confidence, anchors) if len(anchors) < depth else None
    print(
        f"wrote {out}: {n_filled} slices filled from {len(anchors)} anchor(s) by {args.method} "
        f"in {result.seconds:.1f} s, CT intensity weight {result.image_weight:g}"
        + (" (auto)" if result.image_weight_auto else "")
        + empty_note
        + (f"; least confident slice: {worst}" if worst is not None else "")
    )
    return 0
