"""The labeling session behind the PropSeg widget (core: no Qt, napari or magicgui).

Everything the clinician's workflow needs to remember lives here and is tested without
a GUI:

* the geometry of the image a layer came from (:func:`geometry_of`,
  :func:`volume_from_geometry`), carried in napari layer ``metadata`` under
  :data:`META_KEY` so that labels drawn on the image are written back onto its grid;
* the anchor slices (:class:`AnchorBook`): slices whose labels were given by the
  reference module (``suggested``), drawn or fixed by the clinician (``corrected``), or
  explicitly confirmed to hold nothing (``empty``); propagation never changes them;
* the undo stack of propagations (:class:`UndoStack`): one propagation is one step and
  only the slices it changed are kept;
* locked label ids that propagation must not touch;
* the organ names of the label ids (:attr:`Session.label_names`);
* autosave/resume of labels + anchors + settings + names (:meth:`Session.save`,
  :meth:`Session.load`, :func:`find_session`), written atomically. A session is
  recognised by the image's content (:func:`content_key`: the SeriesInstanceUID of a
  DICOM series, else a digest of the grid and a subsample of voxels), so it follows the
  files when the case folder is moved: the ``<image>.propseg/`` folder beside the image
  stays the primary location, and a small index in the cache folder
  (:func:`session_index_dir`) finds a session left behind. A damaged session file
  raises :class:`BrokenSessionError`; :func:`quarantine_session` keeps it aside.

Example:
    >>> import numpy as np
    >>> s = Session(np.zeros((5, 4, 4), np.uint8))
    >>> s.labels[2, 1, 1] = 3
    >>> s.record_edit([2])
    [2]
    >>> s.anchors.items()
    [(2, 'corrected')]
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .errors import InputError
from .progress import CancelFn, ProgressFn

log = logging.getLogger(__name__)

#: Key of the geometry dict in a napari layer's ``metadata``.
META_KEY = "propseg_volume"
#: Anchor statuses, in the order the widget lists them.
ANCHOR_STATUSES = ("suggested", "corrected", "empty")
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


# --------------------------------------------------------------------------- anchors


class AnchorBook:
    """The anchor slices of one volume: z index -> status.

    Args:
        n_slices: number of axial slices Z of the volume.

    Statuses: ``suggested`` (labels written by the reference module), ``corrected``
    (painted or fixed by the clinician), ``empty`` (the clinician confirmed that the
    slice holds no label). Propagation reads anchors and never changes them.
    """

    def __init__(self, n_slices: int):
        if n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {n_slices}")
        self.n_slices = int(n_slices)
        self._status: dict[int, str] = {}

    def _check_z(self, z: int) -> int:
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise InputError(f"Slice {z} is outside the volume (0..{self.n_slices - 1}); pick a slice inside it.")
        return z

    def set(self, z: int, status: str) -> None:
        """Make slice ``z`` an anchor with ``status`` (replacing any previous status)."""
        if status not in ANCHOR_STATUSES:
            raise ValueError(f"anchor status must be one of {ANCHOR_STATUSES}, got {status!r}")
        self._status[self._check_z(z)] = status

    def remove(self, z: int) -> bool:
        """Remove slice ``z`` from the anchors; returns whether it was one."""
        return self._status.pop(int(z), None) is not None

    def clear(self) -> None:
        self._status.clear()

    def status(self, z: int) -> str | None:
        """Status of slice ``z``, or None if it is not an anchor."""
        return self._status.get(int(z))

    def __contains__(self, z: object) -> bool:
        return isinstance(z, (int, np.integer)) and int(z) in self._status

    def __len__(self) -> int:
        return len(self._status)

    @property
    def zs(self) -> list[int]:
        """Anchor slice indices, ascending."""
        return sorted(self._status)

    def items(self) -> list[tuple[int, str]]:
        """(z, status) pairs, ascending z."""
        return [(z, self._status[z]) for z in self.zs]

    def next_after(self, z: int) -> int | None:
        """The first anchor strictly above ``z`` (None if there is none)."""
        later = [a for a in self.zs if a > z]
        return later[0] if later else None

    def prev_before(self, z: int) -> int | None:
        """The last anchor strictly below ``z`` (None if there is none)."""
        earlier = [a for a in self.zs if a < z]
        return earlier[-1] if earlier else None

    def bracket(self, z: int) -> tuple[int, int]:
        """The range [lo, hi] (inclusive) that a change on slice ``z`` affects.

        It runs from the anchor below ``z`` to the anchor above it (the volume's ends
        when there is none): re-propagation after a correction on ``z`` only needs to
        recompute this range.
        """
        lo = self.prev_before(z)
        hi = self.next_after(z)
        return (0 if lo is None else lo, self.n_slices - 1 if hi is None else hi)

    def to_list(self) -> list[list]:
        return [[z, s] for z, s in self.items()]

    @classmethod
    def from_list(cls, n_slices: int, items: Iterable[Sequence]) -> "AnchorBook":
        book = cls(n_slices)
        for z, s in items:
            book.set(int(z), str(s))
        return book


def changed_slices(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Axial slices where two (Z, Y, X) label volumes differ.

    Args:
        before: (Z, Y, X) labels.
        after: (Z, Y, X) labels of the same shape.

    Returns:
        Ascending z indices with at least one differing voxel.
    """
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} vs {after.shape}")
    diff = before.reshape(before.shape[0], -1) != after.reshape(after.shape[0], -1)
    return [int(z) for z in np.flatnonzero(diff.any(axis=1))]


