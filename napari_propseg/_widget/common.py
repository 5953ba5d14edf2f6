"""Small pieces every part of the widget uses: notifications and the slot guard."""
from __future__ import annotations

import functools
import logging

log = logging.getLogger("napari_propseg._widget")


def notify(kind: str, message: str) -> None:
    """A napari notification: ``kind`` is ``"error"``, ``"warning"`` or ``"info"``.

    The widget's modules call it as ``common.notify`` so that tests can watch it."""
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning}.get(kind, notifications.show_info)(message)


def guarded(fn):
    """Slot decorator: an exception becomes a napari notification (through the widget's
    ``_error``), never reaches Qt (PyQt6 aborts the process on an exception escaping a slot)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            try:
                self._error(exc)
            except Exception:  # noqa: BLE001
                log.exception("PropSeg: error while reporting an error")
            return None

    return wrapper
