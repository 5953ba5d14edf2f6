"""CT input/output with true geometry (SimpleITK underneath, no Qt).

Every volume lives in memory in one orientation, **canonical LPS** (see
``docs/ARCHITECTURE.md``): ``array`` is (Z, Y, X) with x (last axis) running toward the
patient's Left, y toward Posterior and z (first axis) toward Superior. Reading a file
reorients its voxels to that layout by a pure permutation/flip of the array axes (no
interpolation), and records in :attr:`Volume.source` what is needed to put the voxels back
into the file's own layout; :func:`write_volume` and :func:`write_labels` do exactly that,
so a label file written by the tool has the same array layout, spacing, origin and
direction as the image it was drawn on.

Geometry conventions (ITK): ``direction`` is a 3x3 matrix whose column ``j`` is the
physical (x, y, z) LPS direction of the index axis ``j`` (ITK index order i, j, k = numpy
axes 2, 1, 0). ``origin`` is the physical LPS (x, y, z) position of the centre of voxel
``array[0, 0, 0]``; ``spacing`` is in array order (sz, sy, sx), millimetres.

Example:
    >>> vol = read_volume("ct.nii.gz")                 # doctest: +SKIP
    >>> labels = read_labels("seg.nrrd", like=vol)     # doctest: +SKIP
    >>> write_labels(labels.array, vol, "out.nii.gz")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import errno
import gzip
import itertools
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write, check_output_path
from .errors import InputError, OutputError

log = logging.getLogger(__name__)

#: File name endings read by :func:`read_volume` (lower case; DICOM is a folder).
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: File name endings written by :func:`write_volume` / :func:`write_labels`.
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd")

_SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
_POS_LETTERS = ("L", "P", "S")  # index axis runs toward +x, +y, +z (LPS)
_NEG_LETTERS = ("R", "A", "I")
# Tolerances for "same grid": geometry read from different formats differs by float32
# rounding (NIfTI header) or by DICOM slice-position arithmetic (~1e-14 mm).
_SPACING_RTOL = 1e-4
_ORIGIN_TOL_VOXELS = 1e-2
_DIRECTION_ATOL = 1e-4
#: Fraction of the image's extent (along each physical axis) a label file on another
#: grid must cover to be resampled rather than refused.
MIN_LABEL_COVERAGE = 0.9


# --------------------------------------------------------------------------- Volume


@dataclass
class Volume:
    """A 3-D image in canonical LPS with its physical geometry.

    Attributes:
        array: (Z, Y, X) voxels, canonical LPS (x -> Left, y -> Posterior, z -> Superior).
        spacing: (sz, sy, sx) voxel size in mm, array order.
        origin: physical LPS (x, y, z) in mm of the centre of ``array[0, 0, 0]``.
        direction: (3, 3) ITK direction (column j = physical x, y, z direction of index
            axis j, i.e. of numpy axis 2 - j). The identity for axis-aligned files; a
            near-identity residual rotation for oblique ones.
        path: the file or DICOM folder read, if any.
        source: what :func:`write_volume` needs to restore the file's own layout
            (original array shape, axis permutation and flips, spacing, origin,
            direction, orientation code). Plain Python types only.
        meta: free-form (series UID, notices, label names, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    path: str | None = None
    source: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        *,
        path: str | None = None,
        meta: dict | None = None,
    ) -> "Volume":
        """Wrap an array that is already in canonical LPS (identity direction).

        Args:
            array: (Z, Y, X) voxels, canonical LPS.
            spacing: (sz, sy, sx) in mm.
            origin: physical LPS (x, y, z) of ``array[0, 0, 0]`` in mm.
            path: optional file the array stands for.
            meta: optional free-form metadata.

        Returns:
            A Volume whose file orientation is LPS (written files are LPS too).
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"Volume.from_array needs a (Z, Y, X) array, got shape {array.shape}")
        spacing_t = _float3(spacing, "spacing")
        origin_t = _float3(origin, "origin")
        if min(spacing_t) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing_t}")
        direction = np.eye(3)
        source = _make_source(
            file_shape=array.shape,
            perm=(0, 1, 2),
            signs=(1, 1, 1),
            itk_spacing=spacing_t[::-1],
            itk_origin=origin_t,
            itk_direction=direction,
        )
        return cls(array, spacing_t, origin_t, direction, path, source, dict(meta or {}))

    def like(self, array: np.ndarray) -> "Volume":
        """A new Volume with this one's geometry and file layout and another array.

        Args:
            array: (Z, Y, X) array of the same shape as ``self.array``, canonical LPS.

        Returns:
            Volume sharing spacing/origin/direction/source (copied) and a copy of ``meta``
            without its ``notice``.
        """
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"Volume.like: array shape {array.shape} differs from the volume's {self.array.shape}")
        meta = {k: v for k, v in self.meta.items() if k != "notice"}
        return Volume(
            array,
            self.spacing,
            self.origin,
            np.array(self.direction, dtype=float, copy=True),
            self.path,
            copy.deepcopy(self.source),
            meta,
        )

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) shape of the canonical array."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter code of the ORIGINAL file's orientation (e.g. 'LPS', 'LAS', 'RAS').

        Letter ``k`` says toward which patient side the file's index axis ``k`` (i, j, k
        = x, y, z storage order) runs (nibabel/"toward" convention).
        """
        return str(self.source.get("orientation", "LPS"))

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """This volume (or ``array`` on its grid) as a SimpleITK image in canonical layout.

        Args:
            array: optional (Z, Y, X) array of the same shape; defaults to ``self.array``.

        Returns:
            sitk.Image with size (X, Y, Z), spacing (sx, sy, sz), this origin and direction.
        """
        arr = self.array if array is None else np.asarray(array)
        if arr.shape != self.array.shape:
            raise ValueError(f"array shape {arr.shape} differs from the volume's {self.array.shape}")
        img = sitk.GetImageFromArray(_sitk_compatible(arr))
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in np.asarray(self.direction, dtype=float).ravel()))
        return img

    def to_metadata(self) -> dict[str, Any]:
        """Geometry as plain Python types (for a napari layer's ``metadata``), no array.

        :meth:`from_metadata` rebuilds a Volume on the same grid from it, so a Labels layer
        drawn on an image layer can be written back onto the image file's grid.
        """
        return {
            "spacing": [float(s) for s in self.spacing],
            "origin": [float(o) for o in self.origin],
            "direction": [float(v) for v in np.asarray(self.direction, float).ravel()],
            "path": self.path,
            "source": copy.deepcopy(self.source),
        }

    @classmethod
    def from_metadata(cls, array: np.ndarray, metadata: dict[str, Any]) -> "Volume":
        """Volume with ``array`` (Z, Y, X) and the geometry from :meth:`to_metadata`.

        Raises:
            InputError: ``metadata`` lacks geometry, or ``array``'s shape does not match it.
        """
        try:
            spacing = _float3(metadata["spacing"], "spacing")
            origin = _float3(metadata["origin"], "origin")
            direction = np.asarray(metadata["direction"], dtype=float).reshape(3, 3)
            source = copy.deepcopy(dict(metadata.get("source") or {}))
        except (KeyError, TypeError, ValueError):
            raise InputError("The layer carries no CT geometry (spacing, origin, direction); open the image with napari-propseg's reader.") from None
        array = np.asarray(array)
        if source.get("file_shape") is not None and array.ndim == 3:
            perm = source["perm"]
            expected = [source["file_shape"][2 - perm[2 - b]] for b in range(3)]
            if list(array.shape) != expected:
                raise InputError(f"Array shape {array.shape} does not match the image grid {tuple(expected)}; draw the labels on the image they belong to.")
        return cls(array, spacing, origin, direction, metadata.get("path"), source, {})

    def physical_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (x, y, z) of the voxels' outer faces, in mm."""
        return _bounds(
            np.asarray(self.origin, float),
            np.asarray(self.spacing[::-1], float),
            np.asarray(self.direction, float),
            np.asarray(self.array.shape[::-1], float),
        )


