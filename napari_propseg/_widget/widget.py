"""The PropSeg dock widget: suggest, correct, propagate, check, undo, export.

:class:`PropSegWidget` is the glue: its layout is :mod:`.panel`, its napari layer handling
:mod:`.layers`, its workers :mod:`.jobs`, its session files and export :mod:`.files`; the
bookkeeping (anchors, undo, locks, what changed since the last run, Check next, names,
autosave) is :class:`napari_propseg.session.Session`, the computation the propagation
engine / reference module, run in napari ``thread_worker``s so the GUI never freezes.
Every error reaches the user as a napari notification.

*Mark anchor* (Shift-M) only ever confirms or adds an anchor, *Remove anchor* removes one
(asking first when it holds a correction). Keyboard shortcuts (in the canvas and in the
dock, while the widget exists): see :data:`~napari_propseg._widget.panel.SHORTCUTS`.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import QListWidgetItem, QWidget

from ..errors import CancelledError, InputError
from ..preprocess import DISPLAY_PRESETS
from ..session import Session, ids_in
from . import common
from .common import guarded
from .files import FilesMixin
from .jobs import JobsMixin, _Bridge, warm_up
from .layers import LayersMixin, _model_label_names, _raw, ensure_reader_preference
from .panel import (
    AUTOSAVE_SECONDS,
    NEW_LABELS,
    SHORTCUTS,
    STATUS_MAX_CHARS,
    build_panel,
    connect_panel,
)

log = logging.getLogger(__name__)


class PropSegWidget(LayersMixin, JobsMixin, FilesMixin, QWidget):
    """Dock widget driving a :class:`~napari_propseg.session.Session` on a napari viewer.

    Args:
        napari_viewer: the viewer (npe2 injects it).
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.session: Session | None = None
        self._labels_layer = None
        self._image_layer = None
        self._worker = None
        self._steps = None  # the write-back of a finished job, stepped on the GUI thread
        self._worker_done = False
        self._job = "The job"
        self._cancel = threading.Event()
        self._progress: tuple[int, int, str] | None = None  # (step, total, message) of the running job
        self._progress_shown = 0.0
        self._binding = False
        self._pending_edits: set[int] = set()
        self._resumable: Path | None = None
        self._resumable_broken = False
        self._ids_in_use: set[int] = set()
        self._legend_key = None
        self._status_full = ""
        self._after_job: list = []  # run in the GUI thread once the running job has finished
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self._bridge.saved.connect(self._on_saved)
        self.last_error: str | None = None
        self.last_result = None
        self.last_summary = None  # the RunSummary of the last propagation
        self._overlay_key = None
        self.model_label_names = _model_label_names()
        build_panel(self)
        connect_panel(self)
        self._connect_viewer()
        self._refresh_layer_choices()
        self._bind_layers()
        self._install_shortcuts()
        added = ensure_reader_preference()
        if added:
            common.notify("info", f"PropSeg now opens {', '.join(added)} files (File > Open); "
                          "change this in File > Preferences > Plugins.")
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setInterval(AUTOSAVE_SECONDS * 1000)
        self._autosave_timer.timeout.connect(lambda: self._autosave(background=True))
        self._autosave_timer.start()
        warm_up()  # the engine's libraries load now, not at the first Propagate

    def minimumSizeHint(self):  # noqa: N802 - Qt API
        """As wide as the content (it scrolls vertically only), as low as a few rows."""
        hint = super().minimumSizeHint()
        content = self.scroll.widget()
        width = content.minimumSizeHint().width() + self.scroll.verticalScrollBar().sizeHint().width() + 4
        return QSize(max(hint.width(), width), hint.height())

    def _set_status(self, text: str) -> None:
        """Show ``text`` in the status line: shortened to :data:`STATUS_MAX_CHARS` (the
        full text is the tooltip), so a long message never pushes the dock's content away."""
        self._status_full = text
        shown = text if len(text) <= STATUS_MAX_CHARS else text[: STATUS_MAX_CHARS - 1].rstrip() + "…"
        self.status.setText(shown)
        self.status.setToolTip(text)

    def status_text(self) -> str:
        """The full text of the status line."""
        return self._status_full

    def _connect_viewer(self) -> None:
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._refresh_layer_choices)
        self.viewer.dims.events.current_step.connect(self._update_plot)

    def _shortcut_actions(self) -> dict:
        return {
            "propagate": self.propagate,
            "next_anchor": lambda: self.goto_anchor(+1),
            "prev_anchor": lambda: self.goto_anchor(-1),
            "check_next": self.check_next,
            "mark_anchor": self.mark_anchor,
        }

    def _install_shortcuts(self) -> None:
        """Make :data:`SHORTCUTS` work wherever the clinician's focus is.

        They go into the viewer's own keymap (napari dispatches it while the canvas has
        the focus, after the active layer's keymap, where these keys are free) and are
        Qt shortcuts on this widget (focus inside the dock, e.g. after a button click).
        The viewer bindings are removed again when the widget is destroyed, so a closed
        dock leaves no key bound to a dead widget.
        """
        from napari.utils.key_bindings import coerce_keybinding

        actions = self._shortcut_actions()
        keymap = self.viewer.keymap
        bound = {}
        for name, key in SHORTCUTS.items():
            fn = actions[name]

            def on_key(_viewer, fn=fn):
                fn()

            self.viewer.bind_key(key, on_key, overwrite=True)
            bound[coerce_keybinding(key)] = on_key
            shortcut = QShortcut(QKeySequence(key.replace("-", "+")), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(fn)

        def unbind(*_args, keymap=keymap, bound=bound):
            for kb, fn in bound.items():
                if keymap.get(kb) is fn:
                    del keymap[kb]

        self.destroyed.connect(unbind)

    def image_weight(self) -> float | None:
        """The CT weight set in the widget; None = auto (chosen per volume by the engine)."""
        v = float(self.image_weight_spin.value())
        return None if v < 0 else v  # the minimum ("auto") and anything typed below 0

    def _settings(self) -> dict:
        return {"method": self.method_combo.currentText(), "device": self.device_combo.currentText(),
                "k": int(self.k_spin.value()), "preset": self.preset_combo.currentText(),
                "model": self.model_combo.currentText(),
                "image_weight": "auto" if self.image_weight() is None else self.image_weight()}

    @guarded
    def _settings_changed(self) -> None:
        if self.session is not None:
            self.session.settings.update(self._settings())
            self.session.dirty = True
            self.session.forget_engine()

    @guarded
    def _apply_preset(self, name: str) -> None:
        if self._image_layer is not None and name in DISPLAY_PRESETS:
            self._image_layer.contrast_limits = list(DISPLAY_PRESETS[name])
            self._image_layer.metadata["propseg_preset"] = name
            self._settings_changed()

    # ------------------------------------------------------------------ DICOM series
    def _series(self) -> list[dict]:
        geometry = self._geometry() or {}
        series = (geometry.get("meta") or {}).get("series") or []
        return [s for s in series if isinstance(s, dict)]

    def _refresh_series(self) -> None:
        """Offer the other series of a DICOM folder that holds several (the Series combo)."""
        series = self._series() if self._image_layer is not None else []
        self.series_combo.blockSignals(True)
        self.series_combo.clear()
        if len(series) > 1:
            current = str(((self._geometry() or {}).get("meta") or {}).get("series_uid") or "")
            for s in series:
                desc = s.get("description") or "(no description)"
                uid = str(s.get("uid") or "")
                self.series_combo.addItem(f"{desc} · {s.get('n_slices', '?')} slices", uid)
                self.series_combo.setItemData(self.series_combo.count() - 1, f"{desc}\nSeriesInstanceUID {uid or '(none)'}",
                                              Qt.ItemDataRole.ToolTipRole)
            idx = self.series_combo.findData(current)
            self.series_combo.setCurrentIndex(max(0, idx))
        self.series_combo.blockSignals(False)
        self.series_combo.setVisible(len(series) > 1)
        self.series_label.setVisible(len(series) > 1)

    @guarded
    def _on_series_chosen(self, index: int) -> None:
        uid = self.series_combo.itemData(index)
        current = str(((self._geometry() or {}).get("meta") or {}).get("series_uid") or "")
        if uid is not None and str(uid) != current:
            self.open_series(str(uid))

    @guarded
    def open_series(self, series_uid: str) -> None:
        """Read another series of the open DICOM folder (in a worker) and label it instead;
        the previous image and labels layers are hidden, not removed (their session is saved)."""
        geometry = self._geometry()
        if self._worker is not None or not geometry or not geometry.get("path"):
            return
        path = geometry["path"]
        known = {str(s.get("uid") or ""): s for s in self._series()}
        if series_uid not in known:
            raise InputError(f"The folder {path} has no series {series_uid!r}; choose one of the listed series.")
        desc = known[series_uid].get("description") or series_uid[-12:] or "series"
        base = Path(str(path)).name

        def job():
            from ..io import read_volume

            return read_volume(path, series_uid=series_uid)

        def done(vol):
            from .._reader import layer_data_for

            data, kwargs, kind = layer_data_for(vol, name=f"{base} ({desc})")
            kwargs.setdefault("metadata", {})["propseg_preset"] = self.preset_combo.currentText()
            if kind != "image":
                raise InputError(f"Series {series_uid} of {path} looks like a label volume, not a CT; choose another series.")
            old = [l for l in (self._image_layer, self._labels_layer) if l is not None]
            layer = _raw(self.viewer.add_image(data, **kwargs))
            for l in old:
                l.visible = False

            def bind():  # once the worker is done (no binding while a job runs)
                self.labels_combo.blockSignals(True)
                self.labels_combo.setCurrentText(NEW_LABELS)
                self.labels_combo.blockSignals(False)
                self.image_combo.setCurrentText(layer.name)  # binds it, with a new Labels layer
                self._set_status(f"Opened series '{desc}' ({vol.shape[0]} slices) of {base}.")

            self._after_job.append(bind)

        self._start(job, done, "Reading the series", 0, "Opening the series")

    # ------------------------------------------------------------------ navigation
    def current_z(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def goto(self, z: int) -> None:
        step = list(self.viewer.dims.current_step)
        step[0] = int(z)
        self.viewer.dims.current_step = tuple(step)

    @guarded
    def goto_anchor(self, direction: int) -> None:
        if self.session is None:
            return
        z = self.current_z()
        target = self.session.anchors.next_after(z) if direction > 0 else self.session.anchors.prev_before(z)
        if target is not None:
            self.goto(target)

    @guarded
    def check_next(self) -> None:
        if self.session is None:
            return
        z = self.session.check_next()  # unverified suggested slices first, then the engine's pick
        if z is None:
            common.notify("info", "Every slice is an anchor; nothing left to check.")
            return
        self.goto(z)
        if self.session.anchors.status(z) == "suggested":
            self._set_status(f"Check suggested slice {z}: paint a correction, or press Mark anchor "
                             f"({SHORTCUTS['mark_anchor']}) to confirm it as it is; then Check next again.")
            return
        self._set_status(f"Check slice {z}: paint a correction there (it becomes an anchor), then Propagate.")

    @guarded
    def mark_anchor(self) -> None:
        """Make the current slice an anchor as it is (add it, or confirm a suggested slice).
        Never removes an anchor: that is :meth:`remove_anchor`."""
        if self.session is None:
            return
        self.flush_edits()
        z = self.current_z()
        before = self.session.anchors.status(z)
        status = self.session.confirm_anchor(z)  # a changed status counts for the next run
        what = {None: "is now an anchor", "suggested": "confirmed as it is"}.get(before, "stays an anchor")
        self._set_status(f"Slice {z} {what} ({status}).")
        self._refresh_anchor_list()

    @guarded
    def remove_anchor(self) -> bool:
        """Remove the current slice from the anchors, after a question when it holds the
        clinician's correction (the next propagation may overwrite it). Returns whether
        an anchor was removed."""
        if self.session is None:
            return False
        self.flush_edits()
        z = self.current_z()
        status = self.session.anchors.status(z)
        if status is None:
            self._set_status(f"Slice {z} is not an anchor; nothing to remove.")
            return False
        if status == "corrected" and not self._ask(
                "PropSeg: remove anchor",
                f"Slice {z} holds your correction. Remove it from the anchors? Its labels stay, but the next "
                "propagation may overwrite them."):
            self._set_status(f"Slice {z} stays an anchor.")
            return False
        self.session.remove_anchor(z)  # re-propagation recomputes the merged range around it
        self._set_status(f"Slice {z} is no anchor any more ({status} before); Propagate to recompute around it.")
        self._refresh_anchor_list()
        return True

    @guarded
    def toggle_lock(self) -> None:
        if self.session is None or self._labels_layer is None:
            return
        label = int(self._labels_layer.selected_label)
        if label == 0:
            common.notify("info", "Select a label id (not background) to lock it.")
            return
        name = self.label_names().get(label, f"label_{label}")
        if self.session.toggle_lock(label):
            common.notify("info", f"Label {label} ({name}) locked: propagation will not change it.")
        else:
            common.notify("info", f"Label {label} ({name}) unlocked.")
        self._legend_key = None
        self._refresh_anchor_list()

    @guarded
    def _on_anchor_clicked(self, item: QListWidgetItem) -> None:
        z = item.data(Qt.ItemDataRole.UserRole)
        if z is not None:
            self.goto(int(z))

    @guarded
    def _on_strip_clicked(self, z: int) -> None:
        if self.session is not None:
            self.goto(int(z))

    @guarded
    def _on_legend_clicked(self, item: QListWidgetItem) -> None:
        label = item.data(Qt.ItemDataRole.UserRole)
        if label is not None and self._labels_layer is not None:
            self._labels_layer.selected_label = int(label)

    @guarded
    def undo(self) -> None:
        """Undo the last propagation or suggestion as one step (later paint edits stay)."""
        if self.session is None or self._worker is not None:
            return
        step = self.session.undo_stack.peek()
        zs = self.session.undo()
        if step is None:
            common.notify("info", "Nothing to undo: no propagation or suggestion since the session started.")
            return
        self._labels_layer.refresh()
        what = "suggestion" if step.description == "suggest" else "propagation"
        self._ids_in_use = ids_in(self.session.labels)
        self._set_status(f"Undid the last {what} ({len(zs)} slices restored; slices corrected since kept).")
        self._refresh_anchor_list()

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            msg = f"{self._job} cancelled; the labels are unchanged."
            self._set_status(msg)
            common.notify("info", msg)
            return
        if isinstance(exc, InputError):
            msg = str(exc)
            if "weight" in msg.lower() and "interp" not in msg and self.method_combo.currentText() == "stcn":
                msg += " Or choose the method 'interp', which needs no weights."
        else:
            log.exception("PropSeg job failed", exc_info=exc)
            msg = f"PropSeg failed: {type(exc).__name__}: {exc}"
        self.last_error = msg
        self._set_status(msg)
        common.notify("error", msg)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._autosave()
        self._cancel.set()
        super().closeEvent(event)

