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
