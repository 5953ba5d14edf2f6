"""The PropSeg dock widget: suggest, correct, propagate, check, undo, export.

Layout and Qt plumbing only: the bookkeeping (anchors, undo, locks, autosave) lives in
:class:`napari_propseg.session.Session` and the computation in the propagation engine /
reference module, which run in napari ``thread_worker``s so the GUI never freezes.
Every error reaches the user as a napari notification.

Keyboard shortcuts (in the canvas and in the dock, while the widget exists): see :data:`SHORTCUTS`.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QKeySequence, QPainter, QPen, QShortcut
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QDoubleSpinBox,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .errors import CancelledError, InputError
from .preprocess import DISPLAY_PRESETS
from .session import (
    DEFAULT_IMAGE_WEIGHT,
    META_KEY,
    Session,
    find_session,
    make_engine,
    run_propagation,
    slices_from_paint_atoms,
    volume_from_geometry,
)

log = logging.getLogger(__name__)

NEW_LABELS = "<new Labels layer>"
AUTOSAVE_SECONDS = 60
#: the CT weight spin box's minimum, shown as "auto"
AUTO_IMAGE_WEIGHT = -0.1
#: action -> napari key binding. Chosen free of napari 0.9's own bindings on the viewer,
#: every layer type and the menus (Shift-Up/Down extend the layer selection, Shift-A
#: selects all points, e.g. of the anchor overlay, Shift-P is the shapes lasso), so a
#: shortcut does the same whichever layer is active. Shift-Left/Right extend napari's
#: Left/Right (one slice) to one anchor.
SHORTCUTS = {
    "propagate": "Shift-R",
    "next_anchor": "Shift-Right",
    "prev_anchor": "Shift-Left",
    "check_next": "Shift-N",
    "mark_anchor": "Shift-M",
}
SHORTCUT_HELP = (
    f"Shortcuts: Propagate {SHORTCUTS['propagate']}, next anchor {SHORTCUTS['next_anchor']}, "
    f"previous anchor {SHORTCUTS['prev_anchor']}, check next {SHORTCUTS['check_next']}, "
    f"mark/unmark anchor {SHORTCUTS['mark_anchor']}."
)


def _reference_available() -> bool:
    try:
        from .reference import inference  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning}.get(kind, notifications.show_info)(message)


def _guarded(fn):
    """Slot decorator: an exception becomes a napari notification, never reaches Qt
    (PyQt6 aborts the process on an exception escaping a slot)."""

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


class _Bridge(QObject):
    """Carries progress from a worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int, str)


