"""Clinical label formats in and out: DICOM SEG, RTSTRUCT, 3D Slicer ``.seg.nrrd``, NIfTI, NRRD.

Out: :func:`export_labels` writes a (Z, Y, X) label array drawn on an image
(:class:`~napari_propseg.io.Volume`) in one of :data:`FORMATS`, with the same label names
and colours (:mod:`napari_propseg.labelcolors`) in every format. DICOM SEG and RTSTRUCT
need the image to be the DICOM series the labels were drawn on.

In: :func:`is_label_object` / :func:`read_label_object` take a DICOM SEG or RTSTRUCT file
(or a folder holding one next to its series) and place it on an image's grid;
:func:`napari_propseg.io.read_labels` calls them, so such a file is accepted wherever a
label file is. :func:`label_names_for` gives the names of any label file.

Example:
    >>> from napari_propseg.io import read_volume            # doctest: +SKIP
    >>> ct = read_volume("ct_dicom/")                         # doctest: +SKIP
    >>> export_labels(lab, ct, "seg.dcm", "dicom-seg", {1: "liver"})   # doctest: +SKIP
    >>> vol, names = read_label_object("seg.dcm", ct)          # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from ..filenames import split_extension

log = logging.getLogger(__name__)

#: Export formats (``--format`` values).
FORMATS = ("dicom-seg", "rtstruct", "seg-nrrd", "nifti", "nrrd")
#: File name endings stripped to find the label map beside a label file.
LABEL_ENDINGS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# --------------------------------------------------------------------------- names


def label_stem(path: str | os.PathLike) -> Path:
    """``path`` without its label-file ending (``a/b.seg.nrrd`` -> ``a/b``)."""
    p = Path(path)
    stem, ext = split_extension(p.name, LABEL_ENDINGS)
    if ext:
        return p.with_name(stem)
    return p.with_name(p.stem) if p.suffix else p


def label_map_path(path: str | os.PathLike) -> Path:
    """The label map JSON beside a label file: ``<stem>.labels.json``."""
    stem = label_stem(path)
    return stem.with_name(stem.name + ".labels.json")


def format_from_path(out: str | os.PathLike, fmt: str | None = None) -> str:
    """The export format of ``out``: ``fmt`` when given, else from the file name.

    ``.seg.nrrd`` -> seg-nrrd, ``.nrrd`` -> nrrd, ``.nii``/``.nii.gz`` -> nifti, ``.dcm``
    -> dicom-seg.

    Raises:
        InputError: unknown ``fmt``, or a name that says no format.
    """
    if fmt is not None:
        f = str(fmt).strip().lower().replace("_", "-")
        f = {"seg": "dicom-seg", "dicomseg": "dicom-seg", "rt-struct": "rtstruct", "segnrrd": "seg-nrrd",
             "nii": "nifti", "nii.gz": "nifti", "slicer": "seg-nrrd"}.get(f, f)
        if f not in FORMATS:
            raise InputError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
        return f
    low = Path(out).name.lower()
    if low.endswith(".seg.nrrd"):
        return "seg-nrrd"
    if low.endswith(".nrrd"):
        return "nrrd"
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        return "nifti"
    if low.endswith(".dcm"):
        return "dicom-seg"
    raise InputError(f"Cannot tell the export format from the name {Path(out).name!r}; end it in .dcm, .seg.nrrd, "
                     f".nrrd, .nii.gz or .nii, or pass --format ({', '.join(FORMATS)}).")


def _clean_names(names: Mapping | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, v in (names or {}).items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            raise InputError(f"Label map entry {k!r} is not an integer id; ids must be whole numbers.") from None
        if i > 0 and str(v).strip():
            out[i] = str(v).strip()
    return out


def label_names_for(path: str | os.PathLike, like=None) -> dict[int, str]:
    """Names of the labels in a label file: from a SEG/RTSTRUCT or ``.seg.nrrd`` itself, else
    from ``<stem>.labels.json`` beside it; ``{}`` when there are none. Never raises for a
    missing map."""
    p = Path(path)
    try:
        if is_label_object(p):
            if like is None:
                return _names_in_object(p)
            return read_label_object(p, like)[1]
        if p.name.lower().endswith(".seg.nrrd") and p.is_file():
            from .slicer import read_seg_nrrd_names

            names, _ = read_seg_nrrd_names(p)
            if names:
                return names
        jp = label_map_path(p)
        if jp.is_file():
            from ..labelmap import read_label_map

            return _clean_names(read_label_map(jp))
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - names are optional
        log.debug("no label names for %s", p, exc_info=True)
    return {}


def _names_in_object(p: Path) -> dict[int, str]:
    """Segment/ROI names of a SEG or RTSTRUCT header, without placing its voxels."""
    import pydicom

    from .dicom_seg import _ID_RE

    files = [p] if p.is_file() else [f for f, _ in _objects_in(p)]
    if not files:
        return {}
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    if "SegmentSequence" in ds:
        out = {}
        for s in ds.SegmentSequence:
            m = _ID_RE.search(str(s.get("SegmentDescription", "") or ""))
            out[int(m.group(1)) if m else int(s.SegmentNumber)] = str(s.get("SegmentLabel", ""))
        return out
    return {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", []) or []}


def resolve_label_names(present: list[int], label_map: Mapping | None = None, labels_path=None, like=None) -> dict[int, str]:
    """``{id: name}`` for every id in ``present``: from ``label_map``, else from the labels
    file's own names or its ``<stem>.labels.json``, else ``label_<id>``."""
    names = _clean_names(label_map) if label_map else {}
    if not names and labels_path is not None:
        names = _clean_names(label_names_for(labels_path, like))
    return {int(i): names.get(int(i), f"label_{int(i)}") for i in sorted(present)}


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    format: str
    names: dict[int, str]  # the labels written (id -> name)
    left_out: dict[int, str] = field(default_factory=dict)  # named labels without a voxel
    extra_files: list[Path] = field(default_factory=list)  # e.g. the label map JSON


