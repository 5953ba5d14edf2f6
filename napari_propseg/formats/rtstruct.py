"""RT Structure Sets (RTSTRUCT), written and read with pydicom alone.

Contours: for every slice of the referenced series and every label, the outline of the
label's pixels *along the pixel edges* (marching squares on the mask upsampled 2x, so each
contour runs on the boundary between inside and outside pixels, cutting the corners by a
quarter pixel), one CLOSED_PLANAR contour per outline, holes as contours of their own.
Filling the contours back with the even-odd rule at the pixel centres (each contour
toggles what it encloses, :func:`contours_to_mask`) gives exactly the original pixels,
holes included, also for one-pixel-thin structures.

Each contour references the SOP instance of its slice (ContourImageSequence); ROI Number
= the label id, ROI Name = the label's name, ROI Display Color from
:mod:`napari_propseg.labelcolors`.
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from .dicom import RTSTRUCT_SOP_CLASS, check_references, check_same_series, first, index_to_physical, physical_to_index, series_of

log = logging.getLogger(__name__)

#: ROI Number is an IS (signed 32-bit) value.
MAX_ROI_NUMBER = 2**31 - 1
TOOL_NAME = "napari-propseg"


# --------------------------------------------------------------------------- geometry of outlines


def _drop_collinear(xy: np.ndarray) -> np.ndarray:
    """A closed polygon without repeated points and without vertices on straight runs."""
    keep = np.ones(len(xy), bool)
    keep[1:] = np.any(np.abs(np.diff(xy, axis=0)) > 1e-9, axis=1)
    xy = xy[keep]
    if len(xy) > 1 and np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    if len(xy) < 3:
        return xy
    prev, nxt = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
    d1, d2 = xy - prev, nxt - xy
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    return xy[np.abs(cross) > 1e-9]


def mask_to_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D boolean mask along its pixel edges.

    Args:
        mask: (P, Q) bool; pixel (p, q) is centred at continuous coordinate (p, q).

    Returns:
        List of (N, 2) float arrays of (p, q) vertices (not repeating the first), one per
        outer boundary and one per hole; even-odd filling restores ``mask`` exactly.
    """
    from skimage.measure._find_contours import find_contours  # the submodule: skimage.measure pulls in scipy.signal

    m = np.asarray(mask, bool)
    if not m.any():
        return []
    pp, qq = np.nonzero(m)
    p0, q0 = int(pp.min()), int(qq.min())
    crop = m[p0: int(pp.max()) + 1, q0: int(qq.max()) + 1]
    up = np.pad(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1), 1).astype(np.float32)
    out = []
    for c in find_contours(up, 0.5, fully_connected="high"):
        # upsampled index u (after the 1-pixel pad) -> original pixel coordinate
        xy = _drop_collinear((c - 1.5) / 2.0 + np.array([p0, q0], float))
        if len(xy) >= 3:
            out.append(xy)
    return out


