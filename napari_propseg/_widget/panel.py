"""The dock's layout: constants, the slice strip and the widgets of the panel (no logic).

:func:`build_panel` creates the controls as attributes of the widget (``image_combo``,
``propagate_btn``, ``status``, ``plot``, ``anchor_list``, ``legend``, ...);
:func:`connect_panel` wires them to the widget's slots.
"""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPainter, QPen, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..preprocess import DISPLAY_PRESETS
from ..session import DEFAULT_IMAGE_WEIGHT

NEW_LABELS = "<new Labels layer>"
AUTOSAVE_SECONDS = 60
#: the CT weight spin box's minimum, shown as "auto"
AUTO_IMAGE_WEIGHT = -0.1
#: action -> napari key binding. Chosen free of napari 0.9's own bindings on the viewer,
#: every layer type and the menus (Shift-Up/Down extend the layer selection, Shift-A
#: selects all points, Shift-P is the shapes lasso), so a shortcut does the same whichever
#: layer is active. Shift-Left/Right extend napari's Left/Right (one slice) to one anchor.
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
    f"mark (confirm) anchor {SHORTCUTS['mark_anchor']}."
)
#: Name of the napari layer that frames the anchor slices.
ANCHOR_LAYER = "PropSeg anchors"
#: Anchor status -> RGB, in the slice strip, the anchor list and the frame on the canvas.
ANCHOR_COLORS = {"suggested": (255, 200, 0), "corrected": (80, 220, 120), "empty": (170, 170, 170)}
#: Status text longer than this is shortened in the dock (the full text is its tooltip).
STATUS_MAX_CHARS = 220


def reference_available() -> bool:
    """Whether the reference module (Suggest) can be imported."""
    try:
        from ..reference import inference  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def installed_models() -> list[str]:
    """Names of the installed reference models, the default first."""
    try:
        from ..reference.models import DEFAULT_MODEL, list_models

        names = [m.name for m in list_models()]
    except Exception:  # noqa: BLE001 - no model folder: Suggest will say so
        return ["abdomen"]
    return sorted(names, key=lambda n: (n != DEFAULT_MODEL, n)) or ["abdomen"]


def swatch(rgb, size: int = 12) -> QIcon:
    """A small square icon of colour ``rgb``."""
    pm = QPixmap(size, size)
    pm.fill(QColor(*rgb))
    return QIcon(pm)


class ConfidencePlot(QWidget):
    """The slice strip: per-slice confidence along z, the anchors (coloured ticks by
    status) and the current slice; a click goes to the slice under the mouse."""

    slice_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumHeight(56)
        self.setMaximumHeight(90)
        self.confidence: np.ndarray | None = None
        self.anchors: list[tuple[int, str]] = []
        self.current: int | None = None
        self.n_slices = 1
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setToolTip("Slices along z: anchors are the ticks (yellow suggested, green corrected, grey empty), the "
                        "blue line the last propagation's confidence (low = worth checking), white the current "
                        "slice. Click to go to a slice.")

    def set_data(self, confidence, anchors, current, n_slices) -> None:
        self.confidence = None if confidence is None else np.asarray(confidence, float)
        self.anchors = [(int(z), str(s)) for z, s in anchors]
        self.current, self.n_slices = current, max(1, int(n_slices))
        self.update()

    def x_of(self, z: float) -> float:
        return 4 + (self.width() - 8) * (z / max(1, self.n_slices - 1))

    def z_at(self, x: float) -> int:
        frac = (x - 4) / max(1.0, self.width() - 8)
        return int(np.clip(round(frac * (self.n_slices - 1)), 0, self.n_slices - 1))

    def mousePressEvent(self, event) -> None:  # noqa: N802 - Qt API
        pos = event.position().x() if hasattr(event, "position") else event.x()
        self.slice_clicked.emit(self.z_at(pos))

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor(38, 41, 48))
        c = self.confidence
        if c is not None and c.size == self.n_slices and np.isfinite(c).any():
            p.setPen(QPen(QColor(90, 200, 255), 1.5))
            pts = [(self.x_of(z), 4 + (h - 22) * (1 - float(np.clip(v, 0, 1)))) for z, v in enumerate(c) if np.isfinite(v)]
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                p.drawLine(int(x0), int(y0), int(x1), int(y1))
        for z, status in self.anchors:
            p.setPen(QPen(QColor(*ANCHOR_COLORS.get(status, (255, 200, 0))), 3))
            p.drawLine(int(self.x_of(z)), h - 16, int(self.x_of(z)), h)
        if self.current is not None:
            p.setPen(QPen(QColor(255, 255, 255), 1))
            p.drawLine(int(self.x_of(self.current)), 0, int(self.x_of(self.current)), h)
        p.end()