# --------------------------------------------------------------------------- helpers


def _float3(values: Sequence[float], what: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{what} needs 3 values, got {values!r}")
    return vals  # type: ignore[return-value]


def _sitk_compatible(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def orientation_code(direction: np.ndarray) -> str:
    """Three-letter "toward" orientation code of an ITK direction matrix (e.g. 'LPS').

    Args:
        direction: (3, 3), column j = physical direction of index axis j.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    perm, signs = _closest_permutation(d)
    letters = [""] * 3
    for p in range(3):
        j = perm[p]
        letters[j] = _POS_LETTERS[p] if signs[p] > 0 else _NEG_LETTERS[p]
    return "".join(letters)


def _closest_permutation(d: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """For each physical axis p, the index axis perm[p] closest to it and its sign.

    Picks the permutation maximising sum |d[p, perm[p]]| (exact for any rotation,
    including oblique ones, where a greedy per-axis choice could pick one axis twice).
    """
    best = max(itertools.permutations(range(3)), key=lambda pm: sum(abs(d[p, pm[p]]) for p in range(3)))
    signs = tuple(1 if d[p, best[p]] >= 0 else -1 for p in range(3))
    return tuple(best), signs  # type: ignore[return-value]


def _make_source(*, file_shape, perm, signs, itk_spacing, itk_origin, itk_direction) -> dict:
    direction = np.asarray(itk_direction, dtype=float).reshape(3, 3)
    return {
        "file_shape": [int(s) for s in file_shape],  # numpy (k, j, i) shape of the file's array
        "perm": [int(p) for p in perm],  # canonical ITK axis p <- file ITK axis perm[p]
        "flip": [bool(s < 0) for s in signs],  # canonical ITK axis p is reversed
        "spacing": [float(s) for s in itk_spacing],  # file's ITK (x, y, z) order
        "origin": [float(o) for o in itk_origin],
        "direction": [float(v) for v in direction.ravel()],
        "orientation": orientation_code(direction),
    }


def _bounds(origin, spacing_xyz, direction, size_xyz) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box (lo, hi), physical (x, y, z), around the voxel faces."""
    corners = np.array(list(itertools.product((0, 1), repeat=3)))
    # continuous index of the outer faces: -0.5 and size - 0.5
    idx = np.where(corners == 0, -0.5, size_xyz[None, :] - 0.5)
    pts = origin[None, :] + (idx * spacing_xyz[None, :]) @ direction.T
    return pts.min(axis=0), pts.max(axis=0)


def _lower_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


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


# --------------------------------------------------------------------------- reading


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


def _read_sitk(path: Path, series_uid: str | None) -> tuple[sitk.Image, dict]:
    """Read ``path`` (file or DICOM folder) into a 3-D scalar sitk image, or raise InputError."""
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path.")
    meta: dict[str, Any] = {}
    if path.is_dir():
        img, meta = _read_dicom_series(path, series_uid)
    else:
        suffix = _lower_suffix(path)
        if suffix not in VOLUME_EXTENSIONS:
            raise InputError(
                f"{path.name} has an unsupported file type {suffix or '(no extension)'!r}; "
                f"napari-propseg reads {_SUPPORTED_TEXT}."
            )
        if suffix == ".dcm":
            # A single DICOM file stands for its series: read the series it belongs to.
            uid = series_uid if series_uid is not None else _dicom_tag(str(path), "0020|000e")
            if not uid and not _has_dicm_preamble(path):
                head = _file_head(path, 132)
                raise InputError(f"{path} is not a DICOM file{_looks_like(head)}; pass a DICOM file of a CT series, its folder or a CT file.")
            return _read_sitk(path.parent, uid)
        try:
            if path.stat().st_size == 0:
                raise InputError(f"{path} is empty (0 bytes); the file is incomplete, copy or export it again.")
        except OSError as exc:
            raise InputError(f"Cannot access {path} ({exc.strerror}); check its permissions.") from None
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_magic(path, suffix)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            log.debug("SimpleITK could not read %s: %s", path, exc)
            raise InputError(
                f"Cannot read {path}: the file is damaged, truncated or not a {suffix} image; export it again."
            ) from None
        if suffix in (".nii", ".nii.gz") and _nifti_truncated(path):
            # ITK's NIfTI reader pads missing voxel data silently; refuse instead.
            raise InputError(f"{path} is truncated (its voxel data ends early); copy or export the file again.")
    _check_image(img, path)
    if img.GetDimension() == 4:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return img, meta


#: Leading bytes of formats that get renamed to .nii.gz by mistake, for the error message.
_KNOWN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"NRRD", "an NRRD file"),
    (b"ObjectType", "a MetaImage header"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"%PDF", "a PDF document"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
)


def _looks_like(head: bytes) -> str:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return " (it is a DICOM file)"
    for magic, name in _KNOWN_MAGIC:
        if head.startswith(magic):
            return f" (it is {name})"
    return ""


def _nifti_header_ok(header: bytes) -> bool:
    """True for a NIfTI-1/NIfTI-2 (or Analyze 7.5, sizeof_hdr 348) header."""
    if len(header) < 4:
        return False
    for endian in ("<", ">"):
        (hsize,) = struct.unpack(endian + "i", header[:4])
        if hsize in (348, 540):
            return True
    return False


def _check_nifti_magic(path: Path, suffix: str) -> None:
    """InputError when a .nii/.nii.gz file is not NIfTI at all (e.g. a PNG renamed), before
    ITK (which picks its reader by content) reads it as something else or calls it damaged.
    A file that starts right but ends early is left to the truncation check."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(540)
    except OSError as exc:
        raise InputError(f"Cannot access {path} ({exc.strerror}); check its permissions.") from None
    gz = head[:2] == b"\x1f\x8b"
    if suffix == ".nii.gz" and not gz:
        if _nifti_header_ok(head):
            return  # an uncompressed NIfTI file named .nii.gz: ITK reads it
        raise InputError(f"{path} is not a NIfTI file{_looks_like(head)}: a .nii.gz file must be a gzip-compressed NIfTI image; "
                         "pass the image in a format napari-propseg reads or export it as NIfTI again.")
    if gz:
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(540)
        except (OSError, EOFError, zlib.error):
            return  # damaged or cut short: the truncation check says so
        if len(head) < 4:
            return
    if not _nifti_header_ok(head):
        raise InputError(f"{path} is not a NIfTI file{_looks_like(head)}: it has no NIfTI header; "
                         "pass the image in a format napari-propseg reads or export it as NIfTI again.")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (voxel offset + data), from its header; None if unknown."""
    for endian in ("<", ">"):
        (hsize,) = struct.unpack(endian + "i", header[:4])
        if hsize == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
            break
        if hsize == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(endian + "h", header[12:14])
            dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    nvox = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return int(max(offset, 348 if hsize == 348 else 540)) + nvox * bitpix // 8


def _nifti_truncated(path: Path) -> bool:
    """True if a .nii/.nii.gz file holds fewer bytes than its header promises."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                header = fh.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return False
            # Cheap check first: the gzip trailer stores the uncompressed size mod 2**32.
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", fh.read(4))
            if isize == expected % 2**32:
                return False
            total = 0  # trailer disagrees (multi-member or extension data?): decompress to be sure
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
            return total < expected
        with open(path, "rb") as fh:
            header = fh.read(540)
        expected = _nifti_expected_bytes(header)
        return expected is not None and path.stat().st_size < expected
    except (OSError, EOFError, gzip.BadGzipFile, struct.error, zlib.error):
        return True


def _check_image(img: sitk.Image, path: Path) -> None:
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise InputError(
            f"{path} is a colour/vector image ({ncomp} components per voxel); napari-propseg needs a "
            "single-channel CT volume in Hounsfield units."
        )
    if "complex" in img.GetPixelIDTypeAsString():
        raise InputError(f"{path} holds complex numbers; napari-propseg needs a real-valued CT volume.")
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputError(f"{path} is a 2-D image (size {'x'.join(map(str, size))}); napari-propseg needs a 3-D CT volume.")
    if dim == 4 and size[3] != 1:
        raise InputError(
            f"{path} is a 4-D volume ({'x'.join(map(str, size))}, e.g. a time series); "
            "extract one 3-D volume from it first."
        )
    if dim not in (3, 4):
        raise InputError(f"{path} is a {dim}-D image; napari-propseg needs a 3-D CT volume.")
    if dim == 4 and min(size[:3]) == 1:
        raise InputError(f"{path} is a 2-D image (size {'x'.join(map(str, size))}); napari-propseg needs a 3-D CT volume.")


def _canonicalize(img: sitk.Image, path: str | None, meta: dict) -> Volume:
    """Reorient a 3-D sitk image to canonical LPS by axis permutation and flips only."""
    arr = sitk.GetArrayFromImage(img)  # numpy (k, j, i)
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    sp = np.array(img.GetSpacing(), dtype=float)
    org = np.array(img.GetOrigin(), dtype=float)
    size = np.array(img.GetSize(), dtype=float)
    perm, signs = _closest_permutation(d)

    # canonical ITK axis p <- file ITK axis perm[p]; numpy axis b = ITK axis 2 - b.
    axes = [2 - perm[2 - b] for b in range(3)]
    out = np.transpose(arr, axes)
    flip_np = [b for b in range(3) if signs[2 - b] < 0]
    if flip_np:
        out = np.flip(out, axis=flip_np)
    out = np.ascontiguousarray(out)

    new_dir = np.empty((3, 3))
    first_idx = np.zeros(3)
    for p in range(3):
        new_dir[:, p] = d[:, perm[p]] * signs[p]
        if signs[p] < 0:
            first_idx[perm[p]] = size[perm[p]] - 1
    new_dir += 0.0  # no negative zeros
    new_origin = org + d @ (sp * first_idx)
    new_sp_xyz = [sp[perm[p]] for p in range(3)]
    source = _make_source(
        file_shape=arr.shape, perm=perm, signs=signs, itk_spacing=sp, itk_origin=org, itk_direction=d
    )
    return Volume(
        array=out,
        spacing=tuple(float(s) for s in new_sp_xyz[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in new_origin),  # type: ignore[arg-type]
        direction=new_dir,
        path=path,
        source=source,
        meta=meta,
    )


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume (NIfTI, NRRD, MHA/MHD, DICOM series folder) into canonical LPS.

    Args:
        path: image file, or folder of a DICOM series (a single ``.dcm`` file stands for
            its series). With several series in a folder the one with most slices is read
            and ``meta['notice']`` lists the others.
        series_uid: SeriesInstanceUID of the DICOM series to read instead.

    Returns:
        Volume with ``array`` (Z, Y, X) in the file's pixel type (HU for CT, rescale
        slope/intercept applied for DICOM) and ``meta`` holding ``series`` (list of dicts
        from :func:`list_dicom_series`) and ``series_uid`` for DICOM input.

    Raises:
        InputError: missing path, unsupported extension, unreadable/truncated file,
            2-D, colour/vector or 4-D image, empty folder, folder without DICOM.
    """
    p = Path(path).expanduser()
    img, meta = _read_sitk(p, series_uid)
    vol = _canonicalize(img, str(p), meta)
    log.info("read %s: shape %s, spacing %s, file orientation %s", p, vol.shape, vol.spacing, vol.orientation)
    return vol


def volume_info(vol: Volume) -> dict[str, Any]:
    """Summary of a volume for display (``propseg info``).

    Returns:
        dict with ``path``, ``shape`` (Z, Y, X), ``spacing`` (sz, sy, sx) mm, ``origin``
        (x, y, z) mm, ``orientation`` (file's code), ``dtype``, ``hu_min``, ``hu_max``,
        ``series`` (list of series dicts, empty for a file), ``series_uid``, ``notice``
        and ``label_ids``: the ids present when the volume looks like a label file (whole
        numbers >= 0, at most :data:`MAX_LABEL_IDS` distinct values), else None.
    """
    arr = vol.array
    finite = arr if np.issubdtype(arr.dtype, np.integer) else arr[np.isfinite(arr)]
    return {
        "path": vol.path,
        "shape": vol.shape,
        "spacing": tuple(float(s) for s in vol.spacing),
        "origin": tuple(float(o) for o in vol.origin),
        "orientation": vol.orientation,
        "oblique": bool(not np.allclose(vol.direction, np.eye(3), atol=_DIRECTION_ATOL)),
        "dtype": str(arr.dtype),
        "hu_min": float(finite.min()) if finite.size else float("nan"),
        "hu_max": float(finite.max()) if finite.size else float("nan"),
        "series": list(vol.meta.get("series", [])),
        "series_uid": vol.meta.get("series_uid"),
        "notice": vol.meta.get("notice"),
        "label_ids": label_ids_present(arr),
    }


#: A volume with at most this many distinct whole-number values >= 0 is taken for a
#: label file by :func:`volume_info` (a CT in HU has thousands of values, and negative ones).
MAX_LABEL_IDS = 256


def label_ids_present(arr: np.ndarray) -> list[int] | None:
    """The distinct values of ``arr`` when it looks like a label volume (integer type,
    values 0..65535, at most :data:`MAX_LABEL_IDS` of them); None otherwise."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return sorted({int(v) for v in np.unique(arr)})
    if not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        return None
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        return None
    flat = arr.reshape(-1)
    counts = np.zeros(hi + 1, dtype=np.int64)
    step = 1 << 22  # in chunks: no full-size int64 copy of a large CT
    for i in range(0, flat.size, step):
        counts += np.bincount(flat[i : i + step], minlength=hi + 1)
    ids = np.flatnonzero(counts)
    return [int(i) for i in ids] if ids.size <= MAX_LABEL_IDS else None


# --------------------------------------------------------------------------- labels


def label_dtype(max_id: int) -> np.dtype:
    """Narrowest integer type for label ids 0..max_id: uint8, uint16 or int32."""
    if max_id <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_id <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_id <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise InputError(f"Label id {max_id} is too large; label ids must fit in a 32-bit integer.")


def _as_label_array(arr: np.ndarray, what: str) -> np.ndarray:
    """Integer label array in the narrowest type, or InputError (negative / non-integral)."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{what} holds NaN or infinite values; a label map needs whole-number ids.")
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(
                f"{what} holds non-integer values (e.g. probabilities); a label map needs whole-number ids, "
                "threshold or argmax it first."
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} has pixel type {arr.dtype}; a label map needs integer ids.")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise InputError(f"{what} holds negative label ids (min {lo}); label ids must be 0 (background) or positive.")
    return arr.astype(label_dtype(int(hi)), copy=False)


