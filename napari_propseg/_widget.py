"""The PropSeg dock widget: suggest, correct, propagate, check, undo, export.

Layout and Qt plumbing only: the bookkeeping (anchors, undo, locks, names, autosave)
lives in :class:`napari_propseg.session.Session` and the computation in the propagation
engine / reference module, which run in napari ``thread_worker``s so the GUI never
freezes. Every error reaches the user as a napari notification.

What the clinician sees:

* organ names: the Labels layer gets a ``features`` table (``index`` = label id,
  ``name``), so napari's status bar and tooltip show e.g. ``name: vertebrae`` under the
  cursor, a colour map with one fixed colour per organ (:mod:`napari_propseg.labelcolors`,
  the same colours as the exported DICOM SEG / Slicer files) and a legend in the dock
  (id, colour, name; click an entry to paint with it). Names come from the label file's
  own map (``<stem>.labels.json`` beside it, or ``metadata["propseg_label_names"]``), else
  from the reference model (its ``labels.json`` / the weights' ``label_names``), else the
  FLARE names;
* anchors: listed in the dock, drawn as ticks on the clickable slice strip (confidence
  plot) and as a coloured frame around the image on each anchor slice (napari Shapes);
  *Mark anchor* (Shift-M) only ever confirms or adds an anchor, *Remove anchor* removes
  one (asking first when it holds a correction);
* reader preference: the first time the widget is loaded, PropSeg becomes napari's
  preferred reader for the CT file patterns of :data:`READER_PATTERNS` that have no
  preference yet (napari's documented ``settings.plugins.extension2reader`` setting, the
  one the "remember my choice" box of napari's reader dialog writes), so File > Open on a
  ``.nii.gz`` no longer asks which plugin to use. A choice the user made is never
  changed; Preferences > Plugins changes it back.

Keyboard shortcuts (in the canvas and in the dock, while the widget exists): see :data:`SHORTCUTS`.
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QSize, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QIcon, QKeySequence, QPainter, QPen, QPixmap, QShortcut
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGridLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .errors import CancelledError, InputError
from .labelcolors import label_color
from .preprocess import DISPLAY_PRESETS
from .session import (
    DEFAULT_IMAGE_WEIGHT,
    META_KEY,
    BrokenSessionError,
    Session,
    content_key,
    find_session,
    keep_aside,
    make_engine,
    quarantine_session,
    run_propagation,
    session_dir,
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
#: File patterns PropSeg becomes napari's preferred reader for (when the user has no preference).
READER_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm")
PLUGIN_NAME = "napari-propseg"
#: Export formats: (fmt for napari_propseg.formats.export_labels, dialog label, patterns, extension).
EXPORT_FORMATS = (
    ("nifti", "NIfTI", "*.nii.gz *.nii", ".nii.gz"),
    ("nrrd", "NRRD", "*.nrrd", ".nrrd"),
    ("dicom-seg", "DICOM SEG", "*.dcm", ".dcm"),
    ("rtstruct", "DICOM RTSTRUCT", "*.dcm", ".dcm"),
    ("seg-nrrd", "3D Slicer segmentation", "*.seg.nrrd", ".seg.nrrd"),
)
#: The formats written without napari_propseg.formats (by napari_propseg.io.write_labels).
BASIC_FORMATS = ("nifti", "nrrd")


def _reference_available() -> bool:
    try:
        from .reference import inference  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _formats_module():
    """``napari_propseg.formats`` when it is installed and offers ``export_labels``, else None."""
    try:
        from . import formats
    except Exception:  # noqa: BLE001 - not written yet / a broken optional dependency
        log.debug("napari_propseg.formats not available", exc_info=True)
        return None
    return formats if callable(getattr(formats, "export_labels", None)) else None


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning}.get(kind, notifications.show_info)(message)


def _raw(obj):
    """The napari object behind a ``PublicOnlyProxy`` (napari hands plugin widgets a proxied
    viewer whose ``add_*`` return proxies, which are never ``is`` the layers in the list)."""
    return getattr(obj, "__wrapped__", obj)


def _same(a, b) -> bool:
    return a is not None and b is not None and _raw(a) is _raw(b)


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


def ensure_reader_preference() -> list[str]:
    """Make PropSeg napari's preferred reader for :data:`READER_PATTERNS` where unset.

    napari asks which plugin to use when several readers match a file (its builtins claim
    ``*.nii.gz`` and then fail on it) unless ``settings.plugins.extension2reader`` names
    one; this sets that documented preference for the patterns the user has not chosen a
    reader for (a pattern of theirs that matches, e.g. ``*.gz``, counts as a choice).

    Returns:
        The patterns set now (empty when nothing changed or napari's settings are unavailable).
    """
    try:
        from napari.settings import get_settings

        settings = get_settings()
        current = dict(settings.plugins.extension2reader)
    except Exception:  # noqa: BLE001 - never fail the widget over a preference
        log.debug("napari settings unavailable", exc_info=True)
        return []
    added = [p for p in READER_PATTERNS
             if p not in current and not any(fnmatch.fnmatch("case" + p[1:], k) for k in current)]
    if added:
        try:
            settings.plugins.extension2reader = {**current, **{p: PLUGIN_NAME for p in added}}
        except Exception:  # noqa: BLE001
            log.debug("could not set the reader preference", exc_info=True)
            return []
    return added


def _installed_models() -> list[str]:
    """Names of the installed reference models, the default first."""
    try:
        from .reference.models import DEFAULT_MODEL, list_models

        names = [m.name for m in list_models()]
    except Exception:  # noqa: BLE001 - no model folder: Suggest will say so
        return ["abdomen"]
    return sorted(names, key=lambda n: (n != DEFAULT_MODEL, n)) or ["abdomen"]


def _model_label_names() -> dict[int, str]:
    """The default reference model's classes ``{id: name}`` (no background): its
    ``labels.json`` / the weights' ``label_names``, else the FLARE names of the abdominal
    starter model."""
    from .labelmap import FLARE_NAMES

    try:
        from .reference.models import find_model

        names = dict(find_model().label_map)
    except Exception:  # noqa: BLE001 - no model installed, no torch, an older layout
        names = {}
    names = {int(i): str(n) for i, n in names.items() if int(i) > 0}
    return names or dict(FLARE_NAMES)


def _names_from_metadata(meta: Any) -> dict[int, str]:
    if not isinstance(meta, dict):
        return {}
    out: dict[int, str] = {}
    geometry = meta.get(META_KEY)
    inner = (geometry or {}).get("meta") if isinstance(geometry, dict) else None
    for source in ((inner or {}).get("label_names"), meta.get("propseg_label_names")):
        if isinstance(source, dict):
            try:
                out.update({int(k): str(v) for k, v in source.items()})
            except (TypeError, ValueError):
                continue
    return out


def _label_map_beside(path: str | Path | None) -> dict[int, str]:
    """``<stem>.labels.json`` beside a label file, or {} (never raises)."""
    if not path:
        return {}
    try:
        json_path = _label_map_path(Path(path))
        if not json_path.is_file():
            return {}
        from .labelmap import read_label_map

        return {i: n for i, n in read_label_map(json_path).items() if i > 0}
    except Exception:  # noqa: BLE001 - a broken sidecar file must not break the widget
        log.debug("unreadable label map beside %s", path, exc_info=True)
        return {}


def layer_label_names(layer) -> dict[int, str]:
    """Names a Labels layer brings itself: ``<stem>.labels.json`` beside the file it was
    read from, then ``metadata["propseg_label_names"]`` (set by the reader / sample)."""
    if layer is None:
        return {}
    meta = layer.metadata if isinstance(layer.metadata, dict) else {}
    geometry = meta.get(META_KEY) if isinstance(meta.get(META_KEY), dict) else {}
    names = _label_map_beside(geometry.get("path") if geometry else None)
    names.update(_names_from_metadata(meta))
    return {i: n for i, n in names.items() if i > 0}


def _rgba(rgb) -> np.ndarray:
    return np.array([rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, 1.0])


def style_labels_layer(layer, names: dict[int, str], ids: set[int] | None = None) -> None:
    """Give a Labels layer organ colours (:func:`~napari_propseg.labelcolors.label_color`,
    fixed per name, else per id) and a ``features`` table (``index``, ``name``) so that
    napari shows the organ under the cursor."""
    from napari.utils.colormaps import DirectLabelColormap

    ids = set(ids or ()) | {int(i) for i in names}
    dtype = np.asarray(layer.data).dtype if hasattr(layer.data, "dtype") else np.dtype(np.int32)
    upto = 255 if np.dtype(dtype).itemsize == 1 else max([255] + list(ids))
    all_ids = sorted(set(range(1, min(upto, 4095) + 1)) | ids)
    colors = {None: _rgba(label_color(None, 0)), 0: np.zeros(4)}
    colors.update({i: _rgba(label_color(names.get(i), i)) for i in all_ids if i > 0})
    layer.colormap = DirectLabelColormap(color_dict=colors)
    shown = sorted(ids - {0})
    layer.features = {
        "index": np.array([0] + shown, dtype=np.int64),
        "name": np.array(["background"] + [names.get(i, f"label_{i}") for i in shown], dtype=object),
    }


def _ids_in(data) -> set[int]:
    """The label ids present in a labels array (fast for 8-bit labels)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return set()
    if arr.dtype == np.uint8:
        counts = np.bincount(arr.reshape(-1), minlength=256)
        return {int(i) for i in np.flatnonzero(counts) if i}
    return {int(i) for i in np.unique(arr) if i}


def _swatch(rgb, size: int = 12) -> QIcon:
    pm = QPixmap(size, size)
    pm.fill(QColor(*rgb))
    return QIcon(pm)


class _Bridge(QObject):
    """Carries progress from a worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int, str)


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
        self._resumable_broken = False
        self._changed_since: set[int] = set()
        self._propagated = False
        self._ids_in_use: set[int] = set()
        self._legend_key = None
        self._status_full = ""
        self._after_job: list = []  # run in the GUI thread once the running job has finished
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self.last_error: str | None = None
        self.last_result = None
        self.model_label_names = _model_label_names()
        self._build_ui()
        self._connect_viewer()
        self._refresh_layer_choices()
        self._bind_layers()
        self._install_shortcuts()
        added = ensure_reader_preference()
        if added:
            _notify("info", f"PropSeg now opens {', '.join(added)} files (File > Open); "
                    "change this in File > Preferences > Plugins.")
        self._autosave_timer = QTimer(self)
        self._autosave_timer.setInterval(AUTOSAVE_SECONDS * 1000)
        self._autosave_timer.timeout.connect(self._autosave)
        self._autosave_timer.start()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.setToolTip("PropSeg: suggest reference slices, correct them, propagate, check, export. " + SHORTCUT_HELP)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        # everything scrolls: the dock is never clipped at napari's default window size
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QWidget()
        self.scroll.setWidget(content)
        outer.addWidget(self.scroll)
        root = QVBoxLayout(content)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.series_combo = QComboBox()
        self.series_combo.setToolTip("The DICOM folder holds several series: choose the one to label (it is read anew)")
        self.series_label = QLabel("Series")
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
        self.k_spin.setRange(0, 256)
        self.k_spin.setSpecialValueText("auto")
        self.k_spin.setValue(0)
        self.k_spin.setToolTip("Number of uniformly spaced slices the reference module segments; auto = min(Z // 5, 64), "
                               "the same default as propseg suggest")
        self.model_combo = QComboBox()
        self.model_combo.addItems(_installed_models())
        self.model_combo.setToolTip("Reference model Suggest uses (propseg models lists them): abdomen, head_neck, ...")
        for combo in (self.image_combo, self.labels_combo, self.series_combo):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(10)
        form.addRow("Image", self.image_combo)
        form.addRow(self.series_label, self.series_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Window", self.preset_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Method", self.method_combo)
        form.addRow("CT weight", self.image_weight_spin)
        form.addRow("Model", self.model_combo)
        form.addRow("k slices", self.k_spin)
        self.series_label.setVisible(False)
        self.series_combo.setVisible(False)
        root.addLayout(form)

        grid = QGridLayout()
        self.suggest_btn = QPushButton("Suggest")
        self.propagate_btn = QPushButton("Propagate")
        self.cancel_btn = QPushButton("Cancel")
        self.check_btn = QPushButton("Check next")
        self.mark_btn = QPushButton("Mark anchor")
        self.remove_btn = QPushButton("Remove anchor")
        self.undo_btn = QPushButton("Undo")
        self.lock_btn = QPushButton("Lock label")
        self.export_btn = QPushButton("Export…")
        self.propagate_btn.setToolTip(f"Propagate the anchors' labels through the volume ({SHORTCUTS['propagate']})")
        self.check_btn.setToolTip(f"Jump to the slice most worth checking ({SHORTCUTS['check_next']})")
        self.mark_btn.setToolTip("Make the current slice an anchor as it is: add it, or confirm a suggested slice "
                                 f"({SHORTCUTS['mark_anchor']}). Never removes an anchor.")
        self.remove_btn.setToolTip("Remove the current slice from the anchors: its labels stay, but the next "
                                   "propagation may change them (asks first when it holds your correction)")
        self.lock_btn.setToolTip("Lock/unlock the selected label id: propagation never changes a locked label")
        self.export_btn.setToolTip("Write the labels on the original CT grid (NIfTI, NRRD, DICOM SEG, RTSTRUCT, "
                                   "3D Slicer .seg.nrrd) with a label map JSON of the organ names")
        self.cancel_btn.setEnabled(False)
        if _reference_available():
            self.suggest_btn.setToolTip("Segment k slices with the reference module and make them anchors")
        else:
            self.suggest_btn.setEnabled(False)
            self.suggest_btn.setToolTip("The reference module is not installed in this build")
        for i, b in enumerate([self.suggest_btn, self.propagate_btn, self.cancel_btn, self.check_btn,
                               self.mark_btn, self.remove_btn, self.undo_btn, self.lock_btn, self.export_btn]):
            grid.addWidget(b, i // 2, i % 2)
        root.addLayout(grid)
        self.resume_btn = QPushButton("Resume session")
        self.resume_btn.setVisible(False)
        self.resume_btn.clicked.connect(lambda: self.resume())
        root.addWidget(self.resume_btn)

        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.progress_bar.setTextVisible(True)
        root.addWidget(self.progress_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        root.addWidget(self.status)

        root.addWidget(QLabel("Slices (click to go there; ticks are anchors)"))
        self.plot = ConfidencePlot()
        root.addWidget(self.plot)
        root.addWidget(QLabel("Anchor slices (click to go there)"))
        self.anchor_list = QListWidget()
        self.anchor_list.setMinimumHeight(60)
        self.anchor_list.setMaximumHeight(140)
        root.addWidget(self.anchor_list)
        root.addWidget(QLabel("Labels (click one to paint with it)"))
        self.legend = QListWidget()
        self.legend.setMinimumHeight(60)
        self.legend.setMaximumHeight(180)
        self.legend.setToolTip("Label id, colour and organ name: the ids in use and the reference model's classes")
        root.addWidget(self.legend)
        hint = QLabel(SHORTCUT_HELP)
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray; font-size: 10px")
        hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        root.addWidget(hint)
        root.addStretch(1)

        self.suggest_btn.clicked.connect(lambda _=False: self.suggest())
        self.propagate_btn.clicked.connect(lambda _=False: self.propagate())
        self.cancel_btn.clicked.connect(lambda _=False: self.cancel())
        self.check_btn.clicked.connect(lambda _=False: self.check_next())
        self.mark_btn.clicked.connect(lambda _=False: self.mark_anchor())
        self.remove_btn.clicked.connect(lambda _=False: self.remove_anchor())
        self.undo_btn.clicked.connect(lambda _=False: self.undo())
        self.lock_btn.clicked.connect(lambda _=False: self.toggle_lock())
        self.export_btn.clicked.connect(lambda: self.export())
        self.anchor_list.itemClicked.connect(self._on_anchor_clicked)
        self.legend.itemClicked.connect(self._on_legend_clicked)
        self.plot.slice_clicked.connect(self._on_strip_clicked)
        self.preset_combo.currentTextChanged.connect(self._apply_preset)
        self.image_combo.currentTextChanged.connect(lambda _: self._bind_layers())
        self.labels_combo.currentTextChanged.connect(lambda _: self._bind_layers())
        self.series_combo.activated.connect(self._on_series_chosen)
        for combo in (self.device_combo, self.method_combo):
            combo.currentTextChanged.connect(lambda _: self._settings_changed())
        self.k_spin.valueChanged.connect(lambda _: self._settings_changed())
        self.image_weight_spin.valueChanged.connect(lambda _: self._settings_changed())

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

    # ------------------------------------------------------------------ layers
    def _image_layers(self):
        from napari.layers import Image

        return [_raw(l) for l in self.viewer.layers if isinstance(l, Image) and l.ndim == 3 and not l.rgb]

    def _labels_layers(self):
        from napari.layers import Labels

        return [_raw(l) for l in self.viewer.layers if isinstance(l, Labels) and l.ndim == 3]

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
        self._style_named_layers()
        self._bind_layers(allow_new=False)

    def _style_named_layers(self) -> None:
        """Organ colours and names on every other Labels layer that brings its own names
        (a ground truth, a label file with ``<stem>.labels.json``), once per layer."""
        for layer in self._labels_layers():
            if _same(layer, self._labels_layer) or not isinstance(layer.metadata, dict):
                continue
            if layer.metadata.get("propseg_styled"):
                continue
            names = layer_label_names(layer)
            if not names:
                continue
            try:
                style_labels_layer(layer, names, _ids_in(layer.data))
                layer.metadata["propseg_styled"] = True
            except Exception:  # noqa: BLE001 - cosmetic
                log.debug("could not style %s", layer.name, exc_info=True)

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
            self._set_status("Open a CT (File > Open, or File > Open Sample > PropSeg) to start.")
            return
        if self._worker is not None:
            return
        lname = self.labels_combo.currentText()
        labels = next((l for l in self._labels_layers() if l.name == lname), None)
        if labels is not None and labels.data.shape != image.data.shape:
            if _same(labels, self._labels_layer) and not _same(image, self._image_layer):
                # another image was chosen: its own labels layer when there is one, else a new one
                labels = next((l for l in self._labels_layers() if l.name == f"{image.name} labels"
                               and l.data.shape == image.data.shape), None)
            else:
                _notify("warning", f"Labels layer '{labels.name}' has shape {labels.data.shape}, not the image's "
                        f"{image.data.shape}; choose a Labels layer on the image's grid or '{NEW_LABELS}'.")
                labels = None
            if labels is not None:
                self.labels_combo.blockSignals(True)
                self.labels_combo.setCurrentText(labels.name)
                self.labels_combo.blockSignals(False)
        if _same(image, self._image_layer) and labels is not None and _same(labels, self._labels_layer):
            return
        if labels is None and not (allow_new or not _same(image, self._image_layer)):
            if self._labels_layer is not None and not any(_same(self._labels_layer, l) for l in self.viewer.layers):
                self._detach(keep_image=True)
                self._set_status(f"Choose a Labels layer (or '{NEW_LABELS}') to continue.")
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
        self._resumable = None
        self.resume_btn.setVisible(False)
        self.anchor_list.clear()
        self.legend.clear()
        self._legend_key = None
        self._refresh_series()

    def _new_labels_layer(self, image):
        """A Labels layer on the image's grid (uint8: up to 255 label ids) with its geometry."""
        data = np.zeros(image.data.shape, dtype=np.uint8)
        meta = {}
        if META_KEY in image.metadata:
            meta[META_KEY] = dict(image.metadata[META_KEY])
        layer = _raw(self.viewer.add_labels(data, name=f"{image.name} labels", scale=image.scale,
                                            translate=image.translate, metadata=meta))
        self.labels_combo.blockSignals(True)
        self._refresh_combo_only()
        self.labels_combo.setCurrentText(layer.name)
        self.labels_combo.blockSignals(False)
        return layer

    def _refresh_combo_only(self) -> None:
        names = [l.name for l in self._labels_layers()] + [NEW_LABELS]
        self.labels_combo.clear()
        self.labels_combo.addItems(names)

    def _geometry(self) -> dict | None:
        layer = self._image_layer
        if layer is None or not isinstance(layer.metadata, dict):
            return None
        return layer.metadata.get(META_KEY)

    def _attach(self, image, labels) -> None:
        image, labels = _raw(image), _raw(labels)
        if self.session is not None and self.session.dirty:
            self._autosave()  # the session of the previous image/labels pair is kept
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
        names = dict(self.model_label_names)
        names.update(layer_label_names(labels))
        self.session = Session(labels.data, geometry, self._settings(),
                               content_key=content_key(geometry, image.data), label_names=names)
        self._engine = None
        self._changed_since.clear()
        self._propagated = False
        self._ids_in_use = _ids_in(labels.data)
        self._legend_key = None
        labels.events.paint.connect(self._on_paint)
        labels.events.data.connect(self._on_data_replaced)
        preset = image.metadata.get("propseg_preset")
        if preset in DISPLAY_PRESETS:
            self.preset_combo.blockSignals(True)
            self.preset_combo.setCurrentText(preset)
            self.preset_combo.blockSignals(False)
        self._refresh_series()
        self._refresh_anchor_list()
        self._set_status(f"Image '{image.name}' {image.data.shape}, labels '{labels.name}'. "
                         "Paint on a few slices (they become anchors), then Propagate.")
        self._offer_resume(geometry)

    def _offer_resume(self, geometry: dict | None) -> None:
        """If this image has a saved session, offer it (non-modal: the Resume button). A
        session not resumed is kept aside (``*.previous-<time>``), never overwritten, when
        this one is first saved."""
        self._resumable = None
        self._resumable_broken = False
        self.resume_btn.setVisible(False)
        if geometry is None or self.session is None:
            return
        found = find_session(geometry, self.session.settings.get("session_folder"), content_key=self.session.content_key)
        if found is None:
            return
        self._resumable = found
        self.resume_btn.setVisible(True)
        self.resume_btn.setToolTip(f"Load the labels, anchors and settings saved in {found}")
        msg = f"A saved PropSeg session of this image exists ({found}); press 'Resume session' to load it."
        self._set_status(msg)
        _notify("info", msg)

    def _ask(self, title: str, question: str) -> bool:
        """Ask a yes/no question (modal); tests replace this method."""
        answer = QMessageBox.question(self, title, question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    @_guarded
    def resume(self, folder: str | Path | None = None) -> None:
        """Load a saved session (default: the one found for this image) into the labels layer.

        A damaged session (a truncated labels file after a crash or a full disk) is not
        loaded: the clinician is asked whether to start fresh, and the damaged files are
        kept aside as ``*.broken-<time>`` (:func:`~napari_propseg.session.quarantine_session`).
        """
        folder = folder or self._resumable
        if folder is None or self._labels_layer is None:
            return
        try:
            self._resume(folder)
        except BrokenSessionError as exc:
            self._on_broken_session(exc)
        except InputError as exc:
            self._error(exc)

    def _on_broken_session(self, exc: BrokenSessionError) -> None:
        question = (f"{exc} The saved session cannot be resumed.\n\nStart a new session? The damaged files stay in "
                    f"{exc.folder}, renamed to *.broken-<time>.")
        if not self._ask("PropSeg: damaged session", question):
            self._resumable_broken = True  # kept aside, not overwritten, when this session is saved
            self._error(InputError(f"{exc} Resume was not possible; the files were left as they are."))
            return
        moved = quarantine_session(exc.folder)
        self._resumable = None
        self.resume_btn.setVisible(False)
        kept = ", ".join(p.name for p in moved) or "nothing"
        msg = (f"The saved session in {exc.folder} was damaged ({exc.file.name}); started a new session. "
               f"The damaged files were kept as {kept}.")
        self._set_status(msg)
        _notify("warning", msg)

    def _resume(self, folder: str | Path) -> None:
        geometry = self._geometry()
        key = self.session.content_key if self.session is not None else None
        loaded = Session.load(folder, geometry, content_key=key)
        if loaded.labels.shape != self._labels_layer.data.shape:
            raise InputError(f"The session in {folder} has labels of shape {loaded.labels.shape}, not the image's; start anew.")
        self._labels_layer.data[...] = loaded.labels
        loaded.labels = self._labels_layer.data
        names = dict(self.session.label_names) if self.session is not None else {}
        names.update(loaded.label_names)
        loaded.label_names = names
        loaded.content_key = loaded.content_key or key
        self.session = loaded
        self._labels_layer.refresh()
        self._propagated = loaded.confidence is not None
        self._changed_since.clear()
        self._resumable = None
        self.resume_btn.setVisible(False)
        saved = dict(loaded.settings)  # applying one setting rewrites the session's settings from the widget
        for combo, key_ in ((self.method_combo, "method"), (self.device_combo, "device")):
            if saved.get(key_):
                combo.setCurrentText(str(saved[key_]))
        if "image_weight" in saved:
            w = saved["image_weight"]
            self.image_weight_spin.setValue(float(w) if isinstance(w, (int, float)) and w >= 0 else AUTO_IMAGE_WEIGHT)
        self.session.dirty = False
        self._ids_in_use = _ids_in(self._labels_layer.data)
        self._legend_key = None
        n_sugg = sum(1 for _, st in loaded.anchors.items() if st == "suggested")
        msg = (f"Resumed the session saved in {folder}: {len(loaded.anchors)} anchors"
               + (f" ({n_sugg} suggested, to check)" if n_sugg else "")
               + ". Check next, correct, then Propagate.")
        self._set_status(msg)
        _notify("info", msg)
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
            for z in zs:  # what was painted (cheap: only those slices)
                self._ids_in_use |= _ids_in(self.session.labels[z])
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
                "model": self.model_combo.currentText(),
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

    @_guarded
    def _on_series_chosen(self, index: int) -> None:
        uid = self.series_combo.itemData(index)
        current = str(((self._geometry() or {}).get("meta") or {}).get("series_uid") or "")
        if uid is not None and str(uid) != current:
            self.open_series(str(uid))

    @_guarded
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
            from .io import read_volume

            return read_volume(path, series_uid=series_uid)

        def done(vol):
            from ._reader import layer_data_for

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
            self._set_status(f"Check suggested slice {z}: paint a correction, or press Mark anchor "
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
        self._set_status(f"Check slice {z}: paint a correction there (it becomes an anchor), then Propagate.")

    @_guarded
    def mark_anchor(self) -> None:
        """Make the current slice an anchor as it is (add it, or confirm a suggested slice).
        Never removes an anchor: that is :meth:`remove_anchor`."""
        if self.session is None:
            return
        self.flush_edits()
        z = self.current_z()
        before = self.session.anchors.status(z)
        status = self.session.confirm_anchor(z)
        if before != status:
            self._changed_since.add(z)
        what = {None: "is now an anchor", "suggested": "confirmed as it is"}.get(before, "stays an anchor")
        self._set_status(f"Slice {z} {what} ({status}).")
        self._refresh_anchor_list()

    @_guarded
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
        self.session.remove_anchor(z)
        self._changed_since.add(z)  # re-propagation recomputes the merged range around it
        self._set_status(f"Slice {z} is no anchor any more ({status} before); Propagate to recompute around it.")
        self._refresh_anchor_list()
        return True

    @_guarded
    def toggle_lock(self) -> None:
        if self.session is None or self._labels_layer is None:
            return
        label = int(self._labels_layer.selected_label)
        if label == 0:
            _notify("info", "Select a label id (not background) to lock it.")
            return
        name = self.label_names().get(label, f"label_{label}")
        if label in self.session.locked:
            self.session.locked.discard(label)
            _notify("info", f"Label {label} ({name}) unlocked.")
        else:
            self.session.locked.add(label)
            _notify("info", f"Label {label} ({name}) locked: propagation will not change it.")
        self.session.dirty = True
        self._legend_key = None
        self._refresh_anchor_list()

    @_guarded
    def _on_anchor_clicked(self, item: QListWidgetItem) -> None:
        z = item.data(Qt.ItemDataRole.UserRole)
        if z is not None:
            self.goto(int(z))

    @_guarded
    def _on_strip_clicked(self, z: int) -> None:
        if self.session is not None:
            self.goto(int(z))

    @_guarded
    def _on_legend_clicked(self, item: QListWidgetItem) -> None:
        label = item.data(Qt.ItemDataRole.UserRole)
        if label is not None and self._labels_layer is not None:
            self._labels_layer.selected_label = int(label)

    def _refresh_anchor_list(self) -> None:
        self.anchor_list.clear()
        if self.session is None:
            return
        for z, status in self.session.anchors.items():
            item = QListWidgetItem(f"slice {z:4d}   {status}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            item.setIcon(_swatch(ANCHOR_COLORS.get(status, (255, 200, 0))))
            self.anchor_list.addItem(item)
        self.undo_btn.setEnabled(len(self.session.undo_stack) > 0 and self._worker is None)
        locked = ", ".join(str(i) for i in sorted(self.session.locked)) or "none"
        short = locked if len(locked) <= 6 else f"{len(self.session.locked)} locked"
        self.lock_btn.setText(f"Lock label ({short})" if self.session.locked else "Lock label")
        self.lock_btn.setToolTip("Lock/unlock the selected label id: propagation never changes a locked label "
                                 f"(locked: {locked})")
        self._update_plot()
        self._mark_anchors_on_layer()
        self._refresh_legend()

    # ------------------------------------------------------------------ names
    def label_names(self) -> dict[int, str]:
        """``{id: organ name}`` of the working labels: the label file's own map, else the
        reference model's classes (FLARE names for the abdominal starter)."""
        if self.session is not None and self.session.label_names:
            return dict(self.session.label_names)
        names = dict(self.model_label_names)
        names.update(layer_label_names(self._labels_layer))
        return names

    _label_names = label_names  # the name of earlier versions

    def legend_ids(self) -> list[int]:
        """The ids the legend lists: those in use plus the reference model's classes."""
        return sorted((set(self._ids_in_use) | set(self.model_label_names)) - {0})

    def _refresh_legend(self, force: bool = False) -> None:
        """The legend (id, colour, name) and the layer's colours and features table."""
        if self.session is None or self._labels_layer is None:
            return
        names = self.label_names()
        ids = self.legend_ids()
        key = (tuple(ids), tuple(sorted(self._ids_in_use)), tuple(sorted(names.items())), tuple(sorted(self.session.locked)),
               id(self._labels_layer))
        if key == self._legend_key and not force:
            return
        self._legend_key = key
        self.legend.clear()
        for i in ids:
            name = names.get(i, f"label_{i}")
            rgb = label_color(names.get(i), i)
            extra = "   (locked)" if i in self.session.locked else ("" if i in self._ids_in_use else "   ·")
            item = QListWidgetItem(f"{i:3d}  {name}{extra}")
            item.setIcon(_swatch(rgb))
            item.setData(Qt.ItemDataRole.UserRole, i)
            item.setToolTip(f"label {i}: {name}" + ("" if i in self._ids_in_use else " (not drawn yet)"))
            self.legend.addItem(item)
        try:
            style_labels_layer(self._labels_layer, names, set(ids))
        except Exception:  # noqa: BLE001 - an older napari without DirectLabelColormap/features
            log.debug("could not set the label colours", exc_info=True)

    def _mark_anchors_on_layer(self) -> None:
        """Frame each anchor slice on the canvas: a rectangle around the image, in the
        anchor's status colour, with its status written at the top (napari Shapes, shown
        on that slice only)."""
        if self.session is None or self._image_layer is None:
            return
        items = self.session.anchors.items()
        _, ny, nx = self._image_layer.data.shape
        width = max(1.0, 0.012 * max(ny, nx))
        lo, hy, hx = width / 2 - 0.5, ny - 0.5 - width / 2, nx - 0.5 - width / 2  # inside the image's edge
        data = [np.array([[z, lo, lo], [z, lo, hx], [z, hy, hx], [z, hy, lo]], float) for z, _ in items]
        colors = [_rgba(ANCHOR_COLORS.get(st, (255, 200, 0))) for _, st in items]
        statuses = np.array([f"anchor: {st}" for _, st in items], dtype=object)
        layer = next((l for l in self.viewer.layers if l.name == ANCHOR_LAYER), None)
        try:
            if layer is not None and type(_raw(layer)).__name__ != "Shapes":
                self.viewer.layers.remove(layer)  # the points overlay of an earlier version
                layer = None
            if layer is None:
                if not items:
                    return
                layer = _raw(self.viewer.add_shapes(
                    data, shape_type="rectangle", edge_color=colors, face_color="transparent", edge_width=width,
                    name=ANCHOR_LAYER, scale=self._image_layer.scale, translate=self._image_layer.translate,
                    features={"status": statuses},
                    text={"string": "{status}", "anchor": "upper_left", "size": 9, "color": "white",
                          "translation": [0, 2 * width, 2 * width]},
                    opacity=0.9))
                layer.metadata["propseg_overlay"] = True
                if self._labels_layer is not None:
                    self.viewer.layers.selection.active = self._labels_layer
            else:
                layer = _raw(layer)
                layer.data = data
                if items:
                    layer.features = {"status": statuses}
                    layer.edge_color = colors
                    layer.edge_width = width
                layer.scale = self._image_layer.scale
                layer.translate = self._image_layer.translate
                layer.refresh()
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
        self.plot.set_data(self.session.confidence, self.session.anchors.items(), cur, self.session.labels.shape[0])

    # ------------------------------------------------------------------ jobs
    def _busy(self, busy: bool) -> None:
        for b in (self.propagate_btn, self.check_btn, self.mark_btn, self.remove_btn, self.undo_btn, self.export_btn,
                  self.lock_btn, self.series_combo):
            b.setEnabled(not busy)
        self.suggest_btn.setEnabled(not busy and _reference_available())
        self.cancel_btn.setEnabled(busy)
        if not busy and self.session is not None:
            self.undo_btn.setEnabled(len(self.session.undo_stack) > 0)

    def _start(self, fn, on_done, what: str, total: int, job: str) -> None:
        """Run ``fn`` in a worker; ``on_done(result)`` in the GUI thread; ``what`` names the
        progress bar ("Propagating"), ``job`` the job in messages ("Propagation").
        The progress shows in the dock's bar and in napari's activity panel."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._cancel.clear()
        self._job = job
        self._pbar = progress(total=total, desc=what)
        self.progress_bar.setRange(0, max(0, int(total)))  # 0..0: busy indicator
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat(f"{what}: %v / %m" if total else what)
        self.progress_bar.setVisible(True)
        worker = create_worker(fn, _start_thread=False, _ignore_errors=True)  # errors -> self._error
        worker.returned.connect(lambda payload: self._call_safely(on_done, payload))
        worker.errored.connect(self._error)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._busy(True)
        self._set_status(f"{what}…")
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
        self.progress_bar.setRange(0, max(0, int(total)))
        self.progress_bar.setValue(int(step))
        self.progress_bar.setFormat(f"{message}  %v / %m" if message else "%v / %m")

    def _progress_cb(self, step: int, total: int, message: str = "") -> None:
        self._bridge.progressed.emit(int(step), int(total), str(message))

    @_guarded
    def _finished(self) -> None:
        self._worker = None
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            pbar.close()
        self.progress_bar.setVisible(False)
        self._busy(False)
        todo, self._after_job = self._after_job, []
        for fn in todo:
            self._call_safely(fn)

    @_guarded
    def cancel(self) -> None:
        """Ask the running job to stop (it stops within one slice)."""
        self._cancel.set()
        self._set_status("Cancelling…")

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
            self._ids_in_use = _ids_in(self.session.labels)
            weight = getattr(eng, "image_weight", None)
            used = "" if weight is None else f", CT weight {weight:g}" + (" (auto)" if getattr(eng, "image_weight_scores", None) else "")
            self._set_status(f"{what}: {len(zs)} slices changed in {seconds:.1f} s{used}.")
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
        k, device = int(self.k_spin.value()) or None, self.device_combo.currentText()  # 0 = auto: the CLI's default
        model = self.model_combo.currentText() or None
        cancel, progress = self._cancel.is_set, self._progress_cb

        def job():
            from .reference.inference import suggest_slices

            return suggest_slices(volume, k=k, device=device, progress=progress, cancel=cancel, model=model)

        def done(sugg):
            masks = np.asarray(sugg.labels)[list(sugg.slices)]
            zs = self.session.set_suggested(sugg.slices, masks, getattr(sugg, "agreement", None))
            model_names = {int(i): str(n) for i, n in (getattr(sugg, "label_map", None) or {}).items() if int(i) > 0}
            if model_names:  # the classes of the model that made the suggestion
                own = layer_label_names(self._labels_layer)
                self.session.label_names = {**self.session.label_names, **model_names, **own}
            self._labels_layer.refresh()
            self._changed_since.update(zs)
            self._ids_in_use |= _ids_in(masks)
            dropped = getattr(sugg, "dropped", None) or {}
            left_out = ""
            if dropped:
                names = getattr(sugg, "label_map", None) or {}
                organs = sorted({names.get(c, str(c)) for cs in dropped.values() for c in cs})
                left_out = (f" Left out where the two networks disagree ({len(dropped)} slices): {', '.join(organs)};"
                            " draw them by hand there.")
                _notify("info", "Suggest" + left_out)
            self._set_status(f"Suggested {len(zs)} slices ({model}); check and correct them, then Propagate.{left_out}")
            self._refresh_anchor_list()

        from .reference.inference import default_k

        self._start(job, done, "Suggesting", k or default_k(volume.shape[0]), "Suggest")

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
        self._ids_in_use = _ids_in(self.session.labels)
        self._set_status(f"Undid the last {what} ({len(zs)} slices restored; slices corrected since kept).")
        self._refresh_anchor_list()

    # ------------------------------------------------------------------ export
    def export_formats(self) -> list[tuple[str, str, str, str]]:
        """The formats the Export dialog offers: every format of :data:`EXPORT_FORMATS` when
        ``napari_propseg.formats`` is installed, else NIfTI and NRRD."""
        have = _formats_module() is not None
        return [f for f in EXPORT_FORMATS if have or f[0] in BASIC_FORMATS]

    def _export_filters(self) -> list[str]:
        return [f"{label} ({patterns})" for _fmt, label, patterns, _ext in self.export_formats()]

    def _ask_export_path(self, start: Path) -> tuple[str | None, str | None]:
        """The Export file dialog: (path, fmt) or (None, None) when cancelled."""
        formats = self.export_formats()
        filters = self._export_filters()
        path, chosen = QFileDialog.getSaveFileName(self, "Export labels", str(start / "labels.nii.gz"), ";;".join(filters))
        if not path:
            return None, None
        chosen_fmt = next((f for f, flt in zip(formats, filters) if flt == chosen), None)
        inferred = _format_of(path)
        if chosen_fmt is None:
            return path, inferred
        fmt, _label, patterns, ext = chosen_fmt
        if any(fnmatch.fnmatch(Path(path).name.lower(), pat) for pat in patterns.split()):
            return path, fmt  # e.g. DICOM RTSTRUCT chosen, "plan.dcm" typed
        if inferred is not None:
            return path, inferred  # the typed extension wins over the filter
        return path + ext, fmt

    @_guarded
    def export(self, path: str | Path | None = None, fmt: str | None = None) -> Path | None:
        """Write the labels on the original CT grid and a label map JSON (organ names) beside them.

        Args:
            path: the output file; asks with a file dialog (one filter per format) when None.
            fmt: ``"nifti"``, ``"nrrd"``, ``"dicom-seg"``, ``"rtstruct"`` or ``"seg-nrrd"``;
                default: from the file name (``.nii.gz``/``.nii``, ``.nrrd``, ``.seg.nrrd``,
                ``.dcm`` = DICOM SEG). The DICOM and Slicer formats need
                ``napari_propseg.formats``.

        Returns:
            The written label file, or None (cancelled or failed, after a notification).
        """
        if self.session is None:
            return None
        self.flush_edits()
        geometry = self._geometry()
        if path is None:
            start = Path(geometry["path"]).parent if geometry and geometry.get("path") else Path.home()
            path, fmt = self._ask_export_path(start)
            if not path:
                return None
        path = Path(path)
        try:
            fmt = fmt or _format_of(path)
            known = [f[0] for f in EXPORT_FORMATS]
            if fmt not in known:
                raise InputError(f"Cannot tell the export format of {path.name}; use .nii.gz, .nii, .nrrd, .seg.nrrd or "
                                 "a .dcm name, or choose a format in the dialog.")
            if geometry is None:
                raise InputError("The image layer carries no CT geometry; open the CT with PropSeg's reader to export.")
            like = volume_from_geometry(geometry, self.session.labels)
            names = self.label_names()
            present = _ids_in(self.session.labels)
            label_map = {i: names.get(i, f"label_{i}") for i in sorted((present | set(names)) - {0})}
            formats = _formats_module()
            if formats is not None:
                written = Path(formats.export_labels(self.session.labels, like, path, fmt, label_map))
            elif fmt in BASIC_FORMATS:
                from .io import write_labels

                written = Path(write_labels(self.session.labels, like, path))
            else:
                label = next(f[1] for f in EXPORT_FORMATS if f[0] == fmt)
                raise InputError(f"{label} export needs the napari_propseg.formats module, which this installation "
                                 "lacks; export NIfTI or NRRD instead.")
            from .labelmap import write_label_map

            json_path = write_label_map(label_map, _label_map_path(written))
        except (InputError, OSError) as exc:
            self._error(exc)
            return None
        msg = f"Labels written to {written} (label map {json_path.name}, {len(present)} labels)."
        self._set_status(msg)
        _notify("info", msg)
        return written

    @_guarded
    def _autosave(self, force: bool = False) -> None:
        self.flush_edits()
        if self.session is None or (not force and not self.session.dirty):
            return
        if self._resumable is not None and self.session.saved_path is None:
            # a saved session was offered and not resumed (or was damaged and not replaced):
            # keep it aside instead of writing over it
            folder = Path(self._resumable)
            target = None
            if self.session.geometry is not None:
                target = session_dir(self.session.geometry, self.session.settings.get("session_folder"))
            if target is not None and target.resolve() == folder.resolve():
                moved = keep_aside(folder, "broken" if self._resumable_broken else "previous")
                if moved:
                    _notify("info", f"The earlier session in {folder} was not resumed; it is kept as "
                            f"{', '.join(p.name for p in moved)} and this session is saved instead.")
            self._resumable = None
            self.resume_btn.setVisible(False)
        try:
            self.session.settings.update(self._settings())
            self.session.save(self.session.settings.get("session_folder"))
        except InputError as exc:
            _notify("warning", f"Autosave failed: {exc}")

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, CancelledError):
            msg = f"{self._job} cancelled; the labels are unchanged."
            self._set_status(msg)
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
        self._set_status(msg)
        _notify("error", msg)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._autosave()
        self._cancel.set()
        super().closeEvent(event)


_LABEL_EXTS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _format_of(path: str | Path) -> str | None:
    """The export format a file name asks for (None when it does not say)."""
    name = str(path).lower()
    for ext, fmt in ((".seg.nrrd", "seg-nrrd"), (".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"),
                     (".dcm", "dicom-seg")):
        if name.endswith(ext):
            return fmt
    return None


def _label_map_path(label_file: Path) -> Path:
    """``<stem>.labels.json`` beside a label file (``case.nii.gz`` -> ``case.labels.json``)."""
    label_file = Path(label_file)
    name = label_file.name
    if label_file.is_dir():
        return label_file.parent / (name + ".labels.json")
    for ext in _LABEL_EXTS:
        if name.lower().endswith(ext):
            return label_file.with_name(name[: -len(ext)] + ".labels.json")
    return label_file.with_name(re.sub(r"\.[^.]*$", "", name) + ".labels.json")
