"""Benchmark protocols: reference slices, scoring, MCI baseline, k-slice runner, correction
loop (with a transparent fake engine and with the real interp engine), CLI."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from napari_propseg.bench import loop as bloop
from napari_propseg.bench import protocol as bp
from napari_propseg.errors import InputError


# --------------------------------------------------------------------------- protocol


def test_reference_slices_hand_case():
    gt = np.zeros((30, 6, 6), np.uint8)
    gt[4:25, 2:4, 2:4] = 1            # label 1 on slices 4..24, area 4
    gt[11, 1:5, 1:5] = 1               # ... largest on slice 11 (area 16)
    gt[7:10, 0:2, 0:2] = 2             # label 2 on 7..9, area 4 each -> first max, slice 7
    gt[8, 0:3, 0:2] = 2                # ... largest on slice 8 (area 6)
    # extent [4, 24]; linspace(4, 24, 5) = 4, 9, 14, 19, 24
    assert bp.reference_slices(gt, 5) == [4, 8, 9, 11, 14, 19, 24]
    # k = 3 -> 4, 14, 24; numpy rounding: linspace(4, 24, 4) = 4, 10.67, 17.33, 24 -> 4, 11, 17, 24
    assert bp.reference_slices(gt, 3) == [4, 8, 11, 14, 24]
    assert bp.reference_slices(gt, 4) == [4, 8, 11, 17, 24]
    assert bp.reference_slices(gt, 1) == [8, 11, 14]
    with pytest.raises(InputError):
        bp.reference_slices(np.zeros((5, 4, 4), np.uint8), 3)
    with pytest.raises(InputError):
        bp.reference_slices(gt, 0)
    with pytest.raises(InputError):
        bp.reference_slices(gt.astype(np.float32), 3)


def test_seeds_and_scoring():
    gt = np.zeros((10, 8, 8), np.uint8)
    gt[2:8, 2:6, 2:6] = 1
    gt[5, 0:2, 0:2] = 2  # only on a reference slice -> not scored
    ref = [2, 5, 7]
    seeds = bp.make_seeds(gt, ref)
    assert np.array_equal(seeds[ref], gt[ref]) and not seeds[[0, 1, 3, 4, 6, 8, 9]].any()
    pred = gt.copy()
    pred[3] = 0                  # lose label 1 on slice 3: 16 of 80 scored voxels
    pred[9, 0, 0] = 3            # invented label
    sc = bp.score_k_slice(pred, gt, ref)
    # scored slices 0,1,3,4,6,8,9: GT label 1 on 3,4,6 (48 voxels), prediction 32 of them.
    assert sc["per_label"][1] == pytest.approx(2 * 32 / (48 + 32))
    assert sc["labels_scored"] == [1]
    assert sc["mean_dice"] == pytest.approx(2 * 32 / 80)
    assert sc["per_label"][3] == 0.0
    assert sc["anchors_unchanged"]
    pred[5, 0, 0] = 0
    assert not bp.score_k_slice(pred, gt, ref)["anchors_unchanged"]


def test_dice_per_label_matches_metrics_module():
    from napari_propseg.metrics import compute_metrics

    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (6, 10, 10)).astype(np.uint8)
    b = rng.integers(0, 4, (6, 10, 10)).astype(np.uint8)
    d = bp.dice_per_label(a, b)
    for row in compute_metrics(a, b, (1, 1, 1)):
        assert d[row["label"]] == pytest.approx(row["dice"])


def test_peak_memory_sees_a_large_allocation():
    with bp.PeakMemory() as mem:
        x = np.ones(40 * 2**20 // 8)  # 40 MB, touched
        x.sum()
        del x
    assert mem.peak_mb > 30
    assert mem.method in ("tracemalloc+psutil-rss", "tracemalloc+ru_maxrss")
    assert mem.traced_mb > 30  # tracemalloc sees numpy buffers even when RSS reuses freed pages
    with bp.PeakMemory(trace=False) as rss_only:
        np.ones(10)
    assert math.isnan(rss_only.traced_mb) and rss_only.peak_mb == rss_only.rss_delta_mb


@pytest.mark.slow
def test_mci_interpolates_between_anchors_and_keeps_them():
    pytest.importorskip("itk")
    lab = np.zeros((9, 24, 24), np.uint8)
    lab[0, 6:12, 6:12] = 1       # small square
    lab[4, 5:15, 5:15] = 1       # medium square
    lab[8, 4:20, 4:20] = 1       # large square
    lab[0, 14:18, 14:18] = 2
    lab[4, 14:18, 14:18] = 2     # label 2 drawn on 0 and 4, absent on anchor 8
    out = bp.mci_interpolate(lab, [0, 4, 8])
    assert np.array_equal(out[[0, 4, 8]], lab[[0, 4, 8]])
    area1 = [(out[z] == 1).sum() for z in range(9)]
    assert area1[0] == 36 and area1[8] == 256
    assert area1[0] < area1[2] < area1[4] < area1[6] < area1[8]   # grows from square to square
    assert (out[2] == 2).sum() == 16              # between two identical squares: the square
    assert (out[6] == 2).sum() < 16               # shrinks toward the anchor where it is absent


# --------------------------------------------------------------------------- k-slice runner


def _phantom(shape=(24, 48, 48)):
    from napari_propseg.bench.cases import make_phantom_case

    return make_phantom_case(shape, (6.0, 6.0, 6.0), seed=1)


@pytest.mark.slow
def test_run_k_slice_classical_on_phantom(tmp_path):
    pytest.importorskip("napari_propseg.propagation.interp")
    case = _phantom()
    res = bp.run_k_slice(case.image_hu, case.labels, case.spacing, ks=(3, 5), methods=("interp", "copy_nearest", "stcn"),
                         case=case.name, label_names=case.label_names, weights=tmp_path / "no_such_weights.pt")
    assert [r["k"] for r in res["runs"]] == [3, 5]
    for run in res["runs"]:
        assert run["ref"] == bp.reference_slices(case.labels, run["k"])
        assert run["ref_fraction"] == pytest.approx(len(run["ref"]) / case.labels.shape[0])
        for m in ("interp", "copy_nearest"):
            r = run["methods"][m]
            assert r["anchors_unchanged"], m
            assert 0.3 < r["mean_dice"] <= 1.0
            assert r["seconds"] > 0
        assert "skipped" in run["methods"]["stcn"]  # no weights: skipped with a reason, never random weights
    # more reference slices never make SDF interpolation much worse on a smooth phantom
    d = [run["methods"]["interp"]["mean_dice"] for run in res["runs"]]
    assert d[1] >= d[0] - 0.02
    paths = bp.write_k_slice_report([res], tmp_path, machine="test")
    data = json.loads(paths["json"].read_text())
    assert data["cases"][0]["runs"][0]["methods"]["interp"]["anchors_unchanged"] is True
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| 3 |" in md and "interp" in md and "Skipped stcn" in md


# --------------------------------------------------------------------------- loop


class NearestEngine:
    """Transparent stand-in engine: copy-nearest-anchor propagation, confidence =
    1 / (1 + distance to the nearest anchor), suggestion = least confident non-anchor."""

    def __init__(self):
        self.changed: list[list[int]] = []

    def _run(self, labels, anchors):
        anchors = np.asarray(sorted(anchors))
        z = np.arange(labels.shape[0])
        nearest = anchors[np.abs(z[:, None] - anchors[None, :]).argmin(axis=1)]
        dist = np.abs(z - nearest)
        return SimpleNamespace(labels=labels[nearest].copy(), confidence=1.0 / (1.0 + dist))

    def propagate(self, labels, anchors):
        return self._run(labels, anchors)

    def repropagate(self, labels, anchors, changed):
        self.changed.append(list(changed))
        return self._run(labels, anchors)

    def suggest_next(self, confidence, anchors):
        conf = np.asarray(confidence, float).copy()
        conf[list(anchors)] = np.inf
        return None if np.isinf(conf).all() else int(np.argmin(conf))


def _cone(z=30):
    gt = np.zeros((z, 32, 32), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    for s in range(2, z - 2):
        r = 3 + 10 * np.sin(np.pi * (s - 2) / (z - 4))
        gt[s][(yy - 16) ** 2 + (xx - 16) ** 2 <= r * r] = 1
        gt[s][(yy - 4) ** 2 + (xx - 4) ** 2 <= 4 + (s % 7)] = 2
    return gt


def test_loop_with_transparent_engine(tmp_path):
    gt = _cone()
    engines = []

    def factory(method):
        engines.append(NearestEngine())
        return engines[-1]

    res = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (2.0, 1.0, 1.0), methods=("nearest",), k=3,
                         engine_factory=factory, seed=3, case="cone")
    assert res["start_slices"] == [2, 14, 27]
    curves = {c["policy"]: c for c in res["curves"]}
    assert set(curves) == set(bloop.POLICIES)
    for pol, c in curves.items():
        assert c["anchors_unchanged"], pol
        zs = [r["slice"] for r in c["rounds"][1:]]
        assert len(set(zs)) == len(zs) and not set(zs) & {2, 14, 27}
        assert c["reached"]["0.95"] is not None, pol           # correcting slices eventually gets there
        assert c["rounds"][-1]["mean_dice"] >= 0.95
        assert c["reached"]["0.90"]["corrected"] <= c["reached"]["0.95"]["corrected"]
        assert c["total_seconds"] >= c["reached"]["0.95"]["seconds"] - 1e-12
    # suggest = the engine's least confident slice: farthest from anchors 2, 14, 27 (6 slices) -> 8, the first of 8, 20, 21
    assert curves["suggest"]["rounds"][1]["slice"] == 8
    # oracle corrects the truly worst slice first and is never beaten by random
    d0 = curves["oracle"]["rounds"][0]
    pred0 = NearestEngine().propagate(bp.make_seeds(gt, [2, 14, 27]), [2, 14, 27]).labels
    dice, wrong = bloop.slice_scores(pred0, gt)
    cand = [s for s in range(gt.shape[0]) if s not in (2, 14, 27)]
    worst = [s for s in cand if dice[s] == dice[cand].min()]
    assert curves["oracle"]["rounds"][1]["slice"] == max(worst, key=lambda s: wrong[s])  # ties: most wrong voxels
    assert d0["mean_dice"] < 0.95
    assert curves["oracle"]["reached"]["0.95"]["corrected"] <= curves["random"]["reached"]["0.95"]["corrected"]
    assert curves["oracle"]["mean_choice_rank"] < 0.1 < curves["random"]["mean_choice_rank"]
    # each round re-propagates exactly the corrected slice
    assert all(len(ch) == 1 for e in engines for ch in e.changed)
    paths = bloop.write_loop_report([res], tmp_path, machine="test")
    data = json.loads(paths["json"].read_text())
    assert data["cases"][0]["curves"][0]["rounds"][0]["corrected"] == 0
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "slices to 0.95" in paths["md"].read_text()


def test_choice_rank_hand_case():
    gt = np.zeros((5, 4, 4), np.uint8)
    gt[:, 1:3, 1:3] = 1
    pred = gt.copy()
    pred[1] = 0           # slice 1: Dice 0
    pred[2, 1, 1] = 0     # slice 2: Dice 6/7
    # slices 0, 3, 4 perfect
    assert bloop.choice_rank(pred, gt, 1, [0, 1, 2, 3, 4]) == 0.0
    assert bloop.choice_rank(pred, gt, 2, [0, 1, 2, 3, 4]) == pytest.approx(1 / 4)
    assert bloop.choice_rank(pred, gt, 3, [0, 1, 2, 3, 4]) == pytest.approx((2 + 0.5 * 2) / 4)
    assert math.isnan(bloop.choice_rank(pred, gt, 3, [3]))


def test_loop_from_initial_prediction_and_bad_input():
    gt = _cone(20)
    init = bp.make_seeds(gt, [3, 10, 16])
    init[10] = 0  # the "reference module" missed everything on slice 10
    res = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (1, 1, 1), methods=("nearest",), policies=("oracle",),
                         initial=(init, [3, 10, 16]), engine_factory=lambda m: NearestEngine(), max_rounds=3)
    c = res["curves"][0]
    assert c["rounds"][1]["slice"] == 10  # the wrong anchor is the worst slice and may be corrected
    assert len(c["rounds"]) <= 4
    with pytest.raises(InputError):
        bloop.run_loop(np.zeros(gt.shape), gt, (1, 1, 1), policies=("psychic",), engine_factory=lambda m: NearestEngine())


def test_loop_skips_stcn_without_weights_and_runs_interp_engine(tmp_path):
    pytest.importorskip("napari_propseg.propagation.engine")
    case = _phantom((20, 40, 40))
    res = bloop.run_loop(case.image_hu, case.labels, case.spacing, methods=("stcn", "interp"), policies=("oracle", "suggest"),
                         k=3, max_rounds=4, weights=tmp_path / "missing.pt", case=case.name)
    by = {(c["method"], c["policy"]): c for c in res["curves"]}
    assert "skipped" in by[("stcn", "oracle")]
    for pol in ("oracle", "suggest"):
        c = by[("interp", pol)]
        assert c["anchors_unchanged"]
        assert 1 <= len(c["rounds"]) <= 5
        assert c["rounds"][-1]["mean_dice"] >= c["rounds"][0]["mean_dice"] - 0.05


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_bench_propagate_phantom(tmp_path, capsys):
    pytest.importorskip("napari_propseg.propagation.interp")
    from napari_propseg.cli import main

    rc = main(["bench", "propagate", "--cases", "phantom", "--phantom-shape", "20,40,40", "--ks", "3,5",
               "--methods", "copy_nearest,interp", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "k_slice.json").read_text())
    assert [r["k"] for r in data["cases"][0]["runs"]] == [3, 5]
    assert (tmp_path / "k_slice.png").stat().st_size > 1000
    assert main(["bench", "propagate", "--cases", "nowhere", "--out", str(tmp_path)]) == 2
    assert main(["bench", "propagate", "--cases", "phantom", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert main(["bench", "propagate", "--cases", "phantom", "--ks", "3,x", "--out", str(tmp_path)]) == 2


# --------------------------------------------------------------------------- real data


def test_real_cases_load_with_flare_ids(shared_data):
    from napari_propseg.bench.cases import load_real_case

    c = load_real_case("totalseg_dicom", shared_data)
    assert c.image_hu.shape == c.labels.shape == (20, 512, 512)
    assert set(c.label_names) <= set(range(1, 14))
    assert {1, 3, 5} <= set(c.label_names)  # liver, spleen, aorta
    ref = bp.reference_slices(c.labels, 3)
    assert ref[0] == int(np.flatnonzero(c.labels.reshape(20, -1).any(1))[0])
    c2 = load_real_case("totalseg_ct", shared_data)
    assert c2.image_hu.shape == c2.labels.shape and c2.spacing == (3.0, 3.0, 3.0)
    assert len(c2.label_names) >= 10


def test_speed_and_metrics_speed_tiny(capsys):
    pytest.importorskip("napari_propseg.propagation.engine")
    from napari_propseg.cli import main

    case = _phantom((20, 40, 40))
    res = bp.run_speed(case.image_hu, case.labels, method="interp", k=3, threads=1, case=case.name)
    assert res["anchors"] == bloop.start_slices(case.labels, 3)
    assert res["anchors"][0] < res["repropagate_slice"] < res["anchors"][1]
    assert res["propagate_seconds"] > 0 and res["repropagate_seconds"] > 0 and res["propagate_peak_rss_mb"] > 0
    assert main(["bench", "metrics", "--shape", "16,32,32", "--labels", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == 3 and 0.3 < out["mean_dice"] < 1.0 and out["seconds"] > 0
    assert main(["bench", "speed", "--shape", "16,32,x"]) == 2


def test_loop_suggest_checks_the_unverified_start_slices_first_least_agreed_first():
    gt = _cone(20)
    init = bp.make_seeds(gt, [3, 10, 16])
    res = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (1, 1, 1), methods=("nearest",), policies=("suggest",),
                         initial=(init, [3, 10, 16], {3: 0.9, 10: 0.4, 16: 0.6}), engine_factory=lambda m: NearestEngine(),
                         max_rounds=5, stop_at_target=False)
    slices = [r["slice"] for r in res["curves"][0]["rounds"][1:]]
    assert slices[:3] == [10, 16, 3]  # the reference pair's least agreed slice first
    assert all(s not in (3, 10, 16) for s in slices[3:])  # then the engine's confidence
    # without agreement: ascending z
    res = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (1, 1, 1), methods=("nearest",), policies=("suggest",),
                         initial=(init, [16, 3, 10]), engine_factory=lambda m: NearestEngine(), max_rounds=3,
                         stop_at_target=False)
    assert [r["slice"] for r in res["curves"][0]["rounds"][1:]] == [3, 10, 16]


def test_loop_mean_over_cases_pairs_policies_and_plots_one_panel(tmp_path):
    gt = _cone()
    results = []
    for seed in range(5):  # more cases than MAX_PANELS: one panel with the mean curves
        results.append(bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (2.0, 1.0, 1.0), methods=("nearest",),
                                      policies=("suggest", "random"), k=3, engine_factory=lambda m: NearestEngine(),
                                      seed=seed, case=f"cone{seed}"))
    summary = bloop.loop_summary(results)
    assert summary["cases"] == 5
    rows = {c["policy"]: c for c in summary["curves"]}
    sug, rnd = rows["suggest"]["reached"]["0.95"], rows["random"]["reached"]["0.95"]
    expect_s = np.mean([next(c for c in r["curves"] if c["policy"] == "suggest")["reached"]["0.95"]["corrected"] for r in results])
    expect_r = np.mean([next(c for c in r["curves"] if c["policy"] == "random")["reached"]["0.95"]["corrected"] for r in results])
    assert sug["paired_cases"] == rnd["paired_cases"] == 5
    assert sug["mean_slices_paired"] == pytest.approx(expect_s)
    assert sug["ratio_to_random"] == pytest.approx(expect_s / expect_r) and rnd["ratio_to_random"] == 1.0
    assert sug["mean_slices_all"] == pytest.approx(expect_s) and sug["ratio_to_random_all"] == pytest.approx(expect_s / expect_r)
    # a curve cut before the target counts as one slice past its end (a lower bound)
    cut = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (2.0, 1.0, 1.0), methods=("nearest",), policies=("random",),
                         k=3, engine_factory=lambda m: NearestEngine(), max_rounds=2, case="cut")
    row = bloop.loop_summary([cut])["curves"][0]["reached"]["0.95"]
    assert row["cases_reached"] == 0 and row["mean_slices_all"] == 3 and row["ratio_to_random_all"] == 1.0
    # a start already past the target: 0 slices under every policy, no ratio (not a division by zero)
    easy = bloop.run_loop(np.zeros(gt.shape, np.int16), gt, (2.0, 1.0, 1.0), methods=("nearest",),
                          policies=("suggest", "random"), k=3, targets=(0.1,), engine_factory=lambda m: NearestEngine(), case="easy")
    easy_rows = {c["policy"]: c["reached"]["0.10"] for c in bloop.loop_summary([easy, easy])["curves"]}
    assert easy_rows["suggest"]["mean_slices_all"] == 0 and math.isnan(easy_rows["suggest"]["ratio_to_random_all"])
    assert "Mean over 2 cases" in bloop.summary_markdown(bloop.loop_summary([easy, easy]))
    # Dice after n corrections: n = 0 is the start; a curve that stopped keeps its last value
    starts = [next(c for c in r["curves"] if c["policy"] == "suggest")["rounds"] for r in results]
    assert rows["suggest"]["dice_after"]["0"] == pytest.approx(np.mean([rs[0]["mean_dice"] for rs in starts]))
    paths = bloop.write_loop_report(results, tmp_path, machine="test")
    data = json.loads(paths["json"].read_text())
    assert data["mean_over_cases"]["cases"] == 5 and len(data["cases"]) == 5
    assert "Mean over 5 cases" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
