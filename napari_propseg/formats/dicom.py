"""DICOM plumbing shared by the SEG and RTSTRUCT writers/readers (pydicom, no Qt).

* :func:`series_of` finds the DICOM files of the series a :class:`~napari_propseg.io.Volume`
  was read from (from ``meta['series_uid']``/``meta['series']``, else from ``path``) and
  reads their headers, filling what an untidy series leaves empty from the file meta
  (SOP Class/Instance UID) and refusing, in one sentence, what cannot be filled.
* :class:`PlaneMap` maps one DICOM frame (rows x columns at ImagePositionPatient, oriented
  by ImageOrientationPatient) onto a plane of the canonical (Z, Y, X) array of a Volume,
  exactly (no interpolation): ``extract`` gives the frame's pixels in the DICOM file's own
  row/column order, ``insert`` writes a frame back.
* :func:`physical_to_index` / :func:`index_to_physical`: patient (LPS, mm) coordinates <->
  continuous canonical ITK indices (x, y, z) of a Volume.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: SOP classes of label objects (DICOM SEG, RT Structure Set).
LABEL_SOP_CLASSES = {SEG_SOP_CLASS: "dicom-seg", RTSTRUCT_SOP_CLASS: "rtstruct"}
#: Tolerance (voxels) for a DICOM frame to lie on a Volume's grid.
GRID_TOL_VOXELS = 0.2
#: At most this many files of a folder are sniffed for a SEG/RTSTRUCT.
MAX_FOLDER_FILES = 5000


# --------------------------------------------------------------------------- geometry


class OffGridError(InputError):
    """A DICOM frame does not lie on the image's voxel grid."""


def _grid(like) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    origin = np.asarray(like.origin, float)
    direction = np.asarray(like.direction, float).reshape(3, 3)
    spacing_xyz = np.asarray(like.spacing, float)[::-1]
    return origin, direction, spacing_xyz


def physical_to_index(points: np.ndarray, like) -> np.ndarray:
    """(N, 3) LPS points in mm -> (N, 3) continuous canonical ITK indices (x, y, z)."""
    origin, direction, sp = _grid(like)
    pts = np.asarray(points, float).reshape(-1, 3)
    return np.linalg.solve(direction, (pts - origin).T).T / sp


def index_to_physical(index: np.ndarray, like) -> np.ndarray:
    """(N, 3) continuous canonical ITK indices (x, y, z) -> (N, 3) LPS points in mm."""
    origin, direction, sp = _grid(like)
    idx = np.asarray(index, float).reshape(-1, 3)
    return origin + (idx * sp) @ direction.T


@dataclass(frozen=True)
class PlaneMap:
    """Where one DICOM frame lies in a Volume's canonical array (ITK axes 0=x, 1=y, 2=z).

    Frame pixel (row a, column b) is canonical ITK voxel with
    ``index[col_axis] = col_start + col_sign * b``, ``index[row_axis] = row_start + row_sign * a``
    and ``index[slice_axis] = slice_index``.
    """

    slice_axis: int
    slice_index: int
    row_axis: int
    row_start: int
    row_sign: int
    col_axis: int
    col_start: int
    col_sign: int
    rows: int
    cols: int

    def _key(self) -> tuple:
        key: list[Any] = [None, None, None]
        key[self.slice_axis] = self.slice_index
        for axis, start, sign, n in ((self.row_axis, self.row_start, self.row_sign, self.rows),
                                     (self.col_axis, self.col_start, self.col_sign, self.cols)):
            if sign > 0:
                key[axis] = slice(start, start + n)
            else:
                stop = start - n
                key[axis] = slice(start, stop if stop >= 0 else None, -1)
        return tuple(key)

    def extract(self, array_zyx: np.ndarray) -> np.ndarray:
        """The (rows, cols) frame of the canonical (Z, Y, X) array, in DICOM row/column order."""
        sub = np.asarray(array_zyx).transpose(2, 1, 0)[self._key()]
        return sub.T if self.col_axis < self.row_axis else sub  # sub is ordered by ITK axis number

    def insert(self, array_zyx: np.ndarray, frame: np.ndarray, *, where: np.ndarray | None = None) -> None:
        """Write a (rows, cols) frame into the canonical array (only where ``where`` is True)."""
        view = array_zyx.transpose(2, 1, 0)[self._key()]
        f = np.asarray(frame)
        f = f.T if self.col_axis < self.row_axis else f
        if where is None:
            view[...] = f
        else:
            w = where.T if self.col_axis < self.row_axis else where
            view[w] = f[w]