def _same_grid(a: Volume, b: Volume) -> bool:
    if a.shape != b.shape:
        return False
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        return False
    if not np.allclose(a.direction, b.direction, atol=_DIRECTION_ATOL, rtol=0):
        return False
    tol = _ORIGIN_TOL_VOXELS * float(min(sa.min(), sb.min()))
    return bool(np.all(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) <= tol))


def grid_difference(a: Volume, b: Volume) -> str:
    """What differs between the grids of ``a`` and ``b`` (the image), in words: e.g.
    ``"origin (400, 400, 400) mm vs the image's (-10, 5, 30) mm"``; shape, spacing,
    origin and direction are compared with the tolerances of the same-grid test."""

    def fmt(v) -> str:
        return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"

    parts = []
    if a.shape != b.shape:
        parts.append(f"shape {a.shape} vs the image's {b.shape}")
    sa, sb = np.asarray(a.spacing, float), np.asarray(b.spacing, float)
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        parts.append(f"spacing {fmt(sa)} mm vs the image's {fmt(sb)} mm")
    tol = _ORIGIN_TOL_VOXELS * float(min(sa.min(), sb.min()))
    if np.any(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) > tol):
        parts.append(f"origin {fmt(a.origin)} mm vs the image's {fmt(b.origin)} mm")
    if not np.allclose(a.direction, b.direction, atol=_DIRECTION_ATOL, rtol=0):
        da, db = orientation_code(a.direction), orientation_code(b.direction)
        parts.append(f"direction {da} vs the image's {db}" if da != db else "a rotated direction (oblique) vs the image's")
    return ", ".join(parts) or "the same grid"


