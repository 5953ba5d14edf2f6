"""Training plumbing shared by the propagation and reference trainers (no Qt).

* :func:`read_config_file` reads a YAML or JSON training config into a dict.
* :func:`seed_everything` seeds python, numpy and torch.
* :func:`save_checkpoint` / :func:`load_checkpoint`: **resumable** checkpoints (model,
  optimizer, scheduler, step, config and the python/numpy/torch RNG states), written
  atomically. They are not weight files: a weights-only export for inference goes through
  :func:`napari_propseg.weights.save_weights`.
* :class:`CSVLogger`: a CSV of training metrics that can be re-opened on resume.
* :func:`ddp_setup` / :func:`ddp_cleanup` / :func:`is_main_process` / :func:`unwrap`:
  DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on CUDA).

Example:
    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> _ = save_checkpoint(path, model=net, optimizer=opt, scheduler=None, step=3, config={"a": 1})
    >>> load_checkpoint(path, model=net, optimizer=opt)["step"]
    3
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ..errors import InputError

log = logging.getLogger(__name__)

#: Header of a resumable checkpoint (weight files carry ``propseg-weights/1`` instead).
CHECKPOINT_FORMAT = "propseg-checkpoint/1"


# --------------------------------------------------------------------------- config files


def read_config_file(path: str | os.PathLike, *, example: str | None = None) -> dict:
    """Read a YAML (.yaml/.yml) or JSON training config.

    Args:
        path: the config file; ``.json`` is parsed as JSON, anything else as YAML.
        example: optional file name suggested in the "does not exist" message.

    Returns:
        The file's top-level mapping.

    Raises:
        InputError: missing file, unparsable content, or not a mapping.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        such_as = f" such as {example}" if example else ""
        raise InputError(f"Training config {p} does not exist; pass a YAML or JSON file{such_as}.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            cfg = json.loads(text)
        else:
            import yaml

            cfg = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is a bad file
        raise InputError(f"Training config {p} could not be parsed ({type(exc).__name__}: {str(exc).splitlines()[0]}); fix its syntax.") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"Training config {p} must be a mapping of options (key: value), not {type(cfg).__name__}.")
    return cfg


# --------------------------------------------------------------------------- seeding / RNG


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Snapshot of the python, numpy and torch (CPU + CUDA) RNG states.

    Everything is stored as tensors / plain python values so that the checkpoint loads
    with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else np.asarray(s["keys"])
        np.random.set_state((s["kind"], keys.astype(np.uint32), int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i].cpu(), device=i)


