"""Classical propagation: SDF interpolation between anchors and copy-nearest."""
from __future__ import annotations

import numpy as np
import pytest

from napari_propseg.errors import CancelledError, InputError
from napari_propseg.propagation.interp import check_anchors, copy_nearest, sdf_interpolate, sdf_interpolate_with_confidence, signed_distance

N = 64


def _disc(r: float, cy: float = 32, cx: float = 32) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_two_discs_give_intermediate_radii():
    lab = np.zeros((11, N, N), np.uint8)
    lab[0][_disc(6)] = 1
    lab[10][_disc(26)] = 1
    out = sdf_interpolate(lab, [0, 10])
    assert np.array_equal(out[0], lab[0]) and np.array_equal(out[10], lab[10])
    radii = [np.sqrt((out[z] == 1).sum() / np.pi) for z in range(11)]
    for z in range(1, 10):
        expected = 6 + 2 * z  # the radius grows linearly along z
        assert abs(radii[z] - expected) < 1.0, (z, radii[z], expected)
    assert all(a < b for a, b in zip(radii, radii[1:]))
    # overlapping discs: the interpolated one moves halfway between the centres
    lab2 = np.zeros((5, N, N), np.uint8)
    lab2[0][_disc(10, 28, 28)] = 1
    lab2[4][_disc(10, 36, 38)] = 1
    mid = sdf_interpolate(lab2, [0, 4])[2] == 1
    cy, cx = np.argwhere(mid).mean(0)
    assert abs(cy - 32) < 1 and abs(cx - 33) < 1


def test_nothing_outside_the_outermost_anchors_and_dtype_kept():
    lab = np.zeros((9, N, N), np.uint16)
    lab[3][_disc(10)] = 300
    lab[6][_disc(12)] = 300
    lab[0][_disc(5)] = 4  # not an anchor: ignored
    out = sdf_interpolate(lab, [3, 6])
    assert out.dtype == np.uint16
    assert not out[:3].any() and not out[7:].any()
    assert (out[4] == 300).sum() > 0 and set(np.unique(out)) == {0, 300}


def test_label_on_one_anchor_shrinks_to_nothing():
    lab = np.zeros((6, N, N), np.uint8)
    lab[0][_disc(15)] = 2
    out = sdf_interpolate(lab, [0, 5])
    radii = [np.sqrt((out[z] == 2).sum() / np.pi) for z in range(6)]
    assert radii[5] == 0 and radii[4] > 0
    for z in range(1, 5):  # eroded at a constant rate: ~3.3 pixels per slice
        assert abs(radii[z] - 15.5 * (1 - z / 5)) < 1.2, (z, radii[z])


def test_identical_anchors_reproduce_themselves_and_labels_stay_exclusive():
    sl = np.zeros((N, N), np.uint8)
    sl[_disc(10, 32, 20)] = 1
    sl[_disc(10, 32, 42)] = 2
    sl[_disc(5, 10, 10)] = 3
    lab = np.zeros((5, N, N), np.uint8)
    lab[0] = lab[4] = sl
    out = sdf_interpolate(lab, [0, 4])
    for z in range(5):
        assert np.array_equal(out[z], sl)


def test_signed_distance_sign_and_zero_level():
    m = _disc(10)
    d = signed_distance(m)
    assert (d[m] < 0).all() and (d[~m] > 0).all()
    assert np.isclose(d[32, 32], -10.0, atol=1.0)  # distance to a radius-10 boundary


def test_confidence_low_where_anchors_disagree():
    lab = np.zeros((9, N, N), np.uint8)
    lab[0][_disc(5, 20, 20)] = 1
    lab[8][_disc(20, 40, 40)] = 1
    _, conf = sdf_interpolate_with_confidence(lab, [0, 8])
    assert conf[0] == conf[8] == 1.0
    assert np.argmin(conf) == 4 and conf[4] < conf[2] < conf[1] < 1.0
    same = np.zeros_like(lab)
    same[0] = same[8] = lab[0]
    _, conf_same = sdf_interpolate_with_confidence(same, [0, 8])
    assert (conf_same == 1.0).all()


