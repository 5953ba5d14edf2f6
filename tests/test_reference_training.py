"""CPS training of tiny reference pairs on tiny phantoms; pseudo-label scoring; CLI runs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from napari_propseg.cli import main as cli_main
from napari_propseg.errors import CancelledError, InputError
from napari_propseg.io import read_volume, write_labels, write_volume
from napari_propseg.phantom import make_phantom
from napari_propseg.reference import build_reference_model, load_reference_model, save_reference_model
from napari_propseg.training.pseudo_label import ensemble_pseudo_label, pseudo_label_folder, shard
from napari_propseg.training.reference import cps_weight, load_config, train_reference

TINY = [{"preset": "transunet-tiny"}, {"preset": "deeplabv3plus-tiny", "ife": "curvature"}]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    ct, lab = make_phantom((12, 64, 64), (10.0, 4.8, 4.8), seed=3)
    write_volume(ct.array, ct, d / "ct.nii.gz")
    write_labels(lab.array, ct, d / "seg.nii.gz")
    return d


def _config(tmp_path, phantom_files, **over):
    cfg = {
        "out": str(tmp_path / "run"),
        "steps": 3, "batch_labeled": 2, "batch_unlabeled": 1, "img_size": 64, "num_classes": 15,
        "lr": 1e-3, "models": TINY, "log_every": 1, "checkpoint_every": 2,
        "cps": {"lambda_max": 0.5, "warmup_steps": 2, "ramp": "linear"},
        "data": {
            "labeled": [{"image": str(phantom_files / "ct.nii.gz"), "labels": str(phantom_files / "seg.nii.gz"),
                         "label_map": "flare", "organs": [1, 2, 3, 13]}],
            "phantoms": {"count": 1, "ratio": 0.5, "shape": [10, 64, 64], "spacing": [10.0, 4.8, 4.8], "seed": 7},
            "val": [{"image": str(phantom_files / "ct.nii.gz"), "labels": str(phantom_files / "seg.nii.gz"), "label_map": "flare"}],
        },
    }
    cfg.update(over)
    return cfg


def test_cps_weight_ramps():
    assert cps_weight(0, 0.5, 500) == 0.0
    assert cps_weight(250, 0.5, 500) == pytest.approx(0.25)
    assert cps_weight(900, 0.5, 500) == 0.5
    assert cps_weight(0, 1.0, 10, "sigmoid") == pytest.approx(np.exp(-5))
    assert cps_weight(10, 1.0, 10, "sigmoid") == 1.0
    assert cps_weight(5, 1.0, 0) == 1.0


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: focal\ndata: {phantoms: {count: 1}}\n")
    with pytest.raises(InputError, match="focal"):
        load_config(bad)
    (tmp_path / "nodata.yaml").write_text("steps: 2\n")
    with pytest.raises(InputError, match="labeled cases or phantoms"):
        load_config(tmp_path / "nodata.yaml")


@pytest.mark.slow
def test_train_resume_and_weights(tmp_path, phantom_files):
    torch.manual_seed(0)
    cfg = _config(tmp_path, phantom_files, val_every=3)
    steps_seen = []
    res = train_reference(cfg, progress=lambda s, n, m: steps_seen.append(s))
    assert res["step"] == 3 and steps_seen == [1, 2, 3]
    rows = list(csv.DictReader(open(res["log"])))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["lambda"]) == 0.0 and float(rows[1]["lambda"]) == pytest.approx(0.25)
    assert 0.0 <= res["val"]["val_dice_ens"] <= 1.0
    a, b = (load_reference_model(p) for p in res["weights"])
    assert a.config["arch"] == "transunet" and b.config["arch"] == "deeplabv3plus" and b.config["ife"] == "curvature"
    assert a.config["num_classes"] == 15 and a.meta["steps"] == 3
    # training moved the weights
    fresh = build_reference_model(a.config)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), fresh.state_dict().values()))
    # resume to 5 steps: continues at step 4 and the log holds each step once
    res2 = train_reference(dict(cfg, steps=5), resume=res["checkpoint"])
    assert res2["step"] == 5
    rows = list(csv.DictReader(open(res2["log"])))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_godc_sigmoid_yaml_config_and_cancel(tmp_path, phantom_files):
    import yaml

    cfg = _config(tmp_path, phantom_files, loss="godc_ce", steps=4)
    cfg["cps"] = {"lambda_max": 1.0, "warmup_steps": 4, "ramp": "sigmoid"}
    cfg["out"] = "run_yaml"  # relative to the config file
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CancelledError, match="resume"):
        train_reference(path, cancel=cancel)
    ck = torch.load(tmp_path / "run_yaml" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 2


class Const(nn.Module):
    """Predicts class ``c`` inside the square [lo, hi) of every slice (input size 32)."""

    def __init__(self, lo, hi, c=1):
        super().__init__()
        self.config = {"num_classes": 3, "img_size": 32}
        self.lo, self.hi, self.c = lo, hi, c

    def forward(self, x, zpos):
        out = torch.zeros(x.shape[0], 3, 32, 32)
        out[:, 0] = 10
        out[:, self.c, self.lo:self.hi, self.lo:self.hi] = 20
        return out


def test_ensemble_score_hand_case():
    hu = np.zeros((2, 32, 32), dtype=np.int16)
    # A: square 8..16 (64 px); B: square 8..16 too -> perfect agreement, score 1
    r = ensemble_pseudo_label(hu, [Const(8, 16), Const(8, 16)], device="cpu")
    assert r.score == pytest.approx(1.0) and r.labels.sum() == 2 * 64
    # B predicts 8..12 (16 px). Vote: 64 px of A tie with B's background on 48 px; ties go to
    # the larger mean probability (organ at ~0.5 vs background ~0.5 + ...), so check via Dice:
    r = ensemble_pseudo_label(hu, [Const(8, 16), Const(8, 12)], device="cpu")
    p = int((r.labels[0] == 1).sum())
    d_a = 2 * min(p, 64) / (64 + p)
    d_b = 2 * min(p, 16) / (16 + p)
    assert r.score == pytest.approx((d_a + d_b) / 2)
    # three models: a 2-of-3 majority decides
    r = ensemble_pseudo_label(hu, [Const(8, 16), Const(8, 16), Const(8, 12)], device="cpu")
    assert int((r.labels[0] == 1).sum()) == 64
    assert r.score == pytest.approx((1 + 1 + 2 * 16 / 80) / 3)
    # only one of three models sees the organ: the consensus is background; the two that
    # agree with it (both empty: Dice 1) and the odd one out (Dice 0) -> 2/3, not NaN
    r = ensemble_pseudo_label(hu, [Const(0, 0), Const(0, 0), Const(8, 16)], device="cpu")
    assert not r.labels.any()
    assert r.score == pytest.approx(2 / 3)
    # nobody predicts an organ: no score
    r = ensemble_pseudo_label(hu, [Const(0, 0), Const(0, 0)], device="cpu")
    assert np.isnan(r.score)


def test_shard():
    assert shard(list(range(7)), 1, 3) == [1, 4]
    with pytest.raises(InputError):
        shard([1], 3, 2)


@pytest.mark.slow
def test_pseudo_label_folder_resumable_and_sharded(tmp_path, phantom_files, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        ct, _ = make_phantom((8, 32, 32), (10.0, 9.6, 9.6), seed=i)
        write_volume(ct.array, ct, src / f"case{i}.nii.gz")
    torch.manual_seed(0)
    m1 = build_reference_model({"preset": "deeplabv3plus-tiny", "num_classes": 3, "img_size": 32})
    paths = [save_reference_model(tmp_path / "m1.pt", m1), save_reference_model(tmp_path / "m2.pt", m1)]
    out = tmp_path / "out"
    # two shards of a world of 2: rank 0 takes case0, case2; rank 1 takes case1
    recs0 = pseudo_label_folder(src, paths, out, rank=0, world_size=2, device="cpu")
    assert [r["case"] for r in recs0] == ["case0", "case2"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    recs1 = pseudo_label_folder(src, paths, out, device="cpu")
    assert [r["case"] for r in recs1] == ["case1"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # identical models agree perfectly: score 1 (or NaN if nothing predicted), kept volumes written
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["case"] for r in rows] == ["case0", "case1", "case2"]
    for r in rows:
        if r["score"] != "nan":
            assert float(r["score"]) == pytest.approx(1.0) and r["kept"] == "True"
            lab = read_volume(r["label_file"])
            assert lab.array.shape == (8, 32, 32)
    # a rerun skips everything
    assert pseudo_label_folder(src, paths, out, rank=0, world_size=1, device="cpu") == []


@pytest.mark.slow
def test_cli_suggest_segment_pseudo_label(tmp_path, phantom_files, monkeypatch, capsys):
    torch.manual_seed(0)
    wdir = tmp_path / "models" / "reference"
    for preset in ("transunet-tiny", "deeplabv3plus-tiny"):
        save_reference_model(wdir / f"{preset}.pt", build_reference_model({"preset": preset, "num_classes": 15}))
    img = str(phantom_files / "ct.nii.gz")
    seeds = tmp_path / "seeds.nii.gz"
    assert cli_main(["suggest", img, "--out", str(seeds), "--k", "3", "--device", "cpu",
                     "--weights", *map(str, sorted(wdir.glob("*.pt")))]) == 0
    info = json.loads((tmp_path / "seeds.slices.json").read_text())
    assert info["slices"] == info["sampled"] == [2, 6, 10]
    assert len(info["z_mm"]) == 3
    lab = read_volume(seeds)
    assert lab.array.shape == (12, 64, 64)
    assert not lab.array[[z for z in range(12) if z not in info["slices"]]].any()
    # default weights folder through PROPSEG_MODELS; without weights: exit 2 and one sentence
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "empty"))
    assert cli_main(["suggest", img, "--out", str(tmp_path / "s2.nii.gz")]) == 2
    assert "No reference model 'abdomen'" in capsys.readouterr().err
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    assert cli_main(["suggest", img, "--out", str(tmp_path / "s3.nii.gz"), "--k", "2", "--device", "cpu"]) == 0
    # pseudo-label needs two models
    assert cli_main(["pseudo-label", str(phantom_files), "--models", str(wdir / "transunet-tiny.pt"), "--out", str(tmp_path / "pl")]) == 2
    assert cli_main(["pseudo-label", str(phantom_files), "--models", *map(str, sorted(wdir.glob("*.pt"))),
                     "--out", str(tmp_path / "pl"), "--threshold", "0.0", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pl" / "scores.csv")))
    assert {r["case"] for r in rows} == {"ct", "seg"}


def test_cli_segment(tmp_path, phantom_files, monkeypatch):
    engine = pytest.importorskip("napari_propseg.propagation.engine")
    assert hasattr(engine, "PropagationEngine")
    torch.manual_seed(0)
    wdir = tmp_path / "models" / "reference"
    for preset in ("transunet-tiny", "deeplabv3plus-tiny"):
        save_reference_model(wdir / f"{preset}.pt", build_reference_model({"preset": preset, "num_classes": 15}))
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path / "models"))
    out = tmp_path / "seg.nii.gz"
    rc = cli_main(["segment", str(phantom_files / "ct.nii.gz"), "--out", str(out), "--k", "3", "--device", "cpu",
                   "--method", "interp", "--seeds", str(tmp_path / "seeds.nii.gz")])
    assert rc == 0
    seg, seeds = read_volume(out).array, read_volume(tmp_path / "seeds.nii.gz").array
    assert seg.shape == (12, 64, 64)
    slices = json.loads((tmp_path / "seeds.slices.json").read_text())["slices"]
    assert np.array_equal(seg[slices], seeds[slices])  # anchors come back unchanged


class _Threshold(nn.Module):
    """Predicts 'bright' (id 1) where HU > 100: two copies agree perfectly."""

    def __init__(self):
        super().__init__()
        self.config = {"num_classes": 2, "img_size": 32, "windows": [[-200, 200]] * 3,
                       "label_names": {"0": "background", "1": "bright"}}
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, z):
        hu = x[:, 0] * 400 - 200
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 1] = 10.0 * (hu > 100).float() - 5.0
        return out + self.p


@pytest.mark.parametrize("layout", ["shared", "nnunet"])
def test_pseudo_label_dataset_in_dataset_out(tmp_path, layout):
    """A dataset folder in gives a dataset folder of the same layout out: the kept cases'
    images and pseudo-labels, their scores, readable by the dataset reader; two ranks
    share the cases."""
    from napari_propseg.datasets import read_dataset

    src = tmp_path / "in"
    src.mkdir()
    vols = {}
    for i in range(3):
        ct = np.full((6, 32, 32), -50, np.int16)
        if i != 1:  # case 1 has nothing bright: no organ, score NaN, not kept
            ct[1:5, 8:20, 8:20] = 300
        vols[f"c{i}"] = ct
    import SimpleITK as sitk

    if layout == "shared":
        (src / "labels.json").write_text(json.dumps({"0": "background", "1": "bright"}))
        for n, ct in vols.items():
            sitk.WriteImage(sitk.GetImageFromArray(ct), str(src / f"{n}_ct.nii.gz"))
    else:
        (src / "imagesTr").mkdir()
        (src / "labelsTr").mkdir()
        (src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "bright": 1}}))
        (src / "imagesTs").mkdir()
        for n, ct in vols.items():
            sitk.WriteImage(sitk.GetImageFromArray(ct), str(src / "imagesTs" / f"{n}_0000.nii.gz"))
    # nnU-Net needs at least one training case in imagesTr
    if layout == "nnunet":
        sitk.WriteImage(sitk.GetImageFromArray(vols["c0"]), str(src / "imagesTr" / "t_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray((vols["c0"] > 100).astype(np.uint8)), str(src / "labelsTr" / "t.nii.gz"))
    out = tmp_path / "out"
    nets = [_Threshold(), _Threshold()]
    pseudo_label_folder(src, nets, out, rank=0, world_size=2, device="cpu")
    pseudo_label_folder(src, nets, out, rank=1, world_size=2, device="cpu")
    ds = read_dataset(out)
    assert ds.layout == layout and ds.label_map == {0: "background", 1: "bright"}
    kept = sorted(c.name for c in ds.all_cases)
    assert kept == (["c0", "c2"] if layout == "shared" else ["c0", "c2", "t"])
    for c in ds.all_cases:
        lab = read_volume(c.labels).array
        assert np.array_equal(lab > 0, vols.get(c.name, vols["c0"]) > 100)
    if layout == "shared":
        manifest = {m["case"]: m for m in json.loads((out / "manifest.json").read_text())}
        assert manifest["c0"]["score"] == pytest.approx(1.0) and manifest["c0"]["labels_present"] == ["bright"]
    rows = {r["case"]: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert rows["c1"]["kept"] == "False"
