"""PropagationEngine mechanics with a random-init STCN (no training here): anchors as hard
constraints, re-propagation range, bounded memory, key cache, cancel, locked labels,
outward stop, fusion weights, the no-weights message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_propseg.errors import CancelledError, InputError
from napari_propseg.propagation import engine as engine_mod
from napari_propseg.propagation import stcn_passes
from napari_propseg.propagation.engine import PropagationEngine, affected_segments, all_segments
from napari_propseg.propagation.memory import MemoryBank
from napari_propseg.propagation.network import CPU_CONFIG, aggregate, build_stcn
from napari_propseg.weights import save_weights

RES = 32  # working resolution of the tiny test network


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=RES))
    return str(save_weights(tmp_path_factory.mktemp("w") / "stcn.pt", "stcn", net.config, net.state_dict(), {"note": "random init, tests only"}))


def _case(depth=12, shape=(24, 20), anchors=(2, 6, 10), seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.normal(40, 200, (depth,) + shape).astype(np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    for i, a in enumerate(anchors):
        lab[a, 4 : 12 + i, 3:10] = 1
        lab[a, 14:20, 8 : 14 + i] = 2
    lab[anchors[-1], 1:3, 1:3] = 3  # a label only on the last anchor
    return vol, lab, list(anchors)


def _engine(vol, weights, **kw):
    return PropagationEngine(vol, weights=weights, device="cpu", **kw)


def test_no_weights_says_so_and_offers_interp(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    vol, _, _ = _case()
    with pytest.raises(InputError, match=r"No trained propagation weights.*--method interp"):
        PropagationEngine(vol)
    PropagationEngine(vol, method="interp")  # the fallback needs none
    with pytest.raises(InputError, match="does not exist"):
        PropagationEngine(vol, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="Unknown propagation method"):
        PropagationEngine(vol, method="magic")


@pytest.mark.parametrize("method", ["stcn", "interp"])
def test_anchors_bit_identical_and_every_slice_computed(weights, method):
    vol, lab, anchors = _case()
    lab[5, 0:4, 0:4] = 2  # stale content on a non-anchor slice is replaced
    eng = _engine(vol, weights, method=method)
    res = eng.propagate(lab, anchors)
    assert res.labels.dtype == lab.dtype and res.labels.shape == lab.shape
    for a in anchors:
        assert np.array_equal(res.labels[a], lab[a])
        assert res.confidence[a] == 1.0
    assert res.computed == [z for z in range(12) if z not in anchors]
    assert res.confidence.shape == (12,) and ((res.confidence >= 0) & (res.confidence <= 1)).all()
    assert set(np.unique(res.labels)) <= {0, 1, 2, 3}
    assert res.seconds > 0


def test_bad_input(weights):
    vol, lab, _ = _case()
    eng = _engine(vol, weights)
    with pytest.raises(InputError, match="No anchor"):
        eng.propagate(lab, [])
    with pytest.raises(InputError, match="outside the volume"):
        eng.propagate(lab, [3, 12])
    with pytest.raises(InputError, match="differs from the CT"):
        eng.propagate(lab[:, :10], [3])


def test_segments():
    assert [(s.kind, s.slices) for s in all_segments([2, 5, 6], 8)] == [("below", [0, 1]), ("between", [3, 4]), ("above", [7])]
    segs = affected_segments([2, 5, 9], [5], 12)
    assert sorted(z for s in segs for z in s.slices) == [3, 4, 6, 7, 8]
    segs = affected_segments([2, 5, 9], [9], 12)
    assert sorted(z for s in segs for z in s.slices) == [6, 7, 8, 10, 11]
    segs = affected_segments([2, 9], [5], 12)  # an anchor removed at 5
    assert sorted(z for s in segs for z in s.slices) == [3, 4, 5, 6, 7, 8]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stcn", "interp"])
def test_repropagate_touches_only_the_affected_range(weights, method):
    vol, lab, _ = _case(depth=16, anchors=(2, 8, 13))
    eng = _engine(vol, weights, method=method)
    first = eng.propagate(lab, [2, 8, 13])
    edited = first.labels.copy()
    edited[first.labels == 0] = 0
    # mark every slice with a sentinel the engine must leave alone outside the range
    sentinel = 7
    edited[:, 0, 0] = sentinel
    edited[5] = 0
    edited[5, 6:12, 4:12] = 2  # the user corrects slice 5: it becomes an anchor
    anchors = [2, 5, 8, 13]
    res = eng.repropagate(edited, anchors, changed=[5])
    assert res.computed == [3, 4, 6, 7]
    changed = [z for z in range(16) if not np.array_equal(res.labels[z], edited[z])]
    assert set(changed) <= {3, 4, 6, 7} and changed  # the sentinel pixel at least is recomputed there
    for z in range(16):
        if z not in res.computed:
            assert np.array_equal(res.labels[z], edited[z])
    # the recomputed range equals what a full propagation with the same anchors gives (with
    # the image weight the re-propagation kept: one more anchor does not choose it again)
    ref = _engine(vol, weights, method=method)
    ref.weighting.choose = lambda *a, **k: setattr(ref.weighting, "weight", eng.image_weight)
    full = ref.propagate(edited, anchors)
    for z in res.computed:
        assert np.array_equal(res.labels[z], full.labels[z])
    # a changed outermost anchor re-runs the outward part too
    res2 = eng.repropagate(edited, anchors, changed=[13])
    assert res2.computed == [9, 10, 11, 12, 14, 15]


def test_memory_bank_bounded():
    bank = MemoryBank(cap=4, every=1)
    bank.add(0, torch.zeros(8, 2, 2), torch.zeros(2, 4, 2, 2), anchor=True)
    for z in range(1, 200):
        bank.add(z, torch.zeros(8, 2, 2), torch.zeros(2, 4, 2, 2))
        assert len(bank) <= 4
    assert bank.slices == [0, 197, 198, 199]  # anchor kept, oldest others evicted
    mk, mv = bank.tensors()
    assert mk.shape == (1, 8, 4, 2, 2) and mv.shape == (1, 2, 4, 4, 2, 2)
    assert [s for s in range(1, 12) if MemoryBank(cap=4, every=5).wants(s)] == [5, 10]
    full = MemoryBank(cap=1)
    full.add(0, torch.zeros(8, 2, 2), torch.zeros(1, 4, 2, 2), anchor=True)
    with pytest.raises(ValueError, match="full of anchors"):
        full.add(1, torch.zeros(8, 2, 2), torch.zeros(1, 4, 2, 2), anchor=True)


@pytest.mark.slow
def test_memory_stays_flat_as_the_volume_grows(weights):
    """The memory read by each query never exceeds the cap, whatever the volume length."""
    sizes = {}
    for depth in (10, 30):
        vol, lab, _ = _case(depth=depth, shape=(16, 16), anchors=(0, depth - 1))
        eng = _engine(vol, weights, memory_every=2, memory_cap=3)
        seen = []
        real = eng.model.segment_boxes

        def spy(qk, query, mk, mv, boxes):
            seen.append(mk.shape[2])
            return real(qk, query, mk, mv, boxes)

        eng.model.segment_boxes = spy
        eng.propagate(lab, [0, depth - 1])
        assert len(seen) == 2 * (depth - 2)
        sizes[depth] = (max(seen), eng.stats["memory_peak"])
    assert sizes[10] == sizes[30] == (3, 3)


def test_keys_encoded_once_and_cached(weights):
    vol, lab, anchors = _case()
    eng = _engine(vol, weights)
    calls = []
    real = eng.model.encode_key
    eng.model.encode_key = lambda x: calls.append(1) or real(x)
    r1 = eng.propagate(lab, anchors)
    n1 = len(calls)
    assert n1 <= vol.shape[0] and n1 == eng.stats["keys_encoded"]
    r2 = eng.propagate(lab, anchors)
    assert len(calls) == n1  # nothing re-encoded
    assert np.array_equal(r1.labels, r2.labels)
    eng.repropagate(r2.labels, anchors, changed=[6])
    assert len(calls) == n1


@pytest.mark.slow
def test_anchor_values_cached_until_the_anchor_changes(weights):
    vol, lab, anchors = _case()
    eng = _engine(vol, weights, memory_every=1, pass_cache_mb=0)  # no pass cache: every pass runs
    eng.propagate(lab, anchors)
    n1 = eng.stats["values_encoded"]
    eng.propagate(lab, anchors)
    n2 = eng.stats["values_encoded"] - n1
    assert 0 < n2 < n1  # propagated slices re-encoded, anchors not
    edited = lab.copy()
    edited[6] = np.roll(lab[6], 3, axis=1)  # the user moves the labels on anchor 6
    cached = eng.propagate(edited, anchors)
    fresh = _engine(vol, weights, memory_every=1).propagate(edited, anchors)
    assert np.array_equal(cached.labels, fresh.labels)


def test_progress_and_cancel(weights):
    vol, lab, anchors = _case()
    eng = _engine(vol, weights)
    steps = []
    eng.propagate(lab, anchors, progress=lambda s, t, m: steps.append((s, t)))
    total = steps[-1][1]
    # between-anchor slices are visited by two passes, outer ones by one (or stop early)
    assert [s for s, _ in steps] == list(range(1, total + 1))
    assert total == 2 * 6 + 2 + 1
    n = [0]

    def cancel():
        n[0] += 1
        return n[0] > 3

    with pytest.raises(CancelledError):
        eng.propagate(lab, anchors, cancel=cancel)
    assert n[0] == 4


@pytest.mark.parametrize("method", ["stcn", "interp"])
def test_locked_labels_never_change(weights, method):
    vol, lab, anchors = _case()
    lab[:, 8:16, 2:12] = np.where(lab[:, 8:16, 2:12] == 0, 5, lab[:, 8:16, 2:12])  # label 5 on every slice
    lab[4, 0:2, :] = 5
    eng = _engine(vol, weights, method=method)
    res = eng.propagate(lab, anchors, locked_labels=[5])
    assert np.array_equal(res.labels == 5, lab == 5)
    free = eng.propagate(lab, anchors)  # not locked: label 5 is propagated like the others
    assert not np.array_equal(free.labels == 5, lab == 5)


def test_outward_propagation_stops_when_labels_vanish(weights):
    vol, lab, _ = _case(depth=20, anchors=(2, 6))
    eng = _engine(vol, weights, stop_patience=3)
    calls = []
    real = eng.model.segment_boxes

    def vanishing(qk, query, mk, mv, boxes):
        calls.append(1)
        out = real(qk, query, mk, mv, boxes)
        return aggregate(torch.zeros(out.shape[0], out.shape[1] - 1, *out.shape[2:]))  # every object gone

    eng.model.segment_boxes = vanishing
    res = eng.propagate(lab, [2, 6])
    # below: 2 slices (< patience), between: 2 * 3, above: exactly `patience` slices then nothing
    assert len(calls) == 2 + 6 + 3
    assert not res.labels[7:].any()


def test_fusion_favours_the_nearer_anchor(weights, monkeypatch):
    vol, lab, _ = _case(depth=12)
    lab[:] = 0
    lab[1, 2:20, 2:18] = 1
    lab[10, 2:20, 2:18] = 2

    def fake_pass(start, start_values, targets, *, stop, tick, cancel, boxes=None):
        k = start_values.shape[1]
        out = {}
        for z in targets:
            p = torch.zeros(k + 1, RES, RES, dtype=torch.uint8)
            p[1] = 255  # each pass carries its own anchor's label: the lower says 1, the upper 2
            out[z] = p
            tick(z)
        return out

    eng = _engine(vol, weights, prior="none", network_pass=fake_pass)  # the network's two passes alone
    res = eng.propagate(lab, [1, 10])
    assert all((res.labels[z] == 1).all() for z in (2, 3, 4, 5))
    assert all((res.labels[z] == 2).all() for z in (6, 7, 8, 9))
    # Check next's confidence (doubt.py): lowest mid-gap, symmetric, 1 on the anchors
    c = res.confidence[2:10]
    np.testing.assert_allclose(c, c[::-1], atol=1e-6)
    assert int(np.argmin(c)) + 2 in (5, 6) and res.confidence[[1, 10]].tolist() == [1.0, 1.0]


def test_sdf_prior_keeps_a_small_organ_the_network_loses(weights, monkeypatch):
    """Shipped weights give p ~ 0 even on the anchor itself for organs of a few pixels at
    1/16 resolution (adrenals, pancreas); the SDF prior must carry them across the gap."""
    vol, lab, _ = _case(depth=12)
    lab[:] = 0
    lab[1, 8:13, 6:10] = 1
    lab[10, 9:14, 7:11] = 1
    lab[1, 14:22, 10:18] = 2  # a second object that stays background-free of the first

    def blind_pass(start, start_values, targets, *, stop, tick, cancel, boxes=None):
        out = {}
        for z in targets:
            p = torch.zeros(start_values.shape[1] + 1, RES, RES, dtype=torch.uint8)
            p[0] = 255  # the network never predicts the objects (8-bit, as a pass returns)
            out[z] = p
            tick(z)
        return out

    results = {}
    for prior in ("none", "sdf"):
        # the linear SDF fusion (no image term)
        eng = _engine(vol, weights, prior=prior, appearance={"weight": 0}, network_pass=blind_pass)
        results[prior] = eng.propagate(lab, [1, 10]).labels
    assert not (results["none"][2:10] == 1).any()
    areas = [(results["sdf"][z] == 1).sum() for z in range(2, 10)]
    assert min(areas) >= 4 and max(areas) <= 30  # carried across (eroded ~1 px where the network says background)
    assert (results["sdf"][5, 10:12, 8] == 1).all()
    assert (results["sdf"][3] == 2).any() and not (results["sdf"][9] == 2).any()  # shrinks toward the empty anchor


def test_bad_prior(weights):
    vol, _, _ = _case()
    for kw in ({"prior": "shape"}, {"prior_weight": 1.5}):
        with pytest.raises(InputError):
            _engine(vol, weights, **kw)


def test_suggest_next_skips_anchors(weights):
    eng = PropagationEngine(np.zeros((6, 8, 8), np.float32), method="interp")
    conf = np.array([0.0, 0.9, 0.2, 1.0, 0.4, np.nan], np.float32)
    assert eng.suggest_next(conf, [0, 3]) == 2
    assert eng.suggest_next(conf, [0, 2, 3]) == 4
    with pytest.raises(InputError, match="already an anchor"):
        eng.suggest_next(conf, range(6))


def test_interp_confidence_points_at_the_gap_middle():
    vol, lab, _ = _case(depth=12, anchors=(1, 10))
    lab[:] = 0
    lab[1, 2:6, 2:6] = 1
    lab[10, 12:22, 8:18] = 1
    eng = PropagationEngine(vol, method="interp")
    res = eng.propagate(lab, [1, 10])
    assert eng.suggest_next(res.confidence, [1, 10]) in (5, 6)
    assert res.confidence[0] < 1.0 and res.confidence[11] < 1.0  # beyond the anchors: the label may continue


def test_body_crop_repeated_from_training_meta(tmp_path):
    """Weights trained on body crops see the same crop at inference; outside it is background."""
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=RES))
    meta = {"preprocessing": {"crop": "body"}}
    w = save_weights(tmp_path / "crop.pt", "stcn", net.config, net.state_dict(), meta)
    vol = np.full((8, 40, 48), -1000, np.float32)
    vol[:, 10:30, 12:36] = 40  # the body
    lab = np.zeros(vol.shape, np.uint8)
    lab[2, 14:24, 16:28] = 1
    lab[6, 15:25, 17:29] = 1
    eng = PropagationEngine(vol, weights=str(w), device="cpu", spacing=(2.0, 1.0, 1.0))
    y0, y1, x0, x1 = eng.box
    assert y0 <= 10 and y1 >= 30 and x0 <= 12 and x1 >= 36 and (y1 - y0, x1 - x0) != vol.shape[1:]
    res = eng.propagate(lab, [2, 6])
    assert np.array_equal(res.labels[2], lab[2]) and np.array_equal(res.labels[6], lab[6])
    outside = np.ones(vol.shape[1:], bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    assert not res.labels[:, outside].any()
    bad = save_weights(tmp_path / "bad.pt", "stcn", net.config, net.state_dict(), {"preprocessing": {"crop": "lungs"}})
    with pytest.raises(InputError, match="crop='lungs'"):
        PropagationEngine(vol, weights=str(bad), device="cpu")


@pytest.mark.slow
def test_repropagation_reuses_the_passes_a_new_anchor_leaves_intact(weights):
    """A new anchor c in the gap (a, b): the passes from a up to c and from b down to c are
    the beginnings of the old passes, so only the two passes starting at c run; the labels
    equal a fresh engine's full propagation with the same anchors."""
    vol, lab, _ = _case(depth=16, anchors=(2, 8, 13))
    # a fixed image weight: the automatic one is re-chosen from the new anchors and would
    # apply to the recomputed gaps only, so a fresh engine could differ elsewhere
    eng = _engine(vol, weights, appearance={"weight": 0.5})
    first = eng.propagate(lab, [2, 8, 13])
    assert eng.stats["passes_run"] == 6 and eng.stats["passes_reused"] == 0  # 2 gaps x 2 passes + below 2 + above 13
    edited = first.labels.copy()
    edited[5] = 0
    edited[5, 6:12, 4:12] = 2
    anchors = [2, 5, 8, 13]
    run0, reused0 = eng.stats["passes_run"], eng.stats["passes_reused"]
    res = eng.repropagate(edited, anchors, changed=[5])
    assert eng.stats["passes_run"] - run0 == 2 and eng.stats["passes_reused"] - reused0 == 2
    fresh = _engine(vol, weights, appearance={"weight": 0.5}).propagate(edited, anchors)
    assert np.array_equal(res.labels, fresh.labels)
    np.testing.assert_allclose(res.confidence[res.computed], fresh.confidence[res.computed], atol=1e-6)
    # the same full propagation again runs nothing
    run1 = eng.stats["passes_run"]
    again = eng.propagate(edited, anchors)
    assert eng.stats["passes_run"] == run1 and np.array_equal(again.labels, fresh.labels)
    # editing anchor 5 again invalidates only the passes that start there
    edited[5] = np.roll(edited[5], 2, axis=0)
    run2 = eng.stats["passes_run"]
    res2 = eng.repropagate(edited, anchors, changed=[5])
    assert eng.stats["passes_run"] - run2 == 2
    assert np.array_equal(res2.labels, _engine(vol, weights, appearance={"weight": 0.5}).propagate(edited, anchors).labels)


