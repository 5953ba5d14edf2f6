"""CT input/output: canonical LPS, exact round trips, DICOM series, label grids, bad input."""
from __future__ import annotations

import json

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_propseg import io as pio
from napari_propseg.errors import InputError
from napari_propseg.io import (
    Volume,
    is_readable_path,
    list_dicom_series,
    read_labels,
    read_volume,
    volume_info,
    write_labels,
    write_volume,
)
from napari_propseg.labelmap import (
    FLARE_NAMES,
    map_totalsegmentator,
    read_label_map,
    totalsegmentator_to_flare,
    write_label_map,
)


# --------------------------------------------------------------------------- helpers


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


def _file_geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _assert_same_volume(a: Volume, b: Volume, exact: bool = True) -> None:
    np.testing.assert_array_equal(a.array, b.array)
    assert a.array.dtype == b.array.dtype
    if exact:
        assert a.spacing == b.spacing
        assert a.origin == b.origin
        np.testing.assert_array_equal(a.direction, b.direction)
    else:  # NIfTI headers store geometry in float32
        np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
        np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
        np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


def _synthetic_canonical(shape=(4, 5, 6)):
    """Distinct voxel values so that any wrong permutation/flip is caught."""
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 100
    spacing = (3.0, 2.0, 0.5)  # (sz, sy, sx), all different
    origin = (-10.0, 20.0, 30.0)  # physical x, y, z of arr[0, 0, 0]
    return arr, spacing, origin


def _file_image(arr, spacing, origin, code: str) -> sitk.Image:
    """Hand-built sitk image storing the canonical (arr, spacing, origin) in another layout."""
    sz, sy, sx = spacing
    z_n, y_n, x_n = arr.shape
    ox, oy, oz = origin
    if code == "LPS":
        file_arr, sp, org, d = arr, (sx, sy, sz), (ox, oy, oz), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    elif code == "LAS":  # y index runs anterior: flip numpy axis 1
        file_arr = arr[:, ::-1, :]
        sp, org, d = (sx, sy, sz), (ox, oy + sy * (y_n - 1), oz), (1, 0, 0, 0, -1, 0, 0, 0, 1)
    elif code == "RAS":
        file_arr = arr[:, ::-1, ::-1]
        sp, org = (sx, sy, sz), (ox + sx * (x_n - 1), oy + sy * (y_n - 1), oz)
        d = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    elif code == "LPI":
        file_arr = arr[::-1]
        sp, org, d = (sx, sy, sz), (ox, oy, oz + sz * (z_n - 1)), (1, 0, 0, 0, 1, 0, 0, 0, -1)
    elif code == "PSL":  # sagittal storage: index i -> +y, j -> +z, k -> +x
        file_arr = arr.transpose(2, 0, 1)  # file[k=x, j=z, i=y]
        sp, org = (sy, sz, sx), (ox, oy, oz)
        d = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # columns: i=(0,1,0), j=(0,0,1), k=(1,0,0)
    else:  # pragma: no cover
        raise ValueError(code)
    img = sitk.GetImageFromArray(np.ascontiguousarray(file_arr))
    img.SetSpacing(sp)
    img.SetOrigin(org)
    img.SetDirection(tuple(float(v) for v in d))
    return img


