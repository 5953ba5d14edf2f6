"""napari reader: CT volumes (NIfTI, NRRD, MetaImage, DICOM series folders) with geometry.

The layer gets ``scale`` = spacing, ``translate`` = physical position and the image
geometry in ``metadata["propseg_volume"]`` (see :mod:`napari_propseg.session`), so a
Labels layer drawn on it is written back onto the file's own grid and orientation.
Integer volumes with few distinct values (label files) open as Labels layers.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: A non-negative integer volume with at most this many distinct values is a label map
#: (TotalSegmentator v2 has 117 classes; an 8-bit grey image has more values).
MAX_LABEL_IDS = 128
#: ... or up to this many when the file name says so (seg, label, mask).
MAX_LABEL_IDS_NAMED = 4096
_LABEL_WORDS = ("seg", "label", "mask")
DEFAULT_PRESET = "abdomen"

LayerData = list[tuple]


def napari_get_reader(path: str | list[str]) -> Callable[[Any], LayerData] | None:
    """npe2 ``get_reader`` hook: a reader function for ``path``, or None if not ours.

    Never raises: paths we do not take (unknown extension, folder without DICOM files,
    missing path) give None so napari can try other readers.
    """
    try:
        from .io import is_readable_path

        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths or not all(is_readable_path(p) or _is_label_object_file(p) for p in paths):
            return None  # (a SEG/RTSTRUCT file may have no .dcm ending)
    except Exception:  # noqa: BLE001 - a reader hook must never raise
        log.debug("napari_get_reader declined %r", path, exc_info=True)
        return None
    return read_layers


def _looks_like_labels(arr: np.ndarray, path: str | None = None) -> bool:
    """Whether a volume is a label map: non-negative integers with few distinct values."""
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        return False
    name = os.path.basename(os.path.normpath(path)).lower() if path else ""
    limit = MAX_LABEL_IDS_NAMED if any(w in name for w in _LABEL_WORDS) else MAX_LABEL_IDS
    sample = arr[:: max(1, arr.shape[0] // 16), ::4, ::4]
    if sample.size and sample.min() < 0:
        return False
    return np.unique(sample).size <= limit and arr.min() >= 0 and np.unique(arr).size <= limit


def layer_data_for(vol: Any, name: str | None = None) -> tuple:
    """(data, kwargs, layer_type) for one canonical-LPS Volume.

    CT images get the abdomen window as contrast limits (the widget switches presets);
    label volumes become a Labels layer.
    """
    from .preprocess import DISPLAY_PRESETS
    from .session import layer_kwargs

    if name is None:
        from .filenames import split_extension

        name = split_extension(os.path.basename(os.path.normpath(vol.path)))[0] if vol.path else "CT"
    kwargs = layer_kwargs(vol, name)
    if _looks_like_labels(vol.array, vol.path):
        return vol.array, kwargs, "labels"
    kwargs.update(colormap="gray", contrast_limits=tuple(DISPLAY_PRESETS[DEFAULT_PRESET]))
    kwargs["metadata"]["propseg_preset"] = DEFAULT_PRESET
    return vol.array, kwargs, "image"


def read_layers(path: str | list[str]) -> LayerData:
    """Read one or several volumes into napari layer data.

    On bad input (truncated file, 2-D/4-D image, ...) a napari error notification says
    what is wrong and the empty-file sentinel ``[(None,)]`` is returned, so napari adds
    nothing and raises nothing.
    """
    from .errors import InputError
    from .io import read_volume

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: LayerData = []
    for p in paths:
        try:
            if _is_label_object_file(p):  # a DICOM SEG / RTSTRUCT: a Labels layer on its series' grid
                from .formats import read_label_object, reference_image

                lab, names = read_label_object(p, reference_image(p))
                out.append(labels_layer_data(lab, names))
                continue
            vol = read_volume(p)
            extra = _label_objects_beside(p, vol)
        except InputError as exc:
            _notify_error(str(exc))
            return [(None,)]
        except Exception as exc:  # noqa: BLE001 - never raise into napari's event loop
            log.exception("unexpected error reading %s", p)
            _notify_error(f"{p} could not be read ({type(exc).__name__}: {exc}); check the file or report a bug.")
            return [(None,)]
        notice = vol.meta.get("notice")
        if notice:
            _notify_info(str(notice))
        data = layer_data_for(vol)
        if data[2] == "labels":
            data = _with_label_names(data, p)
        out.append(data)
        out.extend(extra)
    return out


def _is_label_object_file(p) -> bool:
    from .formats import is_label_object

    return os.path.isfile(p) and is_label_object(p)


def _label_objects_beside(p, vol: Any) -> LayerData:
    """Labels layers for the DICOM SEG / RTSTRUCT files in a series folder that reference it."""
    if not os.path.isdir(p):
        return []
    from .errors import InputError
    from .formats import read_label_object
    from .formats.dicom import label_object_files

    layers: LayerData = []
    for f, _kind in label_object_files(p):
        try:
            lab, names = read_label_object(f, vol)
        except InputError as exc:  # e.g. it references another series of the folder
            log.info("not opened with the series: %s", exc)
            continue
        layers.append(labels_layer_data(lab, names))
    return layers


def _with_label_names(data: tuple, path) -> tuple:
    """A Labels layer tuple with the names of its label map (``<stem>.labels.json``, .seg.nrrd header)."""
    try:
        from .formats import label_names_for

        names = label_names_for(path)
    except Exception:  # noqa: BLE001 - names are optional
        names = {}
    if not names:
        return data
    arr, kwargs, kind = data
    kwargs.update(_label_kwargs(names, kwargs.get("metadata", {})))
    return arr, kwargs, kind


def _label_kwargs(names: dict, metadata: dict, colors: dict | None = None) -> dict:
    """``metadata`` (with ``propseg_label_names``), ``features`` (hover shows the name) and a
    direct ``colormap`` (labelcolors) for a Labels layer with named labels."""
    from .labelcolors import label_color

    names = {int(k): str(v) for k, v in names.items() if int(k) > 0}
    colors = {int(k): tuple(v) for k, v in (colors or {}).items()}
    meta = dict(metadata)
    meta["propseg_label_names"] = dict(names)
    ids = sorted(names)
    cmap: dict = {None: (0.5, 0.5, 0.5, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for i in range(1, max([255] + ids) + 1):
        if i in names or i < 256:
            rgb = colors.get(i) or label_color(names.get(i), i)
            cmap[i] = tuple(c / 255.0 for c in rgb) + (1.0,)
    return {
        "metadata": meta,
        "features": {"index": [0] + ids, "name": ["background"] + [names[i] for i in ids]},
        "colormap": cmap,
    }


def labels_layer_data(lab: Any, names: dict) -> tuple:
    """(data, kwargs, "labels") for labels read from a SEG/RTSTRUCT, with names and colours."""
    from .session import layer_kwargs

    base = os.path.basename(os.path.normpath(lab.path)) if lab.path else "labels"
    if base.lower().endswith(".dcm"):
        base = base[:-4]
    kind = (lab.meta.get("label_object") or {}).get("kind", "labels")
    kwargs = layer_kwargs(lab, f"{base} ({kind})")
    kwargs.update(_label_kwargs(names, kwargs["metadata"], lab.meta.get("label_colors")))
    return lab.array, kwargs, "labels"


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # noqa: BLE001
        log.error("%s", message)


def _notify_info(message: str) -> None:
    try:
        from napari.utils.notifications import show_info

        show_info(message)
    except Exception:  # noqa: BLE001
        log.info("%s", message)