def contours_to_mask(contours: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of (N, 2) (p, q) polygons on a (P, Q) grid, at the pixel centres.

    A pixel is inside when a ray from its centre along +q crosses the polygons' edges an
    odd number of times (so overlapping contours cancel: holes stay holes). Scanline fill
    of all edges at once (vectorised), vertices counted half-open.
    """
    P, Q = int(shape[0]), int(shape[1])
    starts, ends = [], []
    for c in contours:
        c = np.asarray(c, float).reshape(-1, 2)
        if len(c) < 3:
            continue
        starts.append(c)
        ends.append(np.roll(c, -1, axis=0))
    if not starts:
        return np.zeros((P, Q), bool)
    a, b = np.concatenate(starts), np.concatenate(ends)
    lo = np.minimum(a[:, 0], b[:, 0])
    hi = np.maximum(a[:, 0], b[:, 0])
    r0 = np.clip(np.ceil(lo), 0, P).astype(np.int64)  # rows r with lo <= r < hi
    r1 = np.clip(np.ceil(hi), 0, P).astype(np.int64)
    n = np.maximum(r1 - r0, 0)
    if n.sum() == 0:
        return np.zeros((P, Q), bool)
    edge = np.repeat(np.arange(len(a)), n)
    rows = np.repeat(r0, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    pa, qa, pb, qb = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
    q = qa + (rows - pa) * (qb - qa) / (pb - pa)
    col = np.clip(np.floor(q).astype(np.int64) + 1, 0, Q)  # first pixel centre right of the crossing
    toggles = np.zeros((P, Q + 1), np.int32)
    np.add.at(toggles, (rows, col), 1)
    return (np.cumsum(toggles[:, :Q], axis=1) % 2).astype(bool)


def _plane_axes(slice_axis: int) -> tuple[int, int]:
    """The two ITK axes of a plane across ``slice_axis``, in ascending order."""
    a, b = (ax for ax in range(3) if ax != slice_axis)
    return a, b


def _itk_view(array_zyx: np.ndarray) -> np.ndarray:
    return np.asarray(array_zyx).transpose(2, 1, 0)


# --------------------------------------------------------------------------- writing


CONTOUR_DATA = 0x30060050


def _ds_bytes(values: np.ndarray) -> bytes:
    """Decimal strings (at most 16 characters each, 4 decimals) joined by backslashes, even length."""
    v = np.round(np.asarray(values, float).ravel(), 4) + 0.0  # + 0.0: no "-0.0"
    b = "\\".join(v.astype(str).tolist()).encode("ascii")
    return b + b" " if len(b) % 2 else b


def _set_contour_data(item, values: np.ndarray) -> None:
    """ContourData as a raw element: pydicom's per-value DS checks take seconds per organ."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    b = _ds_bytes(values)
    item[CONTOUR_DATA] = RawDataElement(Tag(CONTOUR_DATA), "DS", len(b), b, 0, True, True)


def _contour_points(item) -> np.ndarray:
    """(N, 3) ContourData of a contour item, parsed from the raw bytes when still raw."""
    from pydicom.dataelem import RawDataElement

    elem = item.get_item(CONTOUR_DATA)
    if isinstance(elem, RawDataElement) and elem.value is not None:
        parts = elem.value.strip(b" \x00").split(b"\\")
        vals = np.array(parts).astype(np.float64) if parts and parts[0] else np.zeros(0)
    else:
        vals = np.asarray([float(v) for v in item.ContourData], float)
    return vals.reshape(-1, 3)


def build_rtstruct(labels: np.ndarray, like, names: Mapping[int, str], colors: Mapping[int, tuple]):
    """The RTSTRUCT dataset (pydicom FileDataset) for ``labels`` on ``like``'s series."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

    from .dicom_seg import tool_version

    ids = sorted(int(i) for i in names)
    if ids and max(ids) > MAX_ROI_NUMBER:
        raise InputError(f"Label id {max(ids)} is larger than an RTSTRUCT ROI number can be ({MAX_ROI_NUMBER}).")
    series = series_of(like, purpose="an RTSTRUCT")
    check_references(series, purpose="an RTSTRUCT")
    src = series.headers[0]
    now = _dt.datetime.now()
    sop_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian  # 4-byte lengths: a long contour fits (explicit VR DS stops at 64 KiB)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Patient and General Study modules: copied from the referenced series
    for attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, attr, first(src, attr, default=""))
    ds.StudyInstanceUID = str(src.StudyInstanceUID)
    # RT Series and General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    try:
        ds.SeriesNumber = (int(src.get("SeriesNumber") or 0) + 2000) % 100000
    except (TypeError, ValueError):
        ds.SeriesNumber = 2000
    ds.SeriesDescription = "propseg labels"
    ds.OperatorsName = ""
    ds.Manufacturer = TOOL_NAME
    ds.ManufacturerModelName = TOOL_NAME
    ds.SoftwareVersions = tool_version()[:64]
    ds.InstanceNumber = 1
    # Structure Set module
    ds.StructureSetLabel = "PROPSEG"
    ds.StructureSetName = "propseg labels"
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    for_uid = str(src.FrameOfReferenceUID)

    contour_images = Sequence()
    for h in series.headers:
        item = Dataset()
        item.ReferencedSOPClassUID = str(h.SOPClassUID)
        item.ReferencedSOPInstanceUID = str(h.SOPInstanceUID)
        contour_images.append(item)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = str(src.SeriesInstanceUID)
    rt_series.ContourImageSequence = contour_images
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as is customary
    rt_study.ReferencedSOPInstanceUID = str(src.StudyInstanceUID)
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = Sequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_for])

    slice_axis = series.slice_axis
    pa, pb = _plane_axes(slice_axis)
    by_slice = series.by_slice()
    view = _itk_view(labels)
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    for n, label_id in enumerate(ids, start=1):
        roi = Dataset()
        roi.ROINumber = label_id
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = str(names[label_id])[:64]
        roi.ROIGenerationAlgorithm = "SEMIAUTOMATIC"
        roi.ROIGenerationDescription = f"{TOOL_NAME} {tool_version()}"[:64]
        roi_seq.append(roi)

        rc = Dataset()
        rc.ROIDisplayColor = [int(c) for c in colors[label_id]]
        rc.ReferencedROINumber = label_id
        contours = Sequence()
        mask3 = view == label_id
        # slices holding the label
        other = tuple(ax for ax in range(3) if ax != slice_axis)
        present = np.nonzero(mask3.any(axis=other))[0]
        for k in present:
            plane = np.take(mask3, int(k), axis=slice_axis)  # axes (pa, pb)
            h = series.headers[by_slice[int(k)]]
            for poly in mask_to_contours(plane):
                idx = np.empty((len(poly), 3))
                idx[:, pa] = poly[:, 0]
                idx[:, pb] = poly[:, 1]
                idx[:, slice_axis] = float(k)
                pts = index_to_physical(idx, like)
                c = Dataset()
                img = Dataset()
                img.ReferencedSOPClassUID = str(h.SOPClassUID)
                img.ReferencedSOPInstanceUID = str(h.SOPInstanceUID)
                c.ContourImageSequence = Sequence([img])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(pts)
                c.ContourNumber = len(contours) + 1
                _set_contour_data(c, pts)
                contours.append(c)
        rc.ContourSequence = contours
        contour_seq.append(rc)

        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = label_id
        obs.ROIObservationLabel = str(names[label_id])[:64]
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    # Contour items hold ContourData as raw implicit-VR bytes: mark them as read that way so
    # the writer copies the bytes instead of parsing every decimal string again.
    for rc in ds.ROIContourSequence:
        for c in rc.get("ContourSequence", []):
            c.set_original_encoding(True, True, c._character_set)
    return ds, series


def write_rtstruct(labels: np.ndarray, like, out: Path, names: Mapping[int, str], colors: Mapping[int, tuple]) -> Path:
    """Write the labels ``names`` lists (all present) as an RTSTRUCT at ``out``, atomically."""
    import pydicom

    from ..atomic import atomic_write

    ds, series = build_rtstruct(labels, like, names, colors)

    def _write(tmp: Path) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    def _verify(tmp: Path) -> None:
        back = pydicom.dcmread(tmp)
        if str(back.SOPClassUID) != RTSTRUCT_SOP_CLASS or len(back.StructureSetROISequence) != len(names):
            raise ValueError("the written RTSTRUCT does not read back")

    atomic_write(out, _write, verify=_verify, suffix=".dcm", what="RTSTRUCT")
    log.info("wrote RTSTRUCT %s: %d ROIs on series %s", out, len(names), series.uid)
    return out


# --------------------------------------------------------------------------- reading


def read_rtstruct(path: Path, like) -> tuple[np.ndarray, dict[int, str], dict]:
    """Rasterise an RTSTRUCT's closed planar contours onto ``like``'s grid (even-odd rule).

    Returns:
        (labels (Z, Y, X) int array, {id: name}, info) as :func:`.dicom_seg.read_seg`;
        ids are the ROI numbers.

    Raises:
        InputError: not an RTSTRUCT, another series than ``like``, contours off the image.
    """
    import pydicom

    from .dicom import referenced_series_uids

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"Cannot read RTSTRUCT {path} ({exc}); the file is damaged or not DICOM.") from None
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS and str(ds.get("Modality", "")) != "RTSTRUCT":
        raise InputError(f"{path} is not an RT Structure Set (SOP class {ds.get('SOPClassUID', '?')}).")
    check_same_series(ds, like, path, "RTSTRUCT")
    names: dict[int, str] = {}
    for roi in ds.get("StructureSetROISequence", []) or []:
        names[int(roi.ROINumber)] = str(roi.get("ROIName", "") or f"label_{int(roi.ROINumber)}")
    if not names:
        raise InputError(f"RTSTRUCT {path} holds no ROI.")
    if min(names) < 1:  # ROI numbers must be positive ids here: renumber
        names = {i + 1: n for i, (_, n) in enumerate(sorted(names.items()))}
        log.warning("RTSTRUCT %s has ROI numbers below 1; ROIs renumbered 1..%d", path, len(names))
    max_id = max(names)
    dtype = np.uint8 if max_id < 256 else np.uint16 if max_id < 65536 else np.int32
    out = np.zeros(like.shape, dtype=dtype)
    view = _itk_view(out)
    shape_xyz = out.shape[::-1]
    colors: dict[int, tuple] = {}
    skipped = 0
    off_plane = 0
    overlap = 0
    for rc in ds.get("ROIContourSequence", []) or []:
        label_id = int(rc.ReferencedROINumber)
        if label_id not in names:
            continue
        if rc.get("ROIDisplayColor") is not None:
            colors[label_id] = tuple(int(c) for c in rc.ROIDisplayColor)
        per_slice: dict[tuple[int, int], list[np.ndarray]] = {}
        for c in rc.get("ContourSequence", []) or []:
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue
            if CONTOUR_DATA not in c:
                continue
            pts = _contour_points(c)
            if len(pts) < 3:
                continue
            idx = physical_to_index(pts, like)
            spread = idx.max(axis=0) - idx.min(axis=0)
            slice_axis = int(np.argmin(spread))
            if spread[slice_axis] > 0.5:
                off_plane += 1
                continue
            k = int(round(float(idx[:, slice_axis].mean())))
            if not 0 <= k < shape_xyz[slice_axis]:
                skipped += 1
                continue
            pa, pb = _plane_axes(slice_axis)
            per_slice.setdefault((slice_axis, k), []).append(idx[:, [pa, pb]])
        for (slice_axis, k), polys in per_slice.items():
            pa, pb = _plane_axes(slice_axis)
            mask = contours_to_mask(polys, (shape_xyz[pa], shape_xyz[pb]))
            if not mask.any():
                continue
            key: list = [slice(None)] * 3
            key[slice_axis] = k
            plane = view[tuple(key)]
            overlap += int(np.count_nonzero(plane[mask]))
            plane[mask] = label_id
    if skipped:
        log.warning("RTSTRUCT %s: %d contours lie outside the image's slices; left out", path, skipped)
    if off_plane:
        log.warning("RTSTRUCT %s: %d contours are not in the image's slice planes; left out", path, off_plane)
    if overlap:
        log.warning("RTSTRUCT %s: %d voxels belong to several ROIs; the later ROI is kept", path, overlap)
    native = str(ds.get("Manufacturer", "")) == TOOL_NAME
    info = {"colors": colors, "native_ids": native, "referenced_series": referenced_series_uids(ds), "kind": "rtstruct",
            "overlap_voxels": overlap}
    return out, dict(sorted(names.items())), info
