"""`propseg` command line: a thin argparse shim over the Python API.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)`` which adds a parser whose ``func`` takes the parsed args and
returns an exit code. Bad input raises :class:`napari_propseg.errors.InputError`; it is
printed as one sentence and the process exits with code 2 (no traceback).

Outputs: a subcommand checks every file it will write with :func:`check_outputs` before
any work (folder exists and is writable, not one of its inputs) and writes them through
:mod:`napari_propseg.atomic`. When the command ends, :func:`main` prints
``replaced existing FILE`` for each checked output that existed and was replaced. Ctrl-C
(SIGINT) exits with 130 and SIGTERM with 143, both after the file being written, if any,
was either completed or removed (see ``docs/RELIABILITY.md``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ..errors import InputError

# Subcommand modules, in the order they appear in --help. A missing module is skipped so
# that the CLI lists exactly the subcommands that exist.
SUBCOMMANDS = ["info", "propagate", "suggest", "segment", "export", "evaluate", "models", "train", "pseudo_label", "bench", "sample"]

#: A temporary file of the atomic writer older than this (seconds since its last change)
#: belongs to a writer that was killed (kill -9, power loss); :func:`check_outputs` removes
#: it from the output folder. A live writer touches its file continuously.
STALE_TEMPORARY_SECONDS = 600.0


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler :func:`main` installs, so that
    ``finally`` blocks run (the atomic writer removes its temporary file)."""


# outputs checked by check_outputs in this command: path -> (inode, mtime) before, or None
_checked: dict[Path, tuple[int, int] | None] = {}


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def check_outputs(*outputs, inputs=()) -> list[Path]:
    """Check, before any work, every file a command will write; returns them as Paths.

    Args:
        outputs: ``(path, what)`` pairs (``what`` names the file in messages, e.g. "label
            file"); a path ending in .nii.gz/.nii/.nrrd is checked as a volume (its
            extension too). ``None`` paths are skipped.
        inputs: the command's input files; no output may be one of them.

    Raises:
        InputError / OutputError: one sentence (missing or read-only folder, an output
            that is also an input, two outputs with the same name, unsupported extension).
    """
    from ..atomic import check_output_path
    from ..io import WRITE_EXTENSIONS, check_volume_output

    paths: list[Path] = []
    inputs = tuple(str(i) for i in inputs if i is not None)
    for path, what in outputs:
        if path is None:
            continue
        p = Path(path).expanduser()
        if any(p.name.lower().endswith(e) for e in WRITE_EXTENSIONS) or what in ("label file", "image"):
            check_volume_output(p, inputs=inputs, what=what)
        else:
            check_output_path(p, inputs=inputs, what=what)
        _check_free_space(p, p.parent if str(p.parent) else Path("."), what)
        for q in paths:
            if q.resolve() == p.resolve():
                raise InputError(f"Two outputs of this command are the same file {p}; choose different names.")
        paths.append(p)
        _checked[p] = _identity(p)
        _remove_stale_temporaries(p.parent)
    return paths


#: An output folder with less free space than this is refused before any work.
MIN_FREE_BYTES = 64 * 1024


def _check_free_space(target: Path, folder: Path, what: str = "output") -> None:
    from ..errors import OutputError

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise OutputError(f"Cannot write the {what} {target}: the disk holding {folder} is full ({free // 1024} KiB free); "
                          "free some space or choose another folder.")


def check_output_folder(folder, *, what: str = "output folder") -> Path:
    """Check, before any work, that ``folder`` is (or can be created as) a writable folder."""
    from ..atomic import describe_os_error, probe_writable
    from ..errors import OutputError

    f = Path(folder).expanduser()
    if f.exists() and not f.is_dir():
        raise OutputError(f"The {what} {f} is a file, not a folder; pass a folder.")
    base = f
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"Cannot create the {what} {f}: {base} is a file, not a folder; choose another folder.")
    where = "" if base == f else f" (it would be created in {base})"
    try:
        probe_writable(base)
    except OSError as exc:
        raise OutputError(f"Cannot write into the {what} {f}{where}: {describe_os_error(exc)}; choose another folder.") from exc
    _check_free_space(f, base, what)
    if f.is_dir():
        _remove_stale_temporaries(f)
    return f


def _remove_stale_temporaries(folder: Path) -> int:
    """Remove the atomic writer's temporary files that a killed process left in ``folder``."""
    from ..atomic import TMP_PREFIX

    n = 0
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for p in entries:
        if not p.name.startswith(TMP_PREFIX):
            continue
        try:
            if p.is_file() and now - p.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                p.unlink()
                n += 1
        except OSError:
            pass
    if n:
        logging.getLogger(__name__).info("removed %d temporary file(s) left in %s by an interrupted write", n, folder)
    return n


def _interrupted_outputs() -> str:
    """What an interrupted command left: no partial file, and which outputs it had completed."""
    done = [str(p) for p, before in _checked.items() if _identity(p) not in (None, before)]
    if not done:
        return "no output was changed and no partial file was left"
    return f"no partial file was left; already written completely: {', '.join(done)}"


def _report_replaced() -> None:
    for p, before in _checked.items():
        if before is not None and _identity(p) not in (None, before):
            print(f"replaced existing {p}")
    _checked.clear()


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


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # not the main thread / no SIGTERM here
        previous = None
    _checked.clear()
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"propseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"propseg {args.command}: terminated (SIGTERM); {_interrupted_outputs()}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"propseg {args.command}: cancelled; {_interrupted_outputs()}", file=sys.stderr)
        return 130
    finally:
        try:
            _report_replaced()
        except Exception:  # noqa: BLE001 - reporting must not hide the result
            pass
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except (ValueError, OSError):
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
