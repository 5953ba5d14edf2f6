"""Image-guided fusion between anchors (shape prior x CT intensity model): the weight-0
limit is plain SDF interpolation, the image moves contours toward the organ it sees, and
it never labels a look-alike far from where the anchors put the organ."""
from __future__ import annotations

import numpy as np
import pytest

from napari_propseg.errors import InputError
from napari_propseg.propagation.appearance import AppearanceOptions, GapAppearance, prior_log_probs, tau_pixels
from napari_propseg.propagation.engine import PropagationEngine
from napari_propseg.propagation.interp import sdf_interpolate, sdf_interpolate_with_confidence

SPACING = (3.0, 1.0, 1.0)


def _bending_organ(depth=11, size=64, lookalike=False):
    """A soft-tissue disc (60 HU) in fat (-100 HU) that stays put, then swings sideways
    over the last slices: linear blending of the two end contours misses it mid-gap."""
    yy, xx = np.mgrid[:size, :size]
    vol = np.full((depth, size, size), -100.0, np.float32)
    gt = np.zeros(vol.shape, np.uint8)
    rng = np.random.default_rng(0)
    for z in range(depth):
        cx = 20 if z < depth - 3 else 20 + 6 * (z - (depth - 4))
        disc = (yy - 32) ** 2 + (xx - cx) ** 2 <= 8 ** 2
        vol[z][disc] = 60.0
        gt[z][disc] = 1
        if lookalike:  # an unlabelled organ of the same density, far from the labelled one
            vol[z][(yy - 10) ** 2 + (xx - 52) ** 2 <= 5 ** 2] = 60.0
    vol += rng.normal(0, 5, vol.shape).astype(np.float32)
    seeds = np.zeros_like(gt)
    seeds[[0, depth - 1]] = gt[[0, depth - 1]]
    return vol, gt, seeds, [0, depth - 1]


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_weight_zero_is_plain_sdf_interpolation():
    vol, _, seeds, anchors = _bending_organ()
    seeds[0, 40:50, 40:50] = 2  # a second organ that vanishes toward the other anchor
    plain = sdf_interpolate(seeds, anchors)
    off, _ = sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING, appearance=AppearanceOptions(weight=0))
    np.testing.assert_array_equal(off, plain)
    # the prior alone through the guided code path (a vanishing image weight): the same
    # contours as SDF interpolation whatever the softness, also where organs are close
    seeds[0, 26:30, 30:40] = 3  # a third organ one pixel off the first: the seam stays background
    plain = sdf_interpolate(seeds, anchors)
    for tau in (0.5, 3.0, 30.0):
        tiny = AppearanceOptions(weight=1e-12, tau_mm=tau, tau_growth=0.2)
        guided0, _ = sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING, appearance=tiny)
        assert (guided0 != plain).mean() < 1e-4, tau


def test_the_image_moves_the_contour_to_the_organ():
    vol, gt, seeds, anchors = _bending_organ()
    plain = sdf_interpolate(seeds, anchors)
    guided, conf = sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING, appearance=AppearanceOptions())
    mid = range(1, 10)
    d_plain = np.mean([_dice(plain[z] == 1, gt[z] == 1) for z in mid])
    d_guided = np.mean([_dice(guided[z] == 1, gt[z] == 1) for z in mid])
    assert d_guided > 0.9 and d_guided > d_plain + 0.3, (d_plain, d_guided)
    np.testing.assert_array_equal(guided[anchors], seeds[anchors])
    assert conf.shape == (11,) and conf[0] == 1.0


