"""Propagation training: losses against hand-computed values, data/clips, checkpoints and
resume, a short end-to-end CPU run (config file -> weights), the CLI and the cache."""
from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_propseg.errors import CancelledError, InputError
from napari_propseg.training import common, data as D, losses as L
from napari_propseg.training.propagation import (
    anchor_slices,
    load_train_config,
    lr_factor,
    propagate_between_anchors,
    train_propagation,
)

# --------------------------------------------------------------------------- losses


def _two_class_logits(p_true: list[float], target: list[int]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose softmax gives p_true to the target class."""
    p = torch.tensor(p_true, dtype=torch.float64)
    p1 = torch.where(torch.tensor(target) == 1, p, 1 - p)
    return torch.stack([torch.log(1 - p1), torch.log(p1)])[None, :, None, :]


def test_bootstrapped_ce_keeps_hard_pixels():
    # 2 hard pixels (p_true 0.25, CE ln 4) and 14 easy ones (p_true 0.9): only the hard ones count
    p = [0.25, 0.25] + [0.9] * 14
    t = [1, 0] + [0, 1] * 7
    loss = L.bootstrapped_ce(_two_class_logits(p, t), torch.tensor(t)[None, None])
    assert float(loss) == pytest.approx(math.log(4), rel=1e-6)


def test_bootstrapped_ce_min_fraction_takes_hardest():
    # 32 easy pixels (all CE < ln 2): the 32/16 = 2 hardest (p 0.6 -> CE ln(1/0.6), p 0.7) are averaged
    p = [0.6, 0.7] + [0.95] * 30
    t = [0] * 32
    loss = L.bootstrapped_ce(_two_class_logits(p, t), torch.tensor(t)[None, None])
    assert float(loss) == pytest.approx((math.log(1 / 0.6) + math.log(1 / 0.7)) / 2, rel=1e-6)


def test_bootstrapped_ce_threshold_is_strict():
    # p_true = 0.5 exactly is not "hard" (CE == -ln 0.5): 16 such pixels -> min fraction (1 pixel)
    p = [0.5] * 15 + [0.4]
    t = [1] * 16
    loss = L.bootstrapped_ce(_two_class_logits(p, t), torch.tensor(t)[None, None])
    assert float(loss) == pytest.approx(math.log(1 / 0.4), rel=1e-6)


def test_lovasz_softmax_hand_case():
    # pixel 1: label 1, p = (0.2, 0.8); pixel 2: label 0, p = (0.6, 0.4).
    # class 1: errors (0.2, 0.4) -> sorted fg (0, 1): J = (1/2, 1) -> grads (0.5, 0.5) -> 0.4*0.5 + 0.2*0.5 = 0.3
    # class 0: errors (0.2, 0.4) -> sorted fg (1, 0): J = (1, 1) -> grads (1, 0) -> 0.4
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])  # pixels x classes
    logits = probs.log().T[None, :, None, :]  # 1, C, 1, 2
    loss = L.lovasz_softmax(logits, torch.tensor([[[1, 0]]]))
    assert float(loss) == pytest.approx(0.35, abs=1e-6)
    assert float(L.lovasz_softmax_flat(probs, torch.tensor([1, 0]))) == pytest.approx(0.35, abs=1e-6)


def test_lovasz_softmax_perfect_is_zero_and_ignores_absent_classes():
    target = torch.tensor([[[0, 1], [2, 0]]])
    logits = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50  # class 3 absent
    assert float(L.lovasz_softmax(logits, target)) == pytest.approx(0.0, abs=1e-6)


def test_lovasz_hinge_hand_case():
    # logits (2, -1, 0.5), labels (1, 0, 0): errors 1 - s*y = (-1, 0, 1.5); sorted (1.5, 0, -1) with gt (0, 0, 1)
    # J = (1/2, 2/3, 1) -> grads (1/2, 1/6, 1/3); relu(errors) . grads = 1.5 * 0.5 = 0.75
    loss = L.lovasz_hinge(torch.tensor([[[2.0, -1.0, 0.5]]]), torch.tensor([[[1, 0, 0]]]))
    assert float(loss) == pytest.approx(0.75, abs=1e-6)


def test_propagation_loss_shapes_and_gradient():
    logits = torch.randn(2, 2, 3, 16, 16, requires_grad=True)
    target = torch.randint(0, 3, (2, 2, 16, 16))
    out = L.propagation_loss(logits, target)
    assert set(out) == {"loss", "ce", "lovasz"}
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert float(out["loss"].detach()) == pytest.approx(float((out["ce"] + out["lovasz"]).detach()), rel=1e-6)


# --------------------------------------------------------------------------- common


def test_checkpoint_roundtrip_restores_rng_and_state(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    common.seed_everything(123)
    path = common.save_checkpoint(tmp_path / "c.pt", model=net, optimizer=opt, scheduler=sched, step=7, config={"x": 1}, extra={"k": 2})
    draws = (torch.rand(3), np.random.rand(3), random.random())
    w = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.zero_()
    net2_opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(net2_opt, 1, gamma=0.5)
    payload = common.load_checkpoint(path, model=net, optimizer=net2_opt, scheduler=sched2)
    assert payload["step"] == 7 and payload["config"] == {"x": 1} and payload["extra"] == {"k": 2}
    assert torch.equal(net.weight, w)
    assert sched2.last_epoch == 1 and net2_opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]
    assert not list(tmp_path.glob(".*tmp"))


def test_checkpoint_of_ddp_like_wrapper_has_plain_keys(tmp_path):
    net = torch.nn.DataParallel(torch.nn.Linear(2, 2))
    common.save_checkpoint(tmp_path / "c.pt", model=net, optimizer=None, scheduler=None, step=0, config={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(payload["model"]) == {"weight", "bias"}


def test_load_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        common.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "propseg-weights/1", "state_dict": {}}, tmp_path / "w.pt")
    with pytest.raises(InputError, match="weights-only"):
        common.load_checkpoint(tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="could not be read"):
        common.load_checkpoint(tmp_path / "junk.pt")


def test_csv_logger_resume_drops_later_rows(tmp_path):
    log = common.CSVLogger(tmp_path / "l.csv", ["step", "loss"])
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    again = common.CSVLogger(tmp_path / "l.csv", ["step", "loss"], resume_step=3)
    again.log({"step": 4, "loss": 9.0})
    rows = again.read()
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == "9"
    with pytest.raises(InputError, match="columns"):
        common.CSVLogger(tmp_path / "l.csv", ["step", "other"])


def test_ddp_setup_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, local, dev = common.ddp_setup("cpu")
    assert (rank, world, local, dev.type) == (0, 1, 0, "cpu")
    assert common.is_main_process()
    net = torch.nn.Linear(1, 1)
    assert common.unwrap(torch.nn.DataParallel(net)) is net


# --------------------------------------------------------------------------- data


def _phantom_case(seed=1, shape=(24, 64, 64), spacing=(6.0, 4.0, 4.0), res=64):
    from napari_propseg.phantom import make_phantom

    ct, lab = make_phantom(shape, spacing, seed=seed)
    return D.preprocess_volume(ct.array, lab.array, ct.spacing, res, name=f"ph{seed}", kind="phantom"), ct, lab


def test_preprocess_crops_body_and_keeps_labels():
    case, ct, lab = _phantom_case()
    assert case.image.shape == (24, 3, 64, 64) and case.image.dtype == np.float16
    assert case.labels.shape == (24, 64, 64) and case.labels.dtype == np.uint8
    assert 0.0 <= float(case.image.min()) and float(case.image.max()) <= 1.0
    assert set(np.unique(case.labels)) <= set(np.unique(lab.array))
    # the body fills the crop: body pixels (abdomen window > 0) cover much of the slice
    mid = case.image[12, 1].astype(np.float32)
    assert (mid > 0.3).mean() > 0.4
    # the crop is square in mm, so the in-plane spacings stay equal
    assert case.spacing[1] == pytest.approx(case.spacing[2], rel=0.05)


def test_body_bbox_square_in_mm():
    hu = np.full((4, 40, 80), -1000.0)
    hu[:, 10:30, 20:60] = 40.0  # 20 x 40 pixel body, spacing 2 mm x 1 mm -> 40 mm x 40 mm
    y0, y1, x0, x1 = D.body_bbox(hu, (1.0, 2.0, 1.0), margin=0.0)
    assert (y1 - y0) * 2.0 == pytest.approx((x1 - x0) * 1.0, abs=2.0)
    assert y0 <= 10 and y1 >= 30 and x0 <= 20 and x1 >= 60


def _tiny_data(res=64, n=2, validation=True) -> D.TrainingData:
    cases = [_phantom_case(seed=s, res=res)[0] for s in range(1, n + 1)]
    td = D.TrainingData(resolution=res, cases=cases[:1], phantoms=cases[1:], phantom_ratio=0.5)
    if validation:
        td.validation = [_phantom_case(seed=9, res=res)[0]]
    return td


def test_clip_dataset_is_deterministic_and_well_formed():
    td = _tiny_data(validation=False)
    ds = D.ClipDataset(td, {"seed": 3}, stage0_steps=2, stage1_steps=8, global_batch=2)
    assert len(ds) == 20
    for i in (0, 3, 4, 19):
        a, b = ds[i], ds[i]
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert a["frames"].shape == (3, 3, 64, 64) and a["masks"].shape == (3, 2, 64, 64)
        n = int(a["num_objects"])
        assert n in (1, 2)
        assert a["masks"][0, :n].flatten(1).sum(1).min() > 0  # every target is visible on frame 0
        assert a["masks"][:, n:].sum() == 0  # padding objects are empty
        assert int(a["target"].max()) <= n
        assert int(a["stage"]) == (0 if i < 4 else 1)
    assert not torch.equal(ds[5]["frames"], ds[6]["frames"])


def test_curriculum_gaps():
    td = _tiny_data(validation=False)
    ds = D.ClipDataset(td, {}, stage0_steps=100, stage1_steps=100, global_batch=1)
    # gaps [3,4,5,7,3] from 10/20/30/40/90 % of stage 1; before 10 %: the first gap
    expected = {100: 3, 109: 3, 110: 3, 120: 4, 130: 5, 140: 7, 189: 7, 190: 3, 199: 3}
    assert {s: ds.max_gap(s) for s in expected} == expected
    # stage-1 clips never exceed the scaled gap: 3 mm reference on 6 mm slices halves it
    for i in range(140, 150):
        assert 1 <= int(ds[i]["gap"]) <= max(1, round(7 * 3.0 / 6.0))


def test_step_sampler_shards_ranks_without_overlap():
    r0 = list(D.StepSampler(2, 4, batch_size=3, rank=0, world_size=2))
    r1 = list(D.StepSampler(2, 4, batch_size=3, rank=1, world_size=2))
    assert r0 == [12, 13, 14, 18, 19, 20] and r1 == [15, 16, 17, 21, 22, 23]
    assert list(D.StepSampler(0, 4, 3)) == list(range(12))


def test_cache_roundtrip(tmp_path):
    td = _tiny_data()
    path = D.save_cache(td, tmp_path / "c.npz")
    back = D.load_cache(path, resolution=64)
    assert back.phantom_ratio == td.phantom_ratio
    for name in ("cases", "phantoms", "validation"):
        for a, b in zip(getattr(td, name), getattr(back, name)):
            assert a.name == b.name and a.spacing == pytest.approx(b.spacing)
            assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    with pytest.raises(InputError, match="resolution 64"):
        D.load_cache(path, resolution=128)
    with pytest.raises(InputError, match="does not exist"):
        D.load_cache(tmp_path / "nope.npz")


def test_config_paths_and_variants(tmp_path, monkeypatch):
    monkeypatch.delenv("PROPSEG_DATA_ROOT", raising=False)
    cfg_file = tmp_path / "cfg" / "t.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "resolution: 64\nnetwork: cpu\nstage0_steps: 1\nstage1_steps: 2\n"
        "data:\n  data_root: ../data\n  cases:\n    - {image: a.nii.gz, labels: b.nii.gz, label_names: totalseg_v1}\n"
        "variants:\n  big: {resolution: 96, stage1_steps: 5}\n"
    )
    cfg = load_train_config(cfg_file)
    assert cfg["data"]["cases"][0]["image"] == str(tmp_path / "data" / "a.nii.gz")
    assert cfg["network_config"]["resolution"] == 64 and cfg["network_config"]["key_backbone"] == "resnet18"
    big = load_train_config(cfg_file, variant="big")
    assert big["resolution"] == 96 and big["stage1_steps"] == 5 and big["stage0_steps"] == 1
    monkeypatch.setenv("PROPSEG_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert load_train_config(cfg_file)["data"]["cases"][0]["labels"] == str(tmp_path / "elsewhere" / "b.nii.gz")
    assert load_train_config(cfg_file, data_root="/x")["data"]["cases"][0]["labels"] == "/x/b.nii.gz"
    with pytest.raises(InputError, match="no variant"):
        load_train_config(cfg_file, variant="nope")
    with pytest.raises(InputError, match="whole number"):
        load_train_config(cfg_file, overrides={"batch_size": "many"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(InputError, match="could not be parsed"):
        load_train_config(bad)


def test_lr_step_decay_per_stage():
    assert lr_factor(0, 10, 20, [0.8], 0.1) == 1.0
    assert lr_factor(8, 10, 20, [0.8], 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 10, 20, [0.8], 0.1) == 1.0  # stage 1 starts again at the base lr
    assert lr_factor(26, 10, 20, [0.5, 0.8], 0.1) == pytest.approx(0.01)


def test_anchor_slices_follow_protocol():
    lab = np.zeros((30, 4, 4), np.uint8)
    lab[5:26, 1, 1] = 1
    assert anchor_slices(lab, 5) == [5, 10, 15, 20, 25]


# --------------------------------------------------------------------------- end to end


def _write_phantom_files(folder, seed, shape=(24, 64, 64), spacing=(6.0, 4.0, 4.0)):
    from napari_propseg.io import write_labels, write_volume
    from napari_propseg.phantom import make_phantom

    ct, lab = make_phantom(shape, spacing, seed=seed)
    write_volume(ct.array, ct, folder / f"ct{seed}.nii.gz")
    write_labels(lab.array, ct, folder / f"lab{seed}.nii.gz")


def _tiny_config_file(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    _write_phantom_files(data, 1)
    _write_phantom_files(data, 2)
    cfg = {
        "seed": 5, "resolution": 64, "network": "cpu", "network_overrides": {"value_dim": 64, "decoder_dims": [32, 32, 16]},
        "stage0_steps": 2, "stage1_steps": 2, "batch_size": 2, "log_every": 1, "val_every": 4, "ckpt_every": 2,
        "keep_checkpoints": 0, "weights_dtype": "float32",
        "data": {
            "data_root": "data",
            "cases": [{"image": "ct1.nii.gz", "labels": "lab1.nii.gz", "label_names": "flare"}],
            "validation": [{"image": "ct2.nii.gz", "labels": "lab2.nii.gz", "label_names": "flare"}],
            "phantoms": {"count": 1, "ratio": 0.5, "shape": [24, 64, 64], "spacing": [6.0, 4.0, 4.0], "seed": 7},
        },
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_train_checkpoint_resume_and_weights(tmp_path, one_torch_thread):
    from napari_propseg.propagation.network import load_stcn
    from napari_propseg.weights import load_weights

    cfg = _tiny_config_file(tmp_path)
    calls = []
    weights = train_propagation(cfg, out_dir=tmp_path / "a", device="cpu", progress=lambda s, t, m: calls.append((s, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    run = tmp_path / "a"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["last.pt", "step_0000002.pt", "step_0000004.pt"]
    rows = list(csv.DictReader(open(run / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and [r["stage"] for r in rows] == ["0", "0", "1", "1"]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    val = list(csv.DictReader(open(run / "val_log.csv")))
    assert len(val) == 1 and val[0]["case"] == "ct2" and 0.0 <= float(val[0]["mean_dice"]) <= 1.0 and int(val[0]["n_labels"]) >= 5
    assert 0.3 < float(val[0]["sdf_dice"]) <= 1.0  # the classical baseline on the same anchors

    # weights-only file: loads through the shared loader and rebuilds the network
    config, state, meta = load_weights(weights, kind="stcn")
    assert config["resolution"] == 64 and meta["trained_steps"] == 4 and meta["validation_cases"] == ["ct2"]
    assert set(meta["validation_mean_dice"]) == {"ct2@k5"} and meta["complete"] is True
    net = load_stcn(weights)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, final["model"][k]), k
    assert final["step"] == 4

    # resume from step 2 in another folder: same steps 3-4, same data, same RNG -> same weights
    weights_b = train_propagation(cfg, out_dir=tmp_path / "b", device="cpu", resume=run / "checkpoints" / "step_0000002.pt")
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 4
    for k, v in final["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert torch.equal(resumed["rng"]["torch"], final["rng"]["torch"])
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "train_log.csv"))] == [3, 4]
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "train_log.csv")))
    assert [float(r["loss"]) for r in rows_b] == pytest.approx([float(r["loss"]) for r in rows[2:]], rel=1e-4)
    assert weights_b.is_file()

    # a different architecture cannot resume this checkpoint
    with pytest.raises(InputError, match="another architecture"):
        train_propagation(cfg, out_dir=tmp_path / "c", device="cpu", resume=run / "checkpoints" / "last.pt",
                          overrides={"network_overrides": {"value_dim": 32, "decoder_dims": [32, 32, 16]}})


@pytest.mark.slow
def test_time_limit_and_cancel_write_resumable_checkpoints(tmp_path, one_torch_thread):
    from napari_propseg.weights import load_weights

    td = _tiny_data(validation=False)
    cfg = {"resolution": 64, "network": "cpu", "network_overrides": {"value_dim": 32, "decoder_dims": [16, 16, 16]},
           "stage0_steps": 3, "stage1_steps": 0, "batch_size": 1, "val_every": 100, "ckpt_every": 100}
    # time limit 0: stops after the first step with a checkpoint and partial weights
    weights = train_propagation(cfg, out_dir=tmp_path, device="cpu", data=td, time_limit=0)
    _, _, meta = load_weights(weights, kind="stcn")
    assert meta["trained_steps"] == 1 and meta["complete"] is False
    last = tmp_path / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["step"] == 1
    # resume, then cancel after one more step: checkpoint at step 2, CancelledError
    done = []
    with pytest.raises(CancelledError):
        train_propagation(cfg, device="cpu", data=td, resume=last, progress=lambda s, t, m: done.append(s), cancel=lambda: len(done) >= 1)
    assert done == [2]
    assert torch.load(last, weights_only=True)["step"] == 2
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "train_log.csv"))] == [1, 2]


def test_minimal_propagation_fills_between_anchors():
    class Copy(torch.nn.Module):
        """Stand-in network: predicts the first-frame masks on every later frame."""

        def forward(self, frames, masks, num_objects=None):
            bg = 1 - masks.sum(1, keepdim=True)
            p = torch.cat([bg, masks], 1).clamp(1e-4, 1)
            return p.log()[:, None].expand(-1, frames.shape[1] - 1, -1, -1, -1)

    lab = np.zeros((9, 8, 8), np.uint8)
    lab[0, 1:3, 1:3] = 2  # anchor a: organ 2 top-left
    lab[8, 5:7, 5:7] = 2  # anchor b: organ 2 bottom-right
    img = np.zeros((9, 3, 8, 8), np.float16)
    out = propagate_between_anchors(Copy(), img, lab, [0, 8], device=torch.device("cpu"))
    assert np.array_equal(out[0], lab[0]) and np.array_equal(out[8], lab[8])
    assert out[1, 1, 1] == 2 and out[1, 5, 5] == 0  # near a: forward copy wins
    assert out[7, 5, 5] == 2 and out[7, 1, 1] == 0  # near b: backward copy wins


def test_validation_scores_the_shipped_engine_through_the_builder():
    """Training validation propagates with the engine users get (pipeline defaults), fed
    the network being trained, on the case's cropped and resized HU."""
    from napari_propseg.pipeline import EngineSettings, propagate
    from napari_propseg.propagation.network import CPU_CONFIG, build_stcn
    from napari_propseg.training.propagation import validation_dice

    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=32)).eval()
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 100, (10, 32, 32)).astype(np.int16)
    lab = np.zeros(hu.shape, np.uint8)
    for z in range(1, 9):
        lab[z, 8:16 + z, 6:18] = 1
        lab[z, 20:26, 10:20] = 2
    case = D.CaseData(name="c", image=D.window_slices(hu), labels=lab, spacing=(3.0, 2.0, 2.0), hu=hu)
    got = validation_dice(net, case, k=3, device=torch.device("cpu"))
    anchors = anchor_slices(lab, 3)
    seeds = np.zeros_like(lab)
    seeds[anchors] = lab[anchors]
    pred = propagate(hu, seeds, anchors, EngineSettings(method="stcn", device="cpu", options={"model": net}),
                     spacing=case.spacing).labels
    keep = np.ones(10, bool)
    keep[anchors] = False
    for i, dice in got["per_label"].items():
        g, p = lab[keep] == i, pred[keep] == i
        assert dice == pytest.approx(2 * (g & p).sum() / (g.sum() + p.sum()))
    assert got["anchors"] == anchors and got["n_labels"] == 2


