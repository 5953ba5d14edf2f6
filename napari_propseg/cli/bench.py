"""``propseg bench propagate|loop|speed``: the shared benchmark protocols (PROTOCOL.md).

A thin shim over :mod:`napari_propseg.bench`:

* ``propagate``: section 1, k-slice propagation, all methods on the same seeds;
* ``loop``: section 2, the whole correction loop (suggest / oracle / random clinician);
* ``speed``: section 3, every label through a 512x512x129 phantom, then re-propagation
  after one corrected slice (CPU with 2 threads by default).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import InputError
from ._args import int_list, shape3, str_list

log = logging.getLogger(__name__)


def _bar(step: int, total: int, msg: str) -> None:
    print(f"\r[{step}/{total}] {msg[:90]:<90}", end="" if step < total else "\n", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser, *, cases_default: str) -> None:
    p.add_argument("--cases", default=cases_default,
                   help=f"comma-separated case groups or names: real, phantom, totalseg_ct, totalseg_dicom (default {cases_default})")
    p.add_argument("--data", metavar="DIR", default=None, help="shared data folder (default ../shared/data or $PROPSEG_SHARED_DATA)")
    p.add_argument("--phantom-shape", default="64,128,128", metavar="Z,Y,X", help="phantom size (default 64,128,128)")
    p.add_argument("--phantom-seeds", default="0", metavar="S,...", help="phantom seeds, one case each (default 0)")
    p.add_argument("--dataset", metavar="DIR", default=None,
                   help="a dataset folder (nnU-Net raw layout, or CASE_ct/CASE_labels + labels.json [+ manifest.json]) "
                   "instead of --cases: each labelled case, only its present organs seeded and scored")
    p.add_argument("--split", metavar="NAME", default=None,
                   help="with --dataset: only the cases of this split (e.g. validation-pats); default every labelled case")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --dataset: at most N cases")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="with --dataset: leave out the first N cases (e.g. those a choice was tuned on)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda for STCN (default cpu)")
    p.add_argument("--weights", default=None, metavar="PATH", help="STCN weight file (default: the shipped weights)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` with its ``propagate``, ``loop`` and ``speed`` subcommands."""
    from ..bench.loop import LOOP_METHODS, POLICIES
    from ..bench.protocol import ALL_METHODS, DEFAULT_ADAPT_STEPS
    from ._args import non_negative_int

    p = subparsers.add_parser("bench", help="run the benchmark protocols (k-slice propagation, correction loop, speed)",
                              description="Benchmarks of PROTOCOL.md: propagate (section 1), loop (section 2), speed (section 3).")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")

    pp = sub.add_parser("propagate", help="k-slice propagation: STCN and image-guided interpolation vs SDF interpolation, copy-nearest, ITK MCI",
                        description="PROTOCOL.md section 1 on the chosen cases; writes k_slice.json, k_slice.png, k_slice.md.")
    _common(pp, cases_default="real,phantom")
    pp.add_argument("--ks", default="3,5,9,17", help="numbers of reference slices (default 3,5,9,17)")
    pp.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, from {', '.join(ALL_METHODS)}, stcn_adapt "
                    "(stcn after online adaptation to the reference slices), stcn_noimg (stcn without the CT intensity "
                    "model: network + linear SDF prior); interp = the tool's guided interpolation (no network), "
                    "sdf = plain signed-distance interpolation (the classical baseline; 'guided' is the old name of "
                    "interp) (default: all but stcn_adapt and stcn_noimg)")
    pp.add_argument("--adapt-steps", type=non_negative_int, default=DEFAULT_ADAPT_STEPS, metavar="N",
                    help=f"online adaptation steps of the stcn_adapt method (default {DEFAULT_ADAPT_STEPS})")
    pp.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pp.set_defaults(func=run_propagate)

    pl = sub.add_parser("loop", help="whole correction loop: slices and seconds to reach mean Dice 0.90 / 0.95",
                        description="PROTOCOL.md section 2 on the chosen cases; writes loop.json, loop.png, loop.md.")
    _common(pl, cases_default="real,phantom")
    pl.add_argument("--methods", default=",".join(LOOP_METHODS), help=f"engine methods (default {','.join(LOOP_METHODS)})")
    pl.add_argument("--policies", default=",".join(POLICIES), help=f"clinician policies (default {','.join(POLICIES)})")
    pl.add_argument("--k", type=int, default=3, help="start slices (default 3)")
    pl.add_argument("--start", choices=("gt", "reference"), default="gt",
                    help="gt: k ground-truth slices (propagation alone); reference: the reference module's prediction "
                    "on its own k sampled slices (needs reference weights)")
    pl.add_argument("--reference-weights", nargs="+", default=None, metavar="PATH",
                    help="reference network weight files for --start reference (default: models/reference/*.pt)")
    pl.add_argument("--max-rounds", type=int, default=None, help="cap on corrected slices (default: every slice)")
    pl.add_argument("--no-stop", action="store_true", help="keep correcting after mean Dice 0.95 is reached")
    pl.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
    pl.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pl.set_defaults(func=run_loop_cmd)

    ps = sub.add_parser("speed", help="seconds and peak memory: all labels through a 512x512x129 phantom or a real case",
                        description="PROTOCOL.md section 3: propagation of every label through a phantom (or --image/--labels: "
                        "a real case from the section 1 seeds, then the slice Check next names corrected), then "
                        "re-propagation after one corrected slice; wall seconds and peak RSS.")
    ps.add_argument("--image", default=None, metavar="CT", help="a real CT (file or DICOM folder) instead of the phantom")
    ps.add_argument("--labels", default=None, metavar="LABELS", help="its ground-truth label file (with --image)")
    ps.add_argument("--json", default=None, metavar="OUT", help="write the result JSON to this file")
    ps.add_argument("--shape", default="129,512,512", metavar="Z,Y,X", help="phantom size (default 129,512,512)")
    ps.add_argument("--spacing", default="2.5,0.8,0.8", metavar="SZ,SY,SX", help="phantom spacing in mm (default 2.5,0.8,0.8)")
    ps.add_argument("--method", default="stcn", help="stcn or interp (default stcn)")
    ps.add_argument("--k", type=int, default=3, help="ground-truth anchor slices (default 3)")
    ps.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ps.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    ps.add_argument("--weights", default=None, metavar="PATH", help="STCN weight file")
    ps.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ps.add_argument("--out", default=None, metavar="DIR", help="also write speed.json there")
    ps.set_defaults(func=run_speed_cmd)

    pgui = sub.add_parser("gui", help="longest event-loop block of the PropSeg widget during propagate / re-propagate (needs a display, e.g. xvfb-run)",
                          description="GUI benchmark: how long the PropSeg dock blocks napari's event loop during a run.")
    add_gui_arguments(pgui)
    pgui.set_defaults(func=run_gui_cmd)

    pg = sub.add_parser("segment", help="fully automatic segmentation (propseg segment) of every case of a dataset, scored per organ",
                        description="Run 'propseg segment' (the reference model's suggested slices, then propagation) on every "
                        "labelled case of a dataset folder; Dice per organ the case holds, mean over cases. Writes segment.json "
                        "and segment.md.")
    pg.add_argument("--dataset", metavar="DIR", required=True, help="dataset folder (nnU-Net raw or CASE_ct/CASE_labels layout)")
    pg.add_argument("--split", metavar="NAME", default=None, help="only the cases of this split (e.g. validation-pats)")
    pg.add_argument("--limit", type=int, default=None, metavar="N", help="at most N cases")
    pg.add_argument("--skip", type=int, default=0, metavar="N", help="leave out the first N cases (e.g. those a choice was tuned on)")
    pg.add_argument("--model", metavar="NAME", default=None, help="installed reference model (default abdomen)")
    pg.add_argument("--weights", metavar="FILE", nargs="+", default=None, help="reference weight files instead of --model")
    from ._args import k_or_all

    pg.add_argument("--k", type=k_or_all, default=None, help="reference slices, or 'all' (default: the model's setting)")
    pg.add_argument("--largest-component", dest="largest_component", action="store_true", default=None,
                    help="keep each organ's largest 3-D piece (default: the model's setting)")
    pg.add_argument("--all-components", dest="largest_component", action="store_false", help="keep every piece")
    pg.add_argument("--method", default="interp", help="propagation method (default interp)")
    pg.add_argument("--min-agreement", type=float, default=None, metavar="D",
                    help="leave an organ out of a suggested slice when the two networks' masks overlap with Dice below D "
                    "(default: the model's setting)")
    pg.add_argument("--device", default="cpu", help="auto, cpu or cuda (default cpu)")
    pg.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pg.set_defaults(func=run_segment_cmd)

    pm = sub.add_parser("metrics", help="time propseg evaluate's metrics on a synthetic 512x512x300 pair with 13 labels",
                        description="Seconds and peak memory of the metrics (Dice ... HD95, ASD) on synthetic ellipsoids.")
    pm.add_argument("--shape", default="300,512,512", metavar="Z,Y,X", help="volume size (default 300,512,512)")
    pm.add_argument("--labels", type=int, default=13, help="number of labels (default 13)")
    pm.set_defaults(func=run_metrics_cmd)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def _cases(args):
    from ..bench.cases import iter_dataset_cases, load_cases

    if args.dataset:
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be at least 1, got {args.limit}.")
        return iter_dataset_cases(args.dataset, split=args.split, limit=args.limit, skip=args.skip)
    if args.split or args.limit is not None or args.skip:
        raise InputError("--split and --limit go with --dataset DIR; pass a dataset folder.")
    return load_cases(str_list(args.cases), data_dir=args.data,
                      phantom_shape=shape3(args.phantom_shape, "--phantom-shape"),
                      phantom_seeds=int_list(args.phantom_seeds, "--phantom-seeds"))


