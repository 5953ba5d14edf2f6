"""Clinical label formats: DICOM SEG, RTSTRUCT, 3D Slicer .seg.nrrd, NIfTI/NRRD (issue #14).

Real data: the dcmqi 3-slice CT series with its liver/spine/heart masks and its DICOM SEG
(``../shared/data/dcmqi_ct3slice``), the TotalSegmentator DICOM example (untidy headers).
Synthetic data: small DICOM series written here with pydicom (any orientation, two series
of one study).
"""
from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path

import numpy as np
import pytest

from napari_propseg.cli import main
from napari_propseg.errors import InputError, OutputError
from napari_propseg.formats import (
    export,
    export_labels,
    format_from_path,
    is_label_object,
    label_map_path,
    read_label_object,
)
from napari_propseg.formats.rtstruct import contours_to_mask, mask_to_contours
from napari_propseg.formats import read_labels
from napari_propseg.io import read_volume, write_labels

NAMES = {1: "liver", 2: "spine", 3: "heart"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dcmqi(shared_data):
    """(ct Volume, (Z, Y, X) labels 1 liver, 2 spine, 3 heart) on the dcmqi series."""
    base = shared_data / "dcmqi_ct3slice"
    ct = read_volume(base / "dicom")
    lab = np.zeros(ct.shape, np.uint8)
    for i, n in NAMES.items():
        m = read_labels(base / f"{n}_seg.nrrd", ct).array > 0
        lab[m & (lab == 0)] = i
    assert all((lab == i).any() for i in NAMES)
    return ct, lab


def make_series(folder: Path, *, n: int = 6, rows: int = 24, cols: int = 28, iop=(1, 0, 0, 0, 1, 0),
                spacing=(0.8, 0.7), dz: float = 2.5, study_uid: str | None = None, origin=(-10.0, -20.0, 30.0)) -> Path:
    """A small CT series written with pydicom (ImagePositionPatient stepping along the normal)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(r, c)
    rng = np.random.default_rng(0)
    for k in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P1", "", "O"
        ds.StudyDate, ds.StudyTime = datetime.date.today().strftime("%Y%m%d"), "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 3, k + 1, "test"
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * dz * normal]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = (rng.integers(-100, 100, (rows, cols)).astype(np.int16)).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def synthetic_labels(shape, slice_axis: int = 0) -> np.ndarray:
    """A ring with a hole (1), a one-pixel-thin line on two slices (2), a diagonal chain (3),
    drawn in the planes across numpy axis ``slice_axis`` (the series' slices)."""
    if slice_axis != 0:
        moved = list(shape)
        moved.insert(0, moved.pop(slice_axis))
        return np.moveaxis(synthetic_labels(tuple(moved)), 0, slice_axis).copy()
    z, y, x = shape
    lab = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[:y, :x]
    rr = (yy - y / 2) ** 2 + (xx - x / 2) ** 2
    lab[1:4][:, (rr < 64) & (rr > 9)] = 1
    lab[2:4, 3, 2:x - 2] = 2  # one pixel thin, two slices
    for i in range(6):
        lab[4, 5 + i, 4 + i] = 3  # touching at corners only
    return lab


@pytest.fixture()
def synth(tmp_path):
    ct = read_volume(make_series(tmp_path / "ct"))
    return ct, synthetic_labels(ct.shape)


# --------------------------------------------------------------------------- outlines


def test_outlines_fill_back_exactly_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(150):
        m = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.random()
        np.testing.assert_array_equal(contours_to_mask(mask_to_contours(m), m.shape), m)


def test_outline_of_hole_is_a_separate_contour_and_xor_keeps_it():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[3:6, 3:6] = False
    contours = mask_to_contours(m)
    assert len(contours) == 2
    np.testing.assert_array_equal(contours_to_mask(contours, m.shape), m)
    # vertices lie on pixel edges (half-integers) or quarter-pixel corner cuts
    pts = np.concatenate(contours)
    assert np.allclose(pts * 4, np.round(pts * 4))


# --------------------------------------------------------------------------- format choice and names


def test_format_inferred_from_name():
    assert format_from_path("a/b.seg.nrrd") == "seg-nrrd"
    assert format_from_path("b.nrrd") == "nrrd"
    assert format_from_path("b.nii.gz") == "nifti" and format_from_path("b.nii") == "nifti"
    assert format_from_path("b.dcm") == "dicom-seg"
    assert format_from_path("b.dcm", "rtstruct") == "rtstruct"
    with pytest.raises(InputError, match="--format"):
        format_from_path("b.txt")
    with pytest.raises(InputError, match="Unknown export format"):
        format_from_path("b.dcm", "png")
    assert label_map_path("x/case.seg.nrrd") == Path("x/case.labels.json")
    assert label_map_path("x/case.nii.gz") == Path("x/case.labels.json")


def test_property_codes_for_names():
    from napari_propseg.formats.codes import property_codes

    assert property_codes("Liver").type.value == "10200004"
    assert property_codes("kidney_right").modifier.meaning == "Right"
    assert property_codes("SpinalCord").type.value == "2748008"
    assert property_codes("vertebrae_L3").type.meaning == "Vertebra"
    generic = property_codes("heart (only where not liver)")
    assert not generic.known and generic.type.meaning == "Tissue"


# --------------------------------------------------------------------------- dcmqi: every format


@pytest.mark.slow
def test_dicom_seg_export_opens_with_highdicom_same_voxels(dcmqi, tmp_path):
    import highdicom as hd

    ct, lab = dcmqi
    out = export_labels(lab, ct, tmp_path / "labels.dcm", "dicom-seg", NAMES)
    seg = hd.seg.segread(out)
    assert [seg.get_segment_description(i).segment_label for i in (1, 2, 3)] == ["liver", "spine", "heart"]
    liver = seg.get_segment_description(1)
    assert liver.segmented_property_type.value == "10200004"
    assert liver.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
    assert liver.algorithm_identification[0].AlgorithmName == "napari-propseg"
    assert seg.SeriesInstanceUID != ct.meta["series_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.meta["series_uid"]
    import pydicom

    files = sorted((Path(ct.meta["series_folder"])).iterdir())
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [str(s.SOPInstanceUID) for s in sources]
    assert {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(uids)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
                                             combine_segments=True, skip_overlap_checks=True)
    # the expected frames: the canonical labels at each source file's slice, in its row/column order
    from napari_propseg.formats.dicom import plane_map

    for k, s in enumerate(sources):
        pm = plane_map(s.ImagePositionPatient, s.ImageOrientationPatient, s.PixelSpacing, s.Rows, s.Columns, ct, what="t")
        np.testing.assert_array_equal(got[k], pm.extract(lab))
    # and our own reader gives the label map back
    back = read_labels(out, ct)
    np.testing.assert_array_equal(back.array, lab)
    assert back.meta["label_names"] == NAMES


def test_rtstruct_export_fills_back_with_high_dice(dcmqi, tmp_path, capsys):
    import pydicom

    ct, lab = dcmqi
    out = export_labels(lab, ct, tmp_path / "rt.dcm", "rtstruct", NAMES)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT"
    assert {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence} == NAMES
    ref_series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ct.meta["series_uid"]
    series_sops = {str(i.ReferencedSOPInstanceUID) for i in ref_series.ContourImageSequence}
    assert len(series_sops) == ct.shape[0]
    for rc in ds.ROIContourSequence:
        assert len(rc.ROIDisplayColor) == 3
        for c in rc.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            assert str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) in series_sops
            assert len(c.ContourData) == 3 * int(c.NumberOfContourPoints)
    back = read_labels(out, ct).array
    scores = {NAMES[i]: dice(back == i, lab == i) for i in NAMES}
    with capsys.disabled():
        print(f"\nRTSTRUCT round-trip Dice on the dcmqi series: {scores}")
    assert min(scores.values()) >= 0.90 and np.mean(list(scores.values())) >= 0.95


def test_seg_nrrd_carries_names_colours_and_geometry(dcmqi, tmp_path):
    import nrrd

    ct, lab = dcmqi
    out = export_labels(lab, ct, tmp_path / "labels.seg.nrrd", "seg-nrrd", NAMES)
    data, header = nrrd.read(str(out))
    names = {int(header[f"Segment{i}_LabelValue"]): header[f"Segment{i}_Name"] for i in range(3)}
    assert names == NAMES
    assert header["Segment0_ID"] and header["Segment0_Layer"] == "0"
    color = [float(v) for v in header["Segment0_Color"].split()]
    assert all(0 <= v <= 1 for v in color) and np.allclose(np.array(color) * 255, (221, 130, 101), atol=0.6)
    assert "SCT^10200004^Liver" in header["Segment0_Tags"]
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert "Binary labelmap" in header["Segmentation_ContainedRepresentationNames"]
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["space"] == "left-posterior-superior"
    # geometry: the image file's grid (this series is LPS: identity directions)
    np.testing.assert_allclose(header["space origin"], ct.origin, atol=1e-4)
    np.testing.assert_allclose(np.abs(header["space directions"]).sum(axis=1), ct.spacing[::-1], rtol=1e-6)
    ext = [int(v) for v in header["Segment0_Extent"].split()]
    idx = np.argwhere(data == 1)
    assert ext == [int(idx[:, 0].min()), int(idx[:, 0].max()), int(idx[:, 1].min()), int(idx[:, 1].max()),
                   int(idx[:, 2].min()), int(idx[:, 2].max())]
    np.testing.assert_array_equal(read_labels(out, ct).array, lab)


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nrrd"])
def test_nifti_nrrd_export_with_label_map_beside(dcmqi, tmp_path, name):
    ct, lab = dcmqi
    out = export_labels(lab, ct, tmp_path / name, None, NAMES)
    np.testing.assert_array_equal(read_labels(out, ct).array, lab)
    assert json.loads(label_map_path(out).read_text()) == {"0": "background", "1": "liver", "2": "spine", "3": "heart"}


@pytest.mark.slow
def test_cli_export_names_from_label_map_beside_and_evaluate_reads_seg(dcmqi, tmp_path, capsys):
    ct, lab = dcmqi
    truth = write_labels(lab, ct, tmp_path / "truth.nii.gz")
    (tmp_path / "truth.labels.json").write_text(json.dumps({"1": "liver", "2": "spine", "3": "heart", "4": "pancreas"}))
    folder = ct.meta["series_folder"]
    seg = tmp_path / "truth_seg.dcm"
    assert main(["export", str(truth), "--image", folder, "--out", str(seg)]) == 0
    printed = capsys.readouterr().out
    assert "dicom-seg" in printed and "left out (no voxel): 4 pancreas" in printed
    assert is_label_object(seg)
    assert read_label_object(seg, ct)[1] == NAMES
    rt = tmp_path / "truth_rt.dcm"
    assert main(["export", str(truth), "--image", folder, "--out", str(rt), "--format", "rtstruct"]) == 0
    for pred in (seg, rt):
        report = tmp_path / f"{pred.stem}.csv"
        assert main(["evaluate", str(pred), str(truth), "--out", str(report)]) == 0
        rows = list(csv.DictReader(report.open()))
        per_label = {r["label"]: float(r["dice"]) for r in rows if r["label"] != "mean"}
        assert per_label and all(d == pytest.approx(1.0) for d in per_label.values()), per_label
    # --label-map overrides the map beside LABELS
    other = tmp_path / "map.json"
    other.write_text(json.dumps({"1": "Liver", "2": "Spinal column", "3": "Heart"}))
    out = tmp_path / "named.seg.nrrd"
    assert main(["export", str(truth), "--image", folder, "--out", str(out), "--label-map", str(other)]) == 0
    from napari_propseg.formats.slicer import read_seg_nrrd_names

    assert read_seg_nrrd_names(out)[0] == {1: "Liver", 2: "Spinal column", 3: "Heart"}


def test_shared_dcmqi_seg_reads_onto_its_series(shared_data, dcmqi):
    ct, lab = dcmqi
    seg = shared_data / "dcmqi_ct3slice" / "liver.dcm"
    assert is_label_object(seg)
    back = read_labels(seg, ct)
    assert back.meta["label_names"] == {1: "Liver"}
    assert dice(back.array == 1, lab == 1) == pytest.approx(1.0)
    from napari_propseg import _reader

    [(data, kwargs, kind)] = _reader.read_layers(str(seg))  # the reader finds the series beside it
    assert kind == "labels" and kwargs["metadata"]["propseg_label_names"] == {1: "Liver"}
    assert kwargs["features"]["name"] == ["background", "Liver"]
    assert np.allclose(kwargs["colormap"][1][:3], np.array((221, 130, 101)) / 255, atol=0.01)
    np.testing.assert_array_equal(data, back.array)


# --------------------------------------------------------------------------- synthetic series: geometry, thin structures


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1)],
                         ids=["axial-LPS", "axial-x-flipped", "coronal"])
