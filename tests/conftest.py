"""Shared fixtures.

Real CT cases live in ``../shared/data`` beside the repository. Tests that need them fail
loudly under CI (``CI=true``) when the folder is missing and skip elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PROPSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; fails under CI if it is missing, skips otherwise."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"shared data folder {SHARED_DATA} is missing in CI")
        pytest.skip(f"shared data folder {SHARED_DATA} not present on this machine")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _limit_threads():
    """Keep torch from oversubscribing the small CI machine."""
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture()
def one_torch_thread(monkeypatch):
    """Tiny tensors: one torch thread (``PROPSEG_THREADS=1`` for the engine and trainer) is
    faster than two on a shared CI machine; the thread count is restored afterwards."""
    import torch

    monkeypatch.setenv("PROPSEG_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
