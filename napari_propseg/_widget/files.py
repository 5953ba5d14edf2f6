"""Session files and export from the dock: resume, autosave and Export.

:class:`FilesMixin` (part of :class:`~napari_propseg._widget.widget.PropSegWidget`) offers a
saved session of the open image (the Resume button), keeps a session not resumed aside,
autosaves (in a background thread after each run and on the timer) and exports the labels
through :meth:`napari_propseg.session.Session.export`.
"""
from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QMessageBox

from .. import session_store
from ..errors import InputError
from ..session import BrokenSessionError, Session, find_session, ids_in, keep_aside, quarantine_session, session_dir
from . import common
from .common import guarded
from .panel import AUTO_IMAGE_WEIGHT

log = logging.getLogger(__name__)


class FilesMixin:
    """Resume, autosave and export (needs the attributes of :func:`build_panel`)."""

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
        common.notify("info", msg)

    def _ask(self, title: str, question: str) -> bool:
        """Ask a yes/no question (modal); tests replace this method."""
        answer = QMessageBox.question(self, title, question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    @guarded
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
        common.notify("warning", msg)

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
        self._ids_in_use = ids_in(self._labels_layer.data)
        self._legend_key = None
        n_sugg = sum(1 for _, st in loaded.anchors.items() if st == "suggested")
        msg = (f"Resumed the session saved in {folder}: {len(loaded.anchors)} anchors"
               + (f" ({n_sugg} suggested, to check)" if n_sugg else "")
               + ". Check next, correct, then Propagate.")
        self._set_status(msg)
        common.notify("info", msg)
        self._refresh_anchor_list()

    # ------------------------------------------------------------------ export
    def export_formats(self) -> list[tuple[str, str, str, str]]:
        """The formats the Export dialog offers: every format of :data:`EXPORT_FORMATS` when
        ``napari_propseg.formats`` is installed, else NIfTI and NRRD."""
        have = session_store.formats_module() is not None
        return [f for f in session_store.EXPORT_FORMATS if have or f[0] in session_store.BASIC_FORMATS]

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
        inferred = session_store.format_of(path)
        if chosen_fmt is None:
            return path, inferred
        fmt, _label, patterns, ext = chosen_fmt
        if any(fnmatch.fnmatch(Path(path).name.lower(), pat) for pat in patterns.split()):
            return path, fmt  # e.g. DICOM RTSTRUCT chosen, "plan.dcm" typed
        if inferred is not None:
            return path, inferred  # the typed extension wins over the filter
        return path + ext, fmt

    @guarded
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
        try:
            written, json_path, n_present = self.session.export(Path(path), fmt, self.label_names())
        except (InputError, OSError) as exc:
            self._error(exc)
            return None
        msg = f"Labels written to {written} (label map {json_path.name}, {n_present} labels)."
        self._set_status(msg)
        common.notify("info", msg)
        return written

    @guarded
    def _autosave(self, force: bool = False, background: bool = False) -> None:
        """Save the session when it changed (``force``: anyway). ``background``: the labels are
        copied now and compressed and written in a thread (after a run, on the timer), so the
        GUI does not wait for it; a later save waits for that one."""
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
                    common.notify("info", f"The earlier session in {folder} was not resumed; it is kept as "
                                  f"{', '.join(p.name for p in moved)} and this session is saved instead.")
            self._resumable = None
            self.resume_btn.setVisible(False)
        self.session.settings.update(self._settings())
        folder = self.session.settings.get("session_folder")
        if background:
            self.session.save_in_background(folder, self._bridge.saved.emit)
            return
        try:
            self.session.save(folder)
        except InputError as exc:
            common.notify("warning", f"Autosave failed: {exc}")

    @guarded
    def _on_saved(self, folder, exc) -> None:
        """A background save finished (GUI thread)."""
        if exc is not None:
            common.notify("warning", f"Autosave failed: {exc}")