def test_seg_and_rtstruct_roundtrip_thin_structures_any_orientation(tmp_path, iop):
    from napari_propseg.formats.dicom import series_of

    ct = read_volume(make_series(tmp_path / "ct", iop=iop))
    lab = synthetic_labels(ct.shape, 2 - series_of(ct, purpose="a test").slice_axis)
    names = {1: "ring", 2: "thin line", 3: "diagonal"}
    seg = export_labels(lab, ct, tmp_path / "seg.dcm", "dicom-seg", names)
    np.testing.assert_array_equal(read_labels(seg, ct).array, lab)
    rt = export_labels(lab, ct, tmp_path / "rt.dcm", "rtstruct", names)
    back = read_labels(rt, ct).array
    scores = [dice(back == i, lab == i) for i in names]
    assert min(scores) >= 0.90 and np.mean(scores) >= 0.95, scores
    assert np.array_equal(back == 1, lab == 1)  # the hole of the ring comes back


def test_seg_of_another_series_is_refused_naming_both(tmp_path, synth):
    ct, lab = synth
    other = read_volume(make_series(tmp_path / "other", study_uid=None))
    seg = export_labels(lab, ct, tmp_path / "seg.dcm", "dicom-seg", {1: "a", 2: "b", 3: "c"})
    with pytest.raises(InputError) as err:
        read_labels(seg, other)
    assert ct.meta["series_uid"] in str(err.value) and other.meta["series_uid"] in str(err.value)