def plane_map(ipp: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float], rows: int, cols: int,
              like, *, what: str) -> PlaneMap:
    """The :class:`PlaneMap` of a frame, or InputError when it is not on ``like``'s grid.

    Args:
        ipp: ImagePositionPatient (x, y, z) of the frame's first pixel, mm.
        iop: ImageOrientationPatient (row direction, column direction).
        pixel_spacing: PixelSpacing (between rows, between columns), mm.
        rows, cols: frame size.
        like: the Volume.
        what: the frame's origin for the error sentence.
    """
    iop = np.asarray([float(v) for v in iop], float)
    ps = [float(v) for v in pixel_spacing]
    origin, direction, sp = _grid(like)
    inv = np.linalg.inv(direction)
    idx0 = (inv @ (np.asarray([float(v) for v in ipp], float) - origin)) / sp
    u = (inv @ iop[:3]) * ps[1] / sp  # index step per column
    v = (inv @ iop[3:]) * ps[0] / sp  # index step per row
    shape_xyz = np.asarray(like.array.shape[::-1])

    def axis_of(step: np.ndarray, n: int) -> tuple[int, int]:
        ax = int(np.argmax(np.abs(step)))
        sign = 1 if step[ax] > 0 else -1
        ideal = np.zeros(3)
        ideal[ax] = sign
        if np.abs(step - ideal).max() * max(n, 1) > GRID_TOL_VOXELS * 2:
            raise OffGridError(f"{what} is not on the image grid (its pixel spacing or orientation differs from the "
                             f"image's {tuple(round(s, 4) for s in like.spacing)} mm); use the series the labels belong to.")
        return ax, sign

    col_axis, col_sign = axis_of(u, cols)
    row_axis, row_sign = axis_of(v, rows)
    if col_axis == row_axis:
        raise InputError(f"{what} has a degenerate ImageOrientationPatient; the file is damaged.")
    slice_axis = 3 - col_axis - row_axis
    rounded = np.round(idx0)
    if np.abs(idx0 - rounded).max() > GRID_TOL_VOXELS:
        raise OffGridError(f"{what} lies between the image's voxels (offset {np.round(idx0 - rounded, 2).tolist()} voxels); "
                         "it is not on the grid of the image the labels belong to.")
    start = rounded.astype(int)
    ends = {col_axis: start[col_axis] + col_sign * (cols - 1), row_axis: start[row_axis] + row_sign * (rows - 1)}
    inside = 0 <= start[slice_axis] < shape_xyz[slice_axis]
    for ax, end in ends.items():
        inside = inside and 0 <= start[ax] < shape_xyz[ax] and 0 <= end < shape_xyz[ax]
    if not inside:
        raise OffGridError(f"{what} lies outside the image (voxel {start.tolist()} of a {shape_xyz.tolist()} grid); "
                         "it is not on the grid of the image the labels belong to.")
    return PlaneMap(slice_axis, int(start[slice_axis]), row_axis, int(start[row_axis]), row_sign,
                    col_axis, int(start[col_axis]), col_sign, int(rows), int(cols))


# --------------------------------------------------------------------------- files


def sniff_sop_class(path: str | os.PathLike) -> str | None:
    """SOP Class UID of a DICOM file from its file meta (or dataset), None if not DICOM. Never raises."""
    p = Path(path)
    try:
        if not p.is_file():
            return None
        with open(p, "rb") as fh:
            head = fh.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            if p.suffix.lower() != ".dcm":
                return None
        import pydicom

        try:
            meta = pydicom.filereader.read_file_meta_info(p)
            uid = str(meta.get("MediaStorageSOPClassUID", "") or "")
        except Exception:  # noqa: BLE001 - no file meta: read the dataset header
            uid = ""
        if not uid:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID", "Modality"])
            uid = str(ds.get("SOPClassUID", "") or "")
            if not uid:
                modality = str(ds.get("Modality", "") or "")
                uid = {"SEG": SEG_SOP_CLASS, "RTSTRUCT": RTSTRUCT_SOP_CLASS}.get(modality, "")
        return uid or None
    except Exception:  # noqa: BLE001 - a sniff never raises
        return None