@pytest.mark.slow
def test_pass_cache_off_and_bounded(weights):
    vol, lab, anchors = _case(depth=16, anchors=(2, 8, 13))
    off = _engine(vol, weights, pass_cache_mb=0)
    a = off.propagate(lab, anchors)
    b = off.propagate(lab, anchors)
    assert off.stats["passes_reused"] == 0 and not off.network.passes
    assert np.array_equal(a.labels, b.labels)
    # a budget smaller than one pass keeps nothing; one pass of 3 channels x 32 x 32 bytes fits in 4 KB
    tiny = _engine(vol, weights, pass_cache_mb=4096 / 2**20)
    tiny.propagate(lab, anchors)
    assert sum(p.nbytes for p in tiny.network.passes.values()) <= 4096
    with pytest.raises(InputError):
        _engine(vol, weights, pass_cache_mb=-1)
    with pytest.raises(InputError):
        _engine(vol, weights, pass_cache_mb=float("inf"))


def test_objects_too_small_for_the_memory_follow_the_prior(weights, monkeypatch):
    """An object under ``prior_small_cells`` memory cells is carried by the SDF prior alone:
    a network that claims it everywhere cannot spread it (with the rule off it does)."""
    vol, lab, _ = _case(depth=12)
    lab[:] = 0
    lab[1, 8:12, 6:9] = 1
    lab[10, 9:13, 7:10] = 1

    def greedy_pass(start, start_values, targets, *, stop, tick, cancel, boxes=None):
        out = {}
        for z in targets:
            p = torch.zeros(start_values.shape[1] + 1, RES, RES, dtype=torch.uint8)
            p[1] = 255  # the network says "object" on every pixel
            out[z] = p
            tick(z)
        return out

    areas = {}
    for cells in (4.0, 0.0):
        eng = _engine(vol, weights, prior_weight=0.3, prior_small_cells=cells, appearance={"weight": 0}, network_pass=greedy_pass)
        res = eng.propagate(lab, [1, 10]).labels
        areas[cells] = [int((res[z] == 1).sum()) for z in range(2, 10)]
    assert max(areas[4.0]) <= 40 and min(areas[4.0]) >= 6  # the anchors hold 12 pixels (a 1-pixel rim from resizing)
    assert min(areas[0.0]) == 24 * 20  # the whole slice
    with pytest.raises(InputError):
        _engine(vol, weights, prior_small_cells=-1)


