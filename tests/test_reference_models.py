"""Reference model tasks: installed model folders, --model, label maps, body mask,
organs the two networks disagree on."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_propseg.errors import InputError
from napari_propseg.reference import build_reference_model, save_reference_model
from napari_propseg.reference.inference import body_mask, drop_disagreeing, suggest_slices
from napari_propseg.reference.models import find_model, list_models


def _tiny_model_folder(root, name="tiny", labels=None):
    folder = root / "reference" / name
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    for preset in ("transunet-tiny", "deeplabv3plus-tiny"):
        m = build_reference_model({"preset": preset, "num_classes": 3})
        m.config["label_names"] = {"0": "background", "1": "Liver", "2": "Bone"}
        save_reference_model(folder / f"{preset}.pt", m)
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "model.json").write_text(json.dumps({"region": "test", "training_data": "nothing"}))
    (folder / "card.md").write_text("# card\n")
    return folder


def test_shipped_models_are_listed():
    names = [m.name for m in list_models()]
    assert "abdomen" in names
    ab = find_model("abdomen")
    assert len(ab.weights) == 2 and ab.label_map[1] == "liver" and ab.card is not None
    assert "abdomen" in ab.summary() and "liver" in ab.summary()


def test_unknown_model_names_the_installed_ones(monkeypatch, tmp_path):
    _tiny_model_folder(tmp_path)
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    with pytest.raises(InputError, match=r"No reference model 'nope'.*installed: tiny"):
        find_model("nope")


def test_cli_models_and_suggest_with_model(monkeypatch, tmp_path, capsys):
    import SimpleITK as sitk

    from napari_propseg.cli import main

    _tiny_model_folder(tmp_path / "models", labels={"0": "background", "1": "liver", "2": "bone"})
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: region test; 2 organs (liver, bone)")
    ct = np.full((10, 32, 32), -1000, np.int16)
    ct[:, 4:28, 4:28] = 40
    img = sitk.GetImageFromArray(ct)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    seeds = tmp_path / "seeds.nii.gz"
    assert main(["suggest", str(tmp_path / "ct.nii.gz"), "--model", "tiny", "--k", "3", "--out", str(seeds), "--device", "cpu"]) == 0
    names = json.loads((tmp_path / "seeds.labels.json").read_text())
    assert names == {"0": "background", "1": "liver", "2": "bone"}  # the model folder's labels.json wins
    seg = tmp_path / "seg.nii.gz"
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--model", "tiny", "--k", "3", "--method", "interp",
                 "--out", str(seg), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "seg.labels.json").read_text())["2"] == "bone"
    assert main(["suggest", str(tmp_path / "ct.nii.gz"), "--model", "nope", "--out", str(seeds)]) == 2
    assert "No reference model 'nope'" in capsys.readouterr().err


def test_label_names_from_the_network_config_when_the_folder_has_none(monkeypatch, tmp_path):
    _tiny_model_folder(tmp_path)
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    sug = suggest_slices(np.zeros((6, 32, 32)), None, k=2, device="cpu", model="tiny")
    assert sug.label_map == {0: "background", 1: "Liver", 2: "Bone"}


def test_body_mask_keeps_inner_air_and_drops_outside():
    hu = np.full((40, 40), -1000.0)
    hu[5:35, 5:35] = 30  # body
    hu[15:20, 15:20] = -900  # air inside (an airway)
    m = body_mask(hu)
    assert not m[0, 0] and not m[2, 20] and m[17, 17] and m[10, 10]
    assert body_mask(np.zeros((8, 8))).all()


def test_nothing_is_suggested_outside_the_body(tmp_path):
    class Always1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = {"num_classes": 2, "img_size": 32}
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, z):
            out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            out[:, 1] = 5.0
            return out + self.p

    ct = np.full((4, 32, 32), -1000.0)
    ct[:, 8:24, 8:24] = 40
    sug = suggest_slices(ct, [Always1(), Always1()], k=2, device="cpu")
    z = sug.slices[0]
    assert sug.labels[z][8:24, 8:24].all() and not sug.labels[z][:8].any()
    sug = suggest_slices(ct, [Always1()], k=2, device="cpu", body_only=False)
    assert sug.labels[sug.slices[0]].all()


def test_organs_the_networks_disagree_on_are_left_out():
    ens = np.zeros((10, 10), np.uint8)
    ens[:5, :5] = 1
    ens[6:, 6:] = 2
    a = ens.copy()
    b = ens.copy()
    b[b == 2] = 0
    b[0:2, 6:10] = 2  # network B puts organ 2 somewhere else entirely
    out = ens.copy()
    assert drop_disagreeing(out, [a, b], 3, 0.1) == [2]
    assert (out == 2).sum() == 0 and (out == 1).sum() == 25
    out = ens.copy()
    assert drop_disagreeing(out, [a, a], 3, 0.1) == [] and np.array_equal(out, ens)


def test_old_flat_model_folder_still_works(monkeypatch, tmp_path):
    """$PROPSEG_MODELS of an earlier version held models/reference/*.pt directly."""
    folder = _tiny_model_folder(tmp_path / "x")
    flat = tmp_path / "old" / "reference"
    flat.mkdir(parents=True)
    for p in folder.glob("*.pt"):
        shutil.copy(p, flat / p.name)
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "old"))
    sug = suggest_slices(np.zeros((6, 32, 32)), None, k=2, device="cpu")
    assert sug.labels.shape == (6, 32, 32)


def test_bench_segment_over_a_dataset_matches_by_name(monkeypatch, tmp_path):
    """bench segment scores each present organ by the model's names; an organ the case
    does not hold is not scored."""
    import SimpleITK as sitk

    from napari_propseg.cli import main

    class Oracle(torch.nn.Module):
        """Predicts 'bone' (its id 1) where HU > 200 and 'liver' (id 2) where 0 < HU < 100."""

        def __init__(self):
            super().__init__()
            self.config = {"num_classes": 3, "img_size": 32, "windows": [[-100, 400], [-100, 400], [-100, 400]],
                           "label_names": {"0": "background", "1": "bone", "2": "liver"}}
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, z):
            hu = x[:, 0] * 500 - 100
            out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            out[:, 0] = 1.0
            out[:, 1] = 10.0 * (hu > 200).float()
            out[:, 2] = 10.0 * ((hu > 0) & (hu < 100)).float()
            return out + self.p

    folder = tmp_path / "models" / "reference" / "oracle"
    folder.mkdir(parents=True)
    from napari_propseg.weights import save_weights

    for i in range(2):
        save_weights(folder / f"m{i}.pt", "reference", {"arch": "oracle"}, {})
    monkeypatch.setattr("napari_propseg.reference.inference.load_reference_model", lambda p: Oracle())
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "bone"}))
    lab = np.zeros((12, 32, 32), np.uint8)
    lab[2:10, 4:14, 4:14] = 1
    lab[2:10, 18:28, 18:28] = 2
    ct = np.full(lab.shape, -50, np.int16)
    ct[lab == 1] = 50
    ct[lab == 2] = 300
    for name, keep in (("a", [1, 2]), ("b", [1])):
        sitk.WriteImage(sitk.GetImageFromArray(ct), str(ds / f"{name}_ct.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.where(np.isin(lab, keep), lab, 0).astype(np.uint8)), str(ds / f"{name}_labels.nii.gz"))
    (ds / "manifest.json").write_text(json.dumps([{"case": "a", "split": "v", "labels_present": ["liver", "bone"]},
                                                  {"case": "b", "split": "v", "labels_present": ["liver"]}]))
    out = tmp_path / "out"
    assert main(["bench", "segment", "--dataset", str(ds), "--model", "oracle", "--k", "12", "--out", str(out)]) == 0
    res = json.loads((out / "segment.json").read_text())
    by = {c["case"]: c for c in res["cases"]}
    assert by["a"]["dice"] == pytest.approx({"liver": 1.0, "bone": 1.0})
    assert by["b"]["dice"] == pytest.approx({"liver": 1.0})  # bone is predicted there but not scored
    assert res["per_organ"]["bone"]["n"] == 1 and res["mean_dice"] == pytest.approx(1.0)
    assert "| liver | 1.000 | 2 |" in (out / "segment.md").read_text()


def test_min_agreement_comes_from_the_model_folder(monkeypatch, tmp_path):
    folder = _tiny_model_folder(tmp_path)
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    assert find_model("tiny").min_agreement == 0.1
    (folder / "model.json").write_text(json.dumps({"region": "test", "min_agreement": 0.0}))
    assert find_model("tiny").min_agreement == 0.0
    sug = suggest_slices(np.random.default_rng(0).normal(0, 300, (6, 32, 32)), None, k=6, device="cpu", model="tiny")
    assert sug.dropped == {}


def test_keep_largest_component():
    from napari_propseg.reference.models import keep_largest_component

    lab = np.zeros((6, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    lab[5, 8, 8] = 1  # a speck away from the organ
    lab[0:2, 6:9, 0:2] = 2
    out = keep_largest_component(lab.copy())
    assert out[5, 8, 8] == 0 and (out == 1).sum() == 27 and (out == 2).sum() == (lab == 2).sum()


@pytest.mark.slow
def test_segment_defaults_from_the_model(monkeypatch, tmp_path):
    """segment_k 'all' runs the pair on every slice (no propagation); largest_component cleans specks."""
    from napari_propseg.cli.segment import segment

    folder = _tiny_model_folder(tmp_path)
    (folder / "model.json").write_text(json.dumps({"region": "test", "segment_k": "all", "min_agreement": 0.0,
                                                   "largest_component": True}))
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    ct = np.random.default_rng(1).normal(0, 400, (5, 32, 32))
    labels, sug = segment(ct, model="tiny", device="cpu", method="interp")
    assert sug.slices == list(range(5))
    from scipy import ndimage

    for i in np.unique(labels):
        if i:
            assert ndimage.label(labels == i, structure=np.ones((3, 3, 3)))[1] == 1
    with pytest.raises(InputError, match="'all'"):
        segment(ct, model="tiny", device="cpu", k="most")