def export(labels: np.ndarray, like, out: str | os.PathLike, fmt: str | None = None,
           label_map: Mapping | None = None, *, labels_path=None) -> ExportResult:
    """:func:`export_labels` with details: which labels were written and which left out."""
    from ..atomic import check_output_path
    from ..io import Volume, _as_label_array
    from ..labelcolors import label_color

    out_p = Path(out).expanduser()
    fmt = format_from_path(out_p, fmt)
    arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    if arr.ndim != 3 or tuple(arr.shape) != tuple(like.shape):
        raise InputError(f"The labels have shape {tuple(arr.shape)} but the image has shape {tuple(like.shape)}; "
                         "the labels are not on the image's grid, export them with the image they were drawn on.")
    arr = _as_label_array(arr, "The label volume")
    check_output_path(out_p, inputs=tuple(x for x in (like.path, labels_path) if x), what=f"{fmt} file")
    present = [int(i) for i in np.unique(arr) if i]
    given = _clean_names(label_map) if label_map else {}
    if not given and labels_path is not None:
        given = _clean_names(label_names_for(labels_path, like))
    all_names = resolve_label_names(sorted(set(present) | set(given)), given)
    names = {i: all_names[i] for i in present}
    left_out = {i: n for i, n in all_names.items() if i not in names}
    if left_out and fmt in ("dicom-seg", "rtstruct", "seg-nrrd"):
        log.warning("empty labels left out of the %s: %s", fmt,
                    ", ".join(f"{i} ({n})" for i, n in sorted(left_out.items())))
    colors = {i: label_color(n, i) for i, n in names.items()}
    extra: list[Path] = []
    if fmt in ("dicom-seg", "rtstruct") and not names:
        raise InputError(f"The labels are empty (no voxel is labelled); there is nothing to write as a {fmt} file.")
    if fmt == "dicom-seg":
        from .dicom_seg import write_seg

        write_seg(arr, like, out_p, names, colors)
    elif fmt == "rtstruct":
        from .rtstruct import write_rtstruct

        write_rtstruct(arr, like, out_p, names, colors)
    elif fmt == "seg-nrrd":
        if not out_p.name.lower().endswith(".nrrd"):
            raise InputError(f"A 3D Slicer segmentation must be named *.seg.nrrd, not {out_p.name}.")
        from .slicer import write_seg_nrrd

        write_seg_nrrd(arr, like, out_p, names, colors)
    else:
        from ..io import write_labels
        from ..labelmap import write_label_map

        low = out_p.name.lower()
        if fmt == "nifti" and not (low.endswith(".nii") or low.endswith(".nii.gz")):
            raise InputError(f"A NIfTI file must be named *.nii.gz or *.nii, not {out_p.name}.")
        if fmt == "nrrd" and not low.endswith(".nrrd"):
            raise InputError(f"An NRRD file must be named *.nrrd, not {out_p.name}.")
        write_labels(arr, like, out_p)
        jp = label_map_path(out_p)
        write_label_map({0: "background", **all_names}, jp)
        extra.append(jp)
    log.info("exported %d labels to %s (%s)", len(names), out_p, fmt)
    return ExportResult(out_p, fmt, names, left_out, extra)