def test_folder_with_seg_next_to_its_series_is_a_label_file(tmp_path, synth):
    import shutil

    ct, lab = synth
    folder = Path(ct.meta["series_folder"])
    export_labels(lab, ct, folder / "seg.dcm", "dicom-seg", {1: "liver", 2: "spleen", 3: "aorta"})
    assert is_label_object(folder)
    np.testing.assert_array_equal(read_labels(folder, ct).array, lab)
    from napari_propseg import _reader

    layers = _reader.read_layers(str(folder))
    assert [k for _, _, k in layers] == ["image", "labels"]
    shutil.rmtree(folder)


def test_propagate_takes_a_seg_as_seeds(tmp_path, synth):
    ct, lab = synth
    seeds = np.zeros_like(lab)
    seeds[1] = lab[1]
    seeds[3] = lab[3]
    seg = export_labels(seeds, ct, tmp_path / "seeds.dcm", "dicom-seg", {1: "liver", 2: "spleen", 3: "aorta"})
    out = tmp_path / "out.nii.gz"
    assert main(["propagate", ct.meta["series_folder"], "--seeds", str(seg), "--out", str(out), "--method", "interp",
                 "--appearance", "0", "--quiet"]) == 0
    res = read_labels(out, ct).array
    np.testing.assert_array_equal(res[1], seeds[1])
    assert (res[2] == 1).any()


