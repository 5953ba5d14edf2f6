"""STCN network: shapes of both variants, top-k affinity vs brute force, soft aggregation,
shared affinity across objects, weight files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_propseg.errors import InputError
from napari_propseg.propagation import network
from napari_propseg.propagation.network import (
    CPU_CONFIG,
    DEFAULT_CONFIG,
    aggregate,
    build_stcn,
    load_stcn,
    memory_affinity,
    others_union,
)
from napari_propseg.propagation.resnet import resnet18, resnet50
from napari_propseg.weights import save_weights

RES = 32


@pytest.fixture(scope="module", params=["default", "cpu"])
def net(request):
    torch.manual_seed(0)
    cfg = DEFAULT_CONFIG if request.param == "default" else CPU_CONFIG
    return build_stcn(dict(cfg, resolution=RES)).eval()


def test_configs_record_the_variants():
    assert DEFAULT_CONFIG["key_backbone"] == "resnet50" and DEFAULT_CONFIG["value_backbone"] == "resnet18"
    assert CPU_CONFIG["key_backbone"] == "resnet18" and CPU_CONFIG["resolution"] == 256
    for cfg in (DEFAULT_CONFIG, CPU_CONFIG):
        assert {"key_backbone", "value_backbone", "key_dim", "value_dim", "top_k", "resolution", "norm"} <= set(cfg)
        assert cfg["top_k"] == 20 and cfg["key_dim"] == 64 and cfg["norm"] == "group"


@pytest.mark.parametrize("make,chans", [(resnet18, (256, 128, 64)), (resnet50, (1024, 512, 256))])
def test_resnet_trunks_stop_at_layer3(make, chans):
    trunk = make(in_channels=5)
    f16, f8, f4 = trunk(torch.zeros(2, 5, 64, 96))
    assert trunk.channels == chans
    assert f16.shape == (2, chans[0], 4, 6) and f8.shape == (2, chans[1], 8, 12) and f4.shape == (2, chans[2], 16, 24)
    assert not hasattr(trunk, "layer4")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())  # GroupNorm by default


def test_shapes(net):
    cfg = net.config
    b, k, t = 2, 3, 4
    h = RES // 16
    with torch.no_grad():
        key, f16, f8, f4 = net.encode_key(torch.rand(b, 3, RES, RES))
        c16 = 1024 if cfg["key_backbone"] == "resnet50" else 256
        assert key.shape == (b, cfg["key_dim"], h, h)
        assert f16.shape == (b, c16, h, h) and f8.shape == (b, c16 // 2, 2 * h, 2 * h) and f4.shape == (b, c16 // 4, 4 * h, 4 * h)
        masks = torch.rand(b, k, RES, RES)
        v = net.encode_value(torch.rand(b, 3, RES, RES), f16, masks, others_union(masks))
        assert v.shape == (b, k, cfg["value_dim"], h, h)
        mk = torch.rand(b, cfg["key_dim"], t, h, h)
        mv = torch.rand(b, k, cfg["value_dim"], t, h, h)
        logits = net.segment(key, f16, f8, f4, mk, mv)
        assert logits.shape == (b, k + 1, RES, RES)
        out = net(torch.rand(b, 3, 3, RES, RES), (torch.rand(b, k, RES, RES) > 0.8).float())
        assert out.shape == (b, 2, k + 1, RES, RES)
        assert torch.isfinite(out).all()


def test_encode_key_rejects_sizes_not_multiple_of_16(net):
    with pytest.raises(ValueError, match="multiples of 16"):
        net.encode_key(torch.rand(1, 3, 40, 40))


def _brute_affinity(mk: np.ndarray, qk: np.ndarray, top_k: int) -> np.ndarray:
    """Reference: -||m - q||^2 / sqrt(C) per pair, softmax over the top-k memory entries."""
    b, c = mk.shape[:2]
    m = mk.reshape(b, c, -1)
    q = qk.reshape(b, c, -1)
    out = np.zeros((b, m.shape[2], q.shape[2]))
    for i in range(b):
        for j in range(q.shape[2]):
            s = -((m[i] - q[i][:, j : j + 1]) ** 2).sum(0) / math.sqrt(c)  # THW
            top = np.argsort(-s)[:top_k]
            e = np.exp(s[top] - s[top].max())
            out[i, top, j] = e / e.sum()
    return out


def test_topk_affinity_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    mk = torch.randn(2, 16, 3, 4, 5, generator=g, dtype=torch.float64).float()
    qk = torch.randn(2, 16, 4, 5, generator=g, dtype=torch.float64).float()
    aff = memory_affinity(mk, qk, top_k=20).numpy()
    ref = _brute_affinity(mk.double().numpy(), qk.double().numpy(), 20)
    assert aff.shape == (2, 60, 20)
    np.testing.assert_allclose(aff, ref, atol=1e-5)
    assert ((aff > 0).sum(axis=1) == 20).all()  # exactly k entries per query
    np.testing.assert_allclose(aff.sum(axis=1), 1.0, atol=1e-5)
    # no top-k: the plain softmax over every memory entry
    full = memory_affinity(mk, qk, top_k=None).numpy()
    np.testing.assert_allclose(full, _brute_affinity(mk.double().numpy(), qk.double().numpy(), 60), atol=1e-5)


def test_soft_aggregation_sums_to_one_and_is_exclusive():
    p = torch.zeros(1, 3, 4, 4)
    p[0, 0, :2] = 0.9  # object 1 on the top half
    p[0, 1, 2:] = 0.8  # object 2 on the bottom half
    p[0, 2, :, :1] = 0.3  # object 3 weak everywhere in column 0
    prob = torch.softmax(aggregate(p), dim=1)
    assert prob.shape == (1, 4, 4, 4)
    torch.testing.assert_close(prob.sum(1), torch.ones(1, 4, 4))
    lab = prob.argmax(1)[0]
    assert (lab[:2] == 1).all() and (lab[2:] == 2).all()
    # nothing anywhere -> background with probability ~1
    empty = torch.softmax(aggregate(torch.zeros(1, 2, 3, 3)), dim=1)
    assert (empty[:, 0] > 0.999).all()
    # two objects both certain on the same pixel still share one unit of probability
    both = torch.softmax(aggregate(torch.ones(1, 2, 1, 1)), dim=1)
    torch.testing.assert_close(both.sum(1), torch.ones(1, 1, 1))
    assert both[0, 0, 0, 0] < 1e-6


def test_affinity_computed_once_for_all_objects(net, monkeypatch):
    calls = []
    real = network.memory_affinity
    monkeypatch.setattr(network, "memory_affinity", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = RES // 16
    with torch.no_grad():
        key, f16, f8, f4 = net.encode_key(torch.rand(1, 3, RES, RES))
        mk = torch.rand(1, net.config["key_dim"], 2, h, h)
        mv = torch.rand(1, 5, net.config["value_dim"], 2, h, h)
        net.segment(key, f16, f8, f4, mk, mv)
    assert len(calls) == 1


def test_objects_read_the_same_affinity():
    """Two identical objects (same values) must get identical probabilities."""
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=RES)).eval()
    h = RES // 16
    with torch.no_grad():
        key, f16, f8, f4 = net.encode_key(torch.rand(1, 3, RES, RES))
        mv1 = torch.rand(1, 1, net.config["value_dim"], 2, h, h)
        mv = torch.cat([mv1, mv1], dim=1)
        logits = net.segment(key, f16, f8, f4, torch.rand(1, 64, 2, h, h), mv)
    torch.testing.assert_close(logits[:, 1], logits[:, 2])


def test_padding_objects_get_zero_probability():
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=RES))
    frames = torch.rand(2, 3, 3, RES, RES)
    masks = torch.zeros(2, 3, RES, RES)
    masks[:, 0, 4:14, 4:14] = 1
    masks[0, 1, 20:30, 20:30] = 1
    out = net(frames, masks, num_objects=torch.tensor([2, 1]))
    prob = torch.softmax(out, dim=2)
    assert prob[1, :, 2:].max() < 1e-5  # clip 1 has one real object: objects 2, 3 are padding
    assert prob[0, :, 3].max() < 1e-5
    out.mean().backward()  # the training path is differentiable end to end
    assert net.key_proj.weight.grad is not None and net.fuser.block1.conv1.weight.grad is not None


def test_build_rejects_bad_config():
    with pytest.raises(ValueError, match="key_backbone"):
        build_stcn(dict(CPU_CONFIG, key_backbone="resnet34"))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_stcn(dict(CPU_CONFIG, resolution=100))


def test_load_stcn_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    net = build_stcn(dict(CPU_CONFIG, resolution=RES)).eval()
    path = save_weights(tmp_path / "w.pt", "stcn", net.config, net.state_dict(), {"note": "random init"})
    loaded = load_stcn(path)
    assert loaded.config == net.config and not loaded.training
    x = torch.rand(1, 3, RES, RES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_key(x)[0], net.encode_key(x)[0])
    # config says ResNet-50 key encoder but the state dict is a ResNet-18 one
    bad = save_weights(tmp_path / "bad.pt", "stcn", dict(net.config, key_backbone="resnet50"), net.state_dict())
    with pytest.raises(InputError, match="do not match the architecture"):
        load_stcn(bad)
    other = save_weights(tmp_path / "ref.pt", "reference", net.config, net.state_dict())
    with pytest.raises(InputError, match="not 'stcn'"):
        load_stcn(other)
    weird = save_weights(tmp_path / "weird.pt", "stcn", dict(net.config, norm="layer"), net.state_dict())
    with pytest.raises(InputError, match="cannot build"):
        load_stcn(weird)


def test_boxed_decoding_equals_whole_slices_and_stays_in_its_box(net):
    """segment_boxes with whole-frame boxes is segment; a smaller box leaves its object
    probability 0 outside and matches the whole-slice decoding away from the box edge."""
    torch.manual_seed(1)
    res = 128
    h = res // 16
    model = build_stcn(dict(net.config, resolution=res)).eval()
    with torch.no_grad():
        key, f16, f8, f4 = model.encode_key(torch.rand(1, 3, res, res))
        mk = torch.randn(1, model.config["key_dim"], 2, h, h)
        mv = torch.randn(1, 3, model.config["value_dim"], 2, h, h)
        whole = model.segment(key, f16, f8, f4, mk, mv)
        query = model.decoder_query(f16, f8, f4)
        same = model.segment_boxes(key, query, mk, mv, [(0, h, 0, h)] * 3)
        torch.testing.assert_close(same, whole, atol=1e-4, rtol=1e-4)
        boxed = model.segment_boxes(key, query, mk, mv, [(0, h, 0, h), (1, 7, 2, 8), (0, h, 0, h)])
    p_whole, p_boxed = torch.softmax(whole, 1)[0], torch.softmax(boxed, 1)[0]
    outside = torch.ones(res, res, dtype=torch.bool)
    outside[16:112, 32:128] = False
    assert p_boxed[2][outside].max() < 1e-5
    assert p_boxed[2][~outside].max() > 1e-3
    inner = (p_boxed[2, 48:80, 64:96] - p_whole[2, 48:80, 64:96]).abs().max()
    edge = (p_boxed[2][~outside] - p_whole[2][~outside]).abs().max()
    assert inner <= edge


def test_boxed_decoding_rejects_a_box_per_object_mismatch():
    net = build_stcn(dict(CPU_CONFIG, resolution=RES)).eval()
    h = RES // 16
    with torch.no_grad():
        key, f16, f8, f4 = net.encode_key(torch.rand(1, 3, RES, RES))
        with pytest.raises(ValueError, match="one box per object"):
            net.segment_boxes(key, net.decoder_query(f16, f8, f4), torch.rand(1, 64, 1, h, h), torch.rand(1, 2, 256, 1, h, h),
                              [(0, h, 0, h)])


def test_slice_values_share_the_common_parts_and_equal_encode_value(net):
    torch.manual_seed(2)
    res = 64
    model = build_stcn(dict(net.config, resolution=res)).eval()
    for p in model.parameters():  # away from the zero-initialised residual branches, so every part counts
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        frame = torch.rand(1, 3, res, res)
        _, f16, _, _ = model.encode_key(frame)
        masks = (torch.rand(1, 3, res, res) > 0.7).float()
        whole = model.encode_value(frame, f16, masks, others_union(masks))
        shared = model.encode_slice_values(frame, f16, masks, others_union(masks))
    assert shared.shape == whole.shape
    assert (shared - whole).abs().max() <= 1e-4 * whole.abs().max()  # float32 rounding only