@pytest.mark.slow
def test_cli_cache_then_train(tmp_path, one_torch_thread):
    from napari_propseg.cli import main

    cfg = _tiny_config_file(tmp_path)
    cache = tmp_path / "cache.npz"
    assert main(["train", "propagation", str(cfg), "--cache-out", str(cache)]) == 0
    assert D.load_cache(cache).validation[0].name == "ct2"
    out = tmp_path / "run"
    assert main(["train", "propagation", str(cfg), "--cache", str(cache), "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "stcn_propagation.pt").is_file()
    assert [int(r["step"]) for r in csv.DictReader(open(out / "train_log.csv"))] == [1, 2]
    assert main(["train", "propagation", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "propagation", str(cfg), "--resume", str(tmp_path / "none.pt"), "--cache", str(cache)]) == 2


def test_shared_data_cases_map_to_flare(shared_data):
    case = D.load_case({"image": str(shared_data / "totalseg_example" / "example_ct_dicom"),
                        "labels": str(shared_data / "totalseg_example" / "example_seg_dicom_on_ct_grid.nii.gz"),
                        "label_names": "totalseg_v2"}, 64)
    assert case.depth == 20
    present = set(np.unique(case.labels).tolist())
    assert {1, 3, 5} <= present  # liver, spleen, aorta
    cfg = load_train_config(_default_config_path(), variant="cpu", data_root=shared_data)
    for entry in cfg["data"]["cases"] + cfg["data"]["validation"]:
        assert Path(entry["image"]).exists(), entry["image"]
        assert Path(entry["labels"]).exists(), entry["labels"]


def _default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "propagation" / "train_default.yaml"


def test_cli_reference_passes_overrides(tmp_path, monkeypatch):
    import napari_propseg.training.reference as ref
    from napari_propseg.cli import main

    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "ct.nii.gz").write_bytes(b"")
    cfg = tmp_path / "ref.yaml"
    cfg.write_text("steps: 100\ndata:\n  labeled:\n    - {image: cases/ct.nii.gz, labels: missing.nii.gz}\n")
    seen = {}

    def fake(config, *, resume=None, progress=None, cancel=None, time_limit=None):
        seen.update(config=config, resume=resume)
        return {"weights": ["a.pt", "b.pt"]}

    monkeypatch.setattr(ref, "train_reference", fake)
    assert main(["train", "reference", str(cfg)]) == 0
    assert seen["config"] == str(cfg)  # no override: the file itself
    assert main(["train", "reference", str(cfg), "--steps", "7", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    c = seen["config"]
    assert c["steps"] == 7 and c["device"] == "cpu" and c["out"] == str(tmp_path / "o")
    entry = c["data"]["labeled"][0]
    assert entry["image"] == str(tmp_path / "cases" / "ct.nii.gz") and entry["labels"] == "missing.nii.gz"
    assert main(["train", "reference", str(cfg), "--variant", "cpu"]) == 2


def test_crop_none_keeps_whole_slice():
    from napari_propseg.phantom import make_phantom

    ct, lab = make_phantom((8, 64, 96), (6.0, 4.0, 4.0), seed=3)
    whole = D.preprocess_volume(ct.array, lab.array, ct.spacing, 64, crop="none")
    body = D.preprocess_volume(ct.array, lab.array, ct.spacing, 64, crop="body")
    assert whole.spacing[1:] == pytest.approx((4.0 * 64 / 64, 4.0 * 96 / 64))
    assert body.spacing[1] < whole.spacing[2]  # the body box is smaller than the 384 mm field of view
    with pytest.raises(InputError, match="crop"):
        D.preprocess_volume(ct.array, lab.array, ct.spacing, 64, crop="tight")


@pytest.mark.slow
def test_train_propagation_on_openkbp_dataset_entries(tmp_path, shared_data, one_torch_thread):
    """A few CPU steps on 2 OpenKBP training cases (a dataset entry, partial labels) with
    a third as validation: the dataset reader feeds the propagation trainer."""
    from napari_propseg.training.data import resolve_data_config
    from napari_propseg.weights import load_weights

    okbp = shared_data / "openkbp"
    data = {"cases": [{"dataset": str(okbp), "split": "train-pats", "limit": 2}],
            "validation": [{"dataset": str(okbp), "split": "validation-pats", "limit": 1}]}
    from napari_propseg.datasets import read_dataset

    ds = read_dataset(okbp)
    first = ds.cases(split="train-pats")[:2]
    resolved = resolve_data_config(data, config_dir=tmp_path)
    assert [c["name"] for c in resolved["cases"]] == [c.name for c in first]
    assert [c["organs"] for c in resolved["cases"]] == [c.present_ids(ds.label_map) for c in first]  # partial labels
    cfg = {
        "seed": 1, "resolution": 64, "network": "cpu", "network_overrides": {"value_dim": 64, "decoder_dims": [32, 32, 16]},
        "stage0_steps": 1, "stage1_steps": 2, "batch_size": 2, "log_every": 1, "val_every": 3, "ckpt_every": 3,
        "keep_checkpoints": 0, "weights_dtype": "float32", "data": data,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    weights = train_propagation(path, out_dir=tmp_path / "run", device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(math.isfinite(float(r["loss"])) for r in rows)
    val = list(csv.DictReader(open(tmp_path / "run" / "val_log.csv")))
    assert val and val[0]["case"] == ds.cases(split="validation-pats")[0].name
    _, _, meta = load_weights(weights, kind="stcn")
    assert meta["trained_steps"] == 3
