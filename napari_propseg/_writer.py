"""napari writer: a Labels layer onto its CT's original grid (NIfTI .nii.gz/.nii or NRRD).

The geometry comes from the layer's ``metadata["propseg_volume"]`` (set by our reader,
sample data and widget). A Labels layer created with napari's own "new labels" button
has no such metadata: then the Image layer of the current viewer with the same shape and
a stored geometry is used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _geometry_from_viewer(shape: tuple) -> dict | None:
    from .session import META_KEY

    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001
        return None
    if viewer is None:
        return None
    for layer in viewer.layers:
        geom = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        if geom and tuple(geom["shape"]) == tuple(shape):
            return geom
    return None


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels layers.

    Args:
        path: target ``.nii.gz``, ``.nii`` or ``.nrrd``.
        data: (Z, Y, X) integer labels.
        meta: the layer's attributes (napari passes ``metadata``, ``scale``, ...).

    Returns:
        ``[path]`` on success (with a warning notification when every voxel is
        background); ``[]`` after a napari error notification otherwise (full disk,
        read-only or missing folder, no geometry: nothing written, an existing file
        untouched, no temporary file left).
    """
    from .errors import InputError
    from .io import write_labels as io_write_labels
    from .session import META_KEY, volume_from_geometry

    arr = np.asarray(data)
    geom = (meta.get("metadata") or {}).get(META_KEY) or _geometry_from_viewer(arr.shape)
    try:
        if geom is None:
            raise InputError(
                f"The labels layer '{meta.get('name', '')}' carries no image geometry; draw it on a CT opened with "
                "PropSeg (or create it from the PropSeg widget) so it can be written on the CT's grid."
            )
        like = volume_from_geometry(geom, arr)
        written = io_write_labels(arr, like, path)
    except InputError as exc:  # OutputError too: full disk, read-only folder (nothing written)
        _notify_error(str(exc))
        return []
    except OSError as exc:  # anything the atomic writer did not turn into one sentence
        _notify_error(f"Could not write {path}: {exc.strerror or exc}; nothing was changed there.")
        return []
    if not arr.any():
        _notify_warning(f"{Path(written).name} was written but holds no label (every voxel is background).")
    log.info("labels written to %s", written)
    return [str(Path(written))]


def _notify_warning(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(message)
    except Exception:  # noqa: BLE001
        log.warning("%s", message)


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # noqa: BLE001
        log.error("%s", message)