class ConfidencePlot(QWidget):
    """A small plot of per-slice confidence along z, with anchors and the current slice."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumHeight(60)
        self.confidence: np.ndarray | None = None
        self.anchors: list[int] = []
        self.current: int | None = None
        self.n_slices = 1
        self.setToolTip("Per-slice confidence of the last propagation (low = worth checking); ticks are anchors.")

    def set_data(self, confidence, anchors, current, n_slices) -> None:
        self.confidence = None if confidence is None else np.asarray(confidence, float)
        self.anchors, self.current, self.n_slices = list(anchors), current, max(1, int(n_slices))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(38, 41, 48))

        def x_of(z: float) -> float:
            return 4 + (w - 8) * (z / max(1, self.n_slices - 1))

        p.setPen(QPen(QColor(255, 200, 0), 2))
        for z in self.anchors:
            p.drawLine(int(x_of(z)), h - 10, int(x_of(z)), h)
        c = self.confidence
        if c is not None and c.size == self.n_slices and np.isfinite(c).any():
            p.setPen(QPen(QColor(90, 200, 255), 1.5))
            pts = [(x_of(z), 4 + (h - 18) * (1 - float(np.clip(v, 0, 1)))) for z, v in enumerate(c) if np.isfinite(v)]
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                p.drawLine(int(x0), int(y0), int(x1), int(y1))
        if self.current is not None:
            p.setPen(QPen(QColor(255, 255, 255), 1))
            p.drawLine(int(x_of(self.current)), 0, int(x_of(self.current)), h)
        p.end()


class PropSegWidget(QWidget):
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
        self._engine = None
        self._engine_key = None
        self._worker = None
        self._job = "The job"
        self._cancel = threading.Event()
        self._pbar = None
        self._binding = False
        self._pending_edits: set[int] = set()
        self._resumable: Path | None = None
        self._changed_since: set[int] = set()
        self._propagated = False
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self.last_error: str | None = None
        self.last_result = None
        self._build_ui()
        self._connect_viewer()
        self._refresh_layer_choices()
        self._bind_layers()
        self._install_shortcuts()
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setInterval(AUTOSAVE_SECONDS * 1000)
        self._autosave_timer.timeout.connect(self._autosave)
        self._autosave_timer.start()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.setToolTip("PropSeg: suggest reference slices, correct them, propagate, check, export. " + SHORTCUT_HELP)
        root = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(DISPLAY_PRESETS))
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.method_combo = QComboBox()
        self.method_combo.addItems(["interp", "stcn"])
        self.method_combo.setToolTip(
            "interp: signed-distance interpolation between anchors, guided by the CT intensities (CT weight) (default: on"
            " real CT as accurate as the shipped starter STCN weights, in a fraction of the time);"
            " stcn: memory-bank network with the same guided prior (needs weights; choose it with weights trained on your own data)")
        self.method_combo.setCurrentText("interp")
        self.image_weight_spin = QDoubleSpinBox()
        self.image_weight_spin.setRange(AUTO_IMAGE_WEIGHT, 2.0)
        self.image_weight_spin.setSingleStep(0.1)
        self.image_weight_spin.setDecimals(2)
        self.image_weight_spin.setSpecialValueText("auto")  # shown at the minimum
        self.image_weight_spin.setValue(AUTO_IMAGE_WEIGHT)
        self.image_weight_spin.setToolTip(
            "Weight of the CT intensities between anchors: each organ's HU on the two bracketing anchors move the "
            "interpolated contours toward what the scan shows. auto (default): chosen for this volume by predicting "
            f"each inner anchor from its neighbours ({DEFAULT_IMAGE_WEIGHT:g} with fewer than three anchors); 0 = shapes only")
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 256)
        self.k_spin.setValue(9)
        self.k_spin.setToolTip("Number of uniformly spaced slices the reference module segments")
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Window", self.preset_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Method", self.method_combo)
        form.addRow("CT weight", self.image_weight_spin)
        form.addRow("k slices", self.k_spin)
        root.addLayout(form)

        grid = QGridLayout()
        self.suggest_btn = QPushButton("Suggest")
        self.propagate_btn = QPushButton("Propagate")
        self.cancel_btn = QPushButton("Cancel")
        self.check_btn = QPushButton("Check next")
        self.mark_btn = QPushButton("Mark anchor")
        self.undo_btn = QPushButton("Undo")
        self.lock_btn = QPushButton("Lock label")
        self.export_btn = QPushButton("Export…")
        self.propagate_btn.setToolTip(f"Propagate the anchors' labels through the volume ({SHORTCUTS['propagate']})")
        self.check_btn.setToolTip(f"Jump to the slice most worth checking ({SHORTCUTS['check_next']})")
        self.mark_btn.setToolTip(f"Add the current slice as an anchor, confirm a suggested slice as it is, or remove an anchor ({SHORTCUTS['mark_anchor']})")
        self.lock_btn.setToolTip("Lock/unlock the selected label id: propagation never changes a locked label")
        self.export_btn.setToolTip("Write the labels on the original CT grid (NIfTI or NRRD) with a label map JSON")
        self.cancel_btn.setEnabled(False)
        if _reference_available():
            self.suggest_btn.setToolTip("Segment k slices with the reference module and make them anchors")
        else:
            self.suggest_btn.setEnabled(False)
            self.suggest_btn.setToolTip("The reference module is not installed in this build")
        for i, b in enumerate([self.suggest_btn, self.propagate_btn, self.cancel_btn, self.check_btn,
                               self.mark_btn, self.undo_btn, self.lock_btn, self.export_btn]):
            grid.addWidget(b, i // 2, i % 2)
        root.addLayout(grid)
        self.resume_btn = QPushButton("Resume session")
        self.resume_btn.setVisible(False)
        self.resume_btn.clicked.connect(lambda: self.resume())
        root.addWidget(self.resume_btn)

        root.addWidget(QLabel("Anchor slices (click to go there)"))
        self.anchor_list = QListWidget()
        self.anchor_list.setMinimumHeight(100)
        root.addWidget(self.anchor_list)
        self.plot = ConfidencePlot()
        root.addWidget(self.plot)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        hint = QLabel(SHORTCUT_HELP)
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray; font-size: 10px")
        root.addWidget(hint)

        self.suggest_btn.clicked.connect(lambda _=False: self.suggest())
        self.propagate_btn.clicked.connect(lambda _=False: self.propagate())
        self.cancel_btn.clicked.connect(lambda _=False: self.cancel())
        self.check_btn.clicked.connect(lambda _=False: self.check_next())
        self.mark_btn.clicked.connect(lambda _=False: self.mark_anchor())
        self.undo_btn.clicked.connect(lambda _=False: self.undo())
        self.lock_btn.clicked.connect(lambda _=False: self.toggle_lock())
        self.export_btn.clicked.connect(lambda: self.export())
        self.anchor_list.itemClicked.connect(self._on_anchor_clicked)
        self.preset_combo.currentTextChanged.connect(self._apply_preset)
        self.image_combo.currentTextChanged.connect(lambda _: self._bind_layers())
        self.labels_combo.currentTextChanged.connect(lambda _: self._bind_layers())
        for combo in (self.device_combo, self.method_combo):
            combo.currentTextChanged.connect(lambda _: self._settings_changed())
        self.k_spin.valueChanged.connect(lambda _: self._settings_changed())
        self.image_weight_spin.valueChanged.connect(lambda _: self._settings_changed())

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

    # ------------------------------------------------------------------ layers
    def _image_layers(self):
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and l.ndim == 3 and not l.rgb]

    def _labels_layers(self):
        from napari.layers import Labels

        return [l for l in self.viewer.layers if isinstance(l, Labels) and l.ndim == 3]

    @_guarded
    def _refresh_layer_choices(self, event=None) -> None:
        for combo, layers, extra in ((self.image_combo, self._image_layers(), []),
                                     (self.labels_combo, self._labels_layers(), [NEW_LABELS])):
            current = combo.currentText()
            names = [l.name for l in layers] + extra
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif combo is self.labels_combo:
                # default: a new Labels layer on the image's grid (an existing one, e.g. a
                # ground truth opened beside the CT, is only used when picked).
                combo.setCurrentText(NEW_LABELS)
            combo.blockSignals(False)
        self._bind_layers(allow_new=False)

    @property
    def image_layer(self):
        return self._image_layer

    @property
    def labels_layer(self):
        return self._labels_layer

    @_guarded
    def _bind_layers(self, allow_new: bool = True) -> None:
        """Attach the session to the chosen image and labels layers.

        Args:
            allow_new: create a new Labels layer on the image's grid when "<new Labels
                layer>" is chosen. Layer-list events pass False unless the image itself
                changed, so removing layers (or closing the viewer) never spawns layers.
        """
        if self._binding:
            return
        name = self.image_combo.currentText()
        image = next((l for l in self._image_layers() if l.name == name), None)
        if image is None:
            self._detach()
            self.status.setText("Open a CT (File > Open, or File > Open Sample > PropSeg) to start.")
            return
        if self._worker is not None:
            return
        lname = self.labels_combo.currentText()
        labels = next((l for l in self._labels_layers() if l.name == lname), None)
        if labels is not None and labels.data.shape != image.data.shape:
            _notify("warning", f"Labels layer '{labels.name}' has shape {labels.data.shape}, not the image's "
                    f"{image.data.shape}; choose a Labels layer on the image's grid or '{NEW_LABELS}'.")
            labels = None
        if image is self._image_layer and labels is not None and labels is self._labels_layer:
            return
        if labels is None and not (allow_new or image is not self._image_layer):
            if self._labels_layer is not None and self._labels_layer not in self.viewer.layers:
                self._detach(keep_image=True)
                self.status.setText(f"Choose a Labels layer (or '{NEW_LABELS}') to continue.")
            return
        self._binding = True
        try:
            if labels is None:
                labels = self._new_labels_layer(image)
            self._attach(image, labels)
        finally:
            self._binding = False

    def _detach(self, keep_image: bool = False) -> None:
        if self._labels_layer is not None:
            for ev, cb in ((self._labels_layer.events.paint, self._on_paint),
                           (self._labels_layer.events.data, self._on_data_replaced)):
                try:
                    ev.disconnect(cb)
                except (TypeError, ValueError, RuntimeError):
                    pass
        if self.session is not None and self.session.dirty:
            self._autosave()
        self._labels_layer = None
        if not keep_image:
            self._image_layer = None
        self.session = None
        self._engine = None
        self.anchor_list.clear()

    def _new_labels_layer(self, image):
        """A Labels layer on the image's grid (uint8: up to 255 label ids) with its geometry."""
        data = np.zeros(image.data.shape, dtype=np.uint8)
        meta = {}
        if META_KEY in image.metadata:
            meta[META_KEY] = dict(image.metadata[META_KEY])
        layer = self.viewer.add_labels(data, name=f"{image.name} labels", scale=image.scale,
                                       translate=image.translate, metadata=meta)
        self.labels_combo.blockSignals(True)
        self._refresh_combo_only()
        self.labels_combo.setCurrentText(layer.name)
        self.labels_combo.blockSignals(False)
        return layer

    def _refresh_combo_only(self) -> None:
        names = [l.name for l in self._labels_layers()] + [NEW_LABELS]
        self.labels_combo.clear()
        self.labels_combo.addItems(names)

    def _attach(self, image, labels) -> None:
        if self._labels_layer is not None:
            try:
                self._labels_layer.events.paint.disconnect(self._on_paint)
                self._labels_layer.events.data.disconnect(self._on_data_replaced)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._image_layer, self._labels_layer = image, labels
        if not np.issubdtype(np.asarray(labels.data).dtype, np.integer):
            labels.data = np.asarray(labels.data).astype(np.int32)
        geometry = image.metadata.get(META_KEY)
        if geometry is not None and META_KEY not in labels.metadata:
            labels.metadata[META_KEY] = dict(geometry)
        self._pending_edits = set()
        self.session = Session(labels.data, geometry, self._settings())
        self._engine = None
        self._changed_since.clear()
        self._propagated = False
        labels.events.paint.connect(self._on_paint)
        labels.events.data.connect(self._on_data_replaced)
        preset = image.metadata.get("propseg_preset")
        if preset in DISPLAY_PRESETS:
            self.preset_combo.blockSignals(True)
            self.preset_combo.setCurrentText(preset)
            self.preset_combo.blockSignals(False)
        self._offer_resume(geometry)
        self._refresh_anchor_list()
        self.status.setText(f"Image '{image.name}' {image.data.shape}, labels '{labels.name}'. "
                            "Paint on a few slices (they become anchors), then Propagate.")

    def _offer_resume(self, geometry: dict | None) -> None:
        """If this image has a saved session, offer it (non-modal: the Resume button)."""
        self._resumable = None
        self.resume_btn.setVisible(False)
        if geometry is None:
            return
        found = find_session(geometry, self.session.settings.get("session_folder"))
        if found is None:
            return
        self._resumable = found
        self.resume_btn.setVisible(True)
        self.resume_btn.setToolTip(f"Load the labels, anchors and settings saved in {found}")
        _notify("info", f"A saved PropSeg session of this image exists ({found}); press 'Resume session' to load it.")

    @_guarded
    def resume(self, folder: str | Path | None = None) -> None:
        """Load a saved session (default: the one found for this image) into the labels layer."""
        folder = folder or self._resumable
        if folder is None or self._labels_layer is None:
            return
        try:
            self._resume(folder)
        except InputError as exc:
            self._error(exc)

    def _resume(self, folder: str | Path) -> None:
        geometry = self._image_layer.metadata.get(META_KEY) if self._image_layer is not None else None
        loaded = Session.load(folder, geometry)
        if loaded.labels.shape != self._labels_layer.data.shape:
            raise InputError(f"The session in {folder} has labels of shape {loaded.labels.shape}, not the image's; start anew.")
        self._labels_layer.data[...] = loaded.labels
        loaded.labels = self._labels_layer.data
        self.session = loaded
        self._labels_layer.refresh()
        self._propagated = loaded.confidence is not None
        self._resumable = None
        self.resume_btn.setVisible(False)
        saved = dict(loaded.settings)  # applying one setting rewrites the session's settings from the widget
        for combo, key in ((self.method_combo, "method"), (self.device_combo, "device")):
            if saved.get(key):
                combo.setCurrentText(str(saved[key]))
        if "image_weight" in saved:
            w = saved["image_weight"]
            self.image_weight_spin.setValue(float(w) if isinstance(w, (int, float)) and w >= 0 else AUTO_IMAGE_WEIGHT)
        _notify("info", f"Resumed the session saved in {folder} ({len(loaded.anchors)} anchors).")
        self._refresh_anchor_list()

    @_guarded
    def _on_data_replaced(self, event=None) -> None:
        if self.session is not None and self._labels_layer is not None and self._worker is None:
            if self._labels_layer.data is not self.session.labels:
                self.session.labels = self._labels_layer.data

    @_guarded
    def _on_paint(self, event) -> None:
        """The clinician painted/erased/filled: those slices become anchors.

        napari emits ``paint`` just before it writes the new values, so the slices are
        queued and their status (corrected/empty) is decided right after
        (:meth:`flush_edits`, also called before any job reads the labels).
        """
        if self.session is None:
            return
        zs = [z for z in slices_from_paint_atoms(event.value) if 0 <= z < self.session.labels.shape[0]]
        if not zs:
            return
        self._pending_edits.update(zs)
        QTimer.singleShot(0, self.flush_edits)

    def flush_edits(self) -> list[int]:
        """Record the queued painted slices as anchors; returns them."""
        if self.session is None or not self._pending_edits:
            return []
        zs, self._pending_edits = sorted(self._pending_edits), set()
        try:
            self.session.record_edit(zs)
            self._changed_since.update(zs)
            self._refresh_anchor_list()
        except Exception as exc:  # noqa: BLE001 - called from a timer: never raise into Qt
            self._error(exc)
        return zs

    def image_weight(self) -> float | None:
        """The CT weight set in the widget; None = auto (chosen per volume by the engine)."""
        v = float(self.image_weight_spin.value())
        return None if v < 0 else v  # the minimum ("auto") and anything typed below 0

    def _settings(self) -> dict:
        return {"method": self.method_combo.currentText(), "device": self.device_combo.currentText(),
                "k": int(self.k_spin.value()), "preset": self.preset_combo.currentText(),
                "image_weight": "auto" if self.image_weight() is None else self.image_weight()}

    @_guarded
    def _settings_changed(self) -> None:
        if self.session is not None:
            self.session.settings.update(self._settings())
            self.session.dirty = True
        self._engine = None

    @_guarded
    def _apply_preset(self, name: str) -> None:
        if self._image_layer is not None and name in DISPLAY_PRESETS:
            self._image_layer.contrast_limits = list(DISPLAY_PRESETS[name])
            self._image_layer.metadata["propseg_preset"] = name
            self._settings_changed()

    # ------------------------------------------------------------------ navigation
    def current_z(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def goto(self, z: int) -> None:
        step = list(self.viewer.dims.current_step)
        step[0] = int(z)
        self.viewer.dims.current_step = tuple(step)

    @_guarded
    def goto_anchor(self, direction: int) -> None:
        if self.session is None:
            return
        z = self.current_z()
        target = self.session.anchors.next_after(z) if direction > 0 else self.session.anchors.prev_before(z)
        if target is not None:
            self.goto(target)

    @_guarded
    def check_next(self) -> None:
        if self.session is None:
            return
        z = self.session.next_unverified()  # the reference module's slices are checked first
        if z is not None:
            self.goto(z)
            self.status.setText(f"Check suggested slice {z}: paint a correction, or press Mark anchor "
                                f"({SHORTCUTS['mark_anchor']}) to confirm it as it is; then Check next again.")
            return
        if self._engine is not None and self.session.confidence is not None and hasattr(self._engine, "suggest_next"):
            try:
                z = int(self._engine.suggest_next(self.session.confidence, self.session.anchors.zs))
            except InputError:
                z = None
        if z is None:
            z = self.session.check_next()
        if z is None:
            _notify("info", "Every slice is an anchor; nothing left to check.")
            return
        self.goto(z)
        self.status.setText(f"Check slice {z}: paint a correction there (it becomes an anchor), then Propagate.")

    @_guarded
    def mark_anchor(self) -> None:
        if self.session is None:
            return
        self.flush_edits()
        z = self.current_z()
        is_anchor = self.session.toggle_anchor(z)
        if is_anchor:
            self._changed_since.add(z)
        self._refresh_anchor_list()

    @_guarded
    def toggle_lock(self) -> None:
        if self.session is None or self._labels_layer is None:
            return
        label = int(self._labels_layer.selected_label)
        if label == 0:
            _notify("info", "Select a label id (not background) to lock it.")
            return
        if label in self.session.locked:
            self.session.locked.discard(label)
            _notify("info", f"Label {label} unlocked.")
        else:
            self.session.locked.add(label)
            _notify("info", f"Label {label} locked: propagation will not change it.")
        self.session.dirty = True
        self._refresh_anchor_list()

    @_guarded
    def _on_anchor_clicked(self, item: QListWidgetItem) -> None:
        z = item.data(Qt.ItemDataRole.UserRole)
        if z is not None:
            self.goto(int(z))

    def _refresh_anchor_list(self) -> None:
        self.anchor_list.clear()
        if self.session is None:
            return
        for z, status in self.session.anchors.items():
            item = QListWidgetItem(f"slice {z:4d}   {status}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            self.anchor_list.addItem(item)
        self.undo_btn.setEnabled(len(self.session.undo_stack) > 0 and self._worker is None)
        locked = ", ".join(str(i) for i in sorted(self.session.locked)) or "none"
        self.lock_btn.setText(f"Lock label (locked: {locked})")
        self._update_plot()
        self._mark_anchors_on_layer()

    def _mark_anchors_on_layer(self) -> None:
        """Show the anchors as a points overlay at the volume's corner on each anchor slice."""
        if self.session is None or self._image_layer is None:
            return
        name = "PropSeg anchors"
        zs = self.session.anchors.zs
        pts = np.array([[z, 2, 2] for z in zs], dtype=float).reshape(-1, 3)
        layer = next((l for l in self.viewer.layers if l.name == name), None)
        try:
            if layer is None:
                if not len(zs):
                    return
                self.viewer.add_points(pts, name=name, size=4, face_color="yellow", symbol="square",
                                       scale=self._image_layer.scale, translate=self._image_layer.translate,
                                       out_of_slice_display=False)
                self.viewer.layers.selection.active = self._labels_layer
            else:
                layer.data = pts
        except Exception:  # noqa: BLE001 - the overlay is cosmetic
            log.debug("anchor overlay failed", exc_info=True)

    @_guarded
    def _update_plot(self, event=None) -> None:
        if self.session is None:
            return
        try:
            cur = self.current_z()
        except Exception:  # noqa: BLE001
            cur = None
        self.plot.set_data(self.session.confidence, self.session.anchors.zs, cur, self.session.labels.shape[0])

    # ------------------------------------------------------------------ jobs
    def _busy(self, busy: bool) -> None:
        for b in (self.propagate_btn, self.check_btn, self.mark_btn, self.undo_btn, self.export_btn, self.lock_btn):
            b.setEnabled(not busy)
        self.suggest_btn.setEnabled(not busy and _reference_available())
        self.cancel_btn.setEnabled(busy)
        if not busy and self.session is not None:
            self.undo_btn.setEnabled(len(self.session.undo_stack) > 0)

    def _start(self, fn, on_done, what: str, total: int, job: str) -> None:
        """Run ``fn`` in a worker; ``on_done(result)`` in the GUI thread; ``what`` names the
        progress bar ("Propagating"), ``job`` the job in messages ("Propagation")."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._cancel.clear()
        self._job = job
        self._pbar = progress(total=total, desc=what)
        worker = create_worker(fn, _start_thread=False, _ignore_errors=True)  # errors -> self._error
        worker.returned.connect(lambda payload: self._call_safely(on_done, payload))
        worker.errored.connect(self._error)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._busy(True)
        self.status.setText(f"{what}…")
        worker.start()

    def _call_safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - never raise into Qt
            self._error(exc)

    @_guarded
    def _on_progress(self, step: int, total: int, message: str) -> None:
        pbar = self._pbar
        if pbar is None or self._worker is None:  # a late signal after the job ended
            return
        pbar.total = total
        pbar.n = step
        pbar.set_description(message or "")
        pbar.refresh()

    def _progress_cb(self, step: int, total: int, message: str = "") -> None:
        self._bridge.progressed.emit(int(step), int(total), str(message))

    @_guarded
    def _finished(self) -> None:
        self._worker = None
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            pbar.close()
        self._busy(False)

    @_guarded
    def cancel(self) -> None:
        """Ask the running job to stop (it stops within one slice)."""
        self._cancel.set()
        self.status.setText("Cancelling…")

    def is_busy(self) -> bool:
        return self._worker is not None

    @_guarded
    def propagate(self) -> None:
        """Propagate (or re-propagate the ranges around corrected slices) in a worker."""
        if self._worker is not None or self.session is None or self._image_layer is None:
            return
        self.flush_edits()
        try:
            labels, anchors = self.session.propagation_inputs()
        except InputError as exc:
            self._error(exc)
            return
        method, device = self.method_combo.currentText(), self.device_combo.currentText()
        changed = sorted(self._changed_since) if self._propagated and self._changed_since else None
        volume = np.asarray(self._image_layer.data)
        spacing = self._spacing()
        image_weight = self.image_weight()
        key = (id(self._image_layer), method, device, spacing, image_weight)
        engine = self._engine if self._engine_key == key else None
        cancel = self._cancel.is_set
        progress = self._progress_cb
        locked = tuple(sorted(self.session.locked))

        def job():
            eng = engine or make_engine(volume, method=method, device=device, spacing=spacing, image_weight=image_weight)
            t0 = time.perf_counter()
            result = run_propagation(volume, labels, anchors, method=method, device=device, changed=changed,
                                     locked_labels=locked, progress=progress, cancel=cancel, engine=eng)
            return eng, result, time.perf_counter() - t0

        def done(payload):
            eng, result, seconds = payload
            self._engine, self._engine_key = eng, key
            what = f"re-propagate ({method})" if changed else f"propagate ({method})"
            zs = self.session.apply_result(result.labels, what, getattr(result, "confidence", None))
            self._labels_layer.refresh()
            self._changed_since.clear()
            self._propagated = True
            self.last_result = result
            weight = getattr(eng, "image_weight", None)
            used = "" if weight is None else f", CT weight {weight:g}" + (" (auto)" if getattr(eng, "image_weight_scores", None) else "")
            self.status.setText(f"{what}: {len(zs)} slices changed in {seconds:.1f} s{used}.")
            self._refresh_anchor_list()
            self._autosave(force=True)

        self._start(job, done, "Re-propagating" if changed else "Propagating", labels.shape[0], "Propagation")

    def _spacing(self) -> tuple[float, float, float] | None:
        """The image's voxel size (sz, sy, sx) in mm: the CT geometry's, else the layer's scale."""
        layer = self._image_layer
        if layer is None:
            return None
        geometry = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        spacing = geometry.get("spacing") if isinstance(geometry, dict) else None
        if spacing is None:
            spacing = layer.scale
        try:
            spacing = tuple(float(v) for v in spacing)
        except (TypeError, ValueError):
            return None
        if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
            return None
        return spacing

    @_guarded
    def suggest(self) -> None:
        """Run the reference module on k slices and write its masks there as anchors."""
        if self._worker is not None or self.session is None or self._image_layer is None:
            return
        if not _reference_available():
            _notify("warning", "The reference module is not available in this build; paint anchors by hand.")
            return
        volume = np.asarray(self._image_layer.data)
        k, device = int(self.k_spin.value()), self.device_combo.currentText()
        cancel, progress = self._cancel.is_set, self._progress_cb

        def job():
            from .reference.inference import suggest_slices

            return suggest_slices(volume, k=k, device=device, progress=progress, cancel=cancel)

        def done(sugg):
            masks = np.asarray(sugg.labels)[list(sugg.slices)]
            zs = self.session.set_suggested(sugg.slices, masks, getattr(sugg, "agreement", None))
            self._labels_layer.refresh()
            self._changed_since.update(zs)
            self.status.setText(f"Suggested {len(zs)} slices; check and correct them, then Propagate.")
            self._refresh_anchor_list()

        self._start(job, done, "Suggesting", k, "Suggest")

    @_guarded
    def undo(self) -> None:
        """Undo the last propagation or suggestion as one step (later paint edits stay)."""
        if self.session is None or self._worker is not None:
            return
        step = self.session.undo_stack.peek()
        zs = self.session.undo()
        if step is None:
            _notify("info", "Nothing to undo: no propagation or suggestion since the session started.")
            return
        self._labels_layer.refresh()
        what = "suggestion" if step.description == "suggest" else "propagation"
        self.status.setText(f"Undid the last {what} ({len(zs)} slices restored; slices corrected since kept).")
        self._refresh_anchor_list()

    @_guarded
    def export(self, path: str | Path | None = None) -> Path | None:
        """Write the labels on the original CT grid and a label map JSON beside them.

        Args:
            path: ``.nii.gz`` (default) or ``.nrrd``; asks with a file dialog when None.

        Returns:
            The written label file, or None (cancelled or failed, after a notification).
        """
        if self.session is None:
            return None
        geometry = self._image_layer.metadata.get(META_KEY) if self._image_layer is not None else None
        if path is None:
            start = str(Path(geometry["path"]).parent) if geometry and geometry.get("path") else str(Path.home())
            path, _ = QFileDialog.getSaveFileName(self, "Export labels", str(Path(start) / "labels.nii.gz"),
                                                  "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)")
            if not path:
                return None
        try:
            from .io import write_labels

            if geometry is None:
                raise InputError("The image layer carries no CT geometry; open the CT with PropSeg's reader to export.")
            like = volume_from_geometry(geometry, self.session.labels)
            written = write_labels(self.session.labels, like, path)
            names = self._label_names()
            present = {int(i) for i in np.unique(self.session.labels) if i}
            label_map = {str(i): names.get(i, f"label_{i}") for i in sorted(present | set(names))}
            json_path = _label_map_path(Path(written))
            json_path.write_text(json.dumps(label_map, indent=1))
        except (InputError, OSError) as exc:
            self._error(exc)
            return None
        _notify("info", f"Labels written to {written} (label map {json_path.name}).")
        return Path(written)

    def _label_names(self) -> dict[int, str]:
        from .labelmap import FLARE_NAMES

        names = dict(FLARE_NAMES)
        for layer in self.viewer.layers:
            extra = layer.metadata.get("propseg_label_names") if isinstance(layer.metadata, dict) else None
            if extra:
                names.update({int(k): str(v) for k, v in extra.items()})
        return names

    @_guarded
    def _autosave(self, force: bool = False) -> None:
        self.flush_edits()
        if self.session is None or (not force and not self.session.dirty):
            return
        try:
            self.session.settings.update(self._settings())
            self.session.save(self.session.settings.get("session_folder"))
        except InputError as exc:
            _notify("warning", f"Autosave failed: {exc}")

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            msg = f"{self._job} cancelled; the labels are unchanged."
            self.status.setText(msg)
            _notify("info", msg)
            return
        if isinstance(exc, InputError):
            msg = str(exc)
            if "weight" in msg.lower() and "interp" not in msg and self.method_combo.currentText() == "stcn":
                msg += " Or choose the method 'interp', which needs no weights."
        else:
            log.exception("PropSeg job failed", exc_info=exc)
            msg = f"PropSeg failed: {type(exc).__name__}: {exc}"
        self.last_error = msg
        self.status.setText(msg)
        _notify("error", msg)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._autosave()
        self._cancel.set()
        super().closeEvent(event)


def _label_map_path(label_file: Path) -> Path:
    name = label_file.name
    for ext in (".nii.gz", ".nii", ".nrrd"):
        if name.lower().endswith(ext):
            return label_file.with_name(name[: -len(ext)] + ".labels.json")
    return label_file.with_suffix(".labels.json")