def label_object_files(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``[(file, kind)]`` of the DICOM SEG / RTSTRUCT files directly in ``folder``."""
    out = []
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []
    for f in files[:MAX_FOLDER_FILES]:
        kind = LABEL_SOP_CLASSES.get(sniff_sop_class(f) or "")
        if kind:
            out.append((f, kind))
    return out


@dataclass
class SeriesInfo:
    """The DICOM series of a Volume: headers (pixel data not read) and where each file lies."""

    uid: str
    folders: list[Path]
    files: list[Path]
    headers: list[Any]  # pydicom Datasets, same order as files
    maps: list[PlaneMap]
    notes: list[str] = field(default_factory=list)

    @property
    def slice_axis(self) -> int:
        return self.maps[0].slice_axis

    def by_slice(self) -> dict[int, int]:
        """canonical slice index (along :attr:`slice_axis`) -> position in ``files``."""
        return {m.slice_index: i for i, m in enumerate(self.maps)}


def _candidate_series(like) -> tuple[list[dict], str | None]:
    """Series entries (uid, folders) that may hold ``like``'s files, and the UID wanted."""
    from ..io import list_dicom_series

    meta = dict(like.meta or {})
    uid = meta.get("series_uid")
    entries = []
    for s in meta.get("series") or []:
        folders = s.get("folders") or [s.get("folder")]
        entries.append({"uid": s.get("uid", ""), "folders": [Path(f) for f in folders if f], "n_slices": s.get("n_slices", 0)})
    if not entries and meta.get("series_folder"):
        entries.append({"uid": uid or "", "folders": [Path(meta["series_folder"])], "n_slices": 0})
    if not entries and like.path:
        p = Path(like.path)
        folder = p if p.is_dir() else p.parent
        if p.is_file() and p.suffix.lower() == ".dcm":
            from ..io import _dicom_tag

            uid = uid if uid is not None else _dicom_tag(str(p), "0020|000e")
        if p.is_dir() or p.suffix.lower() == ".dcm":
            try:
                entries = [{"uid": s["uid"], "folders": list(s["folders"]), "n_slices": s["n_slices"]} for s in list_dicom_series(folder)]
            except InputError:
                entries = []
    if uid is not None:
        entries = [e for e in entries if e["uid"] == uid] or entries
    return entries, uid


def _fill_from_file_meta(ds, path: Path) -> list[str]:
    """Fill empty SOP Class/Instance UIDs from the file meta; returns what was filled."""
    filled = []
    meta = getattr(ds, "file_meta", None)
    for attr, meta_attr in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(ds.get(attr, "") or "").strip() and meta is not None and str(meta.get(meta_attr, "") or "").strip():
            setattr(ds, attr, str(meta.get(meta_attr)))
            filled.append(attr)
    cs = ds.get("SpecificCharacterSet", None)
    if cs is not None and not any(str(v).strip() for v in ([cs] if isinstance(cs, str) else list(cs))):
        del ds.SpecificCharacterSet  # an empty value means the default repertoire
    return filled


def series_of(like, *, purpose: str) -> SeriesInfo:
    """The DICOM series ``like`` was read from, each file mapped onto ``like``'s grid.

    Args:
        like: the image Volume (from :func:`napari_propseg.io.read_volume` on a DICOM series,
            or rebuilt from layer metadata).
        purpose: what needs the series ("a DICOM SEG", "an RTSTRUCT"), for the errors.

    Raises:
        InputError: ``like`` is not a DICOM series, its files are gone, or they do not lie on
            its grid.
    """
    import pydicom
    import SimpleITK as sitk

    entries, uid = _candidate_series(like)
    where = like.path or "the image"
    if not entries:
        raise InputError(f"{where} is not a DICOM series; {purpose} must reference the DICOM series the labels were "
                         "drawn on, so pass that series' folder as the image (or export .seg.nrrd, .nii.gz or .nrrd).")
    problems = []
    for entry in entries:
        files: list[Path] = []
        for folder in entry["folders"]:
            if Path(folder).is_dir():
                files += [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), entry["uid"])]
        if not files:
            problems.append(f"series {entry['uid'] or '(no UID)'} has no files left in {', '.join(map(str, entry['folders']))}")
            continue
        headers, maps, notes = [], [], []
        try:
            for f in files:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                filled = _fill_from_file_meta(ds, f)
                if filled and not notes:
                    notes.append(f"{', '.join(filled)} empty in {f.name} (and maybe others); taken from the file meta")
                try:
                    m = plane_map(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, int(ds.Rows),
                                  int(ds.Columns), like, what=f"DICOM file {f}")
                except AttributeError as exc:
                    raise InputError(f"DICOM file {f} lacks {exc.args[0].split()[-1] if exc.args else 'its geometry'}; "
                                     "it is not an image slice.") from None
                headers.append(ds)
                maps.append(m)
        except InputError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        axes = {m.slice_axis for m in maps}
        slices = sorted(m.slice_index for m in maps)
        n = like.array.shape[::-1][maps[0].slice_axis]
        if len(axes) != 1 or slices != list(range(n)):
            problems.append(f"the {len(files)} files of series {entry['uid'] or '(no UID)'} do not fill the image's "
                            f"{n} slices one to one")
            continue
        info = SeriesInfo(entry["uid"], list(entry["folders"]), files, headers, maps, notes)
        for note in notes:
            log.info("DICOM series %s: %s", entry["uid"] or "(no UID)", note)
        return info
    raise InputError(f"The DICOM series of {where} does not match the image grid ({'; '.join(problems)}); "
                     f"{purpose} needs the series the labels were drawn on.")