# --------------------------------------------------------------------------- checkpoints


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DistributedDataParallel / DataParallel wrapper (or itself)."""
    while hasattr(model, "module") and isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a resumable training checkpoint atomically (temporary file, then rename).

    Args:
        path: destination file (its folder is created).
        model: the network; a DDP wrapper is unwrapped so the keys have no ``module.``.
        optimizer: its state (moments, param groups) is saved if given.
        scheduler: an LR scheduler with ``state_dict()`` (or None).
        step: number of optimisation steps done so far (training resumes at this step).
        config: the full training config (JSON-like).
        extra: more JSON-like/tensor state to keep (e.g. a GradScaler's state).

    Returns:
        The path written.
    """
    from ..weights import make_folder, torch_save_atomic

    path = Path(path)
    make_folder(path.parent, what="checkpoint")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "config": dict(config),
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    torch_save_atomic(payload, path, what="checkpoint")  # OutputError on a full disk; the old checkpoint stays
    log.info("checkpoint step %d written to %s", step, path)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and restore state in place.

    Args:
        path: the checkpoint file.
        model: receives the weights (strict; a DDP wrapper is unwrapped).
        optimizer: receives its state if given and saved.
        scheduler: receives its state if given and saved.
        restore_rng: put the python/numpy/torch RNGs back to their saved state.

    Returns:
        ``{"step", "config", "extra", "model", "optimizer", "scheduler", "rng"}``.

    Raises:
        InputError: missing/unreadable file, a weight file instead of a checkpoint, or
            weights that do not fit ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Checkpoint {path} does not exist; pass a checkpoint written by 'propseg train' with --resume.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise InputError(f"Checkpoint {path} could not be read ({type(exc).__name__}); it is truncated or not a torch file.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = " (it is a weights-only file)" if isinstance(payload, dict) and "state_dict" in payload else ""
        raise InputError(f"{path} is not a resumable training checkpoint{hint}; pass a file from the run's checkpoints/ folder.")
    if model is not None:
        try:
            unwrap(model).load_state_dict(payload["model"], strict=True)
        except RuntimeError as exc:
            raise InputError(f"Checkpoint {path} does not fit this network ({str(exc).splitlines()[0]}); resume with the config it was trained with.") from exc
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and payload.get("rng"):
        set_rng_state(payload["rng"])
    return payload


# --------------------------------------------------------------------------- CSV log


class CSVLogger:
    """Append rows of metrics to a CSV file; safe to re-open when a run resumes.

    The header is written once. Re-opening an existing file checks that its header is
    the same and, with ``resume_step``, drops the rows logged after that step (they
    belong to the part of the interrupted run that the checkpoint does not contain), so
    the log of a resumed run has every step exactly once.

    Args:
        path: CSV file (created with its folder if missing).
        fieldnames: column names; rows may leave columns out (written empty).
        resume_step: keep only rows whose ``step`` column is ``<=`` this (None: keep all).
    """

    def __init__(self, path: str | os.PathLike, fieldnames: Iterable[str], *, resume_step: int | None = None):
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        from ..weights import make_folder

        make_folder(self.path.parent, what="training log")
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                rows = list(reader)
            if header != self.fieldnames:
                raise InputError(
                    f"Log {self.path} has columns {header}, not {self.fieldnames}; write the run to a new --out folder."
                )
            if resume_step is not None and "step" in header:
                kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) <= resume_step]
                if len(kept) != len(rows):
                    self._rewrite(kept)
        else:
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        from ..atomic import atomic_write_text

        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue(), what="training log")

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (unknown keys raise ValueError) and flush it to disk.

        Raises:
            OutputError: the row could not be written (full disk, ...); the file is cut
                back to the rows before it, so it never ends in half a row.
        """
        from ..atomic import describe_os_error
        from ..errors import OutputError

        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames)
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        data = buf.getvalue().encode("utf-8")
        try:
            size = self.path.stat().st_size
        except OSError:
            size = None
        try:
            with open(self.path, "ab") as fh:
                fh.write(data)
        except OSError as exc:
            if size is not None:
                try:
                    os.truncate(self.path, size)
                except OSError:
                    pass
            raise OutputError(f"Could not append to the training log {self.path}: {describe_os_error(exc)}; "
                              "free some space or write the run to another --out folder.") from exc

    def read(self) -> list[dict]:
        """All rows logged so far, as dicts of strings."""
        with open(self.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- DDP


def ddp_setup(device: str | torch.device = "auto") -> tuple[int, int, int, torch.device]:
    """Join the process group when launched by ``torchrun`` (env ``WORLD_SIZE`` > 1).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``
    through the ``env://`` init method). On CUDA every process takes GPU ``LOCAL_RANK``
    and the backend is nccl; on CPU the backend is gloo.

    Args:
        device: ``"auto" | "cpu" | "cuda"`` as for :func:`napari_propseg.device.resolve_device`.

    Returns:
        ``(rank, world_size, local_rank, device)``; ``(0, 1, 0, device)`` outside torchrun.
    """
    from ..device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world <= 1:
        return 0, 1, 0, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    log.info("DDP rank %d/%d (local %d) on %s with %s", rank, world, local_rank, dev, backend)
    return rank, world, local_rank, dev


def ddp_cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: the process that logs and saves."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