def export_labels(labels: np.ndarray, like, out: str | os.PathLike, fmt: str | None = None,
                  label_map: Mapping | None = None) -> Path:
    """Write ``labels`` drawn on ``like`` to ``out`` in ``fmt``; returns the path written.

    Args:
        labels: (Z, Y, X) integer label array on ``like``'s grid (canonical LPS).
        like: the image Volume (for DICOM SEG / RTSTRUCT: read from the DICOM series).
        out: output file.
        fmt: one of :data:`FORMATS` (``"dicom-seg"``, ``"rtstruct"``, ``"seg-nrrd"``,
            ``"nifti"``, ``"nrrd"``); None: from ``out``'s name (:func:`format_from_path`).
        label_map: ``{id: name}``; ids without a name are called ``label_<id>``.

    Returns:
        ``out`` as a Path. NIfTI/NRRD also get ``<stem>.labels.json`` beside them.

    Raises:
        InputError: the labels are not on ``like``'s grid, ``like`` is not a DICOM series
            (SEG/RTSTRUCT), too many labels for the format, nothing to write.
        OutputError: ``out`` cannot be written (nothing half-written is left).
    """
    return export(labels, like, out, fmt, label_map).path


# --------------------------------------------------------------------------- import


def _objects_in(folder: Path) -> list[tuple[Path, str]]:
    from .dicom import label_object_files

    return label_object_files(folder)


def is_label_object(path: str | os.PathLike) -> bool:
    """True for a DICOM SEG or RTSTRUCT file, or a folder holding one. Never raises."""
    try:
        from .dicom import LABEL_SOP_CLASSES, sniff_sop_class

        p = Path(path).expanduser()
        if p.is_dir():
            return bool(_objects_in(p))
        low = p.name.lower()
        if any(low.endswith(e) for e in LABEL_ENDINGS):
            return False
        return (sniff_sop_class(p) or "") in LABEL_SOP_CLASSES
    except Exception:  # noqa: BLE001
        return False