# --------------------------------------------------------------------------- the panel


def build_panel(w: QWidget) -> None:
    """Create the dock's controls on the widget ``w`` (a scrolling column)."""
    w.setToolTip("PropSeg: suggest reference slices, correct them, propagate, check, export. " + SHORTCUT_HELP)
    outer = QVBoxLayout(w)
    outer.setContentsMargins(0, 0, 0, 0)
    # everything scrolls: the dock is never clipped at napari's default window size
    w.scroll = QScrollArea()
    w.scroll.setWidgetResizable(True)
    w.scroll.setFrameShape(QFrame.Shape.NoFrame)
    w.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    content = QWidget()
    w.scroll.setWidget(content)
    outer.addWidget(w.scroll)
    root = QVBoxLayout(content)
    root.addLayout(_settings_form(w))
    root.addLayout(_buttons(w))
    w.resume_btn = QPushButton("Resume session")
    w.resume_btn.setVisible(False)
    root.addWidget(w.resume_btn)
    _readouts(w, root)


def _settings_form(w: QWidget) -> QFormLayout:
    """Image, series, labels, window, device, method, CT weight, model and k."""
    form = QFormLayout()
    w.image_combo = QComboBox()
    w.labels_combo = QComboBox()
    w.series_combo = QComboBox()
    w.series_combo.setToolTip("The DICOM folder holds several series: choose the one to label (it is read anew)")
    w.series_label = QLabel("Series")
    w.preset_combo = QComboBox()
    w.preset_combo.addItems(list(DISPLAY_PRESETS))
    w.device_combo = QComboBox()
    w.device_combo.addItems(["auto", "cpu", "cuda"])
    w.method_combo = QComboBox()
    w.method_combo.addItems(["interp", "stcn"])
    w.method_combo.setToolTip(
        "interp: signed-distance interpolation between anchors, guided by the CT intensities (CT weight) (default: on"
        " real CT as accurate as the shipped starter STCN weights, in a fraction of the time);"
        " stcn: memory-bank network with the same guided prior (needs weights; choose it with weights trained on your own data)")
    w.method_combo.setCurrentText("interp")
    w.image_weight_spin = QDoubleSpinBox()
    w.image_weight_spin.setRange(AUTO_IMAGE_WEIGHT, 2.0)
    w.image_weight_spin.setSingleStep(0.1)
    w.image_weight_spin.setDecimals(2)
    w.image_weight_spin.setSpecialValueText("auto")  # shown at the minimum
    w.image_weight_spin.setValue(AUTO_IMAGE_WEIGHT)
    w.image_weight_spin.setToolTip(
        "Weight of the CT intensities between anchors: each organ's HU on the two bracketing anchors move the "
        "interpolated contours toward what the scan shows. auto (default): chosen for this volume by predicting "
        f"each inner anchor from its neighbours ({DEFAULT_IMAGE_WEIGHT:g} with fewer than three anchors); 0 = shapes only")
    w.k_spin = QSpinBox()
    w.k_spin.setRange(0, 256)
    w.k_spin.setSpecialValueText("auto")
    w.k_spin.setValue(0)
    w.k_spin.setToolTip("Number of uniformly spaced slices the reference module segments; auto = min(Z // 5, 64), "
                        "the same default as propseg suggest")
    w.model_combo = QComboBox()
    w.model_combo.addItems(installed_models())
    w.model_combo.setToolTip("Reference model Suggest uses (propseg models lists them): abdomen, head_neck, ...")
    for combo in (w.image_combo, w.labels_combo, w.series_combo):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(10)
    for label, field in (("Image", w.image_combo), (w.series_label, w.series_combo), ("Labels", w.labels_combo),
                         ("Window", w.preset_combo), ("Device", w.device_combo), ("Method", w.method_combo),
                         ("CT weight", w.image_weight_spin), ("Model", w.model_combo), ("k slices", w.k_spin)):
        form.addRow(label, field)
    w.series_label.setVisible(False)
    w.series_combo.setVisible(False)
    return form


