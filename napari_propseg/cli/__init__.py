"""`propseg` command line: a thin argparse shim over the Python API.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)`` which adds a parser whose ``func`` takes the parsed args and
returns an exit code. Bad input raises :class:`napari_propseg.errors.InputError`; it is
printed as one sentence and the process exits with code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import InputError

# Subcommand modules, in the order they appear in --help. A missing module is skipped so
# that the CLI lists exactly the subcommands that exist.
SUBCOMMANDS = ["info", "propagate", "suggest", "segment", "export", "evaluate", "models", "train", "pseudo_label", "bench", "sample"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="propseg",
        description="Label CT volumes: suggest reference slices, propagate labels, evaluate, train.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # subcommand not written yet
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"propseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"propseg {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