def read_labels(path: str | os.PathLike, like: Volume) -> Volume:
    """Read a label file and put it on ``like``'s grid (canonical LPS).

    Same grid (up to float rounding): taken as is. Another grid covering the same
    physical space (at least :data:`MIN_LABEL_COVERAGE` of the image's extent along each
    axis): nearest-neighbour resampled onto ``like``'s grid, and ``meta['notice']`` says
    so. Otherwise refused.

    Args:
        path: label file (or DICOM folder) with integer ids; float files with whole-number
            values are accepted.
        like: the image the labels belong to.

    Returns:
        Volume with ``like``'s geometry and ``source`` (so writing restores the image's
        file layout) and an integer (Z, Y, X) array in the narrowest type.

    Raises:
        InputError: unreadable file, non-integral or negative values, or a grid that does
            not cover the image. (DICOM SEG and RTSTRUCT objects are read one layer up, by
            :func:`napari_propseg.formats.read_labels`, which falls back to this function.)
    """
    p = Path(path).expanduser()
    img, meta = _read_sitk(p, None)
    lab = _canonicalize(img, str(p), meta)
    what = f"Label file {p}"
    arr = _as_label_array(lab.array, what)
    out = like.like(np.zeros(like.shape, dtype=arr.dtype))
    out.path = str(p)
    out.meta = {"label_source": {"orientation": lab.orientation, "shape": lab.shape, "spacing": lab.spacing}}
    if _same_grid(lab, like):
        out.array = arr
        if lab.orientation != like.orientation:
            log.info("%s is stored as %s, the image as %s: reoriented without resampling", p, lab.orientation, like.orientation)
        return out

    lo_i, hi_i = like.physical_bounds()
    lo_l, hi_l = lab.physical_bounds()
    extent = hi_i - lo_i
    overlap = np.clip(np.minimum(hi_i, hi_l) - np.maximum(lo_i, lo_l), 0, None)
    coverage = overlap / np.maximum(extent, 1e-9)
    if np.any(coverage < MIN_LABEL_COVERAGE):
        raise InputError(
            f"{what} is on another grid ({grid_difference(lab, like)}) and covers only "
            f"{100 * float(coverage.min()):.0f}% of the image's extent along one axis; "
            "use a label file drawn on this image."
        )
    label_img = lab.to_sitk(arr)
    ref = like.to_sitk(np.zeros(like.shape, dtype=np.uint8))
    res = sitk.Resample(label_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_img.GetPixelID())
    out.array = sitk.GetArrayFromImage(res).astype(arr.dtype, copy=False)
    notice = (
        f"{what} is on another grid (shape {lab.shape}, spacing "
        f"{tuple(round(s, 3) for s in lab.spacing)} mm) than the image (shape {like.shape}, spacing "
        f"{tuple(round(s, 3) for s in like.spacing)} mm); it was resampled onto the image grid with nearest neighbour."
    )
    log.warning(notice)
    out.meta["notice"] = notice
    return out