def slices_from_paint_atoms(atoms: Iterable[Any], axis: int = 0) -> list[int]:
    """Slice indices touched by a napari Labels ``paint`` event's history atoms.

    Pure function over napari's two atom kinds (no napari import): a tuple
    ``(indices, old_values, new_values)`` whose ``indices`` is a tuple of index arrays,
    or an object with ``slice_key`` (a tuple of slices, the edit's bounding box).

    Args:
        atoms: the event's ``value`` (a list of atoms).
        axis: the slice axis of the data (0 for (Z, Y, X)).

    Returns:
        Ascending unique slice indices.
    """
    zs: set[int] = set()
    for atom in atoms or ():
        key = getattr(atom, "slice_key", None)
        if key is not None:
            sl = key[axis]
            if isinstance(sl, slice):
                zs.update(range(sl.start or 0, sl.stop if sl.stop is not None else (sl.start or 0) + 1))
            else:
                zs.update(int(v) for v in np.atleast_1d(sl))
            continue
        try:
            indices = atom[0]
            zs.update(int(v) for v in np.unique(np.asarray(indices[axis])))
        except (TypeError, IndexError, ValueError):
            log.debug("unrecognised paint atom %r", type(atom))
    return sorted(zs)


# --------------------------------------------------------------------------- undo


@dataclass
class UndoStep:
    """The slices one operation changed, as they were before it.

    Attributes:
        description: what the operation was ("propagate (stcn)", ...).
        zs: (n,) changed slice indices.
        before: (n, Y, X) those slices before the operation.
        anchors_before: the anchor book's ``(z, status)`` pairs before the operation, for
            operations that change anchors (Suggest); None when it left them alone.
    """

    description: str
    zs: np.ndarray
    before: np.ndarray
    anchors_before: list[tuple[int, str]] | None = None