def test_foreign_ids_are_matched_by_name_for_evaluation(tmp_path, synth):
    import pydicom

    from napari_propseg.formats import align_label_ids

    ct, lab = synth
    rt = export_labels(lab, ct, tmp_path / "rt.dcm", "rtstruct", {1: "liver", 2: "spleen", 3: "aorta"})
    ds = pydicom.dcmread(rt)  # as another system would number them: 11, 12, 13
    ds.Manufacturer = "another TPS"
    for item in list(ds.StructureSetROISequence) + list(ds.ROIContourSequence) + list(ds.RTROIObservationsSequence):
        for attr in ("ROINumber", "ReferencedROINumber"):
            if attr in item:
                setattr(item, attr, int(getattr(item, attr)) + 10)
    ds.save_as(rt)
    back = read_labels(rt, ct)
    assert set(np.unique(back.array)) == {0, 11, 12, 13}
    from napari_propseg.labelmap import FLARE_NAMES

    aligned = align_label_ids(back, FLARE_NAMES)  # liver 1, spleen 3, aorta 5
    np.testing.assert_array_equal(aligned == 1, lab == 1)
    np.testing.assert_array_equal(aligned == 3, lab == 2)
    np.testing.assert_array_equal(aligned == 5, lab == 3)


# --------------------------------------------------------------------------- bad inputs