def _buttons(w: QWidget) -> QGridLayout:
    """Suggest, Propagate, Cancel, Check next, Mark/Remove anchor, Undo, Lock label, Export."""
    grid = QGridLayout()
    w.suggest_btn = QPushButton("Suggest")
    w.propagate_btn = QPushButton("Propagate")
    w.cancel_btn = QPushButton("Cancel")
    w.check_btn = QPushButton("Check next")
    w.mark_btn = QPushButton("Mark anchor")
    w.remove_btn = QPushButton("Remove anchor")
    w.undo_btn = QPushButton("Undo")
    w.lock_btn = QPushButton("Lock label")
    w.export_btn = QPushButton("Export…")
    w.propagate_btn.setToolTip(f"Propagate the anchors' labels through the volume ({SHORTCUTS['propagate']})")
    w.check_btn.setToolTip(f"Jump to the slice most worth checking ({SHORTCUTS['check_next']})")
    w.mark_btn.setToolTip("Make the current slice an anchor as it is: add it, or confirm a suggested slice "
                          f"({SHORTCUTS['mark_anchor']}). Never removes an anchor.")
    w.remove_btn.setToolTip("Remove the current slice from the anchors: its labels stay, but the next "
                            "propagation may change them (asks first when it holds your correction)")
    w.lock_btn.setToolTip("Lock/unlock the selected label id: propagation never changes a locked label")
    w.export_btn.setToolTip("Write the labels on the original CT grid (NIfTI, NRRD, DICOM SEG, RTSTRUCT, "
                            "3D Slicer .seg.nrrd) with a label map JSON of the organ names")
    w.cancel_btn.setEnabled(False)
    if reference_available():
        w.suggest_btn.setToolTip("Segment k slices with the reference module and make them anchors")
    else:
        w.suggest_btn.setEnabled(False)
        w.suggest_btn.setToolTip("The reference module is not installed in this build")
    for i, b in enumerate([w.suggest_btn, w.propagate_btn, w.cancel_btn, w.check_btn,
                           w.mark_btn, w.remove_btn, w.undo_btn, w.lock_btn, w.export_btn]):
        grid.addWidget(b, i // 2, i % 2)
    return grid


def _readouts(w: QWidget, root: QVBoxLayout) -> None:
    """Progress bar, status line, slice strip, anchor list, legend and the shortcut hint."""
    w.progress_bar = QProgressBar()
    w.progress_bar.setVisible(False)
    w.progress_bar.setTextVisible(True)
    root.addWidget(w.progress_bar)
    w.status = QLabel("")
    w.status.setWordWrap(True)
    w.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    w.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    root.addWidget(w.status)
    root.addWidget(QLabel("Slices (click to go there; ticks are anchors)"))
    w.plot = ConfidencePlot()
    root.addWidget(w.plot)
    root.addWidget(QLabel("Anchor slices (click to go there)"))
    w.anchor_list = QListWidget()
    w.anchor_list.setMinimumHeight(60)
    w.anchor_list.setMaximumHeight(140)
    root.addWidget(w.anchor_list)
    root.addWidget(QLabel("Labels (click one to paint with it)"))
    w.legend = QListWidget()
    w.legend.setMinimumHeight(60)
    w.legend.setMaximumHeight(180)
    w.legend.setToolTip("Label id, colour and organ name: the ids in use and the reference model's classes")
    root.addWidget(w.legend)
    hint = QLabel(SHORTCUT_HELP)
    hint.setWordWrap(True)
    hint.setStyleSheet("color: gray; font-size: 10px")
    hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    root.addWidget(hint)
    root.addStretch(1)


def connect_panel(w) -> None:
    """Wire the controls of :func:`build_panel` to the widget's slots."""
    w.resume_btn.clicked.connect(lambda: w.resume())
    w.suggest_btn.clicked.connect(lambda _=False: w.suggest())
    w.propagate_btn.clicked.connect(lambda _=False: w.propagate())
    w.cancel_btn.clicked.connect(lambda _=False: w.cancel())
    w.check_btn.clicked.connect(lambda _=False: w.check_next())
    w.mark_btn.clicked.connect(lambda _=False: w.mark_anchor())
    w.remove_btn.clicked.connect(lambda _=False: w.remove_anchor())
    w.undo_btn.clicked.connect(lambda _=False: w.undo())
    w.lock_btn.clicked.connect(lambda _=False: w.toggle_lock())
    w.export_btn.clicked.connect(lambda: w.export())
    w.anchor_list.itemClicked.connect(w._on_anchor_clicked)
    w.legend.itemClicked.connect(w._on_legend_clicked)
    w.plot.slice_clicked.connect(w._on_strip_clicked)
    w.preset_combo.currentTextChanged.connect(w._apply_preset)
    w.image_combo.currentTextChanged.connect(lambda _: w._bind_layers())
    w.labels_combo.currentTextChanged.connect(lambda _: w._bind_layers())
    w.series_combo.activated.connect(w._on_series_chosen)
    for combo in (w.device_combo, w.method_combo):
        combo.currentTextChanged.connect(lambda _: w._settings_changed())
    w.k_spin.valueChanged.connect(lambda _: w._settings_changed())
    w.image_weight_spin.valueChanged.connect(lambda _: w._settings_changed())