# --------------------------------------------------------------------------- writing


def _to_file_layout(array: np.ndarray, like: Volume) -> sitk.Image:
    """Undo the canonicalisation: canonical (Z, Y, X) -> the file's own array + geometry."""
    src = like.source or Volume.from_array(like.array, like.spacing, like.origin).source
    if not src.get("perm"):
        raise ValueError("Volume.source lacks the file layout; build volumes with read_volume or Volume.from_array")
    perm = src["perm"]
    flip = src["flip"]
    flip_np = [b for b in range(3) if flip[2 - b]]
    out = np.flip(array, axis=flip_np) if flip_np else array
    axes = [2 - perm[2 - b] for b in range(3)]  # canonical np axis b <- file np axis axes[b]
    out = np.transpose(out, np.argsort(axes))
    if list(out.shape) != list(src["file_shape"]):
        raise ValueError(f"layout mismatch: {out.shape} vs file shape {src['file_shape']}")
    img = sitk.GetImageFromArray(_sitk_compatible(np.ascontiguousarray(out)))
    img.SetSpacing(tuple(src["spacing"]))
    img.SetOrigin(tuple(src["origin"]))
    img.SetDirection(tuple(src["direction"]))
    return img


def _check_write_target(path: Path) -> str:
    suffix = _lower_suffix(path)
    if suffix not in WRITE_EXTENSIONS:
        raise InputError(
            f"Cannot write {path.name}: unsupported file type {suffix or '(no extension)'!r}; "
            "use .nii.gz, .nii or .nrrd."
        )
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder; give a file name ending in .nii.gz or .nrrd.")
    return suffix


