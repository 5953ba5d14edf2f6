"""File sniffing and DICOM series discovery/reading (folders, split series, slice order).

Part of :mod:`napari_propseg.io`; import the public names from there."""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ._itk import _first_line, _itk_warnings_off, _lower_suffix
from .volume import _SUPPORTED_TEXT, VOLUME_EXTENSIONS

log = logging.getLogger("napari_propseg.io")  # one logger for the io package

def _is_dicom_file(path: Path) -> bool:
    """Cheap DICOM sniff: 'DICM' at byte 128 (Part 10) or a .dcm name."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _file_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (b"" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _has_dicm_preamble(path: Path) -> bool:
    head = _file_head(path, 132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _folder_has_dicom(folder: Path, max_files: int = 64) -> bool:
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return False
    return any(_is_dicom_file(p) for p in entries[:max_files])


def is_readable_path(path: str | os.PathLike) -> bool:
    """Cheap check (no pixel data read) whether :func:`read_volume` would take ``path``.

    True for an existing file with a supported extension, or a folder holding at least
    one DICOM file among its first entries, itself or in one of its first 64 subfolders
    (breadth first). Never raises.
    """
    try:
        p = Path(path)
        if p.is_dir():
            return _folder_has_dicom(p) or any(_folder_has_dicom(sub, max_files=8) for sub in itertools.islice(_iter_subfolders(p), 64))
        return p.is_file() and _lower_suffix(p) in VOLUME_EXTENSIONS
    except (OSError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- DICOM


def _dicom_tags(filename: str, *tags: str) -> list[str]:
    """The values of ``tags`` in one DICOM file's header ('' where missing or unreadable)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return [""] * len(tags)
    return [reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "" for t in tags]


def _dicom_tag(filename: str, tag: str) -> str:
    return _dicom_tags(filename, tag)[0]


def _check_folder(folder: Path) -> None:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise InputError(f"Cannot list folder {folder} ({exc.strerror}); check its permissions.") from None
    if not entries:
        raise InputError(f"Folder {folder} is empty; point to a folder holding a DICOM series or to a CT file.")


#: How deep and how wide :func:`list_dicom_series` looks below a folder without a series.
DICOM_SCAN_DEPTH = 6
DICOM_SCAN_MAX_FOLDERS = 5000


def _series_in(folder: Path) -> list[dict[str, Any]]:
    """The DICOM series directly in ``folder`` (``uid``, ``n_slices``, ``description``, ``folder``)."""
    out = []
    with _itk_warnings_off():
        found = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
                 for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    for uid, files in found.items():
        if files:
            out.append({"uid": uid, "n_slices": len(files), "description": _dicom_tag(files[0], "0008|103e"), "folder": folder})
    return out


def _child_folders(folder: Path) -> list[Path]:
    """Subfolders of ``folder``, sorted; hidden ones and symbolic links left out (no loops)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    except OSError:
        return []


def _iter_subfolders(folder: Path, descend: Callable[[Path], bool] = lambda _: True) -> Iterator[Path]:
    """Subfolders of ``folder``, breadth first, at most DICOM_SCAN_DEPTH levels down (a PACS
    export: patient/study/series/...); a folder for which ``descend`` says False (called
    after it was yielded) is not entered. Lazy: the caller stops the walk."""
    level = [folder]
    for _ in range(DICOM_SCAN_DEPTH):
        nxt = []
        for f in level:
            for sub in _child_folders(f):
                yield sub
                if descend(sub):
                    nxt.append(sub)
        if not nxt:
            return
        level = nxt


def _series_below(folder: Path) -> list[dict[str, Any]]:
    """DICOM series in the subfolders of ``folder`` (:func:`_iter_subfolders`, at most
    DICOM_SCAN_MAX_FOLDERS folders), not below a folder that holds a series. A series whose
    files are spread over several folders (one UID) becomes one entry with all its
    ``folders``."""
    found: list[dict[str, Any]] = []

    def scan(sub: Path) -> bool:
        here = _series_in(sub)
        found.extend(here)
        return not here

    for n, _ in enumerate(_iter_subfolders(folder, descend=scan), start=1):
        if n > DICOM_SCAN_MAX_FOLDERS:  # folder n is not scanned: scan() runs when the walk resumes
            log.warning("stopped looking for DICOM series below %s after %d folders", folder, DICOM_SCAN_MAX_FOLDERS)
            break
    return _merge_split_series(found)


def _merge_split_series(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per SeriesInstanceUID (series without a UID stay apart)."""
    merged: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for s in series:
        if s["uid"] and s["uid"] in merged:
            m = merged[s["uid"]]
            m["n_slices"] += s["n_slices"]
            m["folders"].append(s["folder"])
            continue
        entry = dict(s, folders=[s["folder"]])
        out.append(entry)
        if s["uid"]:
            merged[s["uid"]] = entry
    return out


def _slice_position(filename: str) -> float | None:
    """Position of a DICOM slice along its normal (ImagePositionPatient . normal), or None."""
    pos_text, iop_text = _dicom_tags(filename, "0020|0032", "0020|0037")
    try:
        pos = [float(v) for v in pos_text.split("\\")]
        iop = [float(v) for v in iop_text.split("\\")]
    except ValueError:
        return None
    if len(pos) != 3 or len(iop) != 6:
        return None
    return float(np.dot(pos, np.cross(iop[:3], iop[3:])))