def _out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create output folder {out} ({exc.strerror}); pass a writable --out.") from None
    return out


def _device(name: str) -> str:
    from ..device import resolve_device

    return str(resolve_device(name))


def add_gui_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``propseg bench gui`` (run by :mod:`napari_propseg._widget.bench`)."""
    p.add_argument("--image", default=None, help="a CT file (default: the phantom)")
    p.add_argument("--labels", default=None, help="its labels (with --image)")
    p.add_argument("--shape", default="129,512,512", help="phantom shape Z,Y,X (default 129,512,512)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--anchors", type=int, default=14, help="ground-truth anchor slices (default 14)")
    p.add_argument("--method", default="interp", choices=("interp", "stcn"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--json", default=None, metavar="OUT", help="write the figures there")


def run_gui_cmd(args: argparse.Namespace) -> int:
    from .._widget.bench import run_cli  # the widget: Qt and napari are imported only here

    return run_cli(args)


def run_propagate(args: argparse.Namespace) -> int:
    from ..bench.protocol import _check_methods, machine_description, run_k_slice, write_k_slice_report

    ks = int_list(args.ks, "--ks")
    methods = _check_methods(str_list(args.methods))
    device = _device(args.device)
    out = _out_dir(args.out)
    results = []
    for case in _cases(args):
        results.append(run_k_slice(case.image_hu, case.labels, case.spacing, ks=ks, methods=methods, case=case.name,
                                   weights=args.weights, device=device, label_names=case.label_names, progress=_bar,
                                   adapt_steps=args.adapt_steps))
        write_k_slice_report(results, out, machine=machine_description())  # partial results survive a crash
    paths = write_k_slice_report(results, out, machine=machine_description())
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['png']}, {paths['md']}")
    return 0


def run_loop_cmd(args: argparse.Namespace) -> int:
    from ..bench.loop import POLICIES, run_loop, write_loop_report
    from ..bench.protocol import machine_description

    policies = str_list(args.policies)
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise InputError(f"Unknown policy {', '.join(bad)}; choose from {', '.join(POLICIES)}.")
    methods = str_list(args.methods)
    device = _device(args.device)
    out = _out_dir(args.out)
    results = []
    for case in _cases(args):
        initial = None
        if args.start == "reference":
            from ..reference.inference import suggest_slices

            sug = suggest_slices(case.image_hu, args.reference_weights, k=args.k, device=device)
            initial = (sug.labels, sug.slices, sug.agreement)
        results.append(run_loop(case.image_hu, case.labels, case.spacing, methods=methods, policies=policies, k=args.k,
                                initial=initial, max_rounds=args.max_rounds, stop_at_target=not args.no_stop,
                                weights=args.weights, device=device, seed=args.seed, case=case.name, progress=_bar))
        write_loop_report(results, out, machine=machine_description())
    paths = write_loop_report(results, out, machine=machine_description())
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['png']}, {paths['md']}")
    return 0


def run_speed_cmd(args: argparse.Namespace) -> int:
    from ..bench.cases import make_phantom_case
    from ..bench.protocol import machine_description, run_speed, write_json

    shape = shape3(args.shape, "--shape")
    try:
        spacing = tuple(float(v) for v in args.spacing.split(","))
    except ValueError:
        raise InputError(f"--spacing {args.spacing!r} is not three numbers in mm, e.g. 2.5,0.8,0.8.") from None
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"--spacing {args.spacing!r} must be three positive numbers in mm.")
    if bool(args.image) != bool(args.labels):
        raise InputError("bench speed needs both --image CT and --labels LABELS for a real case (or neither for the phantom).")
    if args.json:
        from ..atomic import check_output_path

        check_output_path(args.json, inputs=(args.image, args.labels), what="speed JSON")
    device = _device(args.device)
    if args.image:
        from ..formats import read_labels
        from ..io import read_volume

        vol = read_volume(args.image)
        gt = read_labels(args.labels, like=vol)
        res = run_speed(vol.array, gt.array, method=args.method, k=args.k, weights=args.weights, device=device,
                        threads=args.threads, case=Path(str(args.image)).name, spacing=vol.spacing, protocol_seeds=True)
    else:
        case = make_phantom_case(shape, spacing, args.seed)
        res = run_speed(case.image_hu, case.labels, method=args.method, k=args.k, weights=args.weights, device=device,
                        threads=args.threads, case=case.name, spacing=case.spacing)
    res["machine"] = machine_description()
    print(json.dumps(res, indent=1))
    if args.out:
        path = write_json(res, _out_dir(args.out) / "speed.json")
        print(f"wrote {path}")
    if args.json:
        path = write_json(res, args.json)
        print(f"wrote {path}")
    return 0


def run_segment_cmd(args: argparse.Namespace) -> int:
    from ..bench.cases import iter_dataset_cases
    from ..bench.protocol import machine_description, write_json
    from ..bench.segment import run_segment_dataset, segment_markdown

    if args.weights and args.model:
        raise InputError("Pass either --model or --weights, not both.")
    if isinstance(args.k, int) and args.k < 1:
        raise InputError(f"--k must be at least 1, got {args.k}.")
    out = _out_dir(args.out)
    if args.skip < 0:
        raise InputError(f"--skip must be 0 or more, got {args.skip}.")
    res = run_segment_dataset(iter_dataset_cases(args.dataset, split=args.split, limit=args.limit, skip=args.skip), model=args.model,
                              weights=args.weights, k=args.k, method=args.method, device=_device(args.device), progress=_bar,
                              min_agreement=args.min_agreement, largest_component=args.largest_component)
    res["machine"] = machine_description()
    res["dataset"] = str(args.dataset)
    res["split"] = args.split
    res["skip"] = args.skip
    write_json(res, out / "segment.json")
    from ..atomic import atomic_write_text

    md = atomic_write_text(out / "segment.md", segment_markdown(res, res["machine"]), what="benchmark report")
    print(md.read_text())
    print(f"wrote {out / 'segment.json'}, {md}")
    return 0


def run_metrics_cmd(args: argparse.Namespace) -> int:
    from ..bench.protocol import machine_description, run_metrics_speed

    if args.labels < 1 or args.labels > 255:
        raise InputError(f"--labels {args.labels} must lie between 1 and 255.")
    res = run_metrics_speed(shape3(args.shape, "--shape"), args.labels)
    res["machine"] = machine_description()
    print(json.dumps(res, indent=1))
    return 0
