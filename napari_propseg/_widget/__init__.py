"""The PropSeg dock widget (napari plugin): suggest, correct, propagate, check, undo, export.

A package of small parts: :mod:`.panel` (layout, constants, the slice strip),
:mod:`.layers` (napari layer glue: binding, names and colours, anchor frames),
:mod:`.jobs` (workers, progress, the stepwise write-back of a run), :mod:`.files`
(resume, autosave, export) and :mod:`.widget` (:class:`PropSegWidget`, which combines
them). The workflow state is :class:`napari_propseg.session.Session`, free of Qt.

napari's manifest names ``napari_propseg._widget:PropSegWidget``.
"""
from .common import guarded, notify
from .layers import READER_PATTERNS, PLUGIN_NAME, ensure_reader_preference, layer_label_names, style_labels_layer
from .panel import (
    ANCHOR_COLORS,
    ANCHOR_LAYER,
    AUTO_IMAGE_WEIGHT,
    AUTOSAVE_SECONDS,
    NEW_LABELS,
    SHORTCUT_HELP,
    SHORTCUTS,
    STATUS_MAX_CHARS,
    ConfidencePlot,
)
from .widget import PropSegWidget

__all__ = [
    "ANCHOR_COLORS", "ANCHOR_LAYER", "AUTO_IMAGE_WEIGHT", "AUTOSAVE_SECONDS", "NEW_LABELS", "PLUGIN_NAME",
    "READER_PATTERNS", "SHORTCUT_HELP", "SHORTCUTS", "STATUS_MAX_CHARS", "ConfidencePlot", "PropSegWidget",
    "ensure_reader_preference", "guarded", "layer_label_names", "notify", "style_labels_layer",
]
