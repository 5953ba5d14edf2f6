"""napari glue: the image and Labels layers the widget works on, their names and colours,
and the anchor frames on the canvas.

:class:`LayersMixin` (part of :class:`~napari_propseg._widget.widget.PropSegWidget`) binds
a :class:`~napari_propseg.session.Session` to the chosen image and Labels layers, turns
paint events into anchors and keeps the dock's anchor list, slice strip and legend in step.

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
* reader preference (:func:`ensure_reader_preference`): the first time the widget is
  loaded, PropSeg becomes napari's preferred reader for the CT file patterns of
  :data:`READER_PATTERNS` that have no preference yet (napari's documented
  ``settings.plugins.extension2reader`` setting, the one the "remember my choice" box of
  napari's reader dialog writes). A choice the user made is never changed; Preferences >
  Plugins changes it back.
"""
from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QListWidgetItem

from ..labelcolors import label_color
from ..preprocess import DISPLAY_PRESETS
from ..session import META_KEY, Session, content_key, ids_in, slices_from_paint_atoms
from . import common
from .common import guarded
from .panel import ANCHOR_COLORS, ANCHOR_LAYER, NEW_LABELS, swatch

log = logging.getLogger(__name__)

#: File patterns PropSeg becomes napari's preferred reader for (when the user has no preference).
READER_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm")
PLUGIN_NAME = "napari-propseg"


def _raw(obj):
    """The napari object behind a ``PublicOnlyProxy`` (napari hands plugin widgets a proxied
    viewer whose ``add_*`` return proxies, which are never ``is`` the layers in the list)."""
    return getattr(obj, "__wrapped__", obj)


def _same(a, b) -> bool:
    return a is not None and b is not None and _raw(a) is _raw(b)


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


def _model_label_names() -> dict[int, str]:
    """The default reference model's classes ``{id: name}`` (no background): its
    ``labels.json`` / the weights' ``label_names``, else the FLARE names of the abdominal
    starter model."""
    from ..labelmap import FLARE_NAMES

    try:
        from ..reference.models import find_model

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
        from ..formats import label_map_path

        json_path = label_map_path(Path(path))
        if not json_path.is_file():
            return {}
        from ..labelmap import read_label_map

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


# --------------------------------------------------------------------------- the mixin


class LayersMixin:
    """The napari-layer half of the widget (needs the attributes of :func:`build_panel`)."""

    def _image_layers(self):
        from napari.layers import Image

        return [_raw(l) for l in self.viewer.layers if isinstance(l, Image) and l.ndim == 3 and not l.rgb]

    def _labels_layers(self):
        from napari.layers import Labels

        return [_raw(l) for l in self.viewer.layers if isinstance(l, Labels) and l.ndim == 3]

    @guarded
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
                style_labels_layer(layer, names, ids_in(layer.data))
                layer.metadata["propseg_styled"] = True
            except Exception:  # noqa: BLE001 - cosmetic
                log.debug("could not style %s", layer.name, exc_info=True)

    @property
    def image_layer(self):
        return self._image_layer

    @property
    def labels_layer(self):
        return self._labels_layer

    @guarded
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
                common.notify("warning", f"Labels layer '{labels.name}' has shape {labels.data.shape}, not the image's "
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
        self._overlay_key = None
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
        self._ids_in_use = ids_in(labels.data)
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

    @guarded
    def _on_data_replaced(self, event=None) -> None:
        if self.session is not None and self._labels_layer is not None and self._worker is None:
            if self._labels_layer.data is not self.session.labels:
                self.session.labels = self._labels_layer.data

    @guarded
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
            self.session.record_edit(zs)  # anchors, and changed for the next run
            for z in zs:  # what was painted (cheap: only those slices)
                self._ids_in_use |= ids_in(self.session.labels[z])
            self._refresh_anchor_list()
        except Exception as exc:  # noqa: BLE001 - called from a timer: never raise into Qt
            self._error(exc)
        return zs

    def _refresh_anchor_list(self) -> None:
        self.anchor_list.clear()
        if self.session is None:
            return
        for z, status in self.session.anchors.items():
            item = QListWidgetItem(f"slice {z:4d}   {status}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            item.setIcon(swatch(ANCHOR_COLORS.get(status, (255, 200, 0))))
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
            item.setIcon(swatch(rgb))
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
        key = (tuple(items), ny, nx, tuple(self._image_layer.scale), tuple(self._image_layer.translate))
        layer = next((l for l in self.viewer.layers if l.name == ANCHOR_LAYER), None)
        if layer is not None and self._overlay_key == (key, id(_raw(layer))):
            return  # drawn as it is (napari Shapes updates cost tens of ms)
        width = max(1.0, 0.012 * max(ny, nx))
        lo, hy, hx = width / 2 - 0.5, ny - 0.5 - width / 2, nx - 0.5 - width / 2  # inside the image's edge
        data = [np.array([[z, lo, lo], [z, lo, hx], [z, hy, hx], [z, hy, lo]], float) for z, _ in items]
        colors = [_rgba(ANCHOR_COLORS.get(st, (255, 200, 0))) for _, st in items]
        statuses = np.array([f"anchor: {st}" for _, st in items], dtype=object)
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
            self._overlay_key = (key, id(layer))
        except Exception:  # noqa: BLE001 - the overlay is cosmetic
            log.debug("anchor overlay failed", exc_info=True)

    @guarded
    def _update_plot(self, event=None) -> None:
        if self.session is None:
            return
        try:
            cur = self.current_z()
        except Exception:  # noqa: BLE001
            cur = None
        self.plot.set_data(self.session.confidence, self.session.anchors.items(), cur, self.session.labels.shape[0])

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