def test_a_lookalike_far_from_the_anchors_organ_stays_background():
    vol, gt, seeds, anchors = _bending_organ(lookalike=True)
    guided, _ = sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING, appearance=AppearanceOptions())
    assert not guided[:, 3:18, 45:60].any()
    # the reach is bounded by weight x log(1/floor) x tau: an image weight far above the
    # default reaches the look-alike, but as an island away from the organ's prior it is dropped
    greedy, _ = sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING, appearance=AppearanceOptions(weight=3.0))
    assert not greedy[:, 3:18, 45:60].any()
    assert np.mean([_dice(greedy[z] == 1, gt[z] == 1) for z in range(1, 10)]) > 0.8
    # the look-alike's HU also counts as background now, so the organ is followed less
    # well than alone (0.94), but far better than by plain interpolation (0.30)
    assert np.mean([_dice(guided[z] == 1, gt[z] == 1) for z in range(1, 10)]) > 0.8


def test_prior_softness_grows_into_the_gap_and_is_normalised():
    opt = AppearanceOptions(tau_mm=1.5, tau_growth=0.1)
    assert tau_pixels(opt, 1, 0, 10, (3.0, 0.5, 0.5)) == pytest.approx((1.5 + 0.3) / 0.5)
    assert tau_pixels(opt, 5, 0, 10, (3.0, 0.5, 0.5)) > tau_pixels(opt, 2, 0, 10, (3.0, 0.5, 0.5))
    import torch

    d = torch.tensor([[[-3.0, 0.0, 4.0]], [[5.0, -1.0, 6.0]]])
    lp = prior_log_probs(d, 1.0)
    np.testing.assert_allclose(torch.logsumexp(lp, 0).numpy(), 0.0, atol=1e-5)
    assert lp[:, 0, 0].argmax() == 1 and lp[:, 0, 1].argmax() == 2 and lp[:, 0, 2].argmax() == 0


def test_intensity_model_blends_the_nearer_anchor():
    img_a = np.full((8, 8), 50.0)
    img_b = np.full((8, 8), 150.0)
    lab = np.zeros((8, 8), np.uint8)
    lab[2:6, 2:6] = 1
    m = GapAppearance(img_a, img_b, lab, lab, [1], 1.0, AppearanceOptions())
    near_a = m.log_likelihood(np.array([[50.0, 150.0]]), wa=0.9)[1, 0]
    near_b = m.log_likelihood(np.array([[50.0, 150.0]]), wa=0.1)[1, 0]
    assert near_a[0] > near_a[1] and near_b[1] > near_b[0]


@pytest.mark.parametrize("bad", [{"weight": -1}, {"tau_mm": 0}, {"band_mm": float("nan")}, {"tau_growth": float("inf")},
                                 {"candidates": "abc"}, {"candidates": 3}, {"candidates": (0.5, -1)}])
def test_bad_options(bad):
    with pytest.raises(InputError):
        AppearanceOptions(**bad)


def test_engine_interp_uses_the_image_and_keeps_its_options():
    vol, gt, seeds, anchors = _bending_organ()
    guided = PropagationEngine(vol, method="interp", spacing=SPACING).propagate(seeds, anchors).labels
    plain = PropagationEngine(vol, method="interp", spacing=SPACING, appearance={"weight": 0}).propagate(seeds, anchors).labels
    np.testing.assert_array_equal(plain, sdf_interpolate(seeds, anchors))
    assert np.mean([_dice(guided[z] == 1, gt[z] == 1) for z in range(1, 10)]) > np.mean([_dice(plain[z] == 1, gt[z] == 1) for z in range(1, 10)]) + 0.05
    with pytest.raises(InputError, match="appearance option"):
        PropagationEngine(vol, method="interp", appearance={"colour": 1})
    with pytest.raises(InputError):
        PropagationEngine(vol, method="interp", network_weight=-0.5)


@pytest.mark.slow
def test_engine_stcn_guided_path_with_the_shipped_weights():
    """With the shipped weights the guided STCN path keeps the anchors bit-identical and
    follows the organ; with network weight 0 it runs no network pass at all."""
    vol, gt, seeds, anchors = _bending_organ(depth=9, size=96)
    for nw in (0.0, 0.5):
        eng = PropagationEngine(vol, method="stcn", device="cpu", spacing=SPACING, network_weight=nw)
        res = eng.propagate(seeds, anchors).labels
        np.testing.assert_array_equal(res[anchors], seeds[anchors])
        assert np.mean([_dice(res[z] == 1, gt[z] == 1) for z in range(1, 8)]) > 0.85
        assert (eng.stats["passes_run"] == 0) == (nw == 0.0)