def _write_dicom_series(folder: Path, arr: np.ndarray, uid: str, spacing=(2.0, 0.8, 0.8), origin=(-100.0, -90.0, 50.0), desc="test"):
    """Write (Z, Y, X) int16 HU as a DICOM CT series (one file per slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sz, sy, sx = spacing
    for z in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[z].astype(np.int16))
        sl.SetSpacing((sx, sy))
        pos = (origin[0], origin[1], origin[2] + z * sz)
        tags = {
            "0008|0060": "CT",
            "0008|103e": desc,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|1052": "0",
            "0028|1053": "1",
            "0008|0018": f"{uid}.{z + 1}",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"s{uid.split('.')[-1]}_{z:03d}.dcm"))
        writer.Execute(sl)


@pytest.fixture(scope="module")
def dicom_ct(shared_data):
    return read_volume(shared_data / "totalseg_example" / "example_ct_dicom")


# --------------------------------------------------------------------------- real CTs


def test_las_labels_land_on_dicom_ct_voxels(shared_data, dicom_ct):
    folder = shared_data / "totalseg_example"
    raw = read_volume(folder / "example_seg_dicom.nii.gz")
    assert raw.orientation == "LAS" and dicom_ct.orientation == "LPS"
    labels = read_labels(folder / "example_seg_dicom.nii.gz", dicom_ct)
    on_grid = read_labels(folder / "example_seg_dicom_on_ct_grid.nii.gz", dicom_ct)
    assert "notice" not in labels.meta  # same physical grid: reoriented, not resampled
    np.testing.assert_array_equal(labels.array, on_grid.array)
    # The on-grid file is stored exactly like the DICOM (LPS): its raw array is canonical.
    np.testing.assert_array_equal(labels.array, sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg_dicom_on_ct_grid.nii.gz"))))
    assert labels.shape == dicom_ct.shape == (20, 512, 512)
    # Anatomy: TotalSegmentator v2 liver (5) is soft tissue on the patient's right (low x in LPS).
    liver = labels.array == 5
    assert liver.sum() > 10000
    assert 20 < dicom_ct.array[liver].mean() < 150
    assert np.nonzero(liver)[2].mean() < dicom_ct.shape[2] / 2
    # The same file read WITHOUT reorientation would put the liver on other voxels.
    flipped = labels.array[:, ::-1, :] == 5
    assert (flipped & liver).sum() < 0.8 * liver.sum()


def test_dicom_geometry(dicom_ct, shared_data):
    assert dicom_ct.spacing == (2.0, 0.9765625, 0.9765625)
    assert dicom_ct.origin == (-249.51171875, -437.51171875, -804.5)
    np.testing.assert_array_equal(dicom_ct.direction, np.eye(3))
    assert dicom_ct.array.dtype == np.int16
    info = volume_info(dicom_ct)
    assert info["hu_min"] == -1024 and info["hu_max"] > 1000
    assert info["series"] == [{"uid": "", "n_slices": 20, "description": "CT Body 3.0", "folder": str((shared_data / "totalseg_example" / "example_ct_dicom").resolve())}]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".nii"])
def test_dicom_roundtrip_keeps_geometry(dicom_ct, tmp_path, ext):
    out = write_volume(dicom_ct.array, dicom_ct, tmp_path / f"ct{ext}")
    back = read_volume(out)
    _assert_same_volume(dicom_ct, back)
    assert back.orientation == "LPS"


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_las_file_roundtrip_keeps_original_orientation(shared_data, tmp_path, ext):
    src = shared_data / "totalseg_example" / "example_seg_dicom.nii.gz"
    vol = read_volume(src)
    out = write_labels(vol.array, vol, tmp_path / f"seg{ext}")
    back = read_volume(out)
    _assert_same_volume(vol, back)
    assert back.orientation == "LAS"
    a0, sp0, or0, d0 = _file_geometry(src)
    a1, sp1, or1, d1 = _file_geometry(out)
    np.testing.assert_array_equal(a0, a1)  # the file's own array layout is restored
    assert sp0 == sp1 and or0 == or1 and d0 == d1
    assert a1.dtype == np.uint8


def test_ras_nifti_roundtrip(shared_data, tmp_path):
    src = shared_data / "totalseg_example" / "example_ct.nii.gz"
    vol = read_volume(src)
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.direction, np.eye(3))
    ref = sitk.DICOMOrient(sitk.ReadImage(str(src)), "LPS")  # ITK's own reorientation
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-9)
    for ext in (".nii.gz", ".nrrd"):
        out = write_volume(vol.array, vol, tmp_path / f"ct{ext}")
        _assert_same_volume(vol, read_volume(out))
        a0, sp0, or0, d0 = _file_geometry(src)
        a1, sp1, or1, d1 = _file_geometry(out)
        np.testing.assert_array_equal(a0, a1)
        assert sp0 == sp1 and d0 == d1
        np.testing.assert_allclose(or0, or1, atol=1e-9)


def test_dcmqi_three_slice_masks_line_up(shared_data):
    folder = shared_data / "dcmqi_ct3slice"
    ct = read_volume(folder / "dicom")
    assert ct.shape == (3, 512, 512)
    masks = {m: read_labels(folder / f"{m}_seg.nrrd", ct) for m in ("liver", "spine", "heart")}
    for name, lab in masks.items():
        assert "notice" not in lab.meta, name  # NRRD grid == DICOM grid (up to float noise)
        assert lab.shape == ct.shape and lab.array.dtype == np.uint8
    liver, spine, heart = (masks[m].array > 0 for m in ("liver", "spine", "heart"))
    assert liver.sum() == 107098 and spine.sum() == 12439 and heart.sum() == 41449
    assert 0 < ct.array[liver].mean() < 150  # soft tissue
    assert ct.array[spine].mean() > 200  # bone
    assert not (liver & spine).any()
    combined = read_labels(folder / "liver_spine_seg.nrrd", ct).array
    np.testing.assert_array_equal(combined, masks["liver"].array + masks["spine"].array)


def test_dcmqi_flipped_mask_still_lines_up(shared_data, tmp_path):
    """A mask stored in another orientation lands on the same voxels."""
    folder = shared_data / "dcmqi_ct3slice"
    ct = read_volume(folder / "dicom")
    liver = read_labels(folder / "liver_seg.nrrd", ct)
    img = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    ras = sitk.DICOMOrient(img, "RAI")  # x and y flipped, z kept... in ITK's naming
    path = tmp_path / "liver_other.nrrd"
    sitk.WriteImage(ras, str(path))
    assert read_volume(path).orientation != "LPS"
    np.testing.assert_array_equal(read_labels(path, ct).array, liver.array)


def test_totalsegmentator_maps_to_flare(shared_data):
    folder = shared_data / "totalseg_example"
    v1 = read_label_map(folder / "labels.json", key="v1")
    v2 = read_label_map(folder / "labels.json", key="v2")
    assert v1[10] == "pancreas" and v2[7] == "pancreas"
    t1, t2 = totalsegmentator_to_flare(v1), totalsegmentator_to_flare(v2)
    # every FLARE-13 organ is found by name in both versions
    assert set(t1.values()) >= set(range(1, 14)) and set(t2.values()) >= set(range(1, 14))
    assert t1[10] == 4 and t2[7] == 4 and t1[5] == 1 and t2[5] == 1 and t2[63] == 6
    ct = read_volume(folder / "example_ct.nii.gz")
    seg = read_labels(folder / "example_seg_v1.nii.gz", ct)
    flare = map_totalsegmentator(seg.array, v1)
    assert flare.dtype == np.uint8 and flare.shape == seg.shape
    np.testing.assert_array_equal(flare == 1, seg.array == 5)  # liver
    np.testing.assert_array_equal(flare == 4, seg.array == 10)  # pancreas
    np.testing.assert_array_equal(flare == 14, (seg.array >= 18) & (seg.array <= 41))  # vertebrae
    assert set(np.unique(flare)) <= set(range(15))
    assert 20 < ct.array[flare == 1].mean() < 150


def test_label_map_json_roundtrip(tmp_path):
    path = write_label_map(FLARE_NAMES, tmp_path / "map.json")
    assert read_label_map(path) == FLARE_NAMES
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError):
        read_label_map(bad)
    nested = tmp_path / "nested.json"
    nested.write_text('{"a v1": {"1": "liver"}, "b v2": {"2": "liver"}}')
    with pytest.raises(InputError):
        read_label_map(nested)
    assert read_label_map(nested, key="v2") == {2: "liver"}


# --------------------------------------------------------------------------- synthetic orientation


@pytest.mark.parametrize("code", ["LPS", "LAS", "RAS", "LPI", "PSL"])
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_every_orientation_reads_to_the_same_canonical_array(tmp_path, code, ext):
    arr, spacing, origin = _synthetic_canonical()
    img = _file_image(arr, spacing, origin, code)
    path = tmp_path / f"img{ext}"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.orientation == code
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-7)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-7)
    # independent oracle: ITK's own reorientation to LPS
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")))
    # writing restores the file's own layout
    if ext != ".mha":
        out = write_labels(vol.array - vol.array.min(), vol, tmp_path / f"lab{ext}")
        a1, sp1, or1, d1 = _file_geometry(out)
        np.testing.assert_array_equal(a1, sitk.GetArrayFromImage(img) - arr.min())
        np.testing.assert_allclose(sp1, img.GetSpacing(), rtol=1e-7)
        np.testing.assert_allclose(or1, img.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(d1, img.GetDirection(), atol=1e-7)
        assert read_volume(out).orientation == code


def test_oblique_keeps_residual_direction_and_roundtrips(tmp_path):
    arr, spacing, origin = _synthetic_canonical()
    img = _file_image(arr, spacing, origin, "RAS")
    t = np.deg2rad(12.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    d_file = rot @ np.array(img.GetDirection()).reshape(3, 3)
    img.SetDirection(tuple(d_file.ravel()))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.array, arr)  # closest permutation: no resampling
    np.testing.assert_allclose(vol.direction, rot, atol=1e-12)  # residual rotation kept
    # physical position of every voxel is unchanged: compare one far corner
    idx_file = (0, 0, 0)  # file voxel (i, j, k) = canonical (x=X-1, y=Y-1, z=0)
    p_file = np.array(img.TransformIndexToPhysicalPoint(idx_file))
    canon = vol.to_sitk()
    p_canon = np.array(canon.TransformIndexToPhysicalPoint((arr.shape[2] - 1, arr.shape[1] - 1, 0)))
    np.testing.assert_allclose(p_file, p_canon, atol=1e-9)
    out = write_volume(vol.array, vol, tmp_path / "oblique_out.nrrd")
    a1, sp1, or1, d1 = _file_geometry(out)
    np.testing.assert_array_equal(a1, sitk.GetArrayFromImage(img))
    assert sp1 == img.GetSpacing() and or1 == img.GetOrigin()
    np.testing.assert_allclose(d1, img.GetDirection(), atol=1e-15)
    assert volume_info(vol)["oblique"]


def test_volume_from_array_and_like(tmp_path):
    arr, spacing, origin = _synthetic_canonical()
    vol = Volume.from_array(arr, spacing, origin, meta={"notice": "x", "k": 1})
    assert vol.shape == arr.shape and vol.orientation == "LPS"
    lab = vol.like(np.zeros(arr.shape, np.uint8))
    assert lab.spacing == vol.spacing and lab.origin == vol.origin and lab.meta == {"k": 1}
    with pytest.raises(ValueError):
        vol.like(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        Volume.from_array(np.zeros((4, 4)))
    out = write_volume(arr, vol, tmp_path / "p.nrrd")
    back = read_volume(out)
    _assert_same_volume(vol, back)
    again = Volume.from_metadata(arr, read_volume(out).to_metadata())
    _assert_same_volume(back, again)
    assert again.source == back.source
    with pytest.raises(InputError):
        Volume.from_metadata(arr[:, :2], vol.to_metadata())
    with pytest.raises(InputError):
        Volume.from_metadata(arr, {})
    lo, hi = vol.physical_bounds()
    np.testing.assert_allclose(lo, np.array(origin) - 0.5 * np.array(spacing[::-1]))
    np.testing.assert_allclose(hi, lo + np.array(spacing[::-1]) * np.array(arr.shape[::-1]))


# --------------------------------------------------------------------------- DICOM series


def test_several_dicom_series(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, (5, 8, 9)).astype(np.int16)
    b = rng.integers(-1000, 1000, (3, 8, 9)).astype(np.int16)
    uid_a, uid_b = "1.2.826.0.1.3680043.2.1125.100", "1.2.826.0.1.3680043.2.1125.200"
    _write_dicom_series(tmp_path / "d", a, uid_a, desc="five")
    _write_dicom_series(tmp_path / "d", b, uid_b, desc="three")
    series = list_dicom_series(tmp_path / "d")
    assert [(s["uid"], s["n_slices"], s["description"]) for s in series] == [(uid_a, 5, "five"), (uid_b, 3, "three")]
    vol = read_volume(tmp_path / "d")
    np.testing.assert_array_equal(vol.array, a)
    assert vol.meta["series_uid"] == uid_a and uid_b in vol.meta["notice"]
    np.testing.assert_allclose(vol.spacing, (2.0, 0.8, 0.8), rtol=1e-6)
    np.testing.assert_allclose(vol.origin, (-100.0, -90.0, 50.0), atol=1e-4)
    picked = read_volume(tmp_path / "d", series_uid=uid_b)
    np.testing.assert_array_equal(picked.array, b)
    assert "notice" not in picked.meta
    # one file stands for its own series
    one = read_volume(next((tmp_path / "d").glob(f"s{uid_b.split('.')[-1]}_*.dcm")))
    np.testing.assert_array_equal(one.array, b)
    with pytest.raises(InputError) as exc:
        read_volume(tmp_path / "d", series_uid="9.9.9")
    assert uid_a in _one_sentence(exc)
    assert is_readable_path(tmp_path / "d")


def test_dicom_series_in_subfolders(tmp_path):
    """A PACS-style export (patient/study/series/...): pointing at the top folder finds the
    series below it, reads the one with most slices and says where it was."""
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, (5, 8, 9)).astype(np.int16)
    b = rng.integers(-1000, 1000, (3, 8, 9)).astype(np.int16)
    uid_a, uid_b = "1.2.826.0.1.3680043.2.1125.300", "1.2.826.0.1.3680043.2.1125.400"
    top = tmp_path / "patient"
    _write_dicom_series(top / "study1" / "ct_thin", a, uid_a, desc="thin")
    _write_dicom_series(top / "study1" / "scout", b, uid_b, desc="scout")
    (top / "notes").mkdir()
    series = list_dicom_series(top)
    assert [(s["uid"], s["n_slices"], s["folder"]) for s in series] == [(uid_a, 5, top / "study1" / "ct_thin"),
                                                                          (uid_b, 3, top / "study1" / "scout")]
    vol = read_volume(top)
    np.testing.assert_array_equal(vol.array, a)
    direct = read_volume(top / "study1" / "ct_thin")
    np.testing.assert_allclose(vol.origin, direct.origin) and np.testing.assert_allclose(vol.spacing, direct.spacing)
    assert "ct_thin" in vol.meta["notice"] and uid_b in vol.meta["notice"]
    np.testing.assert_array_equal(read_volume(top, series_uid=uid_b).array, b)
    assert is_readable_path(top)
    # nothing below either: one sentence that says so
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(InputError) as exc:
        read_volume(tmp_path / "empty")
    assert "subfolders" in _one_sentence(exc)


def test_dicom_series_spread_over_folders_and_symlink_loops(tmp_path):
    """One series whose files lie in two folders is read whole, in slice order; a symbolic
    link back up the tree neither loops nor lists the series twice."""
    import os
    import shutil

    rng = np.random.default_rng(2)
    a = rng.integers(-1000, 1000, (6, 8, 9)).astype(np.int16)
    uid = "1.2.826.0.1.3680043.2.1125.500"
    top = tmp_path / "export"
    _write_dicom_series(top / "all", a, uid)
    (top / "SER1").mkdir()
    for f in sorted((top / "all").glob("*.dcm"))[:3]:  # the first three slices elsewhere
        shutil.move(str(f), top / "SER1" / f.name)
    (top / "all").rename(top / "SER0")
    (top / "misc").mkdir()
    os.symlink("..", top / "misc" / "loop")  # export/misc/loop/misc/loop/... back to the top
    series = list_dicom_series(top)
    assert len(series) == 1 and series[0]["n_slices"] == 6 and len(series[0]["folders"]) == 2
    vol = read_volume(top)
    np.testing.assert_array_equal(vol.array, a)
    assert "spread over 2 folders" in vol.meta["notice"]
    json.dumps(vol.meta["series"])  # serialisable (saved with sessions and layer metadata)


def test_dicom_missing_slice_is_noticed(tmp_path):
    a = np.random.default_rng(2).integers(-1000, 1000, (6, 8, 9)).astype(np.int16)
    uid = "1.2.826.0.1.3680043.2.1125.300"
    _write_dicom_series(tmp_path / "d", a, uid)
    (tmp_path / "d" / "s300_003.dcm").unlink()
    vol = read_volume(tmp_path / "d")
    assert vol.shape == (5, 8, 9)
    assert "uneven slice spacing" in vol.meta["notice"]


# --------------------------------------------------------------------------- label grids


def test_labels_on_other_grid_are_resampled_or_refused(tmp_path):
    arr, spacing, origin = _synthetic_canonical((6, 8, 10))
    img = Volume.from_array(arr, (2.0, 1.0, 1.0), origin)
    # labels: left half of x = 1, on a grid twice as fine covering the same space
    fine = np.zeros((12, 16, 20), np.uint8)
    fine[:, :, :10] = 1
    fine_img = sitk.GetImageFromArray(fine)
    fine_img.SetSpacing((0.5, 0.5, 1.0))
    fine_img.SetOrigin(tuple(np.array(origin) - np.array([0.25, 0.25, 0.5])))
    path = tmp_path / "fine.nrrd"
    sitk.WriteImage(fine_img, str(path))
    lab = read_labels(path, img)
    assert "nearest" in lab.meta["notice"] and lab.shape == img.shape
    expected = np.zeros(img.shape, np.uint8)
    expected[:, :, :5] = 1
    np.testing.assert_array_equal(lab.array, expected)
    # a label file covering half of the image is refused
    half = sitk.GetImageFromArray(np.zeros((3, 8, 10), np.uint8))
    half.SetSpacing((1.0, 1.0, 2.0))
    half.SetOrigin(origin)
    sitk.WriteImage(half, str(tmp_path / "half.nrrd"))
    with pytest.raises(InputError) as exc:
        read_labels(tmp_path / "half.nrrd", img)
    assert "half.nrrd" in _one_sentence(exc)
    # same shape, shifted far away: refused
    far = sitk.GetImageFromArray(np.zeros(img.shape, np.uint8))
    far.SetSpacing((1.0, 1.0, 2.0))
    far.SetOrigin((500.0, 0.0, 0.0))
    sitk.WriteImage(far, str(tmp_path / "far.nrrd"))
    with pytest.raises(InputError):
        read_labels(tmp_path / "far.nrrd", img)


def test_float_labels(tmp_path):
    vol = Volume.from_array(np.zeros((3, 4, 5), np.int16))
    lab = np.zeros((3, 4, 5), np.float32)
    lab[1, 2, 3] = 7.0
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "f.nrrd"))
    out = read_labels(tmp_path / "f.nrrd", vol)
    assert out.array.dtype == np.uint8 and out.array[1, 2, 3] == 7 and out.array.sum() == 7
    lab[0, 0, 0] = 0.5
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "p.nrrd"))
    with pytest.raises(InputError) as exc:
        read_labels(tmp_path / "p.nrrd", vol)
    assert "non-integer" in _one_sentence(exc)


@pytest.mark.parametrize("top,dtype", [(1, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16), (70000, np.int32)])
def test_write_labels_narrowest_type(tmp_path, top, dtype):
    vol = Volume.from_array(np.zeros((2, 3, 4), np.int16))
    lab = np.zeros((2, 3, 4), np.int64)
    lab[1, 1, 1] = top
    out = write_labels(lab, vol, tmp_path / "l.nii.gz")
    a, *_ = _file_geometry(out)
    assert a.dtype == dtype and a[1, 1, 1] == top


def test_write_labels_refuses_bad_labels(tmp_path):
    vol = Volume.from_array(np.zeros((2, 3, 4), np.int16))
    with pytest.raises(InputError):
        write_labels(-np.ones((2, 3, 4), np.int16), vol, tmp_path / "l.nii.gz")
    with pytest.raises(InputError):
        write_labels(np.full((2, 3, 4), 0.5), vol, tmp_path / "l.nii.gz")
    with pytest.raises(InputError):
        write_labels(np.zeros((2, 3, 5), np.uint8), vol, tmp_path / "l.nii.gz")
    with pytest.raises(InputError):
        write_labels(np.zeros((2, 3, 4), np.uint8), vol, tmp_path / "l.png")
    with pytest.raises(InputError):
        write_labels(np.zeros((2, 3, 4), np.uint8), vol, tmp_path / "missing" / "l.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("existing", [True, False])
def test_failed_write_leaves_old_file_and_no_partial(tmp_path, monkeypatch, existing):
    vol = Volume.from_array(np.zeros((2, 3, 4), np.int16))
    target = tmp_path / "labels.nii.gz"
    if existing:
        write_labels(np.ones((2, 3, 4), np.uint8), vol, target)
        before = target.read_bytes()

    def failing_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")  # a partial write, then the failure
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: ITK ERROR: disk full")

    monkeypatch.setattr(pio.sitk, "WriteImage", failing_write)
    with pytest.raises(InputError) as exc:
        write_labels(np.full((2, 3, 4), 2, np.uint8), vol, target)
    assert "disk full" in _one_sentence(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["labels.nii.gz"] if existing else [])
    if existing:
        assert target.read_bytes() == before
        monkeypatch.undo()
        assert (read_volume(target).array == 1).all()


def test_write_replaces_old_file(tmp_path):
    vol = Volume.from_array(np.zeros((2, 3, 4), np.int16))
    target = tmp_path / "labels.nrrd"
    write_labels(np.ones((2, 3, 4), np.uint8), vol, target)
    write_labels(np.full((2, 3, 4), 3, np.uint8), vol, target)
    assert (read_volume(target).array == 3).all()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nrrd"]
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    cases["missing"] = tmp_path / "nope.nii.gz"
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 30, 30)).astype(np.float32)), str(good))
    data = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "truncated.nii.gz"
    (tmp_path / "trunc_raw.nii").write_bytes(gzip.decompress(data)[:1000])
    cases["truncated_raw"] = tmp_path / "trunc_raw.nii"
    (tmp_path / "garbage.nrrd").write_bytes(b"this is not an image at all\n" * 10)
    cases["garbage"] = tmp_path / "garbage.nrrd"
    (tmp_path / "empty.mha").write_bytes(b"")
    cases["zero_bytes"] = tmp_path / "empty.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.int16)), str(tmp_path / "flat.nrrd"))
    cases["2d"] = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 30, 40), np.int16)), str(tmp_path / "one_slice.nii.gz"))
    cases["one_slice"] = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 30, 40, 3), np.uint8), isVector=True), str(tmp_path / "rgb.mha"))
    cases["rgb"] = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40, 3), np.uint8), isVector=True), str(tmp_path / "rgb2d.nrrd"))
    cases["rgb_2d"] = tmp_path / "rgb2d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16))] * 3), str(tmp_path / "t.nii.gz"))
    cases["4d"] = tmp_path / "t.nii.gz"
    (tmp_path / "empty_dir").mkdir()
    cases["empty_folder"] = tmp_path / "empty_dir"
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"note{i}.txt").write_text("hello")
    cases["non_dicom_folder"] = tmp_path / "texts"
    (tmp_path / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cases["unsupported"] = tmp_path / "pic.png"
    return cases


BAD = ["missing", "truncated", "truncated_raw", "garbage", "zero_bytes", "2d", "one_slice", "rgb", "rgb_2d", "4d", "empty_folder", "non_dicom_folder", "unsupported"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_sentence(tmp_path, case):
    path = _bad_inputs(tmp_path)[case]
    with pytest.raises(InputError) as exc:
        read_volume(path)
    msg = _one_sentence(exc)
    assert path.name in msg
    keyword = {"2d": "2-D", "one_slice": "2-D", "rgb": "colour", "rgb_2d": "colour", "4d": "4-D", "empty_folder": "empty",
               "non_dicom_folder": "no DICOM", "unsupported": "unsupported", "missing": "does not exist"}.get(case)
    if keyword:
        assert keyword in msg
    # the same files are refused as label files, too
    like = Volume.from_array(np.zeros((2, 3, 4), np.int16))
    with pytest.raises(InputError):
        read_labels(path, like)


def test_is_readable_path(tmp_path):
    cases = _bad_inputs(tmp_path)
    assert not is_readable_path(cases["missing"])
    assert not is_readable_path(cases["unsupported"])
    assert not is_readable_path(cases["empty_folder"])
    assert not is_readable_path(cases["non_dicom_folder"])
    assert is_readable_path(tmp_path / "good.nii.gz")
    assert is_readable_path(str(tmp_path / "good.nii.gz"))
    assert not is_readable_path(None)  # type: ignore[arg-type]


def test_4d_with_one_frame_is_a_volume(tmp_path):
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(arr)]), str(tmp_path / "t1.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "t1.nii.gz").array, arr)