def _series_files(chosen: dict[str, Any]) -> list[str]:
    """The files of a series, in slice order (sorted by position when spread over folders)."""
    folders = chosen["folders"]
    with _itk_warnings_off():
        files = [f for d in folders for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), chosen["uid"])]
    if len(folders) > 1:
        pos = [_slice_position(f) for f in files]
        if any(p is None for p in pos):
            raise InputError(f"DICOM series {chosen['uid']} is spread over {len(folders)} folders and some files lack a slice "
                             "position; copy its files into one folder and open that.")
        files = [f for _, f in sorted(zip(pos, files))]
    return files


def list_dicom_series(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """DICOM series in ``folder``, most slices first.

    The series directly in ``folder`` when there are any; otherwise those in its subfolders
    (breadth first, up to :data:`DICOM_SCAN_DEPTH` levels), as a PACS export or a DICOMDIR
    disc nests them (patient/study/series).

    Args:
        folder: a folder of DICOM files, or a folder above such folders.

    Returns:
        One dict per series: ``uid`` (SeriesInstanceUID, '' when the files carry none),
        ``n_slices`` (number of files), ``description`` (SeriesDescription or ''),
        ``folder`` (the folder holding its first files) and ``folders`` (every folder
        holding its files: one series may be spread over several).

    Raises:
        InputError: missing or empty folder, or no DICOM series in it or below it.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"Folder {folder} does not exist; check the path.")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; list_dicom_series needs a folder of DICOM files.")
    _check_folder(folder)
    series = [dict(s, folders=[s["folder"]]) for s in _series_in(folder)]
    if not series:
        series = _series_below(folder)
    if not series:
        below = " (nor do its subfolders)" if any(p.is_dir() for p in folder.iterdir()) else ""
        raise InputError(
            f"Folder {folder} holds no DICOM series{below}; point to a DICOM series folder or to a "
            f"{_SUPPORTED_TEXT.replace(' or a DICOM series folder', '')} file."
        )
    series.sort(key=lambda s: (-s["n_slices"], s["uid"], str(s["folder"])))
    return series


def _series_json(s: dict[str, Any]) -> dict[str, Any]:
    """A :func:`list_dicom_series` entry with its folders as absolute path strings."""
    out = {k: v for k, v in s.items() if k not in ("folder", "folders")}
    out["folder"] = str(Path(s["folder"]).resolve())
    if len(s.get("folders") or []) > 1:
        out["folders"] = [str(Path(d).resolve()) for d in s["folders"]]
    return out


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, dict]:
    series = list_dicom_series(folder)
    if series_uid is None:
        chosen = series[0]
    else:
        matches = [s for s in series if s["uid"] == series_uid]
        if not matches:
            known = ", ".join(repr(s["uid"]) for s in series)
            raise InputError(f"Folder {folder} has no DICOM series with UID {series_uid!r}; the series found are {known}.")
        chosen = matches[0]
    where = chosen["folder"]
    meta: dict[str, Any] = {"series_uid": chosen["uid"], "series": [_series_json(s) for s in series],
                            "series_description": chosen["description"], "series_folder": str(Path(where).resolve())}
    notes = []
    if len(chosen["folders"]) > 1:
        shown = ", ".join(str(Path(d).relative_to(folder)) for d in chosen["folders"])
        notes.append(f"DICOM series {chosen['uid']} is spread over {len(chosen['folders'])} folders ({shown}); read them together.")
    elif where != folder:
        notes.append(f"Folder {folder} holds no DICOM files itself; read the series in {where.relative_to(folder)}.")
    if len(series) > 1 and series_uid is None:
        others = "; ".join(f"{s['uid'] or '(no UID)'} ({s['n_slices']} slices)" for s in series[1:])
        notes.append(
            f"Folder {folder} holds {len(series)} DICOM series; read {chosen['uid'] or '(no UID)'} "
            f"({chosen['n_slices']} slices, the most), others: {others}; pick one with series_uid/--series."
        )
    if notes:
        notice = " ".join(notes)
        log.warning(notice)
        meta["notice"] = notice
    files = _series_files(chosen)
    if len(files) < 2:
        raise InputError(
            f"DICOM series {chosen['uid'] or '(no UID)'} in {where} has a single slice (a 2-D image); "
            "napari-propseg needs a 3-D CT series."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Cannot read the DICOM series in {where} ({_first_line(exc)}); check that its files are complete.") from None
    _check_slice_spacing(reader, len(files), where, meta)
    return img, meta


def _check_slice_spacing(reader: sitk.ImageSeriesReader, n: int, folder: Path, meta: dict) -> None:
    """Warn (and note in meta) when DICOM slices are unevenly spaced (missing slices)."""
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        iop = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
    except (RuntimeError, ValueError, IndexError):
        return
    normal = np.cross(iop[:3], iop[3:])
    steps = np.diff(np.sort(pos @ normal))
    if steps.size and steps.max() - steps.min() > 0.01 * max(abs(np.median(steps)), 1e-6):
        msg = (
            f"DICOM series in {folder} has uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm, "
            "missing slices?); the volume uses the mean spacing."
        )
        log.warning(msg)
        meta["notice"] = (meta.get("notice", "") + " " + msg).strip()
