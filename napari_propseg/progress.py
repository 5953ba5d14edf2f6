"""Progress/cancel plumbing shared by long jobs (no Qt).

Long loops take ``progress: Callable[[int, int, str], None] | None`` (step, total, message)
and ``cancel: Callable[[], bool] | None``; they call :func:`check_cancel` once per slice.
"""
from __future__ import annotations

from typing import Callable, Optional

from .errors import CancelledError

ProgressFn = Optional[Callable[[int, int, str], None]]
CancelFn = Optional[Callable[[], bool]]


def report(progress: ProgressFn, step: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(step, total, message)


def check_cancel(cancel: CancelFn) -> None:
    if cancel is not None and cancel():
        raise CancelledError("cancelled by the user")
