"""Metrics: hand-computed cases, empty-mask conventions, SimpleITK cross-check, CSV/CLI."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from napari_propseg.errors import InputError
from napari_propseg.metrics import (
    CSV_COLUMNS,
    MetricAccumulator,
    binary_metrics,
    compute_metrics,
    mean_row,
)


def _cubes(shift_x: int = 3):
    a = np.zeros((30, 30, 30), np.uint8)
    a[10:20, 10:20, 10:20] = 1
    b = np.zeros_like(a)
    b[10:20, 10:20, 10 + shift_x:20 + shift_x] = 1
    return a, b


def test_offset_cubes_exact_overlap_and_distances():
    a, b = _cubes(3)
    m = binary_metrics(a, b, (1.0, 1.0, 1.0))
    # |A∩B| = 10*10*7 = 700, |A| = |B| = 1000.
    assert m["dice"] == pytest.approx(2 * 700 / 2000)
    assert m["jaccard"] == pytest.approx(700 / 1300)
    assert m["rvd"] == 0.0
    assert m["hd"] == pytest.approx(3.0)  # x-faces are 3 voxels apart
    assert m["hd95"] <= m["hd"] + 1e-12
    # Border voxels: 1000 - 8^3 = 488 per cube; 7 x-slices x 36 ring voxels are border of both.
    assert binary_metrics(a, b, (1, 1, 1), tolerance_mm=0.0)["nsd"] == pytest.approx(2 * 252 / 976)
    # Within 1 mm: the 252 shared + 36 ring voxels of the next slice + 28 face voxels one
    # voxel from the other cube's side faces, per direction.
    assert m["nsd"] == pytest.approx(2 * 316 / 976)
    assert binary_metrics(a, b, (1, 1, 1), tolerance_mm=3.0)["nsd"] == 1.0


def test_offset_cubes_anisotropic_spacing_scales_distances():
    a, b = _cubes(3)
    m = binary_metrics(a, b, (3.0, 1.5, 2.0))
    assert m["dice"] == pytest.approx(0.7)
    assert m["hd"] == pytest.approx(6.0)  # 3 voxels along x at 2 mm
    shifted_z = np.roll(a, 2, axis=0)
    assert binary_metrics(a, shifted_z, (3.0, 1.5, 2.0))["hd"] == pytest.approx(6.0)  # 2 voxels at 3 mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_concentric_spheres_distance_is_radius_difference(spacing):
    shape = tuple(int(round(36 / s)) for s in spacing)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = np.sqrt(sum(((g - (n - 1) / 2) * s) ** 2 for g, n, s in zip(grids, shape, spacing)))
    big, small = r <= 14.0, r <= 10.0
    m = binary_metrics(big, small, spacing)
    assert m["hd95"] == pytest.approx(4.0, abs=1.0)
    assert m["asd"] == pytest.approx(4.0, abs=0.75)
    assert m["nsd"] == 0.0  # every surface voxel is ~4 mm from the other surface
    assert binary_metrics(big, small, spacing, tolerance_mm=6.0)["nsd"] == 1.0
    assert m["rvd"] == pytest.approx(big.sum() / small.sum() - 1)


def test_identical_masks_are_perfect():
    a, _ = _cubes()
    m = binary_metrics(a, a, (2.0, 0.7, 0.7))
    assert (m["dice"], m["jaccard"], m["nsd"], m["hd95"], m["hd"], m["asd"], m["rvd"]) == (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


def test_empty_conventions():
    e = np.zeros((8, 8, 8), np.uint8)
    f = e.copy()
    f[2:5, 2:5, 2:5] = 1
    both = binary_metrics(e, e, (1, 1, 1))
    assert (both["dice"], both["jaccard"], both["nsd"], both["hd95"], both["asd"], both["rvd"]) == (1, 1, 1, 0, 0, 0)
    missed = binary_metrics(e, f, (1, 1, 1))  # prediction empty, GT not
    assert (missed["dice"], missed["jaccard"], missed["nsd"], missed["rvd"]) == (0, 0, 0, -1)
    assert math.isinf(missed["hd95"]) and math.isinf(missed["asd"]) and math.isinf(missed["hd"])
    false_pos = binary_metrics(f, e, (1, 1, 1))  # GT empty, prediction not
    assert (false_pos["dice"], false_pos["jaccard"], false_pos["nsd"]) == (0, 0, 0)
    assert math.isinf(false_pos["rvd"]) and false_pos["rvd"] > 0
    assert math.isinf(false_pos["hd95"]) and math.isinf(false_pos["asd"])


def test_compute_metrics_multilabel_and_absent_label():
    a, b = _cubes(3)
    gt = a.copy()
    gt[0:4, 0:4, 0:4] = 2
    pred = b.copy()
    pred[0:4, 0:4, 0:4] = 2
    rows = compute_metrics(pred, gt, (1, 1, 1), labels=[1, 2, 5])
    assert [r["label"] for r in rows] == [1, 2, 5]
    assert rows[0]["dice"] == pytest.approx(0.7)
    assert rows[1]["dice"] == 1.0  # touches the volume corner: border handled
    assert rows[2]["dice"] == 1.0 and rows[2]["gt_voxels"] == 0  # absent from both
    assert rows[1]["gt_ml"] == pytest.approx(64 / 1000)
    m = mean_row(rows)
    assert m["n_labels"] == 2  # the absent label does not inflate the mean
    assert m["dice"] == pytest.approx((0.7 + 1.0) / 2)
    assert [r["label"] for r in compute_metrics(pred, gt, (1, 1, 1))] == [1, 2]


def test_bad_input_raises_input_error():
    a, b = _cubes()
    with pytest.raises(InputError):
        compute_metrics(a, b[:-1], (1, 1, 1))
    with pytest.raises(InputError):
        compute_metrics(a, b, (1, 0, 1))
    with pytest.raises(InputError):
        compute_metrics(a[0], b[0], (1, 1, 1))
    with pytest.raises(InputError):
        compute_metrics(a, b, (1, 1, 1), labels=[0])


def _ellipsoid(shape, center, axes):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g[i] - center[i]) / axes[i]) ** 2 for i in range(3)) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_simpleitk(seed):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(seed)
    shape = (24, 40, 36)
    spacing = (2.5, 0.8, 0.7)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for lab in (1, 2, 3):
        c = rng.uniform(8, 16, 3)
        ax = rng.uniform(3, 8, 3)
        gt[_ellipsoid(shape, c, ax)] = lab
        pred[_ellipsoid(shape, c + rng.uniform(-2, 2, 3), ax * rng.uniform(0.8, 1.2, 3))] = lab
    rows = compute_metrics(pred, gt, spacing)

    def img(a):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing(spacing[::-1])  # ITK order (x, y, z)
        return im

    ov = sitk.LabelOverlapMeasuresImageFilter()
    ov.Execute(img(pred), img(gt))
    for r in rows:
        lab = r["label"]
        if r["gt_voxels"] == 0 or r["pred_voxels"] == 0:
            continue
        assert r["dice"] == pytest.approx(ov.GetDiceCoefficient(lab), abs=1e-9)
        assert r["jaccard"] == pytest.approx(ov.GetJaccardCoefficient(lab), abs=1e-9)
        # SimpleITK's volume similarity 2(P-G)/(P+G) expressed through our rvd = P/G - 1.
        assert 2 * r["rvd"] / (r["rvd"] + 2) == pytest.approx(ov.GetVolumeSimilarity(lab), abs=1e-9)
        hd = sitk.HausdorffDistanceImageFilter()
        hd.Execute(img((pred == lab).astype(np.uint8)), img((gt == lab).astype(np.uint8)))
        # SimpleITK measures to all voxels, we to border voxels: identical maxima (the
        # farthest point always lies outside the other mask).
        assert r["hd"] == pytest.approx(hd.GetHausdorffDistance(), abs=1e-6)


def test_accumulator_csv(tmp_path):
    a, b = _cubes(3)
    acc = MetricAccumulator(label_names={1: "liver"})
    acc.update(b, a, (1, 1, 1), case="c1")
    acc.update(a, a, (1, 1, 1), case="c2")
    agg = acc.aggregate()
    assert agg[1]["dice"] == pytest.approx((0.7 + 1.0) / 2) and agg[1]["n_cases"] == 2
    out = acc.to_csv(tmp_path / "r.csv")
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [("c1", "1", "liver"), ("c1", "mean", "mean"), ("c2", "1", "liver"), ("c2", "mean", "mean")]
    assert float(rows[0]["dice"]) == pytest.approx(0.7)
    acc.reset()
    assert acc.rows == []


# --------------------------------------------------------------------------- propseg evaluate


def _write_case(folder, name, arr, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    from napari_propseg.io import Volume, write_labels

    folder.mkdir(parents=True, exist_ok=True)
    vol = Volume.from_array(arr, spacing, origin)
    return write_labels(arr, vol, folder / name)


def test_cli_evaluate_files_and_label_map(tmp_path, capsys):
    pytest.importorskip("napari_propseg.io")
    from napari_propseg.cli import main

    a, b = _cubes(3)
    gt = _write_case(tmp_path / "gt", "c1.nii.gz", a)
    pred = _write_case(tmp_path / "pred", "c1.nrrd", b)
    (tmp_path / "map.json").write_text('{"0": "background", "1": "tumour"}')
    out = tmp_path / "r.csv"
    assert main(["evaluate", str(pred), str(gt), "--labels", str(tmp_path / "map.json"), "--tolerance", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [("c1", "1", "tumour"), ("c1", "mean", "mean")]
    assert float(rows[0]["dice"]) == pytest.approx(0.7)
    assert float(rows[0]["hd"]) == pytest.approx(3.0)  # x spacing 1 mm
    assert float(rows[0]["gt_ml"]) == pytest.approx(2.0)  # 1000 voxels of 2 mm^3
    assert "c1" in capsys.readouterr().out


def test_cli_evaluate_folders_other_grid_and_errors(tmp_path):
    pytest.importorskip("napari_propseg.io")
    from napari_propseg.cli import main

    a, b = _cubes(3)
    _write_case(tmp_path / "gt", "c1.nii.gz", a, spacing=(2.0, 1.0, 1.0))
    _write_case(tmp_path / "gt", "c2.nii.gz", b, spacing=(2.0, 1.0, 1.0))
    _write_case(tmp_path / "pred", "c1.nii.gz", a)
    # c2's prediction on a grid twice as fine in x covering the same space: resampled
    fine = np.repeat(b, 2, axis=2)
    _write_case(tmp_path / "pred", "c2.nii.gz", fine, spacing=(2.0, 1.0, 0.5), origin=(-0.25, 0.0, 0.0))
    out = tmp_path / "r.csv"
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(out)]) == 0
    rows = {(r["case"], r["label"]): r for r in csv.DictReader(out.open())}
    assert float(rows[("c1", "1")]["dice"]) == 1.0 and rows[("c1", "1")]["name"] == "liver"
    assert float(rows[("c2", "1")]["dice"]) == pytest.approx(1.0)
    # a GT case without prediction, a file against a folder, a bad tolerance: exit code 2
    _write_case(tmp_path / "gt", "c3.nii.gz", a)
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(out)]) == 2
    assert main(["evaluate", str(tmp_path / "pred" / "c1.nii.gz"), str(tmp_path / "gt"), "--out", str(out)]) == 2
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--tolerance", "-1", "--out", str(out)]) == 2
    assert main(["evaluate", str(tmp_path / "nowhere"), str(tmp_path / "gt"), "--out", str(out)]) == 2


def test_cli_evaluate_shared_flipped_labels_match_on_ct_grid(shared_data, tmp_path):
    """The LAS-flipped TotalSegmentator file and its copy on the CT grid are the same
    labels: every organ must score perfectly (geometry handled by io.read_labels)."""
    from napari_propseg.cli import main

    d = shared_data / "totalseg_example"
    out = tmp_path / "r.csv"
    assert main(["evaluate", str(d / "example_seg_dicom.nii.gz"), str(d / "example_seg_dicom_on_ct_grid.nii.gz"),
                 "--labels", str(d / "labels.json"), "--labels-key", "v2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    organs = [r for r in rows if r["label"] != "mean"]
    assert len(organs) >= 20
    assert {r["name"] for r in organs} >= {"liver", "spleen", "aorta"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 for r in organs)


def test_cli_evaluate_translates_totalsegmentator_ground_truth(shared_data, tmp_path):
    """--gt-labels: a TotalSegmentator v1 ground truth scored against a FLARE-id prediction
    made from it by name (labelmap.map_totalsegmentator) matches perfectly; without the
    translation the ids disagree."""
    from napari_propseg.cli import main
    from napari_propseg.io import read_labels, read_volume, write_labels
    from napari_propseg.labelmap import map_totalsegmentator, read_label_map

    d = shared_data / "totalseg_example"
    gt = d / "example_seg_v1.nii.gz"
    ref = read_volume(gt)
    names = read_label_map(d / "labels.json", key="v1")
    flare = map_totalsegmentator(read_labels(gt, like=ref).array, names)
    pred = write_labels(flare, ref, tmp_path / "pred.nii.gz")
    out = tmp_path / "r.csv"
    assert main(["evaluate", str(pred), str(gt), "--gt-labels", str(d / "labels.json"), "--gt-labels-key", "v1",
                 "--out", str(out)]) == 0
    organs = [r for r in csv.DictReader(out.open()) if r["label"] != "mean"]
    assert {r["name"] for r in organs} >= {"liver", "spleen", "pancreas", "vertebrae"}
    assert all(float(r["dice"]) == 1.0 for r in organs)
    assert main(["evaluate", str(pred), str(gt), "--out", str(tmp_path / "raw.csv")]) == 0
    raw = [r for r in csv.DictReader((tmp_path / "raw.csv").open()) if r["label"] == "mean"]
    assert float(raw[0]["dice"]) < 0.5
    # a ground truth that only knows the liver: the prediction's other organs are not scored
    (tmp_path / "liver_only.json").write_text('{"5": "liver"}')
    assert main(["evaluate", str(pred), str(gt), "--gt-labels", str(tmp_path / "liver_only.json"), "--out", str(out)]) == 0
    rows = [r for r in csv.DictReader(out.open()) if r["label"] != "mean"]
    assert [(r["name"], float(r["dice"])) for r in rows] == [("liver", 1.0)]
    # a label map with no class in common: one sentence, exit 2
    (tmp_path / "other.json").write_text('{"1": "tumour"}')
    assert main(["evaluate", str(pred), str(gt), "--gt-labels", str(tmp_path / "other.json"), "--out", str(out)]) == 2


def test_translate_by_name_and_relabel():
    from napari_propseg.errors import InputError
    from napari_propseg.labelmap import relabel, translate_by_name

    table = translate_by_name({1: "Liver", 2: "kidney-cyst-left", 3: "vertebrae_L1", 4: "lung"},
                              {1: "liver", 13: "kidney_left", 14: "vertebrae"})
    assert table == {1: 1, 2: 13, 3: 14}
    assert translate_by_name({5: "tumour", 6: "cyst"}, {1: "cyst"}) == {6: 1}  # plain names, no FLARE rules
    # the TotalSegmentator rules apply only where the target's id names the same organ
    assert translate_by_name({1: "liver", 2: "vertebrae_L1", 3: "kidney_cyst_right"},
                             {1: "liver", 14: "lung", 2: "heart"}) == {1: 1}
    assert relabel(np.array([0, 1, 2**31 - 1]), {1: 5, 2**31 - 1: 7}).tolist() == [0, 5, 7]
    assert relabel(np.array([[0, 1, 2, 4]]), table).tolist() == [[0, 1, 13, 0]]
    with pytest.raises(InputError):
        relabel(np.array([0.5]), table)
    with pytest.raises(InputError):
        relabel(np.array([-1]), table)
