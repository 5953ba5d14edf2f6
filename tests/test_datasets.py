"""Dataset folders: both layouts, partial labels, bad folders, and the benchmark over one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from napari_propseg.datasets import read_dataset
from napari_propseg.errors import InputError


def _write(path, arr, spacing=(2.0, 2.0, 3.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _case_arrays(seed: int, z: int = 12):
    rng = np.random.default_rng(seed)
    ct = rng.normal(-800, 20, (z, 24, 24)).astype(np.int16)
    lab = np.zeros((z, 24, 24), np.uint8)
    lab[2:10, 6:14, 6:14] = 1
    lab[3:9, 15:20, 14:20] = 2
    ct[lab == 1] = 40
    ct[lab == 2] = 300
    return ct, lab


def make_shared(root, *, partial: bool = True):
    root.mkdir()
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "bone"}))
    manifest = []
    for i, split in enumerate(["train", "train", "val"]):
        ct, lab = _case_arrays(i)
        if partial and i == 1:
            lab[lab == 2] = 0  # the clinic did not contour "bone" here
        _write(root / f"c{i}_ct.nii.gz", ct)
        _write(root / f"c{i}_labels.nii.gz", lab)
        manifest.append({"case": f"c{i}", "split": split,
                         "labels_present": ["liver"] if (partial and i == 1) else ["liver", "bone"]})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_nnunet(root):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "bone": 2},
                                                   "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    for i in range(2):
        ct, lab = _case_arrays(i)
        _write(root / "imagesTr" / f"case{i}_0000.nii.gz", ct)
        _write(root / "labelsTr" / f"case{i}.nii.gz", lab)
    _write(root / "imagesTs" / "new_0000.nii.gz", _case_arrays(5)[0])
    return root


def test_shared_layout_with_partial_labels(tmp_path):
    ds = read_dataset(make_shared(tmp_path / "ds"))
    assert ds.layout == "shared" and ds.label_map == {0: "background", 1: "liver", 2: "bone"}
    assert [c.name for c in ds.cases(split="train")] == ["c0", "c1"]
    c1 = ds.cases(names=["c1"])[0]
    assert c1.present_ids(ds.label_map) == [1]
    assert ds.cases(names=["c0"])[0].present_ids(ds.label_map) == [1, 2]
    assert ds.splits == ["train", "val"]


def test_nnunet_layout(tmp_path):
    ds = read_dataset(make_nnunet(tmp_path / "nn"))
    assert ds.layout == "nnunet" and ds.label_map[2] == "bone"
    assert [c.name for c in ds.cases(labeled=True)] == ["case0", "case1"]
    unl = ds.cases(labeled=False)
    assert [c.name for c in unl] == ["new"] and unl[0].labels is None
    assert ds.cases(names=["case1"])[0].present_ids(ds.label_map) == [1, 2]


@pytest.mark.parametrize("breakage, match", [
    ("no_description", "neither dataset.json"),
    ("bad_json", "not valid JSON"),
    ("missing_label", "no label file in labelsTr"),
    ("unknown_organ", "which labels.json does not name"),
    ("unknown_case", "no case named"),
])
def test_bad_folders_get_one_sentence(tmp_path, breakage, match):
    if breakage in ("no_description", "bad_json", "unknown_organ", "unknown_case"):
        root = make_shared(tmp_path / "ds")
        if breakage == "no_description":
            (root / "labels.json").unlink()
        elif breakage == "bad_json":
            (root / "labels.json").write_text("{nope")
        elif breakage == "unknown_organ":
            m = json.loads((root / "manifest.json").read_text())
            m[0]["labels_present"] = ["liver", "spleen"]
            (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(InputError, match=match):
            ds = read_dataset(root)
            ds.cases(names=["zzz"])
    else:
        root = make_nnunet(tmp_path / "nn")
        (root / "labelsTr" / "case1.nii.gz").unlink()
        with pytest.raises(InputError, match=match) as err:
            read_dataset(root)
        assert "case1" in str(err.value)


def test_bench_case_scores_only_present_organs(tmp_path):
    from napari_propseg.bench.cases import iter_dataset_cases

    root = make_shared(tmp_path / "ds")
    # an organ outside labels_present that is in the file anyway must not be seeded or scored
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "c1_labels.nii.gz")))
    lab[4:8, 15:20, 14:20] = 2
    _write(root / "c1_labels.nii.gz", lab)
    cases = {c.name: c for c in iter_dataset_cases(root, split="train")}
    assert set(cases) == {"c0", "c1"}
    assert 2 not in np.unique(cases["c1"].labels) and cases["c1"].label_names == {1: "liver"}
    assert set(np.unique(cases["c0"].labels)) == {0, 1, 2}
    with pytest.raises(InputError, match="no labelled case in split 'test'"):
        list(iter_dataset_cases(root, split="test"))


@pytest.mark.slow
def test_bench_propagate_dataset_cli(tmp_path, one_torch_thread):
    from napari_propseg.cli import main

    root = make_nnunet(tmp_path / "nn")
    out = tmp_path / "out"
    assert main(["bench", "propagate", "--dataset", str(root), "--ks", "3", "--methods", "interp,sdf,copy_nearest",
                 "--out", str(out)]) == 0
    data = json.loads((out / "k_slice.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["case0", "case1"]
    summary = data["mean_over_cases"]["3"]
    for m in ("interp", "sdf", "copy_nearest"):
        per_case = [c["runs"][0]["methods"][m]["mean_dice"] for c in data["cases"]]
        assert summary[m]["n"] == 2 and summary[m]["mean"] == pytest.approx(np.mean(per_case))
    md = (out / "k_slice.md").read_text()
    assert "Mean over cases (2 cases" in md and "| case0 |" in md
    # the old name of the guided interpolation still works
    assert main(["bench", "propagate", "--dataset", str(root), "--limit", "1", "--ks", "3", "--methods", "guided",
                 "--out", str(tmp_path / "o2")]) == 0
    data2 = json.loads((tmp_path / "o2" / "k_slice.json").read_text())
    assert list(data2["cases"][0]["runs"][0]["methods"]) == ["interp"]
    assert main(["bench", "propagate", "--split", "x", "--ks", "3", "--out", str(tmp_path / "o3")]) == 2


def test_openkbp_manifest_reads(shared_data):
    ds = read_dataset(shared_data / "openkbp")
    assert ds.label_map[7] == "Mandible"
    assert len(ds.cases(split="train-pats")) == 170 and len(ds.cases(split="validation-pats")) == 33
    partial = [c for c in ds.cases(split="train-pats") if len(c.present_ids(ds.label_map)) < 7]
    assert partial, "OpenKBP has cases with organs the clinic did not contour"


@pytest.mark.slow
def test_bench_loop_dataset_cli(tmp_path, one_torch_thread):
    """The acceptance form of the correction-loop benchmark over a dataset folder keeps its JSON."""
    from napari_propseg.cli import main

    root = make_shared(tmp_path / "ds")
    out = tmp_path / "loop"
    assert main(["bench", "loop", "--dataset", str(root), "--split", "train", "--methods", "interp",
                 "--policies", "suggest,random", "--max-rounds", "3", "--out", str(out)]) == 0
    data = json.loads((out / "loop.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["c0", "c1"]
    for case in data["cases"]:
        policies = {c["policy"] for c in case["curves"]}
        assert policies == {"suggest", "random"}
        for c in case["curves"]:
            assert c["rounds"] and {"corrected", "mean_dice"} <= set(c["rounds"][0])