#: Attributes every referenced series must carry (type 1 in SEG/RTSTRUCT references).
REQUIRED_REFERENCE = (("StudyInstanceUID", "(0020,000D)"), ("SeriesInstanceUID", "(0020,000E)"),
                      ("SOPInstanceUID", "(0008,0018)"), ("SOPClassUID", "(0008,0016)"),
                      ("FrameOfReferenceUID", "(0020,0052)"))


def check_references(series: SeriesInfo, *, purpose: str) -> None:
    """InputError (one sentence) naming the attributes the series lacks for ``purpose``."""
    missing = []
    for attr, tag in REQUIRED_REFERENCE:
        if any(not str(ds.get(attr, "") or "").strip() for ds in series.headers):
            missing.append(f"{attr} {tag}")
    if missing:
        folder = series.folders[0] if series.folders else "?"
        raise InputError(f"The DICOM series in {folder} has no {' and no '.join(missing)} (empty in its files and not "
                         f"in the file meta), which {purpose} must reference; fix the series' headers or export "
                         ".seg.nrrd, .nii.gz or .nrrd instead.")


def first(ds, *names: str, default: Any = "") -> Any:
    """The first present, non-empty attribute of ``ds`` among ``names``."""
    for n in names:
        v = ds.get(n, None)
        if v not in (None, ""):
            return v
    return default


def referenced_series_uids(ds) -> list[str]:
    """SeriesInstanceUIDs a SEG or RTSTRUCT dataset references."""
    uids: list[str] = []
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        if item.get("SeriesInstanceUID"):
            uids.append(str(item.SeriesInstanceUID))
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        for st in fr.get("RTReferencedStudySequence", []) or []:
            for se in st.get("RTReferencedSeriesSequence", []) or []:
                if se.get("SeriesInstanceUID"):
                    uids.append(str(se.SeriesInstanceUID))
    return list(dict.fromkeys(uids))


def check_same_series(ds, like, path: Path, kind: str) -> None:
    """InputError naming both series when ``ds`` references another series than ``like``."""
    wanted = str((like.meta or {}).get("series_uid") or "")
    refs = referenced_series_uids(ds)
    if wanted and refs and wanted not in refs:
        raise InputError(f"{kind} {path} references DICOM series {refs[0]}, but the image is series {wanted}; "
                         "open it with the series it was drawn on.")
    if not wanted and refs:
        log.info("%s %s references series %s; the image carries no series UID, placed by patient coordinates", kind, path, refs[0])

