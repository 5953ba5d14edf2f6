"""The labeling session behind the PropSeg widget: the clinician's workflow state, without Qt.

Everything the correction loop needs to remember lives here and is tested without a GUI:

* the anchor slices (:class:`AnchorBook`: ``suggested`` by the reference module,
  ``corrected`` by the clinician, ``empty`` confirmed to hold nothing), locked label ids,
  organ names (:attr:`Session.label_names`) and the undo stack (:class:`UndoStack`);
* what changed since the last run (:attr:`Session.changed_since`): a run
  (:meth:`Session.begin_run` -> :meth:`PropagationRun.execute` in a worker ->
  :meth:`Session.apply_steps`, a few slices per step so a GUI never freezes) re-propagates
  only the gaps next to those slices and ends in a :class:`RunSummary`;
* Suggest (:func:`suggest`, :meth:`Session.apply_suggestion`), Check next
  (:meth:`Session.check_next`) and Export (:meth:`Session.export`);
* autosave/resume (:meth:`Session.save`, :meth:`Session.save_in_background`,
  :meth:`Session.load`) through :mod:`napari_propseg.session_store` (which also holds the
  image geometry helpers); its public names and :mod:`napari_propseg.session_state`'s are
  re-exported here.

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

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError
from .progress import CancelFn, ProgressFn
from .session_store import (  # noqa: F401 - re-exported: the session's public API
    CONTENT_SAMPLE,
    EXPORT_FORMATS,
    BASIC_FORMATS,
    META_KEY,
    SESSION_FORMAT,
    SESSION_HOME_ENV,
    SESSION_SUFFIX,
    BrokenSessionError,
    SessionSnapshot,
    content_key,
    default_session_home,
    export_labels,
    find_session,
    fingerprint,
    format_of,
    formats_module,
    geometry_of,
    keep_aside,
    layer_kwargs,
    quarantine_session,
    read_session,
    session_dir,
    session_index_dir,
    volume_from_geometry,
    write_session,
)

from .session_state import (  # noqa: F401 - re-exported
    ANCHOR_STATUSES,
    AnchorBook,
    RunOutcome,
    RunSummary,
    UndoStack,
    UndoStep,
    changed_slices,
    copy_slices,
    ids_in,
    merge_result,
    slices_from_paint_atoms,
    summarize,
)

log = logging.getLogger(__name__)

#: Voxels (about) written back per step of :meth:`Session.apply_steps`.
APPLY_CHUNK_VOXELS = 2_000_000


# --------------------------------------------------------------------------- runs


@dataclass
class PropagationRun:
    """One propagation, planned by :meth:`Session.begin_run` on the GUI thread.

    :meth:`execute` (blocking: call it in a worker thread) builds the engine when none is
    cached, runs it and merges its result with the anchors and locks as they were when the
    run began; :meth:`Session.apply_steps` then writes the changed slices back.
    """

    labels: np.ndarray  # the session's labels; copied (slice by slice) when the run executes
    anchors: list[int]
    changed: list[int] | None  # None: full propagation
    locked: tuple[int, ...]
    method: str
    device: str
    spacing: tuple[float, float, float] | None
    image_weight: float | None
    engine: Any
    key: tuple
    pending: frozenset  # the session's changed slices this run takes care of
    copied: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def description(self) -> str:
        return f"re-propagate ({self.method})" if self.changed else f"propagate ({self.method})"

    def execute(self, volume: np.ndarray, progress: ProgressFn = None, cancel: CancelFn = None) -> "RunOutcome":
        """Run the engine (blocking) and prepare the write-back; see :func:`run_propagation`.

        The labels are copied here, in the worker, so Propagate does not wait for a 34 MB
        copy on the GUI thread; a slice painted meanwhile is an anchor by the time the
        result is written back, and anchors as they are then win (:meth:`Session.apply_steps`).
        """
        if not self.copied:
            self.labels, self.copied = copy_slices(self.labels), True
        engine = self.engine or make_engine(volume, method=self.method, device=self.device, spacing=self.spacing,
                                            image_weight=self.image_weight)
        t0 = time.perf_counter()
        result = run_propagation(volume, self.labels, self.anchors, method=self.method, device=self.device,
                                 changed=self.changed, locked_labels=self.locked, progress=progress, cancel=cancel,
                                 engine=engine)
        engine_seconds = time.perf_counter() - t0
        new = merge_result(self.labels, result.labels, self.anchors, self.locked, in_place=True)  # a fresh engine result
        # the engine leaves every slice it did not recompute as it was given
        computed = getattr(result, "computed", None)
        candidates = changed_slices(self.labels, new, computed if computed is not None and not self.locked else None)
        return RunOutcome(self, engine, result, new, candidates, ids_in(new), engine_seconds)


# --------------------------------------------------------------------------- session


class Session:
    """Labels, anchors, locks, settings, undo history and run bookkeeping of one image.

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
        #: slices whose anchors changed since the last run: the next run re-propagates
        #: only the gaps next to them (once a first propagation was applied)
        self.changed_since: set[int] = set()
        self.propagated = False
        #: the engine of the last run (re-propagation reuses its caches; Check next asks it)
        self.engine: Any = None
        self.engine_key: tuple | None = None
        self._save_lock = threading.Lock()

    # ------------------------------------------------------------------ anchors
    def record_edit(self, zs: Iterable[int]) -> list[int]:
        """The clinician painted/erased/filled slices ``zs``: make them anchors.

        A slice that now holds labels becomes ``corrected``; one left empty becomes
        ``empty`` (the clinician erased it on purpose). They count as changed for the
        next run.

        Returns:
            The slices recorded, ascending.
        """
        done = []
        for z in sorted({int(z) for z in zs}):
            self.anchors.set(z, "corrected" if self.labels[z].any() else "empty")
            done.append(z)
        if done:
            self.dirty = True
            self.changed_since.update(done)
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
        self.changed_since.update(done)
        return done

    def apply_suggestion(self, sugg: Any, own_names: dict[int, str] | None = None) -> tuple[list[int], str]:
        """Take a reference-module :class:`~napari_propseg.reference.inference.Suggestion`
        (from :func:`suggest`) into the session: its masks on its slices as ``suggested``
        anchors (:meth:`set_suggested`) and its model's organ names (``own_names``, the
        labels file's own, win).

        Returns:
            ``(slices that became anchors, a sentence naming the organs left out where the
            reference networks disagreed, or "")``.
        """
        masks = np.asarray(sugg.labels)[list(sugg.slices)]
        zs = self.set_suggested(sugg.slices, masks, getattr(sugg, "agreement", None))
        model_names = {int(i): str(n) for i, n in (getattr(sugg, "label_map", None) or {}).items() if int(i) > 0}
        if model_names:  # the classes of the model that made the suggestion
            self.label_names = {**self.label_names, **model_names, **(own_names or {})}
        dropped = getattr(sugg, "dropped", None) or {}
        left_out = ""
        if dropped:
            names = getattr(sugg, "label_map", None) or {}
            organs = sorted({names.get(c, str(c)) for cs in dropped.values() for c in cs})
            left_out = (f" Left out where the two networks disagree ({len(dropped)} slices): {', '.join(organs)};"
                        " draw them by hand there.")
        return zs, left_out

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
        follows its content). Never removes an anchor; a changed status counts as a change
        for the next run.

        Returns:
            The slice's status afterwards.
        """
        z = int(z)
        before = self.anchors.status(z)
        status = "corrected" if self.labels[z].any() else "empty"
        self.anchors.set(z, status)
        self.dirty = True
        if before != status:
            self.changed_since.add(z)
        return status

    def remove_anchor(self, z: int) -> str | None:
        """Remove slice ``z`` from the anchors (the Remove anchor button). Its labels stay,
        but the next propagation may change them (it recomputes the merged gap around it).

        Returns:
            The status it had (None when it was no anchor).
        """
        status = self.anchors.status(z)
        if status is not None:
            self.anchors.remove(z)
            self.dirty = True
            self.changed_since.add(int(z))
        return status

    def toggle_lock(self, label: int) -> bool:
        """Lock label id ``label`` (propagation never changes it) or unlock it; returns
        whether it is locked now."""
        label = int(label)
        if label in self.locked:
            self.locked.discard(label)
        else:
            self.locked.add(label)
        self.dirty = True
        return label in self.locked

    def check_next(self) -> int | None:
        """The slice most worth checking: an unverified suggested slice first
        (:meth:`next_unverified`), then the slice the last run's engine names
        (``engine.suggest_next(confidence, anchors)``), else the non-anchor slice of lowest
        confidence, else, before any propagation, the labeled slice farthest from every
        anchor. None when every slice is a verified anchor."""
        z_sug = self.next_unverified()
        if z_sug is not None:
            return z_sug
        if self.engine is not None and self.confidence is not None and hasattr(self.engine, "suggest_next"):
            try:
                return int(self.engine.suggest_next(self.confidence, self.anchors.zs))
            except InputError:
                pass
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

    # ------------------------------------------------------------------ propagation
    def propagation_inputs(self) -> tuple[np.ndarray, list[int]]:
        """A copy of the labels and the anchor list to hand to the engine (in a worker)."""
        if not len(self.anchors):
            raise InputError(
                "There are no anchor slices yet; paint labels on at least one slice (or press Suggest) before propagating."
            )
        return self.labels.copy(), self.anchors.zs

    def pending_changes(self) -> list[int] | None:
        """The slices the next run re-propagates around; None = a full propagation (no
        propagation applied yet, or nothing changed since)."""
        return sorted(self.changed_since) if self.propagated and self.changed_since else None

    def forget_engine(self) -> None:
        """Drop the cached engine (the method, device or CT weight changed)."""
        self.engine, self.engine_key = None, None

    def begin_run(self, *, method: str, device: str = "auto", spacing: Sequence[float] | None = None,
                  image_weight: float | None = None, volume_id: Any = None) -> PropagationRun:
        """Plan a propagation (a re-propagation around :meth:`pending_changes` once one was
        applied); run it with :meth:`PropagationRun.execute` and take it back with
        :meth:`apply_steps` / :meth:`apply_outcome`.

        Args:
            method, device: the engine's.
            spacing: ``(sz, sy, sx)`` mm of the image.
            image_weight: the CT weight (None: auto).
            volume_id: identifies the image (the cached engine is reused only for the same).

        Raises:
            InputError: there is no anchor yet.
        """
        if not len(self.anchors):
            self.propagation_inputs()  # the InputError
        labels, anchors = self.labels, self.anchors.zs
        spacing = None if spacing is None else tuple(float(v) for v in spacing)
        key = (volume_id, method, device, spacing, image_weight)
        return PropagationRun(labels=labels, anchors=anchors, changed=self.pending_changes(),
                              locked=tuple(sorted(self.locked)), method=method, device=device, spacing=spacing,
                              image_weight=image_weight, engine=self.engine if self.engine_key == key else None,
                              key=key, pending=frozenset(self.changed_since))

    def apply_steps(self, outcome: RunOutcome, chunk_voxels: int = APPLY_CHUNK_VOXELS) -> Iterator[None]:
        """Write a run's result back into :attr:`labels` a few slices at a time.

        A generator: each ``next()`` writes about ``chunk_voxels`` voxels (a GUI runs one
        step per event-loop turn); its return value (``StopIteration.value``) is the
        :class:`RunSummary`. The anchors and locks as they are now win (the clinician may
        have painted while the engine ran); one undo step holds the slices changed.
        """
        run = outcome.run
        anchors = set(self.anchors.zs)
        todo = [z for z in outcome.candidates if z not in anchors]
        ids = np.fromiter(self.locked, dtype=np.int64)
        per = max(1, int(chunk_voxels) // max(1, int(np.prod(self.labels.shape[1:]))))
        changed: list[int] = []
        # the undo record is filled step by step (stacking it at the end would copy every
        # changed slice again in one go: a long block on a large CT)
        before = np.empty((len(todo),) + self.labels.shape[1:], dtype=self.labels.dtype)
        for i in range(0, len(todo), per):
            zs = todo[i:i + per]
            new = outcome.new[zs]
            old = self.labels[zs]
            if ids.size:
                keep = np.isin(old, ids) | np.isin(new, ids)
                new[keep] = old[keep]
            differs = (new != old).reshape(len(zs), -1).any(axis=1)
            for j in np.flatnonzero(differs):
                before[len(changed)] = old[j]
                self.labels[zs[j]] = new[j]
                changed.append(int(zs[j]))
            yield
        if changed:
            kept = before[:len(changed)]
            if 2 * len(changed) < len(todo):  # do not hold memory for slices that did not change
                kept = kept.copy()
            self.undo_stack.push(UndoStep(run.description, np.asarray(changed, dtype=np.int64), kept))
            self.dirty = True
        confidence = getattr(outcome.result, "confidence", None)
        if confidence is not None:
            self.confidence = np.asarray(confidence, dtype=np.float32).reshape(-1)
        self.engine, self.engine_key = outcome.engine, run.key
        self.changed_since -= run.pending
        self.propagated = True
        return summarize(outcome, changed)

    def apply_outcome(self, outcome: RunOutcome) -> RunSummary:
        """:meth:`apply_steps` in one go."""
        steps = self.apply_steps(outcome)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

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
        new = merge_result(self.labels, new_labels, self.anchors.zs, self.locked)
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

    # ------------------------------------------------------------------ export
    def export(self, path: str | os.PathLike, fmt: str | None = None,
               names: dict[int, str] | None = None) -> tuple[Path, Path, int]:
        """Write the labels on the image's grid and the organ names (default:
        :attr:`label_names`) beside them (:func:`~napari_propseg.session_store.export_labels`).

        Returns:
            ``(label file, label map JSON, number of label ids present)``.
        """
        if self.geometry is None:
            raise InputError("The image layer carries no CT geometry; open the CT with PropSeg's reader to export.")
        present = ids_in(self.labels)
        names = self.label_names if names is None else names
        label_map = {i: names.get(i, f"label_{i}") for i in sorted((present | set(names)) - {0})}
        written, json_path = export_labels(self.labels, self.geometry, path, fmt, label_map)
        return written, json_path, len(present)

    # ------------------------------------------------------------------ persistence
    def snapshot(self, copy: bool = True) -> SessionSnapshot:
        """What :meth:`save` writes, detached from this session (the labels are copied,
        unless ``copy`` is False)."""
        return SessionSnapshot(
            labels=self.labels.copy() if copy else self.labels, geometry=self.geometry, content_key=self.content_key,
            anchors=self.anchors.to_list(), locked=sorted(self.locked), suggest_agreement=dict(self.suggest_agreement),
            label_names=dict(self.label_names), settings=dict(self.settings),
            confidence=None if self.confidence is None else self.confidence.copy())

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write labels, anchors, locks, settings and confidence atomically
        (:func:`~napari_propseg.session_store.write_session`); waits for a background save.

        Args:
            folder: where the session folder goes (see :func:`session_dir`).

        Returns:
            The session folder.

        Raises:
            InputError: the folder cannot be written.
        """
        snap = self.snapshot()
        with self._save_lock:
            target = write_session(snap, folder)
        self.dirty = False
        self.saved_path = target
        self.last_saved = time.time()
        return target

    def save_in_background(self, folder: str | os.PathLike | None = None,
                           on_done: Callable[[Path | None, Exception | None], None] | None = None) -> threading.Thread:
        """:meth:`save` in a thread: the labels are copied now, compressed and written there.

        ``on_done(folder, None)`` or ``on_done(None, error)`` is called in that thread; a
        failed save leaves the session dirty. The labels are copied in the thread, slice by
        slice (a stroke painted during that copy may be half in this save; it is dirty and
        in the next one).
        """
        snap = self.snapshot(copy=False)
        self.dirty = False

        def work():
            target, error = None, None
            try:
                snap.labels = copy_slices(snap.labels)
                with self._save_lock:
                    target = write_session(snap, folder)
                self.saved_path, self.last_saved = target, time.time()
            except Exception as exc:  # noqa: BLE001 - reported through on_done
                self.dirty, error = True, exc
            try:
                if on_done is not None:
                    on_done(target, error)
            except Exception:  # noqa: BLE001 - e.g. the widget was closed meanwhile
                log.debug("autosave callback failed", exc_info=True)

        thread = threading.Thread(target=work, name="propseg-autosave", daemon=False)
        thread.start()
        return thread

    @classmethod
    def load(cls, folder: str | os.PathLike, geometry: dict | None = None,
             content_key: str | None = None) -> "Session":
        """Read a session folder written by :meth:`save`
        (:func:`~napari_propseg.session_store.read_session`).

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
        snap, saved_at = read_session(folder, geometry, content_key)
        s = cls(snap.labels, snap.geometry, snap.settings, content_key=snap.content_key, label_names=snap.label_names)
        s.anchors = AnchorBook.from_list(snap.labels.shape[0], snap.anchors)
        s.locked = set(snap.locked)
        s.suggest_agreement = dict(snap.suggest_agreement)
        s.confidence = snap.confidence
        s.propagated = snap.confidence is not None
        s.saved_path = Path(folder)
        s.last_saved = saved_at
        return s


# --------------------------------------------------------------------------- engine and reference module


def suggest(volume_hu: np.ndarray, *, k: int | None = None, device: str = "auto", model: str | None = None,
            progress: ProgressFn = None, cancel: CancelFn = None) -> Any:
    """Run the reference module on ``k`` slices (blocking; the widget calls it in a worker):
    :func:`napari_propseg.reference.inference.suggest_slices`; take the result in with
    :meth:`Session.apply_suggestion`."""
    from .reference import inference

    return inference.suggest_slices(volume_hu, k=k, device=device, progress=progress, cancel=cancel, model=model)


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
    from .pipeline import EngineSettings, make_engine as build

    return build(volume_hu, EngineSettings(method=method, device=device, image_weight=image_weight), spacing=spacing,
                 engine_factory=engine_factory)

