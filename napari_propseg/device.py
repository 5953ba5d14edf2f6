"""Device selection, done once per job. No hard-coded ``.cuda()`` anywhere else."""
from __future__ import annotations

import logging
import os

import torch

from .errors import InputError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a :class:`torch.device`.

    Raises:
        InputError: for an unknown name, or ``cuda`` on a machine without CUDA.
    """
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif key == "cpu":
        dev = torch.device("cpu")
    elif key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"Device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu or auto.")
        dev = torch.device(key)
    else:
        raise InputError(f"Unknown device {name!r}; use one of auto, cpu, cuda.")
    if dev.type == "cpu":
        set_cpu_threads()
    return dev


def set_cpu_threads(n: int | None = None) -> int:
    """Use all physical cores for intra-op parallelism (override with PROPSEG_THREADS)."""
    if n is None:
        env = os.environ.get("PROPSEG_THREADS")
        n = int(env) if env else max(1, os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
