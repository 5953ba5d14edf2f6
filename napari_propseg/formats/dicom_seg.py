"""DICOM Segmentation (SEG) objects: written with highdicom, read with pydicom.

Writing: one BINARY segment per non-empty label, on the frames of the DICOM series the
labels were drawn on (the SEG references its Study, Series and SOP instances), segment
label = the label's name, segmented property codes from :mod:`.codes`, recommended
display colour from :mod:`napari_propseg.labelcolors`, algorithm type SEMIAUTOMATIC with
this tool's name and version. The label id is kept in the Segment Description
(``"<name> (label value <id>)"``) so reading gives the same ids back.

Reading: BINARY, FRACTIONAL (>= half the maximum) and LABELMAP segmentations, frames
placed by their Plane Position (or, lacking one, by the source image they derive from) on
the image's grid.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from .dicom import SEG_SOP_CLASS, check_references, check_same_series, plane_map, series_of

log = logging.getLogger(__name__)

#: Segment Number is an unsigned 16-bit value.
MAX_SEGMENTS = 65535
_ID_RE = re.compile(r"label value (\d+)\)?\s*$")
TOOL_NAME = "napari-propseg"


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-propseg")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        from .. import __version__

        return __version__


def _coded(code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_description(number: int, label_id: int, name: str, rgb) -> object:
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    from .codes import property_codes

    pc = property_codes(name)
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64],
        segmented_property_category=_coded(pc.category),
        segmented_property_type=_coded(pc.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=TOOL_NAME, family=dcm_codes.DCM.ArtificialIntelligence, version=tool_version()[:64]),
        display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in rgb]),
    )
    if pc.modifier is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_coded(pc.modifier)]
    suffix = f" (label value {int(label_id)})"
    desc.SegmentDescription = name[: 64 - len(suffix)] + suffix
    return desc


def write_seg(labels: np.ndarray, like, out: Path, names: Mapping[int, str], colors: Mapping[int, tuple]) -> Path:
    """Write the labels ``names`` lists (all present) as a DICOM SEG at ``out``, atomically.

    Raises:
        InputError: ``like`` is not a DICOM series (or its series lacks a reference
            attribute), too many segments. OutputError: the file cannot be written.
    """
    import highdicom as hd
    import pydicom

    from ..atomic import atomic_write

    ids = sorted(int(i) for i in names)
    if len(ids) > MAX_SEGMENTS:
        raise InputError(f"The labels hold {len(ids)} labels, more than the {MAX_SEGMENTS} segments a DICOM SEG can hold.")
    series = series_of(like, purpose="a DICOM SEG")
    check_references(series, purpose="a DICOM SEG")
    dtype = np.uint8 if len(ids) < 256 else np.uint16
    lut = np.zeros(int(labels.max()) + 1, dtype=dtype)
    for n, i in enumerate(ids, start=1):
        lut[i] = n
    numbers = lut[labels]
    frames = np.stack([m.extract(numbers) for m in series.maps])
    descs = [_segment_description(n, i, names[i], colors[i]) for n, i in enumerate(ids, start=1)]
    src = series.headers[0]
    try:
        series_number = int(src.get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # person-name style hints on the source's headers
            seg = hd.seg.Segmentation(
                source_images=series.headers,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descs,
                series_instance_uid=hd.UID(),
                series_number=series_number % 100000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=TOOL_NAME,
                manufacturer_model_name=TOOL_NAME,
                software_versions=tool_version()[:64],
                device_serial_number="0",
                series_description="propseg labels",
                content_label="PROPSEG",
                content_description="Labels drawn and propagated with napari-propseg",
            )
    except (ValueError, TypeError, AttributeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"Cannot build a DICOM SEG on the series in {series.folders[0]} ({msg}); "
                         "export .seg.nrrd, .nii.gz or .nrrd instead.") from None

    def _write(tmp: Path) -> None:
        seg.save_as(tmp, enforce_file_format=True)

    def _verify(tmp: Path) -> None:
        back = pydicom.dcmread(tmp, stop_before_pixels=True)
        if str(back.SOPClassUID) != SEG_SOP_CLASS or len(back.SegmentSequence) != len(ids):
            raise ValueError("the written DICOM SEG does not read back")

    atomic_write(out, _write, verify=_verify, suffix=".dcm", what="DICOM SEG")
    log.info("wrote DICOM SEG %s: %d segments on %d frames of series %s", out, len(ids), len(series.files), series.uid)
    return out


# --------------------------------------------------------------------------- reading


def _fg(frame_item, shared, seq: str, attr: str):
    for group in (frame_item, shared):
        if group is None:
            continue
        items = group.get(seq)
        if items and attr in items[0]:
            return items[0].get(attr)
    return None


def _rgb_from_lab(value) -> tuple[int, int, int] | None:
    try:
        import highdicom as hd

        rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in value]).to_rgb()
        return tuple(int(round(float(c))) for c in rgb)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - a colour is optional
        return None


def read_seg(path: Path, like) -> tuple[np.ndarray, dict[int, str], dict]:
    """Read a DICOM SEG onto ``like``'s grid.

    Returns:
        (labels (Z, Y, X) int array, {id: name}, info) where info holds ``colors``
        ({id: rgb}), ``native_ids`` (ids written by napari-propseg), ``referenced_series``.

    Raises:
        InputError: not a SEG, another series than ``like``, frames off the grid.
    """
    import pydicom

    from .dicom import referenced_series_uids

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds
        raise InputError(f"Cannot read DICOM SEG {path} ({exc}); the file is damaged or not DICOM.") from None
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS and str(ds.get("Modality", "")) != "SEG":
        raise InputError(f"{path} is not a DICOM SEG (SOP class {ds.get('SOPClassUID', '?')}).")
    check_same_series(ds, like, path, "DICOM SEG")
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    try:
        pix = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"Cannot decode the pixel data of DICOM SEG {path} ({exc}).") from None
    if pix.ndim == 2:
        pix = pix[None]
    segments = {int(s.SegmentNumber): s for s in ds.get("SegmentSequence", [])}
    if not segments:
        raise InputError(f"DICOM SEG {path} holds no segment.")
    ids: dict[int, int] = {}
    names: dict[int, str] = {}
    colors: dict[int, tuple] = {}
    native = True
    for number, s in sorted(segments.items()):
        m = _ID_RE.search(str(s.get("SegmentDescription", "") or ""))
        if m is None:
            native = False
        ids[number] = int(m.group(1)) if m else number
    if len(set(ids.values())) != len(ids):  # ids in the descriptions collide: use the numbers
        ids = {n: n for n in segments}
        native = False
    for number, s in segments.items():
        i = ids[number]
        names[i] = str(s.get("SegmentLabel", "") or f"label_{i}")
        if s.get("RecommendedDisplayCIELabValue") is not None:
            rgb = _rgb_from_lab(s.RecommendedDisplayCIELabValue)
            if rgb is not None:
                colors[i] = rgb
    threshold = 1
    if seg_type == "FRACTIONAL":
        threshold = max(1, int(ds.get("MaximumFractionalValue", 255)) // 2 + (int(ds.get("MaximumFractionalValue", 255)) % 2))
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(per_frame) != pix.shape[0]:
        raise InputError(f"DICOM SEG {path} has {pix.shape[0]} frames but {len(per_frame)} frame descriptions; the file is damaged.")
    dtype = np.uint8 if max(ids.values()) < 256 else np.uint16 if max(ids.values()) < 65536 else np.int32
    out = np.zeros(like.shape, dtype=dtype)
    overlap = 0
    by_sop = None
    for k, fr in enumerate(per_frame):
        ipp = _fg(fr, shared, "PlanePositionSequence", "ImagePositionPatient")
        iop = _fg(fr, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = _fg(fr, shared, "PixelMeasuresSequence", "PixelSpacing")
        what = f"Frame {k + 1} of DICOM SEG {path}"
        if ipp is not None and iop is not None and ps is not None:
            pm = plane_map(ipp, iop, ps, int(ds.Rows), int(ds.Columns), like, what=what)
        else:  # no plane position: place it on the slice of the source image it derives from
            if by_sop is None:
                info = series_of(like, purpose="placing this DICOM SEG")
                by_sop = {str(h.SOPInstanceUID): m for h, m in zip(info.headers, info.maps)}
            try:
                uid = str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                pm = by_sop[uid]
            except (AttributeError, IndexError, KeyError):
                raise InputError(f"{what} has neither a plane position nor a source image of the image's series; "
                                 "it cannot be placed.") from None
        frame = pix[k]
        if seg_type == "LABELMAP":
            lab = np.zeros(frame.shape, dtype=dtype)
            for number, i in ids.items():
                lab[frame == number] = i
            mask = lab > 0
        else:
            try:
                number = int(fr.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            except (AttributeError, IndexError):
                raise InputError(f"{what} names no segment; the file is damaged.") from None
            if number not in ids:
                raise InputError(f"{what} refers to segment {number}, which the SEG does not describe; the file is damaged.")
            mask = frame >= threshold
            lab = np.full(frame.shape, ids[number], dtype=dtype)
        if not mask.any():
            continue
        overlap += int(np.count_nonzero(pm.extract(out)[mask]))
        pm.insert(out, lab, where=mask)
    if overlap:
        log.warning("DICOM SEG %s: %d voxels belong to several segments; the higher segment number is kept", path, overlap)
    info = {"colors": colors, "native_ids": native, "referenced_series": referenced_series_uids(ds), "kind": "dicom-seg",
            "overlap_voxels": overlap}
    return out, dict(sorted(names.items())), info
