"""``propseg train propagation|reference CONFIG``: train the networks (thin shim over the API).

Examples::

    propseg train propagation models/propagation/train_default.yaml --device cuda --out runs/stcn
    propseg train propagation models/propagation/train_default.yaml --variant cpu --steps 2000
    propseg train propagation CONFIG --cache-out cache.npz      # preprocess only (needs SimpleITK)
    propseg train propagation CONFIG --cache cache.npz --device cuda   # train from the cache
    torchrun --nproc_per_node 4 -m napari_propseg train propagation CONFIG --device cuda
    propseg train propagation CONFIG --resume runs/stcn/checkpoints/last.pt
    propseg train reference CONFIG --out runs/ref
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..errors import InputError
from ._args import int_at_least

log = logging.getLogger(__name__)


_steps = int_at_least(1)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` (with ``propagation`` and ``reference``) to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train the propagation (STCN) or reference network",
        description="Train a network from a YAML/JSON config. Resumable checkpoints go to OUT/checkpoints, "
        "the weights-only file to OUT. Multi-GPU: launch with torchrun.",
    )
    sub = p.add_subparsers(dest="what", metavar="NETWORK")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", metavar="CONFIG", help="training config (YAML or JSON)")
        sp.add_argument("--resume", metavar="CKPT", default=None, help="checkpoint to continue from (e.g. OUT/checkpoints/last.pt)")
        sp.add_argument("--out", metavar="DIR", default=None, help="output folder (logs, checkpoints, weights)")
        sp.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
        sp.add_argument("--steps", type=_steps, default=None, metavar="N",
                        help="total training steps, overriding the config (split between the stages in the config's proportion)")
        sp.add_argument("--variant", default=None, metavar="NAME", help="named variant of the config (e.g. cpu)")
        sp.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder the config's relative data paths start from (default: the config's data_root, or $PROPSEG_DATA_ROOT)")
        sp.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds with a checkpoint (continue later with --resume OUT/checkpoints/last.pt)")

    pp = sub.add_parser("propagation", help="train the STCN propagation network",
                        description="Train the STCN propagation network: stage 0 (static clips), then stage 1 (slice clips).")
    common(pp)
    pp.add_argument("--cache", metavar="FILE.npz", default=None, help="train from preprocessed volumes written by --cache-out")
    pp.add_argument("--cache-out", metavar="FILE.npz", default=None, help="preprocess the volumes into FILE.npz and stop (no training)")
    pp.set_defaults(func=run_propagation)

    pr = sub.add_parser("reference", help="train the reference (slice segmentation) network",
                        description="Train the reference network (TransUNet / DeepLabV3+) on axial slices.")
    common(pr)
    pr.set_defaults(func=run_reference)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


class ProgressBar:
    """A text progress bar on stderr (one line, redrawn), for ``(step, total, message)``."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.time()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def __call__(self, step: int, total: int, message: str = "") -> None:
        now = time.time()
        if not self.tty and step < total and now - self._last < 30:  # logs: one line every 30 s
            return
        self._last = now
        frac = step / max(1, total)
        done = int(self.width * frac)
        elapsed = now - self.t0
        eta = elapsed / max(1e-9, frac) - elapsed if step else 0.0
        line = f"[{'#' * done}{'.' * (self.width - done)}] {step}/{total} {message} {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and step >= total:
            self.stream.write("\n")
        self.stream.flush()


def _step_overrides(config_path: str, steps: int | None, variant: str | None) -> dict:
    """Split ``--steps`` between the stages in the proportion of the config."""
    if steps is None:
        return {}
    from ..training.propagation import load_train_config

    cfg = load_train_config(config_path, variant=variant)
    s0, s1 = cfg["stage0_steps"], cfg["stage1_steps"]
    n0 = int(round(steps * s0 / max(1, s0 + s1)))
    return {"stage0_steps": n0, "stage1_steps": steps - n0}


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_propagation(args: argparse.Namespace) -> int:
    """Train the propagation network (or only write the preprocessing cache)."""
    from ..training.data import build_training_data, save_cache
    from ..training.propagation import load_train_config, train_propagation

    if args.cache and args.cache_out:
        raise InputError("--cache and --cache-out exclude each other: write the cache first, then train with --cache.")
    if args.cache_out:
        cfg = load_train_config(args.config, variant=args.variant, data_root=args.data_root)
        data = build_training_data(cfg["data"])
        path = save_cache(data, args.cache_out)
        print(f"preprocessed {data.summary()}\ncache written to {path}")
        return 0
    overrides = _step_overrides(args.config, args.steps, args.variant)
    bar = ProgressBar() if _rank0() else None
    weights = train_propagation(args.config, resume=args.resume, out_dir=args.out, progress=bar, device=args.device,
                                variant=args.variant, data_root=args.data_root, cache=args.cache, overrides=overrides,
                                time_limit=args.time_limit)
    if _rank0():
        print(f"weights written to {weights}")
    return 0


def _absolutize(value, base):
    """Copy of a config value with every relative path string that exists under ``base`` made absolute."""
    from pathlib import Path

    if isinstance(value, dict):
        return {k: _absolutize(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolutize(v, base) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
        return str((base / value).resolve())
    return value


def run_reference(args: argparse.Namespace) -> int:
    """Train the reference network through :func:`napari_propseg.training.reference.train_reference`.

    ``--out``, ``--device`` and ``--steps`` become the config keys ``out``, ``device`` and
    ``steps``; the config is then passed as a dict whose relative data paths were made
    absolute against the config file's folder (``--variant`` and ``--data-root`` are not
    supported by the reference trainer and are refused).
    """
    from pathlib import Path

    try:
        from ..training.reference import train_reference
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("training.reference"):
            raise InputError("Reference training is not available in this installation (napari_propseg.training.reference is missing).") from None
        raise
    if args.variant or args.data_root:
        raise InputError("propseg train reference does not take --variant or --data-root; put the paths in its config file.")
    config: object = args.config
    over = {}
    if args.out is not None:
        over["out"] = str(Path(args.out).resolve())
    if args.device != "auto":
        over["device"] = args.device
    if args.steps is not None:
        over["steps"] = args.steps
    if over:
        from ..training.propagation import read_config_file

        path = Path(args.config).expanduser().resolve()
        raw = read_config_file(path)
        config = {**_absolutize(raw, path.parent), **over}
    result = train_reference(config, resume=args.resume, progress=ProgressBar() if _rank0() else None,
                             time_limit=args.time_limit)
    if _rank0():
        weights = result.get("weights") if isinstance(result, dict) else result
        print(f"weights written to {', '.join(str(w) for w in weights)}")
        if isinstance(result, dict) and result.get("stopped_early"):
            print(f"stopped by the time limit at step {result['step']}; continue with --resume {result['checkpoint']}")
    return 0
