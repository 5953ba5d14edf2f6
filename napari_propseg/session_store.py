"""Where a labeling session lives on disk, and the image geometry it is tied to (no Qt).

* the geometry of the image a layer came from (:func:`geometry_of`,
  :func:`volume_from_geometry`, :func:`layer_kwargs`), carried in napari layer
  ``metadata`` under :data:`META_KEY` so that labels drawn on the image are written back
  onto its grid;
* the session files: :func:`write_session` writes a :class:`SessionSnapshot` atomically
  (labels, anchors, locks, settings, names, confidence), :func:`read_session` reads one
  back, :func:`find_session` finds the session of an image. A session is recognised by
  the image's content (:func:`content_key`: the SeriesInstanceUID of a DICOM series, else
  a digest of the grid and a subsample of voxels), so it follows the files when the case
  folder is moved: the ``<image>.propseg/`` folder beside the image stays the primary
  location, and a small index in the cache folder (:func:`session_index_dir`) finds a
  session left behind. A damaged session file raises :class:`BrokenSessionError`;
  :func:`quarantine_session` keeps it aside.

:class:`napari_propseg.session.Session` (the workflow state) saves and loads through
this module; everything here is re-exported by :mod:`napari_propseg.session`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .errors import InputError
from .filenames import split_extension
from .formats import format_from_path, label_map_path

log = logging.getLogger(__name__)

#: Key of the geometry dict in a napari layer's ``metadata``.
META_KEY = "propseg_volume"
#: Suffix of the session folder written beside the image.
SESSION_SUFFIX = ".propseg"
#: Version of the on-disk session format.
SESSION_FORMAT = "propseg-session/1"
#: Environment variable overriding the folder of sessions for images without a path.
SESSION_HOME_ENV = "PROPSEG_SESSION_HOME"
#: Number of voxels (about) that :func:`content_key` reads from the image.
CONTENT_SAMPLE = 4096


class BrokenSessionError(InputError):
    """A saved session exists but one of its files cannot be read (truncated, damaged).

    Attributes:
        folder: the session folder.
        file: the unreadable file.
    """

    def __init__(self, message: str, folder: Path, file: Path):
        super().__init__(message)
        self.folder = Path(folder)
        self.file = Path(file)


# --------------------------------------------------------------------------- geometry


def geometry_of(vol: Any) -> dict:
    """The geometry of a :class:`~napari_propseg.io.Volume` as plain Python types.

    Args:
        vol: a Volume (its ``array`` is only used for its shape and is not kept).

    Returns:
        :meth:`Volume.to_metadata` (``spacing`` (sz, sy, sx) mm, ``origin`` (x, y, z) mm,
        flat ``direction``, ``path``, ``source`` = the file-layout record
        :func:`napari_propseg.io.write_labels` needs) plus ``shape`` (Z, Y, X) and the
        JSON-able entries of ``meta``. Small, deep-copyable and JSON-serialisable.
    """
    meta = {}
    for k, v in (vol.meta or {}).items():
        try:
            json.dumps(v, default=_json_default)
        except (TypeError, ValueError):
            continue
        meta[str(k)] = v
    geom = _jsonable(vol.to_metadata())
    geom["shape"] = [int(s) for s in vol.array.shape]
    geom["meta"] = _jsonable(meta)
    return geom


def volume_from_geometry(geometry: dict, array: np.ndarray) -> Any:
    """Rebuild a Volume from :func:`geometry_of`'s dict and an array on that grid.

    Args:
        geometry: the dict stored in layer metadata or a session file.
        array: (Z, Y, X) array whose shape equals ``geometry["shape"]``.

    Returns:
        A :class:`~napari_propseg.io.Volume` that :func:`napari_propseg.io.write_labels`
        accepts as ``like``.

    Raises:
        InputError: the array's shape differs from the geometry's, or the geometry is
            incomplete.
    """
    from .io import Volume

    array = np.asarray(array)
    shape = tuple(int(s) for s in geometry.get("shape", array.shape))
    if array.shape != shape:
        raise InputError(
            f"The labels have shape {array.shape} but the image they belong to has shape {shape}; "
            "draw them on a Labels layer created on that image."
        )
    vol = Volume.from_metadata(array, geometry)
    vol.meta = dict(geometry.get("meta") or {})
    return vol


def layer_kwargs(vol: Any, name: str) -> dict:
    """napari layer keyword arguments placing ``vol`` at its physical position.

    Args:
        vol: a canonical-LPS Volume.
        name: layer name.

    Returns:
        dict with ``name``, ``scale`` = spacing (sz, sy, sx), ``translate`` = the physical
        (z, y, x) of voxel (0, 0, 0) (canonical volumes have a near-identity direction)
        and ``metadata`` holding :func:`geometry_of` under :data:`META_KEY`.
    """
    return {
        "name": name,
        "scale": tuple(float(s) for s in vol.spacing),
        "translate": tuple(float(o) for o in vol.origin[::-1]),
        "metadata": {META_KEY: geometry_of(vol)},
    }


def fingerprint(geometry: dict) -> str:
    """Short hash identifying an image (path, shape, spacing, origin) for resume."""
    key = json.dumps(
        {
            "path": os.path.abspath(geometry["path"]) if geometry.get("path") else None,
            "shape": list(geometry["shape"]),
            "spacing": [round(float(s), 4) for s in geometry["spacing"]],
            "origin": [round(float(o), 3) for o in geometry["origin"]],
        },
        sort_keys=True,
    )
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def content_key(geometry: dict | None, image: Any = None) -> str | None:
    """A key of the image's content that stays the same when its files are moved or copied.

    A DICOM series is known by its SeriesInstanceUID (and grid); any other image by a
    digest of its grid (shape, spacing, origin, direction) and of about
    :data:`CONTENT_SAMPLE` voxels sampled on a regular lattice of ``image``. The path is
    not part of it.

    Args:
        geometry: :func:`geometry_of` of the image (None: no key).
        image: the (Z, Y, X) image voxels (any array-like supporting strided slicing);
            without it (and without a series UID) there is no key.

    Returns:
        A 24-character key (``dicom-...`` or ``image-...``), or None.
    """
    if not geometry:
        return None
    try:
        shape = [int(v) for v in geometry["shape"]]
        grid = {
            "shape": shape,
            "spacing": [round(float(v), 4) for v in geometry["spacing"]],
            "origin": [round(float(v), 3) for v in geometry["origin"]],
            "direction": [round(float(v), 4) for v in np.asarray(geometry.get("direction", np.eye(3)), float).ravel()],
        }
    except (KeyError, TypeError, ValueError):
        return None
    uid = str((geometry.get("meta") or {}).get("series_uid") or "")
    h = hashlib.sha1(json.dumps(grid, sort_keys=True).encode())
    if uid:
        h.update(b"uid:" + uid.encode())
        return "dicom-" + h.hexdigest()[:18]
    if image is None:
        return None
    try:
        arr = image
        if tuple(int(v) for v in arr.shape) != tuple(shape):
            return None
        per_axis = max(1, round(CONTENT_SAMPLE ** (1 / 3)))
        steps = [max(1, n // per_axis) for n in shape]
        sample = np.asarray(arr[:: steps[0], :: steps[1], :: steps[2]])
    except Exception:  # noqa: BLE001 - an odd array type: no key, the path-based fingerprint stays
        log.debug("no content key for this image", exc_info=True)
        return None
    h.update(np.ascontiguousarray(sample.astype(np.float64)).round(3).tobytes())
    return "image-" + h.hexdigest()[:18]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _jsonable(obj: Any) -> Any:
    """Plain lists/dicts/numbers copy of ``obj`` (numpy arrays -> nested lists)."""
    return json.loads(json.dumps(obj, default=_json_default))


# --------------------------------------------------------------------------- where sessions live


def default_session_home() -> Path:
    """Folder of sessions for images without a file (the phantom) or a read-only folder."""
    env = os.environ.get(SESSION_HOME_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-propseg" / "sessions"


def session_index_dir() -> Path:
    """Folder of the content-keyed index of sessions (``<session home>/index``): one small
    ``<content key>.json`` per image naming its session folder, so a session is found
    after the image (or the session folder) was moved."""
    return default_session_home() / "index"


def _index_file(key: str) -> Path:
    return session_index_dir() / f"{key}.json"


def session_dir(geometry: dict, folder: str | os.PathLike | None = None) -> Path:
    """Where the session of an image is saved.

    Args:
        geometry: :func:`geometry_of` of the image.
        folder: a chosen folder; default: beside the image file or DICOM folder
            (``ct.nii.gz`` -> ``ct.propseg/``), or :func:`default_session_home` for an
            image without a path.

    Returns:
        The session folder (not created). A DICOM folder holding several series keeps one
        session per series: the series read by default (most slices) in ``<folder>.propseg``,
        any other in ``<folder>.series-<8 hex digits of its UID>.propseg``.
    """
    path = geometry.get("path")
    if path:
        p = Path(path)
        stem = split_extension(p.name)[0]
        name = stem + _series_tag(geometry) + SESSION_SUFFIX
        base = Path(folder) if folder is not None else p.parent
    else:
        name = "image-" + fingerprint(geometry) + SESSION_SUFFIX
        base = Path(folder) if folder is not None else default_session_home()
    return base.expanduser() / name


def _series_tag(geometry: dict) -> str:
    """``.series-<hash>`` for a DICOM series that is not its folder's default one, else ''."""
    meta = geometry.get("meta") or {}
    uid = str(meta.get("series_uid") or "")
    series = [s for s in (meta.get("series") or []) if isinstance(s, dict)]
    if not uid or len(series) < 2 or str(series[0].get("uid") or "") == uid:
        return ""
    return ".series-" + hashlib.sha1(uid.encode()).hexdigest()[:8]



