"""Reference-slice suggestion: sampling, ensemble, per-organ best slice, weights folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_propseg.errors import CancelledError, InputError
from napari_propseg.reference import build_reference_model, save_reference_model
from napari_propseg.reference.inference import (
    default_k,
    segment_volume,
    suggest_slices,
    uniform_slices,
)


class ThresholdNet(nn.Module):
    """A stand-in network with known output: class 1 where the abdomen window is > 0.8,
    class 2 where it is in (0.3, 0.7), background elsewhere. Records the zpos it saw."""

    def __init__(self, img_size=32, scale=10.0):
        super().__init__()
        self.config = {"num_classes": 3, "img_size": img_size}
        self.scale = scale
        self.seen_zpos: list[float] = []
        self.seen_shape = None

    def forward(self, x, zpos):
        self.seen_zpos += zpos.tolist()
        self.seen_shape = tuple(x.shape)
        a = x[:, 0]
        c1 = (a > 0.8).float()
        c2 = ((a > 0.3) & (a < 0.7)).float()
        c0 = 1 - c1 - c2
        return self.scale * torch.stack([c0, c1, c2], dim=1)


def _volume():
    """Z=20 slices of 40x40: organ 1 (HU 250) a square whose side peaks at z=11, organ 2
    (HU 50) a square only on slices 5..8, largest on 6."""
    hu = np.full((20, 40, 40), -1000, dtype=np.int16)
    for z in range(20):
        r = max(0, 12 - 2 * abs(z - 11))
        hu[z, 20 - r:20 + r, 5:5 + 2 * r] = 250
    for z, r in [(5, 3), (6, 6), (7, 4), (8, 2)]:
        hu[z, 2:2 + 2 * r, 25:25 + r] = 50
    return hu


def test_default_k_and_uniform_slices():
    assert default_k(3) == 1 and default_k(100) == 20 and default_k(1000) == 64
    assert uniform_slices(20, 4) == [2, 7, 12, 17]
    assert uniform_slices(5, 9) == [0, 1, 2, 3, 4]
    assert uniform_slices(1, 1) == [0]
    with pytest.raises(InputError):
        uniform_slices(10, 0)


def test_suggest_with_known_networks():
    hu = _volume()
    nets = [ThresholdNet(32), ThresholdNet(48)]
    calls = []
    s = suggest_slices(hu, nets, k=4, device="cpu", progress=lambda i, n, m: calls.append((i, n)))
    assert s.sampled == [2, 7, 12, 17]
    # among the sampled slices, organ 1 is largest on 12 and organ 2 exists only on 7
    assert s.per_organ_best == {1: 12, 2: 7}
    assert s.slices == [2, 7, 12, 17]
    assert calls[-1] == (4, 4) and len(calls) == 4
    # each net got its own input size and the relative positions z / (Z - 1)
    assert nets[0].seen_shape[-2:] == (32, 32) and nets[1].seen_shape[-2:] == (48, 48)
    assert nets[0].seen_zpos == pytest.approx([2 / 19, 7 / 19, 12 / 19, 17 / 19])
    # labels only on the suggested slices, equal to the thresholds there (up to the
    # resampling of the square edges)
    assert not s.labels[[z for z in range(20) if z not in s.slices]].any()
    truth = np.where(hu >= 200, 1, np.where((hu > -30) & (hu < 130), 2, 0))
    for z in s.slices:
        agree = (s.labels[z] == truth[z]).mean()
        assert agree > 0.97, (z, agree)
    assert s.areas.shape == (4, 3)


def test_scan_finds_each_organs_largest_slice():
    hu = _volume()
    s = suggest_slices(hu, [ThresholdNet(40)], k=4, scan=1, device="cpu")
    assert s.per_organ_best == {1: 11, 2: 6}
    assert s.slices == [2, 6, 7, 11, 12, 17]
    assert s.processed == list(range(20))
    assert s.labels[6].max() == 2 and s.labels[11].max() == 1


def test_ensemble_sums_probabilities():
    hu = _volume()
    sure, unsure = ThresholdNet(40, scale=10.0), ThresholdNet(40, scale=0.1)

    class Flipped(ThresholdNet):
        def forward(self, x, zpos):  # confident background everywhere
            out = super().forward(x, zpos)
            return torch.stack([torch.full_like(out[:, 0], self.scale), out[:, 1] * 0, out[:, 2] * 0], 1)

    # a confident organ vote outweighs an unsure background vote...
    s = suggest_slices(hu, [sure, Flipped(40, scale=0.1)], k=1, device="cpu", min_agreement=0)
    assert s.labels[s.slices[0]].max() == 1
    # ...unless the two networks' masks disagree strongly: then the organ is left out of
    # the slice and the suggestion says so
    s = suggest_slices(hu, [sure, Flipped(40, scale=0.1)], k=1, device="cpu")
    assert s.labels.max() == 0 and s.dropped == {s.slices[0]: [1]}
    # ...and a confident background vote outweighs an unsure organ vote
    s = suggest_slices(hu, [unsure, Flipped(40)], k=1, device="cpu")
    assert s.labels.max() == 0


def test_cancel_stops():
    with pytest.raises(CancelledError):
        suggest_slices(_volume(), [ThresholdNet()], k=4, device="cpu", cancel=lambda: True)


def test_default_weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPSEG_MODELS", str(tmp_path))
    with pytest.raises(InputError, match="No reference model .abdomen."):
        suggest_slices(_volume(), None, k=2, device="cpu")
    torch.manual_seed(0)
    for preset in ("transunet-tiny", "deeplabv3plus-tiny"):
        net = build_reference_model({"preset": preset, "num_classes": 3})
        save_reference_model(tmp_path / "reference" / f"{preset}.pt", net)
    s = suggest_slices(_volume(), None, k=3, device="cpu")
    assert s.labels.shape == (20, 40, 40) and s.sampled == [3, 10, 16]
    assert set(np.unique(s.labels)) <= {0, 1, 2}
    per_model = segment_volume(_volume(), None, slices=[3, 10], device="cpu")
    assert len(per_model) == 2 and per_model[0].shape == (20, 40, 40)


def test_mismatched_networks_are_refused():
    a = build_reference_model({"preset": "transunet-tiny", "num_classes": 3})
    b = build_reference_model({"preset": "deeplabv3plus-tiny", "num_classes": 4})
    with pytest.raises(InputError, match="different numbers of classes"):
        suggest_slices(_volume(), [a, b], k=2, device="cpu")
    with pytest.raises(InputError, match="3-D"):
        suggest_slices(np.zeros((4, 4)), [a], device="cpu")


@pytest.mark.slow
def test_shipped_starter_weights_segment_an_unseen_phantom():
    """The weights in models/reference load through the default folder and find the large
    organs of a phantom seed they never saw (model card: liver 0.96 over all slices)."""
    from napari_propseg.phantom import make_phantom
    from napari_propseg.weights import models_dir

    shipped = sorted((models_dir() / "reference" / "abdomen").glob("*.pt"))
    assert len(shipped) == 2, f"expected the two shipped reference weight files, found {shipped}"
    ct, lab = make_phantom((40, 128, 128), (4.0, 2.5, 2.5), 999)
    sug = suggest_slices(ct.array, None, k=8, device="cpu")
    zs = sug.slices
    assert len(zs) == 8
    pred, gt = sug.labels[zs], lab.array[zs]
    for organ in (1, 3, 11):  # liver, spleen, stomach (FLARE ids; the phantom uses them too)
        a, b = pred == organ, gt == organ
        assert b.sum() > 200, f"organ {organ} should be on the suggested slices of this phantom"
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.7, f"organ {organ}: Dice {dice:.2f} on the suggested slices"


def test_slice_agreement_hand_case():
    from napari_propseg.reference.inference import slice_agreement

    a = torch.zeros(4, 4, dtype=torch.long)
    a[:2, :2] = 1  # 4 px of class 1
    b = torch.zeros(4, 4, dtype=torch.long)
    b[:2, :1] = 1  # 2 px of class 1
    b[3, 3] = 2  # 1 px of class 2 only B sees
    ens = a.clone()  # the ensemble follows A
    # class 1: A 1.0, B 2*2/(2+4); class 2: A agrees (both empty) 1.0, B 0
    expected = (1.0 + 4 / 6 + 1.0 + 0.0) / 4
    assert slice_agreement([a, b], ens, 3) == pytest.approx(expected)
    assert slice_agreement([torch.zeros_like(a)] * 2, torch.zeros_like(a), 3) == 1.0
    sug = suggest_slices(_volume(), [ThresholdNet(), ThresholdNet()], k=3, device="cpu")
    assert set(sug.agreement) == set(sug.processed) and all(v == pytest.approx(1.0) for v in sug.agreement.values())