class UndoStack:
    """Bounded stack of :class:`UndoStep` (only changed slices are kept).

    Args:
        max_steps: the oldest steps are dropped beyond this many.
    """

    def __init__(self, max_steps: int = 10):
        self.max_steps = int(max_steps)
        self._steps: list[UndoStep] = []

    def push(self, step: UndoStep) -> None:
        self._steps.append(step)
        del self._steps[: max(0, len(self._steps) - self.max_steps)]

    def peek(self) -> UndoStep | None:
        """The step :meth:`pop` would return, left on the stack."""
        return self._steps[-1] if self._steps else None

    def pop(self) -> UndoStep | None:
        return self._steps.pop() if self._steps else None

    def __len__(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        self._steps.clear()

    @property
    def last_description(self) -> str | None:
        return self._steps[-1].description if self._steps else None


# --------------------------------------------------------------------------- session


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
        stem = p.name
        for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
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


class Session:
    """Labels, anchors, locks, settings and undo history of one image.

    Args:
        labels: (Z, Y, X) integer label volume; the session owns and edits this array
            in place (the widget hands it the Labels layer's data).
        geometry: :func:`geometry_of` of the image (None for a bare array: then
            :meth:`save` needs a folder).
        settings: free-form JSON-able widget settings (method, device, k, preset, ...).
        max_undo: number of propagations that can be undone.
        content_key: :func:`content_key` of the image (finds the session again after a move).
        label_names: ``{id: organ name}`` of the label ids (saved with the session).
    """

    def __init__(self, labels: np.ndarray, geometry: dict | None = None, settings: dict | None = None,
                 max_undo: int = 10, content_key: str | None = None, label_names: dict | None = None):
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise InputError(f"The labels must be a (Z, Y, X) volume, got shape {labels.shape}; use a 3-D Labels layer.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"The labels must hold integer ids, got dtype {labels.dtype}; use a Labels layer.")
        self.labels = labels
        self.geometry = geometry
        self.settings: dict = dict(settings or {})
        self.anchors = AnchorBook(labels.shape[0])
        self.locked: set[int] = set()
        self.confidence: np.ndarray | None = None  # (Z,) in [0, 1], nan where unknown
        self.suggest_agreement: dict[int, float] = {}  # suggested slice -> reference pair's agreement
        self.undo_stack = UndoStack(max_undo)
        self.dirty = False
        self.saved_path: Path | None = None
        self.last_saved = 0.0
        self.content_key = content_key
        self.label_names: dict[int, str] = {int(k): str(v) for k, v in (label_names or {}).items()}

    # ------------------------------------------------------------------ anchors
    def record_edit(self, zs: Iterable[int]) -> list[int]:
        """The clinician painted/erased/filled slices ``zs``: make them anchors.

        A slice that now holds labels becomes ``corrected``; one left empty becomes
        ``empty`` (the clinician erased it on purpose).

        Returns:
            The slices recorded, ascending.
        """
        done = []
        for z in sorted({int(z) for z in zs}):
            self.anchors.set(z, "corrected" if self.labels[z].any() else "empty")
            done.append(z)
        if done:
            self.dirty = True
        return done

    def set_suggested(self, zs: Iterable[int], masks: np.ndarray | None = None,
                      agreement: dict[int, float] | None = None) -> list[int]:
        """Write reference-module masks on slices ``zs`` and mark them ``suggested``.

        Args:
            zs: slice indices.
            masks: (len(zs), Y, X) label slices, or None when ``labels`` already holds
                them. Slices already ``corrected`` by the clinician are left alone.
            agreement: slice -> the reference networks' agreement on it (see
                :class:`~napari_propseg.reference.inference.Suggestion`); the least agreed
                suggested slice is checked first.

        Returns:
            The slices that became suggested anchors.
        """
        zs = [int(z) for z in zs]
        keep = [(i, z) for i, z in enumerate(zs) if self.anchors.status(z) != "corrected"]
        if keep:  # one undo step: the overwritten slices and the anchors as they were
            idx = np.asarray([z for _, z in keep], dtype=np.int64)
            self.undo_stack.push(UndoStep("suggest", idx, self.labels[idx].copy(), self.anchors.items()))
        done = []
        for i, z in keep:
            if masks is not None:
                self.labels[z] = masks[i]
            self.anchors.set(z, "suggested" if self.labels[z].any() else "empty")
            if agreement is not None and z in agreement:
                self.suggest_agreement[z] = float(agreement[z])
            done.append(z)
        self.dirty = self.dirty or bool(done)
        return done

    def next_unverified(self) -> int | None:
        """The ``suggested`` anchor to check first: the reference module's output that the
        clinician has not confirmed yet, least agreed between its networks first (ties and
        unknown agreement: lowest z). None when no suggested slice is left."""
        zs = [z for z, st in self.anchors.items() if st == "suggested"]
        if not zs:
            return None
        return min(zs, key=lambda z: (self.suggest_agreement.get(z, 0.0), z))

    def confirm_anchor(self, z: int) -> str:
        """Make slice ``z`` an anchor as it is now (the Mark anchor button): a slice that is
        not an anchor becomes one (``corrected``, or ``empty`` when it holds no label), a
        ``suggested`` one is confirmed (``corrected``), an anchor stays an anchor (its status
        follows its content). Never removes an anchor.

        Returns:
            The slice's status afterwards.
        """
        self.record_edit([z])
        return str(self.anchors.status(z))

    def remove_anchor(self, z: int) -> str | None:
        """Remove slice ``z`` from the anchors (the Remove anchor button). Its labels stay,
        but the next propagation may change them.

        Returns:
            The status it had (None when it was no anchor).
        """
        status = self.anchors.status(z)
        if status is not None:
            self.anchors.remove(z)
            self.dirty = True
        return status

    # ------------------------------------------------------------------ propagation
    def propagation_inputs(self) -> tuple[np.ndarray, list[int]]:
        """A copy of the labels and the anchor list to hand to the engine (in a worker)."""
        if not len(self.anchors):
            raise InputError(
                "There are no anchor slices yet; paint labels on at least one slice (or press Suggest) before propagating."
            )
        return self.labels.copy(), self.anchors.zs

    def apply_result(self, new_labels: np.ndarray, description: str,
                     confidence: np.ndarray | None = None) -> list[int]:
        """Take a propagation result into the session as one undoable step.

        Anchor slices are kept exactly as they were and voxels of locked label ids are
        neither added nor removed, whatever the engine returned.

        Args:
            new_labels: (Z, Y, X) labels from the engine.
            description: undo-step name.
            confidence: optional (Z,) per-slice confidence.

        Returns:
            The slices that changed (written into ``self.labels`` in place).
        """
        new = np.asarray(new_labels)
        if new.shape != self.labels.shape:
            raise ValueError(f"result shape {new.shape} differs from the labels' {self.labels.shape}")
        new = new.astype(self.labels.dtype, copy=True)
        zs = self.anchors.zs
        if zs:
            new[zs] = self.labels[zs]
        if self.locked:
            ids = np.fromiter(self.locked, dtype=np.int64)
            keep = np.isin(self.labels, ids) | np.isin(new, ids)
            new[keep] = self.labels[keep]
        changed = changed_slices(self.labels, new)
        if changed:
            idx = np.asarray(changed, dtype=np.int64)
            self.undo_stack.push(UndoStep(description, idx, self.labels[idx].copy()))
            self.labels[idx] = new[idx]
            self.dirty = True
        if confidence is not None:
            self.confidence = np.asarray(confidence, dtype=np.float32).reshape(-1)
        return changed

    def undo(self) -> list[int]:
        """Undo the last propagation or suggestion: its slices get their previous labels back.

        After a propagation anchors are untouched (a propagation never changes them, and
        anchors painted since stay anchors). After a suggestion the suggested slices leave
        the anchor book again (those that were anchors before get their old status back);
        anchors the clinician painted since stay.

        Returns:
            The slices restored (empty if there was nothing to undo).
        """
        step = self.undo_stack.pop()
        if step is None:
            return []
        was = dict(step.anchors_before) if step.anchors_before is not None else None
        restored = []
        for i, z in enumerate(int(z) for z in step.zs):
            status = self.anchors.status(z)
            # a slice the clinician painted after the step keeps the edit: a propagation
            # never wrote anchors, so an anchor now was made later; a suggested slice
            # corrected since is the clinician's
            if (was is None and status is not None) or (was is not None and status == "corrected"):
                continue
            self.labels[z] = step.before[i]
            if was is not None:
                if z in was:
                    self.anchors.set(z, was[z])
                else:
                    self.anchors.remove(z)
            restored.append(z)
        self.dirty = True
        return restored

    def check_next(self) -> int | None:
        """The slice most worth checking: an unverified suggested slice first
        (:meth:`next_unverified`), then the non-anchor slice of lowest confidence (as the
        engine's ``suggest_next``), else, before any propagation, the labeled slice
        farthest from every anchor. None when every slice is a verified anchor."""
        z_sug = self.next_unverified()
        if z_sug is not None:
            return z_sug
        z_all = np.arange(self.labels.shape[0])
        free = np.ones(len(z_all), bool)
        free[self.anchors.zs] = False
        if not free.any():
            return None
        if self.confidence is not None and self.confidence.shape == (len(z_all),):
            conf = np.where(free & np.isfinite(self.confidence), self.confidence, np.inf)
            if np.isfinite(conf).any():
                return int(np.argmin(conf))
        filled = self.labels.reshape(len(z_all), -1).any(axis=1) & free
        candidates = z_all[filled] if filled.any() else z_all[free]
        if not len(self.anchors):
            return int(candidates[len(candidates) // 2])
        anchors = np.asarray(self.anchors.zs)
        dist = np.abs(candidates[:, None] - anchors[None, :]).min(axis=1)
        return int(candidates[int(np.argmax(dist))])

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write labels, anchors, locks, settings and confidence atomically.

        The labels go to a new ``labels-<n>.npz``; ``session.json`` (which names it) is
        then replaced in one rename, so a crash leaves the previous session readable.

        Args:
            folder: where the session folder goes (see :func:`session_dir`).

        Returns:
            The session folder.

        Raises:
            InputError: the folder cannot be written.
        """
        if self.geometry is None and folder is None:
            raise InputError("This labels volume has no image file; choose a folder to save the session in.")
        geometry = self.geometry or {"shape": list(self.labels.shape), "spacing": [1, 1, 1], "origin": [0, 0, 0],
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
            confidence = self.confidence if self.confidence is not None else np.zeros(0, np.float32)
            atomic_write(target / labels_name,
                         lambda tmp: np.savez_compressed(tmp, labels=self.labels, confidence=confidence),
                         what="session labels")
            doc = {
                "format": SESSION_FORMAT,
                "counter": counter,
                "fingerprint": fingerprint(geometry),
                "content_key": self.content_key,
                "geometry": geometry,
                "labels_file": labels_name,
                "anchors": self.anchors.to_list(),
                "locked": sorted(int(i) for i in self.locked),
                "suggest_agreement": {str(z): float(a) for z, a in self.suggest_agreement.items()},
                "label_names": {str(int(k)): str(v) for k, v in sorted(self.label_names.items())},
                "settings": _jsonable(self.settings),
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
        self.dirty = False
        self.saved_path = target
        self.last_saved = time.time()
        self._write_index(target)
        log.info("session saved in %s", target)
        return target

    def _write_index(self, target: Path) -> None:
        """Record ``content key -> session folder`` in the cache folder (best effort)."""
        if not self.content_key:
            return
        entry = {"folder": str(Path(target).resolve()), "image": (self.geometry or {}).get("path"),
                 "saved_at": time.time()}
        try:
            session_index_dir().mkdir(parents=True, exist_ok=True)
            atomic_write_text(_index_file(self.content_key), json.dumps(entry, indent=1), what="session index entry")
        except (InputError, OSError) as exc:
            log.warning("could not index the session %s: %s", target, exc)

    @classmethod
    def load(cls, folder: str | os.PathLike, geometry: dict | None = None,
             content_key: str | None = None) -> "Session":
        """Read a session folder written by :meth:`save`.

        Args:
            folder: the session folder.
            geometry: the open image's geometry; when given, the session must belong to
                it (same content key when both sides have one, else same fingerprint),
                else InputError.
            content_key: :func:`content_key` of the open image.

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
        names = {int(k): str(v) for k, v in (doc.get("label_names") or {}).items()}
        s = cls(labels, geometry or doc["geometry"], doc.get("settings") or {},
                content_key=content_key or doc.get("content_key"), label_names=names)
        s.anchors = AnchorBook.from_list(labels.shape[0], doc.get("anchors") or [])
        s.locked = {int(i) for i in doc.get("locked") or []}
        s.suggest_agreement = {int(z): float(a) for z, a in (doc.get("suggest_agreement") or {}).items()}
        s.confidence = conf if conf.size == labels.shape[0] else None
        s.saved_path = folder
        s.last_saved = float(doc.get("saved_at") or 0.0)
        return s


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


def run_propagation(volume_hu: np.ndarray, labels: np.ndarray, anchors: list[int], *, method: str = "stcn",
                    device: str = "auto", changed: Sequence[int] | None = None, locked_labels: Iterable[int] = (),
                    progress: ProgressFn = None, cancel: CancelFn = None,
                    engine: Any = None, engine_factory: Callable[..., Any] | None = None,
                    spacing: Sequence[float] | None = None) -> Any:
    """Run the propagation engine (blocking; the widget calls it in a worker thread).

    Args:
        volume_hu: (Z, Y, X) CT in HU.
        labels: (Z, Y, X) labels holding the anchor slices.
        anchors: anchor slice indices.
        method: ``"stcn"`` (network) or ``"interp"`` (SDF interpolation).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        changed: when given, the slices corrected since the last propagation: only the
            ranges between their neighbouring anchors are recomputed (``repropagate``).
        locked_labels: label ids the engine keeps exactly as in ``labels``.
        progress: ``(step, total, message)`` callback, once per slice.
        cancel: returns True to stop within one slice (CancelledError).
        engine: an engine built earlier for this volume/method/device (re-propagation
            reuses it and its cached slice features); built when None.
        engine_factory: for tests; defaults to
            :class:`napari_propseg.propagation.engine.PropagationEngine`.
        spacing: ``(sz, sy, sx)`` voxel size in mm of ``volume_hu`` (e.g. the session
            geometry's ``spacing``), so the engine's body crop is right for non-square
            pixels; used only when the engine is built here.

    Returns:
        The engine's ``PropagationResult`` (``labels``, ``confidence``, ``computed``,
        ``seconds``).
    """
    if engine is None:
        engine = make_engine(volume_hu, method=method, device=device, engine_factory=engine_factory, spacing=spacing)
    locked = tuple(int(i) for i in locked_labels)
    if changed:
        return engine.repropagate(labels, anchors, list(changed), locked_labels=locked, progress=progress, cancel=cancel)
    return engine.propagate(labels, anchors, locked_labels=locked, progress=progress, cancel=cancel)


#: Default weight of the CT intensity model between anchors in the widget: the engine's
#: ``AppearanceOptions.weight`` (kept here, free of torch, so the widget loads fast; a test
#: checks the two agree).
DEFAULT_IMAGE_WEIGHT = 0.5


def make_engine(volume_hu: np.ndarray, *, method: str = "stcn", device: str = "auto",
                engine_factory: Callable[..., Any] | None = None,
                spacing: Sequence[float] | None = None, image_weight: float | None = None) -> Any:
    """Build the propagation engine for one volume (see :func:`run_propagation`).

    ``spacing`` ``(sz, sy, sx)`` in mm and ``image_weight`` (the weight of the CT intensity
    model between anchors, :mod:`napari_propseg.propagation.appearance`; 0 = off) are
    passed to the factory only when given, so factories that do not take them keep working.
    """
    if engine_factory is None:
        try:
            from .propagation.engine import PropagationEngine as engine_factory  # noqa: N813
        except ImportError as exc:
            raise InputError(
                "The propagation engine is not available in this installation; reinstall napari-propseg."
            ) from exc
    kwargs: dict[str, Any] = {"method": method, "device": device}
    if spacing is not None:
        kwargs["spacing"] = tuple(float(v) for v in spacing)
    if image_weight is not None:
        kwargs["appearance"] = {"weight": float(image_weight)}
    return engine_factory(volume_hu, **kwargs)


# --------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