def test_outward_slices_next_to_a_lone_anchor_are_doubtful_and_stale_passes_go(weights, monkeypatch):
    vol, lab, _ = _case(depth=12)
    lab[:] = 0
    lab[6, 4:12, 3:10] = 1

    def reach_three(start, start_values, targets, *, stop, tick, cancel, boxes=None):
        out = {}
        for z in targets:
            p = torch.zeros(start_values.shape[1] + 1, RES, RES, dtype=torch.uint8)
            p[1 if abs(z - start) <= 3 else 0] = 255  # the label runs 3 slices each way
            out[z] = p
            tick(z)
        return out

    eng = _engine(vol, weights, network_pass=reach_three)
    res = eng.propagate(lab, [6])
    assert (res.confidence[[3, 4, 5, 7, 8, 9]] < 1.0).all()  # the label may run on beyond the anchor
    assert (res.confidence[[0, 1, 2, 10, 11]] == 1.0).all() and res.confidence[6] == 1.0
    assert eng.suggest_next(res.confidence, [6]) in (4, 8)
    # the anchor's labels change: its old passes are dropped before anything runs
    assert len(eng.network.passes) == 2
    edited = lab.copy()
    edited[6] = np.roll(lab[6], 1, axis=0)
    eng.propagate(edited, [6])
    assert len(eng.network.passes) == 2 and all(k[-1] == stcn_passes.slice_digest(edited[6], np.array([], np.int64)) for k in eng.network.passes)