# --------------------------------------------------------------------------- session files


@dataclass
class SessionSnapshot:
    """Everything a session file holds, detached from the live session (safe to write
    from another thread while the clinician keeps painting).

    Attributes:
        labels: (Z, Y, X) labels (a copy).
        geometry: :func:`geometry_of` of the image, or None (then a folder is needed).
        content_key: :func:`content_key` of the image.
        anchors: ``[[z, status], ...]``.
        locked: locked label ids.
        suggest_agreement: suggested slice -> the reference networks' agreement.
        label_names: ``{id: organ name}``.
        settings: JSON-able widget settings.
        confidence: (Z,) per-slice confidence, or None.
    """

    labels: np.ndarray
    geometry: dict | None = None
    content_key: str | None = None
    anchors: list = field(default_factory=list)
    locked: list = field(default_factory=list)
    suggest_agreement: dict = field(default_factory=dict)
    label_names: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    confidence: np.ndarray | None = None


def write_session(snap: SessionSnapshot, folder: str | os.PathLike | None = None) -> Path:
    """Write a session atomically and index it by its content key (best effort).

    The labels go to a new ``labels-<n>.npz``; ``session.json`` (which names it) is then
    replaced in one rename, so a crash leaves the previous session readable.

    Args:
        snap: what to write.
        folder: where the session folder goes (see :func:`session_dir`).

    Returns:
        The session folder.

    Raises:
        InputError: the folder cannot be written, or there is no image path and no folder.
    """
    if snap.geometry is None and folder is None:
        raise InputError("This labels volume has no image file; choose a folder to save the session in.")
    geometry = snap.geometry or {"shape": list(snap.labels.shape), "spacing": [1, 1, 1], "origin": [0, 0, 0],
                                 "direction": np.eye(3).tolist(), "path": None, "source": {}, "meta": {}}
    target = session_dir(geometry, folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        old = _read_json(target / "session.json")
        counter = int(old.get("counter", 0)) + 1 if old else 1
        labels_name = f"labels-{counter}.npz"
        while (target / labels_name).exists():  # e.g. left by a session.json that is now damaged
            counter += 1
            labels_name = f"labels-{counter}.npz"
        confidence = snap.confidence if snap.confidence is not None else np.zeros(0, np.float32)
        atomic_write(target / labels_name,
                     lambda tmp: np.savez_compressed(tmp, labels=snap.labels, confidence=confidence),
                     what="session labels")
        doc = {
            "format": SESSION_FORMAT,
            "counter": counter,
            "fingerprint": fingerprint(geometry),
            "content_key": snap.content_key,
            "geometry": geometry,
            "labels_file": labels_name,
            "anchors": [list(a) for a in snap.anchors],
            "locked": sorted(int(i) for i in snap.locked),
            "suggest_agreement": {str(z): float(a) for z, a in snap.suggest_agreement.items()},
            "label_names": {str(int(k)): str(v) for k, v in sorted(snap.label_names.items())},
            "settings": _jsonable(snap.settings),
            "saved_at": time.time(),
        }
        atomic_write_text(target / "session.json", json.dumps(doc, indent=1), what="session file")
        for stale in target.glob("labels-*.npz"):
            if stale.name != labels_name:
                stale.unlink(missing_ok=True)
    except InputError as exc:  # OutputError of the atomic writer: one sentence already
        raise InputError(f"Cannot save the session in {target}: {exc}") from exc
    except OSError as exc:
        raise InputError(f"Cannot save the session in {target}: {exc.strerror or exc}; choose a writable folder.") from exc
    _write_index(snap, target)
    log.info("session saved in %s", target)
    return target


def _write_index(snap: SessionSnapshot, target: Path) -> None:
    """Record ``content key -> session folder`` in the cache folder (best effort)."""
    if not snap.content_key:
        return
    entry = {"folder": str(Path(target).resolve()), "image": (snap.geometry or {}).get("path"),
             "saved_at": time.time()}
    try:
        session_index_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(_index_file(snap.content_key), json.dumps(entry, indent=1), what="session index entry")
    except (InputError, OSError) as exc:
        log.warning("could not index the session %s: %s", target, exc)


def read_session(folder: str | os.PathLike, geometry: dict | None = None,
                 content_key: str | None = None) -> tuple[SessionSnapshot, float]:
    """Read a session folder written by :func:`write_session`.

    Args:
        folder: the session folder.
        geometry: the open image's geometry; when given, the session must belong to it
            (same content key when both sides have one, else same fingerprint), else
            InputError. The snapshot carries it (else the saved one).
        content_key: :func:`content_key` of the open image.

    Returns:
        ``(snapshot, saved_at)``; the snapshot's confidence is None unless it has one value
        per slice.

    Raises:
        BrokenSessionError: the session file or its labels are damaged (truncated).
        InputError: no session there, or one of another image.
    """
    folder = Path(folder)
    remove_stale_temporaries(folder)
    doc_path = folder / "session.json"
    doc = _read_json(doc_path)
    if doc is None and doc_path.is_file():
        raise BrokenSessionError(f"The session file {doc_path} is damaged (not readable JSON).", folder, doc_path)
    if not doc or doc.get("format") != SESSION_FORMAT:
        raise InputError(f"{folder} holds no readable PropSeg session; start a new one or pick another folder.")
    if geometry is not None and not _belongs(doc, geometry, content_key):
        raise InputError(
            f"The session in {folder} belongs to another image ({(doc.get('geometry') or {}).get('path')}); "
            "open that image to resume it."
        )
    labels_path = folder / str(doc.get("labels_file"))
    if not labels_path.is_file():
        raise BrokenSessionError(f"The labels file {labels_path} of the session is missing.", folder, labels_path)
    try:
        with np.load(labels_path) as z:
            labels = z["labels"].copy()
            conf = z["confidence"].copy()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, KeyError, ...
        raise BrokenSessionError(
            f"The labels file {labels_path} of the session is damaged ({type(exc).__name__}: {exc}).", folder, labels_path
        ) from exc
    snap = SessionSnapshot(
        labels=labels,
        geometry=geometry or doc["geometry"],
        content_key=content_key or doc.get("content_key"),
        anchors=[list(a) for a in doc.get("anchors") or []],
        locked=[int(i) for i in doc.get("locked") or []],
        suggest_agreement={int(z): float(a) for z, a in (doc.get("suggest_agreement") or {}).items()},
        label_names={int(k): str(v) for k, v in (doc.get("label_names") or {}).items()},
        settings=doc.get("settings") or {},
        confidence=conf if conf.size == labels.shape[0] else None,
    )
    return snap, float(doc.get("saved_at") or 0.0)


def _belongs(doc: dict, geometry: dict, key: str | None) -> bool:
    """Whether a session document is of this image: by content key when both have one,
    else (older sessions, images without voxels) by the path-based fingerprint."""
    if key and doc.get("content_key"):
        return doc["content_key"] == key
    try:
        return doc.get("fingerprint") == fingerprint(geometry)
    except (KeyError, TypeError, ValueError):
        return False


def find_session(geometry: dict, folder: str | os.PathLike | None = None,
                 content_key: str | None = None) -> Path | None:
    """The saved session of this image, if any. Never raises.

    Looks beside the image first (:func:`session_dir`; a session folder moved with its
    image is recognised by ``content_key``), then in the content-keyed index of the cache
    folder (a session left behind when the image alone was moved). Stale temporary files
    of a killed save are removed from the folder found.

    Returns:
        The session folder; also a folder whose ``session.json`` is damaged (then
        :meth:`Session.load` raises :class:`BrokenSessionError`), or None.
    """
    candidates: list[Path] = []
    try:
        candidates.append(session_dir(geometry, folder))
    except (KeyError, TypeError, ValueError):
        pass
    if content_key:
        entry = _read_json(_index_file(content_key))
        if entry and entry.get("folder"):
            candidates.append(Path(entry["folder"]))
    for i, target in enumerate(candidates):
        try:
            doc_path = target / "session.json"
            if not doc_path.is_file():
                continue
            remove_stale_temporaries(target)
            doc = _read_json(doc_path)
            if doc is None:
                if i == 0:  # beside the image under its name: its session, damaged
                    return target
                continue
            if doc.get("format") == SESSION_FORMAT and _belongs(doc, geometry, content_key):
                return target
        except OSError:
            continue
    return None


def keep_aside(folder: str | os.PathLike, tag: str = "previous", when: float | None = None) -> list[Path]:
    """Rename a session's ``session.json`` and labels files to ``<name>.<tag>-<YYYYmmdd-HHMMSS>``
    so that a new session can be saved in the same folder without destroying them.

    Returns:
        The new paths of the renamed files.
    """
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when if when is not None else time.time()))
    moved = []
    files = [folder / "session.json"] + sorted(folder.glob("labels-*.npz"))
    for f in files:
        if not f.is_file():
            continue
        dest = f.with_name(f"{f.name}.{tag}-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = f.with_name(f"{f.name}.{tag}-{stamp}-{n}")
        try:
            os.replace(f, dest)
            moved.append(dest)
        except OSError as exc:
            log.warning("could not keep %s aside: %s", f, exc)
    return moved


def quarantine_session(folder: str | os.PathLike, when: float | None = None) -> list[Path]:
    """Keep a damaged session aside: its ``session.json`` and labels files become
    ``<name>.broken-<YYYYmmdd-HHMMSS>`` (:func:`keep_aside`), so a new session can start in
    the same folder. Returns the new paths."""
    return keep_aside(folder, "broken", when)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- export

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


def formats_module():
    """``napari_propseg.formats`` when it is installed and offers ``export_labels``, else None."""
    try:
        from . import formats
    except Exception:  # noqa: BLE001 - a broken optional dependency
        log.debug("napari_propseg.formats not available", exc_info=True)
        return None
    return formats if callable(getattr(formats, "export_labels", None)) else None


def format_of(path: str | os.PathLike) -> str | None:
    """The export format a file name asks for (None when it does not say)."""
    try:
        return format_from_path(path)
    except InputError:
        return None


def export_labels(labels: np.ndarray, geometry: dict, path: str | os.PathLike, fmt: str | None,
                  label_map: dict[int, str]) -> tuple[Path, Path]:
    """Write ``labels`` on the grid of the image ``geometry`` describes, in ``fmt`` (default:
    from the name), with the label map JSON (``<stem>.labels.json``) beside it.

    :mod:`napari_propseg.formats` writes the file (and, for NIfTI/NRRD, the label map);
    without it NIfTI and NRRD are written by :func:`napari_propseg.io.write_labels`. The
    label map is written with :func:`napari_propseg.labelmap.write_label_map` where the
    format did not write one.

    Returns:
        ``(label file, label map JSON)``.

    Raises:
        InputError: unknown format, labels not on the grid, a format that needs
            :mod:`napari_propseg.formats` without it; OSError/OutputError when writing fails.
    """
    from .labelmap import write_label_map

    path = Path(path)
    fmt = fmt or format_of(path)
    if fmt not in [f[0] for f in EXPORT_FORMATS]:
        raise InputError(f"Cannot tell the export format of {path.name}; use .nii.gz, .nii, .nrrd, .seg.nrrd or "
                         "a .dcm name, or choose a format in the dialog.")
    like = volume_from_geometry(geometry, labels)
    formats = formats_module()
    extra: list[Path] = []
    if formats is not None:
        if callable(getattr(formats, "export", None)):
            done = formats.export(labels, like, path, fmt, label_map)
            written, extra = Path(done.path), [Path(p) for p in done.extra_files]
        else:
            written = Path(formats.export_labels(labels, like, path, fmt, label_map))
    elif fmt in BASIC_FORMATS:
        from .io import write_labels

        written = Path(write_labels(labels, like, path))
    else:
        label = next(f[1] for f in EXPORT_FORMATS if f[0] == fmt)
        raise InputError(f"{label} export needs the napari_propseg.formats module, which this installation "
                         "lacks; export NIfTI or NRRD instead.")
    json_path = label_map_path(written)
    if json_path not in extra:
        json_path = write_label_map(label_map, json_path)
    return written, json_path
