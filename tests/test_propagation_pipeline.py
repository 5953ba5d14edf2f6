"""The one builder (``napari_propseg.pipeline``): one set of defaults, only non-default
settings reach a factory, a reused engine must match the settings, results carry the
image weight, and the body crop is one object shared by training and inference."""
from __future__ import annotations

import numpy as np
import pytest

from napari_propseg.crop import BodyCrop, body_bbox, crop_pad
from napari_propseg.errors import InputError
from napari_propseg.pipeline import EngineSettings, make_engine, propagate
from napari_propseg.propagation.engine import PropagationEngine
from napari_propseg.propagation.options import NETWORK_WEIGHT


def _case(depth=10, shape=(20, 18)):
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 100, (depth,) + shape).astype(np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    for a, w in ((1, 6), (5, 8), (8, 7)):
        lab[a, 4:4 + w, 3:10] = 1
    return vol, lab, [1, 5, 8]


def test_only_settings_that_differ_from_the_defaults_reach_the_factory():
    calls = []

    def factory(vol, **kw):
        calls.append(kw)
        return "engine"

    vol = np.zeros((3, 4, 4), np.float32)
    assert make_engine(vol, engine_factory=factory) == "engine"
    assert calls[-1] == {"method": "stcn", "device": "auto"}
    make_engine(vol, EngineSettings(method="interp", device="cpu", image_weight=0, network_weight=NETWORK_WEIGHT),
                spacing=(2, 1, 1), engine_factory=factory)
    assert calls[-1] == {"method": "interp", "device": "cpu", "spacing": (2.0, 1.0, 1.0), "appearance": {"weight": 0.0}}
    make_engine(vol, EngineSettings(weights="w.pt", adapt_steps=3, network_weight=1.0, options={"prior": "none"}),
                engine_factory=factory)
    assert calls[-1] == {"method": "stcn", "device": "auto", "weights": "w.pt", "adapt_steps": 3, "network_weight": 1.0,
                         "prior": "none"}
    with pytest.raises(InputError, match="Unknown propagation method"):
        EngineSettings(method="magic")


def test_propagate_is_the_engine_and_the_result_carries_the_weight():
    vol, lab, anchors = _case()
    direct = PropagationEngine(vol, method="interp", spacing=(2.0, 1.0, 1.0)).propagate(lab, anchors)
    res = propagate(vol, lab, anchors, EngineSettings(method="interp", device="cpu"), spacing=(2.0, 1.0, 1.0))
    np.testing.assert_array_equal(res.labels, direct.labels)
    np.testing.assert_array_equal(res.confidence, direct.confidence)
    assert res.method == "interp" and res.image_weight == direct.image_weight and res.image_weight_auto
    fixed = propagate(vol, lab, anchors, EngineSettings(method="interp", image_weight=0.25))
    assert fixed.image_weight == 0.25 and not fixed.image_weight_auto


def test_a_reused_engine_must_match_the_settings():
    vol, lab, anchors = _case()
    eng = make_engine(vol, EngineSettings(method="interp", device="cpu"))
    first = propagate(vol, lab, anchors, EngineSettings(method="interp", device="cpu"), engine=eng)
    again = propagate(vol, first.labels, anchors, EngineSettings(method="interp", device="cpu"), engine=eng, changed=[5])
    assert again.computed == [2, 3, 4, 6, 7]
    with pytest.raises(InputError, match="'stcn'"):
        propagate(vol, lab, anchors, EngineSettings(method="stcn", device="cpu"), engine=eng)
    with pytest.raises(InputError, match="'auto'"):
        propagate(vol, lab, anchors, EngineSettings(method="interp"), engine=eng)


def test_bench_builder_goes_through_the_pipeline():
    from napari_propseg.bench.protocol import make_stcn_engine

    vol, _, _ = _case()
    eng = make_stcn_engine(vol, method="interp", appearance={"weight": 0.0})
    assert eng.appearance.weight == 0.0 and not eng.appearance.auto
    eng = make_stcn_engine(vol, method="interp", appearance={"tau_mm": 2.0})
    assert eng.appearance.tau_mm == 2.0 and eng.appearance.auto


def test_body_crop_is_one_object_for_training_and_inference():
    hu = np.full((4, 30, 40), -1000.0, np.float32)
    hu[:, 5:25, 8:30] = 40.0
    box = body_bbox(hu, (2.0, 1.0, 1.0))
    bc = BodyCrop.for_weights("body", hu, (2.0, 1.0, 1.0))
    assert bc.box == box
    vol = bc.crop(hu, -1000.0)
    assert vol.shape[1:] == bc.size(hu.shape[1:])
    np.testing.assert_array_equal(vol, crop_pad(hu, box, -1000.0))
    lab = np.zeros(hu.shape[1:], np.uint8)
    lab[10:15, 12:20] = 3
    back = bc.place(bc.crop(lab, 0), lab.shape, lab.dtype)
    np.testing.assert_array_equal(back, lab)  # the body box holds every labelled pixel
    wide = BodyCrop((-3, 33, -2, 42))  # a box larger than the slice: padded, then cut back
    np.testing.assert_array_equal(wide.place(wide.crop(lab, 0), lab.shape, lab.dtype), lab)
    assert BodyCrop.for_weights("none", hu).crop(lab, 0) is lab
    from napari_propseg.training import data as D

    assert D.body_bbox is body_bbox  # training imports the same function