def check_volume_output(path: str | os.PathLike, *, inputs: Sequence = (), what: str = "label file") -> Path:
    """Check, before any work, that a label/image file can be written at ``path``.

    The extension must be one of :data:`WRITE_EXTENSIONS`, the folder must exist and be
    writable and ``path`` must not be one of ``inputs`` (see
    :func:`napari_propseg.atomic.check_output_path`).

    Raises:
        InputError: unsupported extension; OutputError: folder missing or read-only, or
            ``path`` is an input.
    """
    p = Path(path).expanduser()
    _check_write_target(p)
    return check_output_path(p, inputs=tuple(inputs), what=what)


#: Below this many free bytes on the output's file system a short write is put down to a
#: full disk.
_FULL_DISK_BYTES = 1 << 20


def _free_bytes(folder: Path) -> int | None:
    """Bytes free for this user on ``folder``'s file system (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _short_write_error(folder: Path, detail: str) -> OSError:
    """The OSError for an image file that came out incomplete: a full disk when little is free."""
    free = _free_bytes(folder)
    if free is not None and free < _FULL_DISK_BYTES:
        return OSError(errno.ENOSPC, "the disk is full")
    return OSError(errno.EIO, f"the written file came out incomplete ({detail}; is the disk full or over quota?)")


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


def _expected_data_bytes(img: sitk.Image) -> int:
    n = int(np.prod(img.GetSize(), dtype=np.int64))
    return n * int(img.GetNumberOfComponentsPerPixel()) * int(img.GetSizeOfPixelComponent())


def _gzip_length(path: Path, offset: int = 0) -> int:
    """Uncompressed length of the complete gzip stream(s) from ``offset``; raises EOFError
    / zlib.error / gzip.BadGzipFile when the stream is cut short or damaged (the CRC and
    length in the gzip trailer are checked)."""
    total = 0
    with open(path, "rb") as raw:
        raw.seek(offset)
        with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
    return total


def _verify_image_file(tmp: Path, suffix: str, img: sitk.Image) -> None:
    """Check that the file ITK wrote holds all of ``img`` (its writers can stop short
    without raising, e.g. NIfTI on a full disk); raises OSError otherwise."""
    data = _expected_data_bytes(img)
    folder = tmp.parent
    try:
        if suffix in (".nii", ".nii.gz"):
            if suffix == ".nii.gz":
                with gzip.open(tmp, "rb") as fh:
                    header = fh.read(540)
            else:
                with open(tmp, "rb") as fh:
                    header = fh.read(540)
            expected = _nifti_expected_bytes(header)
            if expected is None or expected - data < 348:
                raise _short_write_error(folder, "its header is missing or damaged")
            have = _gzip_length(tmp) if suffix == ".nii.gz" else tmp.stat().st_size
            if have < expected:
                raise _short_write_error(folder, f"{have} of {expected} bytes")
        elif suffix == ".nrrd":
            with open(tmp, "rb") as fh:
                head = fh.read(1 << 16)
            end = head.find(b"\n\n")
            if not head.startswith(b"NRRD") or end < 0:
                raise _short_write_error(folder, "its header is missing or damaged")
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (ln.partition(":") for ln in head[:end].decode("latin-1").splitlines()[1:])
            )
            offset = end + 2
            encoding = fields.get("encoding", "raw").lower()
            if encoding in ("gzip", "gz"):
                have = _gzip_length(tmp, offset)
            elif encoding == "raw":
                have = tmp.stat().st_size - offset
            else:
                return
            if have < data:
                raise _short_write_error(folder, f"{have} of {data} data bytes")
    except (EOFError, zlib.error, gzip.BadGzipFile, struct.error) as exc:
        raise _short_write_error(folder, f"its compressed data ends early ({exc.__class__.__name__})") from None


def _atomic_write(img: sitk.Image, path: Path, suffix: str, what: str = "label file") -> None:
    """Write ``img`` to ``path`` through :func:`napari_propseg.atomic.atomic_write`: a
    temporary file beside it, checked to hold every voxel, then renamed over ``path``.

    Raises:
        OutputError: one sentence (the disk is full, read-only folder, ...); an existing
            file at ``path`` is left as it was and no temporary file remains.
    """

    def write(tmp: Path) -> None:
        try:
            with _c_stderr_to_log():
                sitk.WriteImage(img, str(tmp), useCompression=(suffix in (".nrrd", ".nii.gz")))
        except RuntimeError as exc:
            log.debug("SimpleITK could not write %s: %s", path, exc)
            free = _free_bytes(tmp.parent)
            if free is not None and free < _FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, "the disk is full") from None
            raise OSError(errno.EIO, f"the image writer failed ({_first_line(exc)})") from None

    atomic_write(path, write, verify=lambda tmp: _verify_image_file(tmp, suffix, img), suffix=suffix, what=what)
    log.info("wrote %s", path)


def _check_shape(array: np.ndarray, like: Volume, what: str) -> None:
    if array.ndim != 3 or array.shape != like.array.shape:
        raise InputError(
            f"{what} has shape {tuple(array.shape)} but the image has shape {like.shape}; "
            "they must be drawn on the same (Z, Y, X) grid."
        )


def write_volume(array: np.ndarray, like: Volume, path: str | os.PathLike, *, what: str = "image") -> Path:
    """Write ``array`` on ``like``'s grid, in ``like``'s original file layout, atomically.

    Args:
        array: (Z, Y, X) canonical-LPS array of ``like``'s shape (any numeric type).
        like: the volume whose geometry and file orientation are restored.
        path: ``.nii.gz``, ``.nii`` or ``.nrrd`` (the extension picks the format).
        what: what the file is, for error messages.

    Returns:
        The path written.

    Raises:
        InputError: unsupported extension, shape mismatch; OutputError (an InputError):
            missing or read-only folder, full disk or any other write failure (the old
            file, if any, is left untouched and no partial or temporary file remains).
    """
    p = Path(path).expanduser()
    suffix = _check_write_target(p)
    arr = np.asarray(array)
    _check_shape(arr, like, "The array to write")
    check_output_path(p, what=what)
    _atomic_write(_to_file_layout(arr, like), p, suffix, what=what)
    return p


def write_labels(labels: np.ndarray | Volume, like: Volume, path: str | os.PathLike, *, what: str = "label file") -> Path:
    """Write an integer label volume on ``like``'s grid and original file layout, atomically.

    Args:
        labels: (Z, Y, X) canonical-LPS label ids (or a Volume), 0 = background;
            float arrays must hold whole numbers.
        like: the image the labels were drawn on.
        path: ``.nii.gz``, ``.nii`` or ``.nrrd``.
        what: what the file is, for error messages.

    Returns:
        The path written. The file's pixel type is uint8, uint16 or int32, the narrowest
        that holds the largest id. An all-background volume is written too, with a
        warning in the log.

    Raises:
        InputError: as :func:`write_volume`, plus negative or non-integral ids.
    """
    p = Path(path).expanduser()
    suffix = _check_write_target(p)
    arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    _check_shape(arr, like, "The label volume")
    arr = _as_label_array(arr, "The label volume")
    check_output_path(p, what=what)
    _atomic_write(_to_file_layout(arr, like), p, suffix, what=what)
    if not arr.any():
        log.warning("%s holds no label (every voxel is background)", p)
    return p
