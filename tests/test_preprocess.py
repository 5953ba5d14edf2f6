"""CT windowing (network input), display presets and slice resizing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_propseg.preprocess import DISPLAY_PRESETS, WINDOWS, resize_slices, window_ct


def test_windows_are_the_seed_pipeline_windows():
    assert list(WINDOWS) == ["abdomen", "chest", "bone"]
    assert WINDOWS == {"abdomen": (-150.0, 250.0), "chest": (-1350.0, 225.0), "bone": (-500.0, 1300.0)}


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_exact_values_at_window_edges_and_channel_order(lib):
    hu = np.array([[-2000, -1350, -500, -150, 0, 225, 250, 1300, 3000]], dtype=np.int16)
    x = hu if lib == "numpy" else torch.from_numpy(hu)
    out = window_ct(x)
    out = out if lib == "numpy" else out.numpy()
    assert out.dtype == np.float32 and out.shape == (3, 1, 9)
    abd, chest, bone = out[0, 0], out[1, 0], out[2, 0]
    # each channel: 0 at and below low, 1 at and above high, exactly
    assert abd[3] == 0.0 and abd[6] == 1.0 and abd[0] == 0.0 and abd[-1] == 1.0
    assert chest[1] == 0.0 and chest[5] == 1.0 and chest[0] == 0.0 and chest[-1] == 1.0
    assert bone[2] == 0.0 and bone[7] == 1.0 and bone[0] == 0.0 and bone[-1] == 1.0
    # linear in between, channel order abdomen, chest, bone
    np.testing.assert_allclose(abd[4], 150 / 400, rtol=1e-6)
    np.testing.assert_allclose(chest[4], 1350 / 1575, rtol=1e-6)
    np.testing.assert_allclose(bone[4], 500 / 1800, rtol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("shape,expected", [((5, 7), (3, 5, 7)), ((4, 5, 7), (4, 3, 5, 7)), ((2, 4, 5, 7), (2, 4, 3, 5, 7))])
def test_window_shapes(shape, expected):
    hu = np.random.default_rng(0).uniform(-1500, 2000, shape).astype(np.float32)
    out = window_ct(hu)
    assert out.shape == expected
    # the channel axis sits before (Y, X): slice z of the volume equals the windowed slice
    if len(shape) == 3:
        np.testing.assert_array_equal(out[2], window_ct(hu[2]))
    t = window_ct(torch.from_numpy(hu))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == expected
    np.testing.assert_allclose(t.numpy(), out, atol=1e-6)


def test_window_rejects_bad_input():
    with pytest.raises(ValueError):
        window_ct(np.zeros(5))
    with pytest.raises(ValueError):
        window_ct(np.zeros((2, 2)), windows=[(10, 10)])
    assert window_ct(np.zeros((2, 2)), windows=[(-1, 1)]).shape == (1, 2, 2)


def test_display_presets():
    assert set(DISPLAY_PRESETS) == {"abdomen", "liver", "lung", "bone", "brain"}
    for lo, hi in DISPLAY_PRESETS.values():
        assert lo < hi
    # standard W/L: lung W1500 L-600, brain W80 L40
    assert DISPLAY_PRESETS["lung"] == (-1350.0, 150.0) and DISPLAY_PRESETS["brain"] == (0.0, 80.0)


def test_resize_slices_nearest_keeps_ids_and_dtype():
    lab = np.zeros((2, 8, 8), np.uint16)
    lab[:, :4, :4] = 300
    lab[:, 4:, 4:] = 7
    small = resize_slices(lab, (4, 4), mode="nearest")
    assert small.dtype == np.uint16 and small.shape == (2, 4, 4)
    assert set(np.unique(small)) == {0, 7, 300}
    assert (small[:, :2, :2] == 300).all() and (small[:, 2:, 2:] == 7).all()
    big = resize_slices(torch.from_numpy(lab.astype(np.int64)), (16, 16), mode="nearest")
    assert big.dtype == torch.int64 and tuple(big.shape) == (2, 16, 16)
    assert (big[:, :8, :8] == 300).all()


def test_resize_slices_bilinear():
    img = np.random.default_rng(1).normal(size=(3, 2, 10, 12)).astype(np.float32)
    out = resize_slices(img, (5, 6))
    assert out.shape == (3, 2, 5, 6) and out.dtype == np.float32
    const = np.full((4, 6), 42.0, np.float32)
    np.testing.assert_allclose(resize_slices(const, (9, 9)), 42.0, rtol=1e-6)
    same = resize_slices(img, (10, 12))
    np.testing.assert_array_equal(same, img)
    with pytest.raises(ValueError):
        resize_slices(img, (5, 5), mode="cubic")