def test_left_empty_names_the_slices_interp_does_not_reach(weights):
    """interp leaves the slices beyond the outermost anchors empty and says which (those
    where a label runs on to that anchor); STCN propagates there, so it names none."""
    vol, lab, _ = _case(depth=12, anchors=(2, 6, 9))
    res = PropagationEngine(vol, method="interp").propagate(lab, [2, 6, 9])
    assert res.left_empty == [0, 1, 10, 11]
    assert not res.labels[res.left_empty].any()
    top_empty = lab.copy()
    top_empty[9] = 0  # "no organ here" on the highest anchor: nothing runs on above it
    eng = PropagationEngine(vol, method="interp")
    assert eng.propagate(top_empty, [2, 6, 9]).left_empty == [0, 1]
    locked_only = lab.copy()
    locked_only[2][locked_only[2] != 0] = 2  # the lowest anchor holds only a locked label
    assert eng.propagate(locked_only, [2, 6, 9], locked_labels=[2]).left_empty == [10, 11]
    again = eng.repropagate(lab, [2, 6, 9], changed=[6])  # the whole returned volume counts
    assert again.computed == [3, 4, 5, 7, 8] and again.left_empty == [0, 1, 10, 11]
    assert _engine(vol, weights).propagate(lab, [2, 6, 9]).left_empty == []


