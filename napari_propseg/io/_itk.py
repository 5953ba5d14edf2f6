"""SimpleITK plumbing shared by reading and writing: one-sentence ITK error text,
ITK warnings off, C-level stderr to the log, the lower-case file suffix.

Part of :mod:`napari_propseg.io`."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import SimpleITK as sitk


log = logging.getLogger("napari_propseg.io")  # one logger for the io package

def _lower_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()

def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages look like "Exception thrown in SimpleITK ReadImage: /path/file.cxx:123:\nITK ERROR: ..."
    for ln in lines:
        if "ERROR" in ln:
            return _strip_itk_object(ln.split("ERROR:", 1)[-1].strip().rstrip("."))[:200]
    return _strip_itk_object(lines[-1] if lines else type(exc).__name__)[:200]


def _strip_itk_object(text: str) -> str:
    """``"NrrdImageIO(0x55d0): Write: ..."`` -> ``"Write: ..."`` (no class names or addresses)."""
    return re.sub(r"^\w+ ?\(0x[0-9a-fA-F]+\):\s*", "", text).strip() or text

@contextlib.contextmanager
def _c_stderr_to_log() -> Iterator[None]:
    """Send what C libraries print straight to file descriptor 2 (the NIfTI library's
    "** ERROR: NWAD: wrote only ..." on a full disk) to the debug log, so that the user
    sees one sentence; Python's own stderr is untouched."""
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sink = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield
        return
    try:
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        try:
            sink.seek(0)
            text = sink.read(4000).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        sink.close()
        if text:
            log.debug("image writer said: %s", text)


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Keep ITK from printing its own warnings (e.g. GDCM's "No Series were found") on
    stderr; the caller turns what matters into one sentence."""
    try:
        before = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    except AttributeError:  # pragma: no cover - very old SimpleITK
        yield
        return
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)