@pytest.mark.slow
def test_the_network_term_enters_the_guided_fusion():
    """A (fake) network that claims the organ everywhere widens it by a bounded margin when
    listened to (network weight 1), not at all at weight 0."""
    import torch

    vol, gt, seeds, anchors = _bending_organ(depth=9, size=96)

    def greedy_pass(start, start_values, targets, *, stop, tick, cancel, boxes=None):
        out = {}
        r = eng.resolution
        for z in targets:
            p = torch.zeros(start_values.shape[1] + 1, r, r, dtype=torch.uint8)
            p[1] = 255
            out[z] = p
            tick(z)
        return out

    area = {}
    for nw in (0.0, 1.0):
        eng = PropagationEngine(vol, method="stcn", device="cpu", spacing=SPACING, network_weight=nw,
                                appearance={"weight": 0.5}, network_pass=greedy_pass)
        area[nw] = int((eng.propagate(seeds, anchors).labels[1:8] == 1).sum())
    assert area[1.0] > area[0.0] + 25
    assert area[1.0] < 96 * 96 * 7 / 4  # bounded: the prior's log-odds still win far from the organ


def test_widget_default_matches_the_engine_default():
    from napari_propseg.session import DEFAULT_IMAGE_WEIGHT

    assert DEFAULT_IMAGE_WEIGHT == AppearanceOptions().weight


def test_cli_rejects_a_negative_image_weight(tmp_path, capsys):
    from napari_propseg.cli import main

    for bad in ("-1", "lots"):
        with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
            main(["propagate", str(tmp_path / "ct.nii.gz"), "--seeds", str(tmp_path / "s.nii.gz"), "--out",
                  str(tmp_path / "o.nii.gz"), "--appearance", bad])
        assert exc.value.code == 2
        assert "--appearance" in capsys.readouterr().err


def test_weight_chosen_per_volume_on_the_anchors(monkeypatch):
    """Leave-one-anchor-out: where the image tracks the organ the image weight wins, where
    the labels do not follow the image (noise) shapes alone win; repropagate keeps it until
    the anchors have grown by half."""
    from napari_propseg.propagation.appearance import choose_weight

    vol, gt, _, _ = _bending_organ(depth=11)
    anchors = [0, 8, 10]  # slice 8: the organ has started to swing, which the image shows
    seeds = np.zeros_like(gt)
    seeds[anchors] = gt[anchors]
    w, scores = choose_weight(vol, seeds, anchors, SPACING, AppearanceOptions())
    assert w > 0 and scores[w] > scores[0.0]
    noise = np.random.default_rng(1).normal(0, 300, vol.shape).astype(np.float32)
    w0, scores0 = choose_weight(noise, seeds, anchors, SPACING, AppearanceOptions())
    assert w0 <= 0.25 and scores0[w0] >= scores0[1.0]
    assert choose_weight(vol, seeds, [0, 10], SPACING, AppearanceOptions()) == (0.5, {})  # too few anchors: the default
    eng = PropagationEngine(vol, method="interp", spacing=SPACING)
    assert eng.image_weight is None
    eng.propagate(seeds, anchors)
    assert eng.image_weight == w and eng.image_weight_scores == scores
    before = eng.propagate(seeds, anchors).labels
    seeds[5] = gt[5]
    calls = []
    import napari_propseg.propagation.appearance as app

    real = app.GapAppearance
    monkeypatch.setattr(app, "GapAppearance", lambda *a, **k: calls.append(1) or real(*a, **k))
    current = before.copy()
    current[5] = gt[5]
    res = eng.repropagate(current, [0, 5, 8, 10], changed=[5])
    # one more anchor (3 -> 4 labelled, under REWEIGH_GROWTH): the volume's weight is kept,
    # only the two gaps (0,5) and (5,8) are recomputed = 2 intensity models
    assert len(calls) == 2
    assert (eng.image_weight, eng.image_weight_scores) == (w, scores)
    assert res.computed == [1, 2, 3, 4, 6, 7]  # only the gaps next to slice 5
    np.testing.assert_array_equal(res.labels[9], before[9])
    # with that weight, the re-propagated gaps are those of a full propagation
    full = PropagationEngine(vol, method="interp", spacing=SPACING, appearance={"weight": w}).propagate(current, [0, 5, 8, 10])
    np.testing.assert_array_equal(res.labels, full.labels)
    calls.clear()
    current = res.labels.copy()
    current[2] = gt[2]
    seeds[2] = gt[2]
    eng.repropagate(current, [0, 2, 5, 8, 10], changed=[2])
    # 5 labelled anchors >= 1.5 x 3: chosen again from all of them (the triples (0,2,5), (2,5,8),
    # (5,8,10)), then the gaps (0,2) and (2,5)
    assert len(calls) == 5
    assert (eng.image_weight, eng.image_weight_scores) == choose_weight(vol, seeds, [0, 2, 5, 8, 10], SPACING, AppearanceOptions())
    calls.clear()
    eng.propagate(current, [0, 2, 5, 8, 10])  # a full propagation chooses again: every triple from the cache
    assert len(calls) == 4  # the four gaps
    fixed = PropagationEngine(vol, method="interp", spacing=SPACING, appearance={"weight": 0.25})
    fixed.propagate(seeds, anchors)
    assert fixed.image_weight == 0.25 and fixed.image_weight_scores == {}