def test_one_correction_recomputes_only_the_gaps_next_to_it():
    """After one corrected slice the re-propagation computes the two gaps next to it and
    nothing else, also with the automatic image weight (kept for the volume), and those
    gaps are what a full propagation with that weight gives."""
    vol, lab, _ = _case(depth=30, shape=(40, 36), anchors=(1, 6, 11, 16, 21, 26))
    vol[lab > 0] += 300.0  # organs the image can see
    anchors = [1, 6, 11, 16, 21, 26]
    eng = PropagationEngine(vol, method="interp", spacing=(2.0, 1.0, 1.0))
    first = eng.propagate(lab, anchors)
    w = eng.image_weight
    edited = first.labels.copy()
    edited[13] = 0
    edited[13, 5:14, 3:11] = 1
    res = eng.repropagate(edited, sorted(anchors + [13]), changed=[13])
    assert res.computed == [12, 14, 15]
    assert eng.image_weight == w
    unchanged = [z for z in range(30) if z not in res.computed]
    np.testing.assert_array_equal(res.labels[unchanged], edited[unchanged])
    fixed = PropagationEngine(vol, method="interp", spacing=(2.0, 1.0, 1.0), appearance={"weight": w})
    np.testing.assert_array_equal(res.labels[12:16], fixed.propagate(edited, sorted(anchors + [13])).labels[12:16])