def test_seg_needs_a_dicom_series(tmp_path, synth, capsys):
    ct, lab = synth
    nii = write_labels(lab, ct, tmp_path / "lab.nii.gz")
    from napari_propseg.io import write_volume

    img = write_volume(ct.array, ct, tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="not a DICOM series"):
        export_labels(lab, read_volume(img), tmp_path / "x.dcm", "dicom-seg")
    assert main(["export", str(nii), "--image", str(img), "--out", str(tmp_path / "x.dcm")]) == 2
    err = capsys.readouterr().err
    assert "not a DICOM series" in err and err.count("\n") == 1
    assert not (tmp_path / "x.dcm").exists()
    # NIfTI and .seg.nrrd need no DICOM
    assert main(["export", str(nii), "--image", str(img), "--out", str(tmp_path / "x.seg.nrrd")]) == 0


def test_labels_not_on_the_grid_are_refused(tmp_path, synth, capsys):
    ct, lab = synth
    with pytest.raises(InputError, match="not on the image's grid"):
        export_labels(lab[:-1], ct, tmp_path / "x.dcm", "dicom-seg")
    other = read_volume(make_series(tmp_path / "other", n=4, rows=20, cols=20, spacing=(1.1, 1.1), dz=3.0,
                                    origin=(100.0, 100.0, 100.0)))
    far = write_labels(np.ones(other.shape, np.uint8), other, tmp_path / "far.nii.gz")
    assert main(["export", str(far), "--image", ct.meta["series_folder"], "--out", str(tmp_path / "x.dcm")]) == 2
    assert "grid" in capsys.readouterr().err


def test_untidy_totalseg_series_names_the_missing_attribute(shared_data, tmp_path):
    folder = shared_data / "totalseg_example" / "example_ct_dicom"
    ct = read_volume(folder)
    lab = np.zeros(ct.shape, np.uint8)
    lab[5:8, 200:220, 200:230] = 1
    with pytest.raises(InputError, match="StudyInstanceUID") as err:
        export_labels(lab, ct, tmp_path / "x.dcm", "dicom-seg", {1: "liver"})
    assert "SOPClassUID" not in str(err.value)  # taken from the file meta
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        export_labels(lab, ct, tmp_path / "x.dcm", "rtstruct", {1: "liver"})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_more_labels_than_the_format_allows(tmp_path, synth, monkeypatch):
    from napari_propseg.formats import dicom_seg

    ct, lab = synth
    monkeypatch.setattr(dicom_seg, "MAX_SEGMENTS", 2)
    with pytest.raises(InputError, match="more than the 2 segments"):
        export_labels(lab, ct, tmp_path / "x.dcm", "dicom-seg")


def test_empty_labels_are_left_out_and_empty_volume_refused(tmp_path, synth):
    ct, lab = synth
    res = export(lab, ct, tmp_path / "x.dcm", "dicom-seg", {1: "a", 2: "b", 3: "c", 7: "gone"})
    assert res.left_out == {7: "gone"} and set(res.names) == {1, 2, 3}
    with pytest.raises(InputError, match="empty"):
        export_labels(np.zeros_like(lab), ct, tmp_path / "y.dcm", "rtstruct")
    assert not (tmp_path / "y.dcm").exists()