def test_cropping_to_the_reach_of_the_image_changes_nothing(monkeypatch):
    """Interpolation and the automatic weight work only near the anchors' labels; the
    labels and scores are exactly those of the whole-slice computation."""
    import napari_propseg.propagation.appearance as app
    from napari_propseg.propagation.appearance import choose_weight

    vol, gt, _, _ = _bending_organ(depth=13, size=160, lookalike=True)
    yy, xx = np.mgrid[:160, :160]
    for z in range(13):  # a second organ that ends mid-volume, and one only on one anchor
        vol[z][(yy - 140) ** 2 + (xx - 140) ** 2 <= 64] = 60.0  # a far look-alike, outside the crop
        if z < 8:
            gt[z][(yy - 50) ** 2 + (xx - 40 - z) ** 2 <= 36] = 2
            vol[z][(yy - 50) ** 2 + (xx - 40 - z) ** 2 <= 36] = 150.0
    gt[0, 22:26, 12:16] = 3
    anchors = [0, 4, 9, 12]
    seeds = np.zeros_like(gt)
    seeds[anchors] = gt[anchors]
    ys, xs = app.reach_box(seeds[4] > 0, app.LOGLIK_SPAN * 2.0, 3.0)
    assert ys.stop - ys.start < 150 and xs.stop - xs.start < 150  # a real crop
    results = {}
    for crop in (True, False):
        monkeypatch.setattr(app, "CROP_TO_REACH", crop)
        w, scores = choose_weight(vol, seeds, anchors, SPACING, AppearanceOptions())
        labs = [sdf_interpolate_with_confidence(seeds, anchors, image=vol, spacing=SPACING,
                                                appearance=AppearanceOptions(weight=v, auto=False))[0] for v in (0.5, 2.0)]
        results[crop] = (w, scores, labs)
    assert results[True][:2] == results[False][:2]
    for cropped, whole in zip(results[True][2], results[False][2]):
        np.testing.assert_array_equal(cropped, whole)


