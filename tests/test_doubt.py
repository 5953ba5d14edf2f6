"""Check next's expected-gain model (napari_propseg.propagation.doubt)."""
import numpy as np
import pytest

from napari_propseg.propagation.doubt import CheckNextModel, gap_gains, slice_doubt, suggest_slice


def _disk(shape, cy, cx, r, value):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, dtype=np.uint8)
    out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    return out


def _volume(radii, value=1, shape=(32, 32)):
    return np.stack([_disk(shape, 16, 16, r, value) if r else np.zeros(shape, np.uint8) for r in radii])


def test_the_gap_whose_anchors_disagree_is_checked_first():
    # anchors 0, 10, 20: radius 5 -> 5 (agree) and 5 -> 12 (disagree); both gaps 10 long
    radii = [5] * 11 + [8] * 9 + [12]
    labels = _volume(radii)
    z = suggest_slice(labels, [0, 10, 20])
    assert z == 15


def test_a_longer_gap_wins_when_the_anchors_agree_equally():
    radii = [6] * 31
    labels = _volume(radii)
    assert suggest_slice(labels, [0, 6, 30], model=CheckNextModel(outer_reach=0)) == 18


def test_labels_count_by_their_own_size_as_mean_dice_does():
    # a big label changing a little on gap A, a small label changing a lot (relatively) on gap B
    z, shape = 21, (64, 64)
    labels = np.zeros((z,) + shape, dtype=np.uint8)
    for s in range(z):
        labels[s] = _disk(shape, 20, 20, 16 if s < 10 else 17, 1)
        small = _disk(shape, 50, 50, 2 if s < 15 else 4, 2)
        labels[s][small > 0] = 2
    # gap 0-10: the big disk grows by one pixel of radius (about 100 pixels) -> small relative change
    # gap 10-20: the small disk grows from radius 2 to 4 (about 37 pixels) -> large relative change
    assert suggest_slice(labels, [0, 10, 20], model=CheckNextModel(outer_reach=0)) == 15


def test_anchors_and_excluded_slices_are_never_suggested_and_none_when_all_are_taken():
    labels = _volume([4, 5, 6])
    assert suggest_slice(labels, [0, 2]) == 1
    assert suggest_slice(labels, [0, 2], exclude=[1]) is None
    assert suggest_slice(labels, [0, 1, 2]) is None


def test_labels_running_off_the_outermost_anchor_point_beyond_it():
    # every gap between anchors is one slice long; the label is large on the last anchor
    labels = _volume([6] * 10)
    z = suggest_slice(labels, list(range(0, 8)))
    assert z in (8, 9)


def test_nothing_doubtful_falls_back_to_the_longest_stretch():
    labels = np.zeros((20, 8, 8), dtype=np.uint8)
    assert suggest_slice(labels, [0, 4]) == 12
    d = slice_doubt(labels, [0, 4])  # the engine's confidence (1 - d) names the same slice
    assert int(np.argmax(d)) == 12 and d[[0, 4]].tolist() == [0.0, 0.0]


def test_locked_labels_are_not_scored():
    radii = [5] * 11 + [8] * 9 + [12]
    labels = _volume(radii)
    gains = gap_gains(labels, [0, 10, 20], locked_labels=[1])
    assert gains and all(g == 0.0 for g, _, _ in gains)
    assert any(g > 0.0 for g, _, _ in gap_gains(labels, [0, 10, 20]))


def test_slice_doubt_is_a_display_curve_peaking_at_the_suggestion():
    radii = [5] * 11 + [8] * 9 + [12]
    labels = _volume(radii)
    d = slice_doubt(labels, [0, 10, 20])
    assert d.shape == (21,) and d.dtype == np.float32
    assert d.min() >= 0.0 and d.max() == pytest.approx(1.0)
    assert d[[0, 10, 20]].tolist() == [0.0, 0.0, 0.0]
    assert int(np.argmax(d)) == suggest_slice(labels, [0, 10, 20])


def test_bad_shape_is_one_clear_sentence():
    from napari_propseg.errors import InputError

    with pytest.raises(InputError, match="Z, Y, X"):
        gap_gains(np.zeros((4, 4), dtype=np.uint8), [0])
