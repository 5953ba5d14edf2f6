"""Shape and behaviour tests of the reference networks (TransUNet, DeepLabV3+, IFE)."""
from __future__ import annotations

import math

import pytest
import torch

from napari_propseg.errors import InputError
from napari_propseg.reference import (
    build_reference_model,
    load_reference_model,
    resolve_config,
    save_reference_model,
)
from napari_propseg.reference.ife import IFE, curvature_score, entropy_score
from napari_propseg.reference.transunet import n_parameters
from napari_propseg.weights import save_weights


@pytest.mark.parametrize("size", [224, 512])
def test_transunet_full_parameter_count(size):
    net = build_reference_model({"preset": "transunet", "num_classes": 9, "img_size": size})
    n = n_parameters(net)
    # TransUNet R50-ViT-B/16 with 9 classes has 105.28 M parameters at 224; the larger
    # position embedding at 512 adds (32*32 - 14*14) * 768 = 0.64 M.
    assert 104.5e6 < n < 106.5e6
    assert len(net.layers) == 12 and net.config["hidden_size"] == 768 and net.config["mlp_dim"] == 3072
    assert [len(s) for s in net.backbone.body] == [3, 4, 9]


@pytest.mark.slow
def test_transunet_full_forward_at_other_size_interpolates_position_embedding():
    torch.manual_seed(0)
    net = build_reference_model({"preset": "transunet", "num_classes": 14, "img_size": 224}).eval()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, 256, 256), torch.tensor([0.4]))
    assert y.shape == (1, 14, 256, 256)
    assert torch.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["transunet-small", "deeplabv3plus-small"])
@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("use_position", [True, False])
def test_small_variants_shapes(preset, size, use_position):
    torch.manual_seed(0)
    net = build_reference_model({"preset": preset, "num_classes": 5, "use_position": use_position}).eval()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, size, size), torch.tensor([0.25]))
    assert y.shape == (1, 5, size, size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("method", ["curvature", "entropy"])
@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("use_position", [True, False])
def test_deeplab_ife_shapes(method, size, use_position):
    torch.manual_seed(0)
    cfg = {"preset": "deeplabv3plus-small", "num_classes": 4, "ife": method, "use_position": use_position}
    net = build_reference_model(cfg)
    assert net.ife_low.out_channels == 48 + 36
    assert net.ife_aspp.out_channels == 128 + 96
    net.eval()
    with torch.inference_mode():
        y = net(torch.rand(1, 3, size, size), torch.tensor([0.75]))
    assert y.shape == (1, 4, size, size)


def test_deeplab_full_width_ife_channels():
    net = build_reference_model({"preset": "deeplabv3plus", "ife": "curvature", "ife_ratio": [0.75, 0.5]})
    assert net.ife_low.out_channels == 48 + 36  # 0.75 of the 48 low-level channels
    assert net.ife_aspp.out_channels == 256 + 128  # 0.5 of the 256 ASPP channels
    assert net.decoder[0][0].in_channels == 84 + 384


@pytest.mark.parametrize("preset", ["transunet-tiny", "deeplabv3plus-tiny"])
def test_position_encoding_changes_output_only_when_on(preset):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    on = build_reference_model({"preset": preset, "num_classes": 3}).eval()
    off = build_reference_model({"preset": preset, "num_classes": 3, "use_position": False}).eval()
    with torch.inference_mode():
        a, b = on(x, torch.tensor([0.0, 0.0])), on(x, torch.tensor([1.0, 1.0]))
        c, d = off(x, torch.tensor([0.0, 0.0])), off(x, torch.tensor([1.0, 1.0]))
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)
    head = on.segmentation_head if preset.startswith("trans") else on.head
    assert head.in_channels == (8 if preset.startswith("trans") else 32) + 1


@pytest.mark.parametrize("preset", ["transunet-tiny", "deeplabv3plus-tiny"])
def test_backward_and_training_batch(preset):
    net = build_reference_model({"preset": preset, "num_classes": 3, "ife": "entropy"} if "deep" in preset else preset)
    net.train()
    y = net(torch.rand(2, 3, 64, 64), torch.tensor([0.1, 0.6]))
    y.mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_curvature_score_zero_for_flat_positive_for_edges():
    flat = torch.ones(1, 1, 16, 16)
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 4:12, 4:12] = 1.0
    s = curvature_score(torch.cat([flat, edge], dim=1))[0]
    assert s[0] == 0  # the filter sums to zero
    assert s[1] > 0
    # A single unit impulse: |response| sum = 1 + 4*5/16 + 4*1/16 = 2.5
    imp = torch.zeros(1, 1, 9, 9)
    imp[..., 4, 4] = 1
    assert curvature_score(imp)[0, 0].item() == pytest.approx(2.5)


def test_entropy_score_hand_cases():
    flat = torch.full((1, 1, 8, 8), 3.0)
    assert entropy_score(flat, bins=4)[0, 0].item() == pytest.approx(0.0)
    # Left half 0, right half 1 on an 8x8 plane: four (value, mean) pairs.
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1.0
    # column 3 (value 0) sees mean 1/3 -> bin 1; column 4 (value 1) sees mean 2/3 -> bin 2 (4 bins).
    # pairs: (0,0) 24 px, (0,1) 8 px, (3,2) 8 px, (3,3) 24 px over 64 px.
    p = torch.tensor([24, 8, 8, 24]) / 64.0
    expected = float(-(p * torch.log2(p)).sum())
    assert entropy_score(x, bins=4)[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_ife_selects_structured_channels_and_concatenates():
    torch.manual_seed(0)
    x = torch.zeros(1, 4, 16, 16)
    x[0, 1] = torch.rand(16, 16)  # noisy: highest curvature and entropy
    x[0, 3, 4:12, 4:12] = 1.0  # a square
    for method in ("curvature", "entropy"):
        ife = IFE(4, ratio=0.5, method=method, bins=8)
        y = ife(x)
        assert y.shape == (1, 6, 16, 16)
        assert torch.equal(y[:, :4], x)
        chosen = {c for c in range(4) for k in (4, 5) if torch.equal(y[0, k], x[0, c])}
        assert chosen == {1, 3}


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    net = build_reference_model({"preset": "deeplabv3plus-tiny", "num_classes": 3, "ife": "curvature"}).eval()
    path = save_reference_model(tmp_path / "dl.pt", net, meta={"steps": 0})
    back = load_reference_model(path)
    assert back.config == net.config and back.meta == {"steps": 0}
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(back(x, torch.tensor([0.3])), net(x, torch.tensor([0.3])))


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    net = build_reference_model({"preset": "transunet-tiny", "num_classes": 3})
    cfg = dict(net.config, num_classes=4)
    save_weights(tmp_path / "bad.pt", "reference", cfg, net.state_dict())
    with pytest.raises(InputError, match="do not match"):
        load_reference_model(tmp_path / "bad.pt")


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown reference preset"):
        resolve_config("unet")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_reference_model({"preset": "transunet-tiny", "img_size": 60})
    with pytest.raises(ValueError, match="IFE method"):
        build_reference_model({"preset": "deeplabv3plus-tiny", "ife": "sobel"})
    assert math.isclose(resolve_config("transunet")["img_size"], 224)
