"""Each reference loss against a case computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from napari_propseg.reference.losses import (
    ce_loss,
    dice_loss,
    dice_loss_probs,
    godc_loss,
    godc_loss_probs,
    lovasz_softmax,
    merge_unlabeled,
    supervised_loss,
    target_adaptive_loss,
)


def _logits(fg):
    """Two-class logits whose softmax is (1 - fg, fg). fg: (B, H, W)."""
    fg = torch.as_tensor(fg, dtype=torch.float64)
    return torch.log(torch.stack([1 - fg, fg], dim=1))


FG = [[[0.9, 0.2], [0.6, 0.1]]]
TARGET = torch.tensor([[[1, 0], [1, 0]]])


def test_dice_hand_case():
    # I = 0.9 + 0.6 = 1.5; U = (0.9 + 0.2 + 0.6 + 0.1) + 2 = 3.8; loss = 1 - 3 / 3.8
    assert dice_loss(_logits(FG), TARGET, smooth=0).item() == pytest.approx(1 - 3 / 3.8)
    # with background: class 0 has I = 0.8 + 0.9 = 1.7, U = 2.2 + 2 = 4.2
    both = ((1 - 3 / 3.8) + (1 - 3.4 / 4.2)) / 2
    assert dice_loss(_logits(FG), TARGET, smooth=0, include_background=True).item() == pytest.approx(both)


def test_dice_perfect_prediction_is_zero():
    fg = TARGET.double() * 0.999999 + 0.0000005
    assert dice_loss(_logits(fg), TARGET, smooth=0).item() == pytest.approx(0.0, abs=1e-5)


def test_ce_hand_case():
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.9)) / 4
    assert ce_loss(_logits(FG), TARGET).item() == pytest.approx(expected)


def test_lovasz_hand_case():
    # fg probabilities 0.8, 0.3, 0.6, 0.1 for targets 1, 0, 1, 0 (see the derivation:
    # class 1 errors sorted .4 .3 .2 .1 with Jaccard increments .5, 1/6, 1/3, 0 -> 0.31667;
    # class 0 errors sorted .4 .3 .2 .1 with increments 1/3, 1/3, 1/12, 1/4 -> 0.275).
    fg = [[[0.8, 0.3], [0.6, 0.1]]]
    expected = (0.4 * 0.5 + 0.3 / 6 + 0.2 / 3 + 0.4 / 3 + 0.3 / 3 + 0.2 / 12 + 0.1 / 4) / 2
    assert lovasz_softmax(_logits(fg), TARGET).item() == pytest.approx(expected)


def test_lovasz_equals_jaccard_loss_for_hard_predictions():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 6))
    pred = torch.randint(0, 3, (2, 6, 6))
    probs = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).double()
    logits = torch.log(probs.clamp_min(1e-30))
    ious = []
    for c in range(3):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        ious.append(1 - inter / union)
    assert lovasz_softmax(logits, target).item() == pytest.approx(sum(ious) / 3, abs=1e-9)


def test_godc_hand_case_and_equivalence_to_batch_dice():
    # sample 1: p = (.5, .5), g = (1, 0): I = .5, U = 2, Dice loss .5
    # sample 2: p = (.1, .1), g = (0, 0): I = 0, U = .2, Dice loss 1
    # mean U = 1.1 -> weights 2/1.1, .2/1.1 -> GODC = (0.5*2 + 1*0.2) / 1.1 / 2 = 0.54545
    fg = torch.tensor([[[0.5, 0.5]], [[0.1, 0.1]]], dtype=torch.float64)
    probs = torch.stack([1 - fg, fg], dim=1)
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    godc = godc_loss_probs(probs, target, smooth=0).item()
    assert godc == pytest.approx(1.2 / 1.1 / 2)
    assert godc == pytest.approx(1 - 2 * 0.5 / 2.2)  # batch-global Dice loss
    assert dice_loss_probs(probs, target, smooth=0).item() == pytest.approx(0.75)  # plain per-slice Dice differs
    assert godc_loss(torch.log(probs), target, smooth=0).item() == pytest.approx(godc)


def test_merge_unlabeled_and_tal_hand_case():
    # 3 classes, the dataset labels background and class 1 only.
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]], dtype=torch.float64).T.reshape(1, 3, 1, 2)
    labeled = torch.tensor([[True, True, False]])
    merged = merge_unlabeled(probs, labeled)
    assert torch.allclose(merged[0, :, 0, 0], torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64))
    assert torch.allclose(merged[0, :, 0, 1], torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64))
    target = torch.tensor([[[0, 1]]])
    ce = -(math.log(0.7) + math.log(0.6)) / 2
    dice = 1 - 1.2 / 1.9  # class 1: I = .6, U = (.3 + .6) + 1
    loss = target_adaptive_loss(torch.log(probs), target, labeled).item()
    assert loss == pytest.approx(ce + dice, rel=1e-4)
    # without merging the CE would charge the unlabeled organ's mass to background
    assert ce_loss(torch.log(probs), target).item() == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2)


def test_supervised_loss_dispatch_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    for kind in ("dice_ce", "godc_ce", "dice", "ce", "lovasz", "lovasz_ce"):
        loss = supervised_loss(logits, target, kind=kind)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and g.abs().sum() > 0
    full = torch.ones(2, 4, dtype=torch.bool)
    assert supervised_loss(logits, target, labeled=full).item() == pytest.approx(supervised_loss(logits, target).item())
    partial = full.clone()
    partial[1, 3] = False
    t2 = target.clone()
    t2[1][t2[1] == 3] = 0
    assert supervised_loss(logits, t2, labeled=partial).item() == pytest.approx(
        target_adaptive_loss(logits, t2, partial).item()
    )
    with pytest.raises(ValueError, match="unknown loss"):
        supervised_loss(logits, target, kind="focal")
