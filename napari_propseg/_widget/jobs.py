"""Work off the GUI thread: propagation and Suggest in napari workers, their progress, and
the write-back of a run in small steps so the event loop never blocks for long.

:class:`JobsMixin` (part of :class:`~napari_propseg._widget.widget.PropSegWidget`) starts a
job with :meth:`JobsMixin._start`; its ``on_done`` runs on the GUI thread and may be a
generator, which is then stepped for at most :data:`STEP_BUDGET_S` per event-loop turn.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import threading
import time

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from .. import session as session_mod
from ..errors import InputError
from ..session import ids_in
from . import common
from .common import guarded
from .layers import layer_label_names
from .panel import reference_available

log = logging.getLogger(__name__)

#: Longest stretch (seconds) of write-back work done in one turn of the event loop.
STEP_BUDGET_S = 0.04
#: The dock's progress bar is redrawn at most this often (seconds): every redraw repaints
#: the whole window, which under software OpenGL (no GPU, remote desktops) costs CPU the
#: engine needs (measured with ``propseg bench gui``, see the README).
PROGRESS_EVERY_S = 0.25


#: Modules the first run needs, imported in the background when the dock opens: loading
#: their compiled libraries holds the GIL (a few hundred ms on a loaded 2-core machine), which
#: would otherwise freeze the GUI at the first Propagate.
WARM_UP_MODULES = ("napari_propseg.propagation.engine", "scipy.ndimage", "napari.qt.threading")


def warm_up(modules=WARM_UP_MODULES) -> threading.Thread:
    """Import ``modules`` in a daemon thread (errors are ignored: the run reports them)."""

    def work():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - e.g. an installation without the engine
                log.debug("warm-up import of %s failed", name, exc_info=True)

    thread = threading.Thread(target=work, name="propseg-warm-up", daemon=True)
    thread.start()
    return thread


class _Bridge(QObject):
    """Carries progress and autosave results from worker threads to the GUI thread (queued signals)."""

    progressed = Signal(int, int, str)
    saved = Signal(object, object)


class JobsMixin:
    """Workers, progress and the runs (needs the attributes of :func:`build_panel`)."""

    def _busy(self, busy: bool) -> None:
        for b in (self.propagate_btn, self.check_btn, self.mark_btn, self.remove_btn, self.undo_btn, self.export_btn,
                  self.lock_btn, self.series_combo):
            b.setEnabled(not busy)
        self.suggest_btn.setEnabled(not busy and reference_available())
        self.cancel_btn.setEnabled(busy)
        if not busy and self.session is not None:
            self.undo_btn.setEnabled(len(self.session.undo_stack) > 0)

    def _start(self, fn, on_done, what: str, total: int, job: str) -> None:
        """Run ``fn`` in a worker; ``on_done(result)`` in the GUI thread; ``what`` names the
        progress bar ("Propagating"), ``job`` the job in messages ("Propagation").

        ``on_done`` may be a generator function: its steps then run on the GUI thread for
        at most :data:`STEP_BUDGET_S` per event-loop turn, and the job counts as running
        (:meth:`is_busy`) until the last one.

        The progress shows in the dock's own bar, redrawn at most every
        :data:`PROGRESS_EVERY_S` (not in napari's activity panel, whose animation alone
        costs a core under software rendering)."""
        from napari.qt.threading import create_worker

        self._cancel.clear()
        self._job = job
        self._progress = (0, int(total), what)
        self._progress_shown = 0.0
        self.progress_bar.setRange(0, max(0, int(total)))  # 0..0: busy indicator
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat(f"{what}: %v / %m" if total else what)
        self.progress_bar.setVisible(True)
        worker = create_worker(fn, _start_thread=False, _ignore_errors=True)  # errors -> self._error
        worker.returned.connect(lambda payload: self._on_returned(on_done, payload))
        worker.errored.connect(self._error)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._steps, self._worker_done = None, False
        self._busy(True)
        self._set_status(f"{what}…")
        worker.start()

    def _on_returned(self, on_done, payload) -> None:
        try:
            out = on_done(payload)
        except Exception as exc:  # noqa: BLE001 - never raise into Qt
            self._error(exc)
            return
        if inspect.isgenerator(out):
            self._steps = out
            QTimer.singleShot(0, self._step)

    def _step(self) -> None:
        """Run the write-back steps for up to :data:`STEP_BUDGET_S`, then yield to the event loop."""
        steps = self._steps
        if steps is None:
            return
        end = time.perf_counter() + STEP_BUDGET_S
        try:
            while time.perf_counter() < end:
                next(steps)
        except StopIteration:
            self._steps = None
        except Exception as exc:  # noqa: BLE001 - never raise into Qt
            self._steps = None
            self._error(exc)
        if self._steps is None:
            if self._worker_done:
                self._finish_job()
            return
        QTimer.singleShot(0, self._step)

    def _call_safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - never raise into Qt
            self._error(exc)

    @guarded
    def _on_progress(self, step: int, total: int, message: str) -> None:
        if self._progress is None or self._worker is None:  # a late signal after the job ended
            return
        self._progress = (int(step), int(total), message or "")
        now = time.perf_counter()
        if now - self._progress_shown < PROGRESS_EVERY_S and step < total:
            return
        self._progress_shown = now
        self.progress_bar.setRange(0, max(0, int(total)))
        self.progress_bar.setValue(int(step))
        self.progress_bar.setFormat(f"{message}  %v / %m" if message else "%v / %m")

    def _progress_cb(self, step: int, total: int, message: str = "") -> None:
        self._bridge.progressed.emit(int(step), int(total), str(message))

    @guarded
    def _finished(self) -> None:
        """The worker thread ended; the job ends once its write-back steps are done too."""
        self._worker_done = True
        if self._steps is None:
            self._finish_job()

    @guarded
    def _finish_job(self) -> None:
        self._worker = None
        self._worker_done = False
        self._progress = None
        self.progress_bar.setVisible(False)
        self._busy(False)
        todo, self._after_job = self._after_job, []
        for fn in todo:
            self._call_safely(fn)

    @guarded
    def cancel(self) -> None:
        """Ask the running job to stop (it stops within one slice)."""
        self._cancel.set()
        self._set_status("Cancelling…")

    def is_busy(self) -> bool:
        return self._worker is not None

    @guarded
    def propagate(self) -> None:
        """Propagate (or re-propagate the gaps around the slices changed since the last run)
        in a worker; the result is written back in steps (:meth:`_start`)."""
        if self._worker is not None or self.session is None or self._image_layer is None:
            return
        self.flush_edits()
        session = self.session
        try:
            run = session.begin_run(method=self.method_combo.currentText(), device=self.device_combo.currentText(),
                                    spacing=self._spacing(), image_weight=self.image_weight(),
                                    volume_id=id(self._image_layer))
        except InputError as exc:
            self._error(exc)
            return
        volume = np.asarray(self._image_layer.data)
        cancel, progress = self._cancel.is_set, self._progress_cb

        def job():
            return run.execute(volume, progress=progress, cancel=cancel)

        def done(outcome):
            if self.session is not session:  # the layers were changed meanwhile: drop the result
                return
            summary = yield from session.apply_steps(outcome)
            self._labels_layer.refresh()
            yield  # each of these costs tens of ms on a 512x512 slice: one event-loop turn each
            self.last_result, self.last_summary = outcome.result, summary
            edited = sorted(session.changed_since)  # painted while the engine ran
            self._ids_in_use = outcome.ids | (ids_in(session.labels[edited]) if edited else set())
            self._set_status(summary.text())
            self._refresh_anchor_list()
            yield
            self._autosave(force=True, background=True)

        self._start(job, done, "Re-propagating" if run.changed else "Propagating", session.labels.shape[0], "Propagation")

    @guarded
    def suggest(self) -> None:
        """Run the reference module on k slices (:func:`napari_propseg.session.suggest`) and
        take its masks in as anchors (:meth:`~napari_propseg.session.Session.apply_suggestion`)."""
        if self._worker is not None or self.session is None or self._image_layer is None:
            return
        if not reference_available():
            common.notify("warning", "The reference module is not available in this build; paint anchors by hand.")
            return
        volume = np.asarray(self._image_layer.data)
        k, device = int(self.k_spin.value()) or None, self.device_combo.currentText()  # 0 = auto: the CLI's default
        model = self.model_combo.currentText() or None
        cancel, progress = self._cancel.is_set, self._progress_cb

        def job():
            return session_mod.suggest(volume, k=k, device=device, model=model, progress=progress, cancel=cancel)

        def done(sugg):
            zs, left_out = self.session.apply_suggestion(sugg, layer_label_names(self._labels_layer))
            self._labels_layer.refresh()
            self._ids_in_use |= ids_in(np.asarray(sugg.labels)[list(sugg.slices)])
            if left_out:
                common.notify("info", "Suggest" + left_out)
            self._set_status(f"Suggested {len(zs)} slices ({model}); check and correct them, then Propagate.{left_out}")
            self._refresh_anchor_list()

        from ..reference.inference import default_k

        self._start(job, done, "Suggesting", k or default_k(volume.shape[0]), "Suggest")
