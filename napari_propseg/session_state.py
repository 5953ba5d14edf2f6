"""The workflow state of a labeling session as plain data (no Qt, no engine).

:class:`AnchorBook` (anchor slices and their status), :class:`UndoStack` (one step per
propagation or suggestion, only the changed slices kept), :func:`merge_result` (an
engine result with anchors and locked labels kept), :class:`RunSummary` (what a run did)
and small helpers on label volumes. :class:`napari_propseg.session.Session` combines
them; everything here is re-exported by :mod:`napari_propseg.session`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

#: Anchor statuses, in the order the widget lists them.
ANCHOR_STATUSES = ("suggested", "corrected", "empty")


def ids_in(data: Any) -> set[int]:
    """The label ids present in a labels array (fast for 8-bit labels)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return set()
    if arr.dtype == np.uint8:  # bincount in chunks: one pass over a 512x512x129 volume is 1.5 s, chunked 0.07 s
        flat = arr.reshape(-1)
        counts = np.zeros(256, np.int64)
        for i in range(0, flat.size, 1 << 20):
            counts += np.bincount(flat[i:i + (1 << 20)], minlength=256)
        return {int(i) for i in np.flatnonzero(counts) if i}
    return {int(i) for i in np.unique(arr) if i}


def copy_slices(arr: np.ndarray) -> np.ndarray:
    """A copy of a (Z, Y, X) array made one slice at a time (in a worker thread this lets
    the GUI thread run between slices; a fresh 34 MB copy in one go costs 0.1-0.3 s of
    page faults on a loaded machine)."""
    out = np.empty_like(arr)
    for z in range(arr.shape[0]):
        out[z] = arr[z]
    return out


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


def changed_slices(before: np.ndarray, after: np.ndarray, among: Iterable[int] | None = None) -> list[int]:
    """Axial slices where two (Z, Y, X) label volumes differ.

    Args:
        before: (Z, Y, X) labels.
        after: (Z, Y, X) labels of the same shape.
        among: only these slices are compared (the others are known to be equal, e.g.
            those a re-propagation did not recompute); None compares every slice.

    Returns:
        Ascending z indices with at least one differing voxel.
    """
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} vs {after.shape}")
    if among is not None:
        return [z for z in sorted({int(z) for z in among}) if not np.array_equal(before[z], after[z])]
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




# --------------------------------------------------------------------------- runs


@dataclass
class RunSummary:
    """What one propagation did, for the status line and the benchmarks.

    Attributes:
        description: ``"propagate (interp)"`` or ``"re-propagate (interp)"``.
        changed: slices whose labels changed, ascending.
        computed: slices the engine (re)computed, ascending (None when it does not say).
        seconds: wall-clock seconds from :meth:`Session.begin_run` to the last write-back.
        engine_seconds: seconds of the engine call alone.
        image_weight: the CT weight the engine used (None when it does not say).
        auto_weight: whether that weight was chosen automatically.
        left_empty: slices beyond the outermost anchors that were left empty although a
            label runs on to that anchor.
    """

    description: str
    changed: list[int]
    computed: list[int] | None
    seconds: float
    engine_seconds: float
    image_weight: float | None = None
    auto_weight: bool = False
    left_empty: list[int] = field(default_factory=list)

    def text(self) -> str:
        """One sentence: ``re-propagate (interp): 12 slices changed in 0.8 s, CT weight 0.5 (auto).``"""
        used = ""
        if self.image_weight is not None:
            used = f", CT weight {self.image_weight:g}" + (" (auto)" if self.auto_weight else "")
        msg = f"{self.description}: {len(self.changed)} slices changed in {self.seconds:.1f} s{used}."
        if self.left_empty:
            msg += (f" Slices {_ranges(self.left_empty)} beyond the outermost anchors were left empty; "
                    "paint one there to label them.")
        return msg


def _ranges(zs: Sequence[int]) -> str:
    """``[0, 1, 2, 7, 9, 10]`` -> ``"0-2, 7, 9-10"``."""
    parts, zs = [], sorted(int(z) for z in zs)
    i = 0
    while i < len(zs):
        j = i
        while j + 1 < len(zs) and zs[j + 1] == zs[j] + 1:
            j += 1
        parts.append(str(zs[i]) if i == j else f"{zs[i]}-{zs[j]}")
        i = j + 1
    return ", ".join(parts)


def merge_result(labels: np.ndarray, result: np.ndarray, anchors: Sequence[int],
                 locked: Iterable[int] = (), *, in_place: bool = False) -> np.ndarray:
    """An engine result with the anchor slices and the locked label ids of ``labels`` kept.

    Args:
        labels: (Z, Y, X) labels the engine started from.
        result: (Z, Y, X) the engine's labels.
        anchors: anchor slices (kept exactly as in ``labels``).
        locked: label ids that are neither added nor removed anywhere.
        in_place: write into ``result`` itself when it already has ``labels``' dtype (the
            caller owns it, e.g. a fresh engine result): saves a copy of the volume.

    Returns:
        An array of ``labels``' dtype (new, or ``result`` with ``in_place``).
    """
    new = np.asarray(result)
    if new.shape != labels.shape:
        raise ValueError(f"result shape {new.shape} differs from the labels' {labels.shape}")
    new = new.astype(labels.dtype, copy=not in_place)
    zs = sorted(int(z) for z in anchors)
    if zs:
        new[zs] = labels[zs]
    ids = np.fromiter((int(i) for i in locked), dtype=np.int64)
    if ids.size:
        keep = np.isin(labels, ids) | np.isin(new, ids)
        new[keep] = labels[keep]
    return new


@dataclass
class RunOutcome:
    """A finished engine call, merged and ready to be written back (see :class:`PropagationRun`)."""

    run: Any  # the napari_propseg.session.PropagationRun
    engine: Any
    result: Any
    new: np.ndarray  # (Z, Y, X) the result with the run's anchors and locked voxels kept
    candidates: list[int]  # slices where ``new`` differs from the run's labels
    ids: set[int]  # label ids in ``new``
    engine_seconds: float


def summarize(outcome: RunOutcome, changed: list[int]) -> RunSummary:
    """The :class:`RunSummary` of a written-back run (``changed``: the slices that changed)."""
    result = outcome.result  # a PropagationResult carries the weight; stand-in engines' results may not
    weight = getattr(result, "image_weight", None)
    auto = bool(getattr(result, "image_weight_auto", False))
    computed = getattr(result, "computed", None)
    return RunSummary(outcome.run.description, changed, None if computed is None else [int(z) for z in computed],
                      time.perf_counter() - outcome.run.started, outcome.engine_seconds,
                      None if weight is None else float(weight), auto,
                      [int(z) for z in getattr(result, "left_empty", None) or []])