def test_interp_needs_no_torch(tmp_path):
    """``interp`` (engine, package import) runs without importing torch, so the CLI starts fast."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from napari_propseg.propagation import PropagationEngine\n"
        "vol = np.zeros((5, 16, 16), np.float32); lab = np.zeros((5, 16, 16), np.uint8)\n"
        "lab[0, 4:8, 4:8] = 1; lab[4, 5:9, 5:9] = 1\n"
        "res = PropagationEngine(vol, method='interp').propagate(lab, [0, 4])\n"
        "assert res.labels[2].any()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_object_boxes_follow_the_extent_with_a_margin_and_keep_the_last_box():
    from napari_propseg.propagation.stcn_passes import object_boxes

    masks = torch.zeros(3, 64, 64)
    masks[0, 20:30, 33:40] = 0.9  # rows 20-29 lie in cell row 1, columns 33-39 in cell column 2
    masks[1, 0:5, 60:64] = 0.9
    assert object_boxes(masks, 0.5, 4, 1)[:2] == [(0, 3, 1, 4), (0, 2, 2, 4)]
    assert object_boxes(masks, 0.5, 4, 0)[2] == (0, 4, 0, 4)  # nowhere: the whole frame
    assert object_boxes(masks, 0.5, 4, 0, previous=[(0, 1, 0, 1)] * 3)[2] == (0, 1, 0, 1)  # nowhere: its last box


@pytest.mark.slow
def test_boxed_decoding_follows_the_objects_with_the_shipped_weights():
    """The network alone (no prior, no image term), decoded in boxes and on whole slices,
    gives nearly the same labels: a box that lost its object (wrong place, wrong axis,
    stale extent) would cut it off."""
    from napari_propseg.bench.cases import make_phantom_case
    from napari_propseg.bench.protocol import make_seeds, start_slices
    from napari_propseg.metrics import dice_from_counts
    from napari_propseg.propagation.engine import default_weights_path

    path = default_weights_path()
    if not path.is_file():
        pytest.skip("no shipped STCN weights")
    case = make_phantom_case((24, 96, 96), (5.0, 3.2, 3.2), 3)
    anchors = start_slices(case.labels, 3)
    seeds = make_seeds(case.labels, anchors)
    out = {}
    for margin in (None, 2):
        eng = PropagationEngine(case.image_hu, weights=str(path), device="cpu", spacing=case.spacing, prior="none",
                                appearance={"weight": 0}, decode_margin=margin)
        out[margin] = eng.propagate(seeds, anchors).labels
    others = [z for z in range(case.labels.shape[0]) if z not in anchors]
    ids = [int(i) for i in np.unique(case.labels[anchors]) if i]
    for i in ids:
        whole, boxed = out[None][others] == i, out[2][others] == i
        if whole.sum() > 200:
            assert dice_from_counts(int((boxed & whole).sum()), int(boxed.sum()), int(whole.sum())) > 0.95, i
    assert (out[None] != out[2]).mean() < 0.01