def _pick_object(folder: Path, like) -> tuple[Path, str]:
    import pydicom

    from .dicom import referenced_series_uids

    found = _objects_in(folder)
    if not found:
        raise InputError(f"Folder {folder} holds no DICOM SEG or RTSTRUCT file.")
    wanted = str((like.meta or {}).get("series_uid") or "")
    if wanted:
        matching = []
        for f, kind in found:
            try:
                refs = referenced_series_uids(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception:  # noqa: BLE001
                refs = []
            if not refs or wanted in refs:
                matching.append((f, kind))
        if matching:
            found = matching
    if len(found) > 1:
        log.warning("folder %s holds %d label objects; read %s", folder, len(found), found[0][0].name)
    return found[0]


def read_labels(path: str | os.PathLike, like):
    """Read any label file onto ``like``'s grid: a DICOM SEG or RTSTRUCT (file, or a folder
    holding one; names in ``meta['label_names']``) through :func:`read_label_object`,
    anything else (NIfTI, NRRD, MHA, a DICOM label series) through
    :func:`napari_propseg.io.read_labels`. Returns a Volume; raises InputError."""
    if is_label_object(path):
        return read_label_object(path, like)[0]
    from ..io import read_labels as read_label_image

    return read_label_image(path, like)


def read_label_object(path: str | os.PathLike, like) -> tuple:
    """Read a DICOM SEG or RTSTRUCT (file, or a folder holding one) onto ``like``'s grid.

    Args:
        path: the SEG/RTSTRUCT file, or a folder holding one (e.g. next to its series).
        like: the image Volume the object's series was read into.

    Returns:
        ``(labels, names)``: a Volume with ``like``'s geometry and source and an integer
        (Z, Y, X) array, and ``{id: name}``. ``labels.meta`` holds ``label_names``,
        ``label_colors`` ({id: (r, g, b)}), ``label_object`` (kind, native_ids,
        referenced_series).

    Raises:
        InputError: not a SEG/RTSTRUCT, it references another series than ``like``
            (naming both UIDs), or its frames/contours are not on ``like``'s grid.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p} does not exist; check the path.")
    if p.is_dir():
        p, kind = _pick_object(p, like)
    else:
        from .dicom import LABEL_SOP_CLASSES, sniff_sop_class

        kind = LABEL_SOP_CLASSES.get(sniff_sop_class(p) or "")
        if kind is None:
            raise InputError(f"{p} is neither a DICOM SEG nor an RTSTRUCT file.")
    if kind == "dicom-seg":
        from .dicom import OffGridError
        from .dicom_seg import read_seg

        try:
            arr, names, info = read_seg(p, like)
        except OffGridError as exc:  # e.g. a ground truth on another grid: resample, as read_labels does
            arr, names, info = _read_seg_resampled(p, like, exc)
    else:
        from .rtstruct import read_rtstruct

        arr, names, info = read_rtstruct(p, like)
    from ..io import label_dtype

    top = int(arr.max()) if arr.size else 0
    out = like.like(arr.astype(label_dtype(top), copy=False))
    out.path = str(p)
    out.meta = {"label_names": dict(names), "label_colors": dict(info.pop("colors", {})), "label_object": info}
    if info.get("notice"):
        out.meta["notice"] = info["notice"]
    log.info("read %s %s: %d labels (%s)", kind, p, len(names), ", ".join(f"{i} {n}" for i, n in names.items()))
    return out, dict(names)


def _read_seg_resampled(p: Path, like, why: Exception):
    """A SEG whose frames are off ``like``'s grid: read on its own frame grid, then
    nearest-neighbour resampled onto ``like`` (refused when it misses the image)."""
    import SimpleITK as sitk

    from .dicom_seg import read_seg

    own = _seg_own_grid(p)
    own.meta = dict(like.meta or {})  # keep the series UID check
    arr, names, info = read_seg(p, own)
    lo_i, hi_i = like.physical_bounds()
    lo_s, hi_s = own.physical_bounds()
    if np.any(np.minimum(hi_i, hi_s) <= np.maximum(lo_i, lo_s)):
        raise InputError(f"DICOM SEG {p} does not overlap the image ({why}).")
    src = own.to_sitk(arr)
    ref = like.to_sitk(np.zeros(like.shape, dtype=np.uint8))
    res = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, src.GetPixelID())
    notice = (f"DICOM SEG {p} is on another grid than the image (frames {own.shape}, spacing "
              f"{tuple(round(s, 3) for s in own.spacing)} mm); it was resampled onto the image grid with nearest neighbour.")
    log.warning(notice)
    info["notice"] = notice
    return sitk.GetArrayFromImage(res).astype(arr.dtype, copy=False), names, info


def align_label_ids(labels, label_names: Mapping[int, str] | None):
    """The label array of ``labels`` with its ids matched by name to ``label_names``.

    Only for labels read from a SEG/RTSTRUCT whose ids are not napari-propseg's own (an
    RTSTRUCT's ROI numbers, a foreign SEG's segment numbers): ids whose names match
    (:func:`~napari_propseg.labelmap.translate_by_name`) take the target id; the others
    keep theirs unless that id is taken, then they are dropped (logged). Anything else is
    returned unchanged.
    """
    arr = labels.array
    meta = getattr(labels, "meta", None) or {}
    info = meta.get("label_object")
    names = meta.get("label_names")
    if not info or not names or info.get("native_ids") or not label_names:
        return arr
    from ..labelmap import relabel, translate_by_name

    table = translate_by_name(names, label_names)
    if not table:
        return arr
    taken = set(table.values())
    full = {}
    dropped = []
    for i in names:
        if i in table:
            full[i] = table[i]
        elif i not in taken:
            full[i] = i
        else:
            dropped.append(i)
    if dropped:
        log.warning("%s: labels %s have no name in the label map and their ids are taken; left out",
                    labels.path, ", ".join(f"{i} ({names[i]})" for i in dropped))
    log.info("%s: ids matched by name: %s", labels.path, ", ".join(f"{s}->{t}" for s, t in sorted(full.items()) if s != t) or "none changed")
    return relabel(arr, full)


def reference_image(path: str | os.PathLike):
    """The image a SEG/RTSTRUCT file references, to place it on when no image is given.

    Looks for the referenced series in the file's folder and the folder above it (and
    their subfolders, as :func:`~napari_propseg.io.list_dicom_series` does). A SEG whose
    series is not found is placed on the grid its own frames span; an RTSTRUCT needs its
    series.

    Raises:
        InputError: an RTSTRUCT whose series is not beside it.
    """
    import pydicom

    from ..io import _series_below, _series_in, read_volume
    from .dicom import referenced_series_uids

    p = Path(path).expanduser()
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    refs = referenced_series_uids(ds)
    seen: set[Path] = set()
    for folder in (p.parent, p.parent.parent):
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        try:
            series = _series_in(folder) + _series_below(folder)
        except (InputError, OSError, RuntimeError):
            continue
        for s in series:
            if s["uid"] and s["uid"] in refs:
                return read_volume(s["folder"], series_uid=s["uid"])
    if "SegmentSequence" in ds:
        log.info("the series %s referenced by %s is not beside it; placed on the SEG's own frame grid", refs[:1], p)
        return _seg_own_grid(p)
    raise InputError(f"RTSTRUCT {p} references DICOM series {refs[0] if refs else '(none)'}, which is not in its folder "
                     "or the folder above; open that series first and read the RTSTRUCT onto it.")


def _seg_own_grid(p: Path):
    """A Volume (zeros) on the grid the frames of a SEG span (for a SEG without its series)."""
    import pydicom
    import SimpleITK as sitk

    from ..io import _canonicalize
    from .dicom_seg import _fg

    ds = pydicom.dcmread(p, stop_before_pixels=True)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    frames = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    try:
        iop = np.asarray([float(v) for v in _fg(frames[0], shared, "PlaneOrientationSequence", "ImageOrientationPatient")])
        ps = [float(v) for v in _fg(frames[0], shared, "PixelMeasuresSequence", "PixelSpacing")]
        ipps = np.asarray([[float(v) for v in _fg(f, shared, "PlanePositionSequence", "ImagePositionPatient")] for f in frames])
    except (TypeError, IndexError, ValueError):
        raise InputError(f"DICOM SEG {p} has no plane positions and its series is not beside it; open the series first.") from None
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    pos = ipps @ n
    uniq = np.unique(np.round(pos, 3))
    pm = (ds.get("SharedFunctionalGroupsSequence") or [{}])[0].get("PixelMeasuresSequence") if shared is not None else None
    dz = None
    if pm and pm[0].get("SpacingBetweenSlices"):
        dz = float(pm[0].SpacingBetweenSlices)
    if not dz:
        dz = float(np.min(np.diff(uniq))) if len(uniq) > 1 else float(ps[0])
    n_slices = int(round((uniq[-1] - uniq[0]) / dz)) + 1 if len(uniq) > 1 else 1
    first_ipp = ipps[int(np.argmin(pos))]
    img = sitk.Image(int(ds.Columns), int(ds.Rows), max(n_slices, 1), sitk.sitkUInt8)
    img.SetSpacing((ps[1], ps[0], dz))
    img.SetOrigin(tuple(float(v) for v in first_ipp))
    img.SetDirection(tuple(np.column_stack([r, c, n]).ravel().tolist()))
    return _canonicalize(img, str(p), {})
