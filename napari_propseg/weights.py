"""Weight files: a torch state dict with the architecture config inside.

A weight file is ``torch.save({"format": "propseg-weights/1", "kind": KIND, "config": {...},
"state_dict": {...}, "meta": {...}})``. ``config`` is everything needed to rebuild the
architecture (so loading picks the right variant); ``meta`` is provenance (data, steps,
hardware, wall time). Resumable training checkpoints are separate files (see
``napari_propseg.training``), never confused with weight files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

log = logging.getLogger(__name__)

FORMAT = "propseg-weights/1"


def models_dir() -> Path:
    """Folder of shipped weights: $PROPSEG_MODELS, else the repository's ``models/``."""
    env = os.environ.get("PROPSEG_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def save_weights(path: str | os.PathLike, kind: str, config: dict, state_dict: dict, meta: dict | None = None) -> Path:
    """Write a weight file atomically (see :mod:`napari_propseg.atomic`); its folder is created.

    Raises:
        OutputError: full disk, read-only folder, ...: an existing file is left as it
            was and no temporary file remains.
    """
    path = Path(path)
    make_folder(path.parent, what="weight file")
    payload = {
        "format": FORMAT,
        "kind": kind,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": dict(meta or {}),
    }
    return torch_save_atomic(payload, path, what="weight file")


def make_folder(folder: Path, *, what: str) -> None:
    """``mkdir -p`` with the failure as one :class:`~napari_propseg.errors.OutputError` sentence."""
    from .atomic import describe_os_error
    from .errors import OutputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot write the {what} into {folder}: the folder cannot be created ({describe_os_error(exc)}); "
                          "choose another folder.") from exc


def torch_save_atomic(obj: Any, path: str | os.PathLike, *, what: str = "file") -> Path:
    """``torch.save(obj, path)`` through :func:`napari_propseg.atomic.atomic_write`: the
    written zip archive is checked (every member's CRC) before it replaces ``path``.

    Raises:
        OutputError: one sentence (the disk is full, ...); nothing changed at ``path``.
    """
    import errno
    import zipfile

    from .atomic import atomic_write

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a short write this way
            raise _writer_os_error(tmp.parent, exc) from None

    def verify(tmp: Path) -> None:
        try:
            with zipfile.ZipFile(tmp) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise _writer_os_error(tmp.parent, exc) from None
        if bad is not None:
            raise OSError(errno.EIO, f"the written file is damaged (member {bad})")

    return atomic_write(path, write, verify=verify, what=what)


def _writer_os_error(folder: Path, exc: BaseException) -> OSError:
    """An OSError for a writer's failure: ENOSPC when the file system is (nearly) full."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return OSError(errno.ENOSPC, "the disk is full")
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[-1][:200]
    return OSError(errno.EIO, f"the writer failed ({text})")


def load_weights(path: str | os.PathLike, kind: str) -> tuple[dict, dict, dict]:
    """Read a weight file of ``kind``; returns ``(config, state_dict, meta)``.

    Raises:
        InputError: missing/unreadable file, not a propseg weight file, or another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Weight file {path} does not exist; pass an existing file with --weights.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise InputError(f"Weight file {path} could not be read ({type(exc).__name__}); it is truncated or not a torch file.") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path} is not a napari-propseg weight file (no '{FORMAT}' header); pass a file written by 'propseg train'.")
    if payload.get("kind") != kind:
        raise InputError(f"{path} holds {payload.get('kind')!r} weights, not {kind!r} weights; pass the right file.")
    return payload["config"], payload["state_dict"], payload.get("meta", {})


def load_state_checked(module: torch.nn.Module, state_dict: dict, path: str | os.PathLike = "<weights>") -> None:
    """Load a state dict strictly; every key mismatch is logged and turned into an InputError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    for k in missing:
        log.warning("weights %s: missing key %s", path, k)
    for k in unexpected:
        log.warning("weights %s: unexpected key %s", path, k)
    for k in shape:
        log.warning("weights %s: shape mismatch for %s: file %s vs model %s", path, k, tuple(state_dict[k].shape), tuple(own[k].shape))
    if missing or unexpected or shape:
        raise InputError(
            f"Weights in {path} do not match the architecture in their config "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} mis-shaped keys); retrain or pass matching weights."
        )
    module.load_state_dict(state_dict, strict=True)