def test_progress_and_cancel():
    lab = np.zeros((6, N, N), np.uint8)
    lab[0][_disc(5)] = 1
    lab[5][_disc(9)] = 1
    steps = []
    sdf_interpolate(lab, [0, 5], progress=lambda s, t, m: steps.append((s, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(CancelledError):
        sdf_interpolate(lab, [0, 5], cancel=lambda: True)


def test_copy_nearest():
    lab = np.zeros((7, 4, 4), np.uint8)
    lab[1] = 1
    lab[4] = 2
    out = copy_nearest(lab, [4, 1])
    assert [int(out[z, 0, 0]) for z in range(7)] == [1, 1, 1, 2, 2, 2, 2]  # tie at 2.5 -> none; z=0 -> 1


def test_anchor_validation():
    assert check_anchors([5, 2, 5], 6) == [2, 5]
    with pytest.raises(InputError, match="No anchor"):
        check_anchors([], 6)
    with pytest.raises(InputError, match="outside"):
        sdf_interpolate(np.zeros((3, 4, 4), np.uint8), [0, 3])


def _old_signed_distance(mask):
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (outside - inside + np.where(mask, 0.5, -0.5)).astype(np.float32)


def test_signed_distance_is_exactly_scipys():
    """The fast transform (edt) gives bit for bit the distances of scipy's, also for
    random, thin, border-touching and all-True masks."""
    rng = np.random.default_rng(0)
    masks = [rng.random((40, 53)) < p for p in (0.02, 0.3, 0.7, 0.98)]
    masks += [_disc(20, 0, 0), _disc(3), np.eye(N, dtype=bool), np.ones((7, 9), bool)]
    for m in masks:
        np.testing.assert_array_equal(signed_distance(m), _old_signed_distance(m))


def test_hu_bins_are_searchsorteds():
    from napari_propseg.propagation.gap import HU_EDGES, hu_bins

    hu = np.concatenate([np.arange(-1100.0, 3000.0, 0.5), HU_EDGES, np.nextafter(HU_EDGES, -np.inf), np.nextafter(HU_EDGES, np.inf),
                         [-1e-30, 1e-30, -0.0, np.inf, -np.inf, np.nan], np.random.default_rng(0).normal(0, 300, 5000)])
    hu = hu.astype(np.float32)
    ref = np.clip(np.searchsorted(HU_EDGES, hu, side="right") - 1, 0, len(HU_EDGES) - 2)
    np.testing.assert_array_equal(hu_bins(hu), ref)
    ints = np.arange(-2000, 3001, dtype=np.int16)  # CT files store integers
    np.testing.assert_array_equal(hu_bins(ints), np.clip(np.searchsorted(HU_EDGES, ints.astype(np.float32), side="right") - 1,
                                                         0, len(HU_EDGES) - 2))


def test_plain_interpolation_on_boxes_equals_the_whole_slice(monkeypatch):
    """Computing each label only near its masks changes no pixel (several labels that
    touch, one missing on an anchor, one at the border)."""
    import napari_propseg.propagation.interp as interp

    lab = np.zeros((9, N, N), np.uint8)
    lab[0][_disc(10, 20, 20)] = 1
    lab[8][_disc(14, 30, 26)] = 1
    lab[0][_disc(8, 20, 36)] = 2  # touches label 1, gone on the other anchor
    lab[8][_disc(12, 63, 63)] = 3  # at the border, only on one anchor
    lab[4][_disc(5, 40, 40)] = 2
    got = sdf_interpolate(lab, [0, 4, 8])

    def whole(labels, a, b, ids, sdf_cache=None):  # the reference: whole-slice distances, as before
        sdfs = [interp._bracket_sdf(labels[a] == i, labels[b] == i) for i in ids]

        def fill(z, wa, wb):
            best = np.zeros(labels.shape[1:], np.float32)
            sl = np.zeros(labels.shape[1:], labels.dtype)
            for i, (da, db) in zip(ids, sdfs):
                d = wa * da + wb * db
                sl[d < best] = i
                best = np.minimum(best, d)
            return sl

        return fill

    monkeypatch.setattr(interp, "_sdf_gap", whole)
    np.testing.assert_array_equal(got, sdf_interpolate(lab, [0, 4, 8]))