def test_unwritable_output_leaves_nothing(tmp_path, synth):
    ct, lab = synth
    with pytest.raises(OutputError):
        export_labels(lab, ct, tmp_path / "missing" / "x.dcm", "dicom-seg")
    target = tmp_path / "x.seg.nrrd"
    target.write_text("old")
    from napari_propseg.formats import slicer

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    import nrrd

    orig = nrrd.write
    nrrd.write = broken
    try:
        with pytest.raises(OutputError, match="disk is full"):
            slicer.write_seg_nrrd(lab, ct, target, {1: "a", 2: "b", 3: "c"}, {1: (1, 2, 3), 2: (1, 2, 3), 3: (1, 2, 3)})
    finally:
        nrrd.write = orig
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "x.seg.nrrd"]


def test_export_from_layer_geometry_as_the_widget_does(tmp_path, synth):
    """The widget rebuilds the image Volume from layer metadata; the series is found again."""
    from napari_propseg.session import geometry_of, volume_from_geometry

    ct, lab = synth
    geom = json.loads(json.dumps(geometry_of(ct)))  # as stored in layer metadata / a session file
    like = volume_from_geometry(geom, lab)
    for fmt, name in (("dicom-seg", "w.dcm"), ("rtstruct", "w_rt.dcm"), ("seg-nrrd", "w.seg.nrrd"), ("nifti", "w.nii.gz")):
        out = export_labels(lab, like, tmp_path / name, fmt, {1: "liver", 2: "spleen", 3: "aorta"})
        np.testing.assert_array_equal(read_labels(out, ct).array, lab)
    geom["meta"] = {}  # an older session without the series record: found from the path
    like = volume_from_geometry(geom, lab)
    out = export_labels(lab, like, tmp_path / "v.dcm", "dicom-seg", None)
    assert read_label_object(out, ct)[1] == {1: "label_1", 2: "label_2", 3: "label_3"}


def test_napari_reader_takes_seg_without_extension(tmp_path, synth):
    from napari_propseg import _reader

    ct, lab = synth
    out = export_labels(lab, ct, tmp_path / "SEG_1.2.3", "dicom-seg", {1: "liver", 2: "spleen", 3: "aorta"})
    fn = _reader.napari_get_reader(str(out))
    assert fn is not None
    [(data, kwargs, kind)] = fn(str(out))  # its series is found in the folder below
    assert kind == "labels" and kwargs["metadata"]["propseg_label_names"] == {1: "liver", 2: "spleen", 3: "aorta"}
    np.testing.assert_array_equal(data, lab)
    # without its series: placed on the grid its own frames span (the slices holding labels)
    import shutil

    shutil.rmtree(ct.meta["series_folder"])
    [(data, kwargs, kind)] = _reader.read_layers(str(out))
    assert kind == "labels" and data.shape[1:] == lab.shape[1:]
    np.testing.assert_array_equal(data, lab[1:5])
    assert np.allclose(kwargs["translate"], np.array(ct.origin[::-1]) + np.array([ct.spacing[0], 0, 0]))


def test_seg_onto_another_grid_is_resampled_with_a_notice(tmp_path, synth):
    from napari_propseg.io import Volume

    ct, lab = synth
    seg = export_labels(lab, ct, tmp_path / "seg.dcm", "dicom-seg", {1: "liver", 2: "spleen", 3: "aorta"})
    sz, sy, sx = ct.spacing
    ox, oy, oz = ct.origin
    fine = Volume.from_array(np.zeros((ct.shape[0], ct.shape[1] * 2, ct.shape[2] * 2), np.int16), (sz, sy / 2, sx / 2),
                             (ox - sx / 4, oy - sy / 4, oz))
    back = read_labels(seg, fine)
    assert "resampled" in back.meta["notice"]
    np.testing.assert_array_equal(back.array, lab.repeat(2, axis=1).repeat(2, axis=2))