def test_islands_away_from_the_prior_are_dropped_a_moved_organ_is_kept():
    from napari_propseg.propagation.appearance import drop_islands

    d = np.full((2, 20, 20), 5.0, np.float32)
    d[0, 2:8, 2:8] = -1.0  # label 1's prior
    d[1, 12:18, 12:18] = -1.0  # label 2's prior
    idx = np.zeros((20, 20), np.int64)
    idx[3:9, 3:9] = 1  # label 1 grown by the image: kept
    idx[15, 2] = 1  # a speck of label 1 far from its prior: dropped
    idx[2:5, 14:17] = 2  # label 2 only away from its prior, in one piece: an organ that moved, kept
    out = drop_islands(idx, d)
    assert (out[3:9, 3:9] == 1).all() and out[15, 2] == 0 and (out[2:5, 14:17] == 2).all()
    idx[17, 17] = 2  # two pieces of label 2, neither on its prior... one touches it now
    d[1, 17, 17] = -1.0
    out = drop_islands(idx, d)
    assert out[17, 17] == 2 and not (out[2:5, 14:17] == 2).any()


def _several_organs(depth=9, size=96):
    """Three organs of different density that move and change size, one ending mid-way,
    in noisy fat, plus a look-alike: a workout for the per-label boxes."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:size, :size]
    vol = rng.normal(-100, 15, (depth, size, size)).astype(np.float32)
    gt = np.zeros(vol.shape, np.uint8)
    for z in range(depth):
        for lab, (cy, cx, r, hu) in enumerate([(30, 25 + z, 9, 60), (34, 44 + z // 2, 6 + z // 3, 150), (70, 60, 12 - z, 20)], 1):
            if r > 0:
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                vol[z][disc] = rng.normal(hu, 15, disc.sum())
                gt[z][disc] = lab
        vol[z][(yy - 85) ** 2 + (xx - 15) ** 2 <= 25] = 60.0
    return vol, gt


def _gap_of_several_organs():
    """The gap (0, 8) of :func:`_several_organs` with its intensity model and anchor SDFs:
    ``(vol, gt, a, b, ids, opt, model, sdfs)``."""
    from napari_propseg.propagation.interp import _bracket_sdf

    vol, gt = _several_organs()
    a, b = 0, 8
    ids = [1, 2, 3]
    opt = AppearanceOptions()
    model = GapAppearance(vol[a], vol[b], gt[a], gt[b], ids, 1.0, opt)
    sdfs = [_bracket_sdf(gt[a] == i, gt[b] == i) for i in ids]
    return vol, gt, a, b, ids, opt, model, sdfs


def test_the_numpy_fusion_gives_the_torch_fusions_labels():
    """:class:`~napari_propseg.propagation.gap.GuidedGap` (no normalisation, each label in
    its own box) labels every pixel as the whole-slice torch fusion does
    (``guided_indices``), for several weights and softnesses."""
    import torch

    from napari_propseg.propagation.appearance import LOGLIK_SPAN, guided_indices
    from napari_propseg.propagation.gap import GuidedGap

    vol, gt, a, b, ids, opt, model, sdfs = _gap_of_several_organs()
    for weight in (0.25, 1.0, 3.0):
        for z in (1, 4, 6):
            wa = (b - z) / (b - a)
            tau = tau_pixels(opt, z, a, b, SPACING)
            d = torch.from_numpy(np.stack([wa * da + (1.0 - wa) * db for da, db in sdfs]).astype(np.float32))
            ref = guided_indices(d, vol[z], model, wa, tau, weight)
            g = GuidedGap(gt[a], gt[b], ids, LOGLIK_SPAN * weight, tau)
            got = np.zeros_like(ref)
            y0, y1, x0, x1 = g.union
            got[y0:y1, x0:x1] = g.fill(wa, tau, vol[z], model.log_table(wa), [weight])[0]
            assert (got != ref).sum() <= 2, (weight, z, (got != ref).sum())  # float ties at most
            if weight <= 1.0:  # real crops (at the candidates' weights)
                assert min((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in g.boxes) < 96 * 96


def test_each_gap_weight_depends_only_on_its_neighbourhood(monkeypatch):
    """Per-gap weights: a correction recomputes only the triples its two gaps need, leaves
    the weights of the far gaps as they were, and the re-propagated gaps equal those of a
    fresh full propagation with the same anchors."""
    import napari_propseg.propagation.appearance as app

    vol, gt = _several_organs(depth=25)
    anchors = [0, 6, 12, 18, 24]
    seeds = np.zeros_like(gt)
    seeds[anchors] = gt[anchors]
    eng = PropagationEngine(vol, method="interp", spacing=SPACING, weight_scope="gap")
    first = eng.propagate(seeds, anchors)
    assert set(eng.gap_weights) == {(0, 6), (6, 12), (12, 18), (18, 24)}
    before = dict(eng.gap_weights)
    calls = []
    real = app._triple_counts
    monkeypatch.setattr(app, "_triple_counts", lambda *a, **k: calls.append(a[2:5]) or real(*a, **k))
    labels = first.labels.copy()
    labels[9] = gt[9]
    new = sorted(anchors + [9])
    res = eng.repropagate(labels, new, changed=[9])
    assert res.computed == [7, 8, 10, 11]  # only the gaps next to slice 9
    assert sorted(calls) == [(0, 6, 9), (6, 9, 12), (9, 12, 18)]  # only the triples those gaps need
    assert eng.gap_weights[(12, 18)] == before[(12, 18)] and eng.gap_weights[(18, 24)] == before[(18, 24)]
    for z in range(25):
        if z not in res.computed:
            np.testing.assert_array_equal(res.labels[z], labels[z])
    fresh = PropagationEngine(vol, method="interp", spacing=SPACING, weight_scope="gap").propagate(labels, new)
    np.testing.assert_array_equal(res.labels[7:12], fresh.labels[7:12])


def test_volume_scope_keeps_one_weight(monkeypatch):
    from napari_propseg.propagation.appearance import choose_weight

    vol, gt = _several_organs(depth=25)
    anchors = [0, 6, 12, 18, 24]
    seeds = np.zeros_like(gt)
    seeds[anchors] = gt[anchors]
    eng = PropagationEngine(vol, method="interp", spacing=SPACING, weight_scope="volume")
    eng.propagate(seeds, anchors)
    assert eng.gap_weights == {}
    assert (eng.image_weight, eng.image_weight_scores) == choose_weight(vol, seeds, anchors, SPACING, AppearanceOptions())


def test_the_numpy_fusion_with_a_network_term_gives_the_torch_fusions_labels():
    """With the STCN network's term (``n log max(p, floor)``, here a random field that
    claims labels everywhere) the boxes grow by its spread and the labels stay those of
    the whole-slice torch fusion."""
    import math

    import torch

    from napari_propseg.propagation.appearance import LOGLIK_SPAN, guided_indices
    from napari_propseg.propagation.gap import GuidedGap
    from napari_propseg.propagation.stcn_fusion import NETWORK_FLOOR

    vol, gt, a, b, ids, opt, model, sdfs = _gap_of_several_organs()
    rng = np.random.default_rng(3)
    for nw in (0.5, 1.0):
        for z in (2, 4):
            wa = (b - z) / (b - a)
            tau = tau_pixels(opt, z, a, b, SPACING)
            d = torch.from_numpy(np.stack([wa * da + (1.0 - wa) * db for da, db in sdfs]).astype(np.float32))
            p = torch.from_numpy(rng.dirichlet(np.ones(4), size=gt.shape[1:]).astype(np.float32)).permute(2, 0, 1)
            extra = nw * torch.log(p.clamp_min(NETWORK_FLOOR))
            ref = guided_indices(d, vol[z], model, wa, tau, 0.5, extra)
            g = GuidedGap(gt[a], gt[b], ids, LOGLIK_SPAN * 0.5 + nw * math.log(1 / NETWORK_FLOOR), tau)
            got = np.zeros_like(ref)
            y0, y1, x0, x1 = g.union
            got[y0:y1, x0:x1] = g.fill(wa, tau, vol[z], model.log_table(wa), [0.5], extra.numpy())[0]
            assert (got != ref).sum() <= 2, (nw, z, (got != ref).sum())  # float ties at most
