"""Segmentation losses for the reference networks (torch only).

All losses take logits ``(B, C, H, W)`` (or probabilities where the name says so) and an
integer target ``(B, H, W)`` with values in ``[0, C)``.

* :func:`dice_loss` - soft Dice, per sample and class: ``1 - (2 I + s) / (U + s)`` with
  ``I = sum(p * g)``, ``U = sum(p) + sum(g)``, averaged over the (sample, class) pairs.
* :func:`ce_loss` - cross-entropy.
* :func:`lovasz_softmax` - Lovasz-softmax (Berman et al. 2018), the convex surrogate of
  the per-class Jaccard loss, over the batch's pixels and the classes present.
* :func:`godc_loss` - our reading of GODC, "Dice loss scaled by the batch-normalised
  union size": each (sample, class) Dice loss ``1 - D_bc`` is multiplied by
  ``w_bc = U_bc / mean_b U_bc`` (its union size over the batch mean for that class), then
  averaged. Without smoothing this equals ``1 - 2 sum_b I_bc / sum_b U_bc``, the Dice of
  the whole batch taken as one volume: slices where an organ is absent or tiny no longer
  weigh as much as slices where it is large (they made the plain per-slice Dice noisy).
* :func:`merge_unlabeled` / :func:`target_adaptive_loss` - the target adaptive loss of
  PIPO-FAN (Fang & Yan 2020): for a sample from a dataset that labels only some organs,
  the predicted probabilities of the organs it does not label are added to its
  background probability before the loss (an unlabeled organ is "background" there), and
  only the labeled organs enter the Dice term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import lovasz_softmax_flat

LOSSES = ("dice_ce", "godc_ce", "dice", "ce", "lovasz", "lovasz_ce")


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` int -> ``(B, C, H, W)`` float one-hot."""
    return F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


def _class_mask(b: int, c: int, include_background: bool, classes: torch.Tensor | None, device) -> torch.Tensor:
    m = torch.ones(b, c, dtype=torch.bool, device=device)
    if classes is not None:
        m &= classes.to(device=device, dtype=torch.bool).expand(b, c)
    if not include_background:
        m[:, 0] = False
    return m


def dice_terms(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union size per (sample, class).

    Args:
        probs: ``(B, C, H, W)`` probabilities.
        target: ``(B, H, W)`` labels.

    Returns:
        ``I (B, C) = sum p*g`` and ``U (B, C) = sum p + sum g``.
    """
    g = one_hot(target, probs.shape[1]).to(probs.dtype)
    inter = (probs * g).sum(dim=(2, 3))
    union = probs.sum(dim=(2, 3)) + g.sum(dim=(2, 3))
    return inter, union


def dice_loss_probs(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice loss from probabilities (see :func:`dice_loss`)."""
    inter, union = dice_terms(probs, target)
    mask = _class_mask(*inter.shape, include_background, classes, probs.device)
    loss = 1.0 - (2.0 * inter + smooth) / (union + smooth)
    return loss[mask].mean() if mask.any() else loss.sum() * 0.0


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice loss, per sample and class, averaged.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)``.
        smooth: added to numerator and denominator (a class absent from both prediction
            and target scores Dice 1).
        include_background: count class 0.
        classes: optional ``(C,)`` or ``(B, C)`` bool mask of the classes to count.

    Returns:
        Scalar loss.
    """
    return dice_loss_probs(logits.softmax(1), target, smooth=smooth, include_background=include_background, classes=classes)


def godc_loss_probs(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """GODC from probabilities (see :func:`godc_loss`)."""
    inter, union = dice_terms(probs, target)
    mask = _class_mask(*inter.shape, include_background, classes, probs.device).to(probs.dtype)
    per = 1.0 - (2.0 * inter + smooth) / (union + smooth)  # B, C
    mean_union = (union * mask).sum(0) / mask.sum(0).clamp_min(1)  # C
    w = union / (mean_union + smooth).clamp_min(1e-12)  # batch-normalised union size
    n = mask.sum()
    return torch.where(mask > 0, w * per, torch.zeros_like(per)).sum() / n if n > 0 else per.sum() * 0.0


def godc_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1e-5,
    include_background: bool = False,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dice loss scaled by the batch-normalised union size (our reading of GODC).

    ``L = mean_{b,c} (U_bc / mean_b' U_b'c) * (1 - (2 I_bc + s) / (U_bc + s))``; with
    ``s = 0`` this is ``mean_c (1 - 2 sum_b I_bc / sum_b U_bc)``, the batch-global Dice loss.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)``.
        smooth, include_background, classes: as in :func:`dice_loss`.
    """
    return godc_loss_probs(logits.softmax(1), target, smooth=smooth, include_background=include_background, classes=classes)


def ce_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pixel cross-entropy. ``logits (B, C, H, W)``, ``target (B, H, W)``."""
    return F.cross_entropy(logits, target.long(), weight=weight)


def lovasz_softmax_probs(probs: torch.Tensor, target: torch.Tensor, *, classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax from probabilities ``(B, C, H, W)`` over all pixels of the batch.

    Shares the Lovasz extension with the propagation losses
    (:func:`napari_propseg.losses.lovasz_softmax_flat`).

    Args:
        probs: probabilities.
        target: ``(B, H, W)``.
        classes: ``"present"`` (classes in the target) or ``"all"``.
    """
    c = probs.shape[1]
    return lovasz_softmax_flat(probs.permute(0, 2, 3, 1).reshape(-1, c), target.reshape(-1).long(), classes=classes)


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, *, classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al. 2018). ``logits (B, C, H, W)``, ``target (B, H, W)``."""
    return lovasz_softmax_probs(logits.softmax(1), target, classes=classes)


def merge_unlabeled(probs: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Add the probabilities of the classes a sample's dataset does not label to background.

    Args:
        probs: ``(B, C, H, W)`` probabilities.
        labeled: ``(B, C)`` or ``(C,)`` bool, True where the sample's dataset labels class c
            (class 0, background, is always treated as labeled).

    Returns:
        ``(B, C, H, W)`` probabilities with unlabeled channels zero and their mass in channel 0.
    """
    b, c = probs.shape[:2]
    lab = labeled.to(device=probs.device, dtype=torch.bool).expand(b, c).clone()
    lab[:, 0] = True
    keep = lab.to(probs.dtype).view(b, c, 1, 1)
    extra = (probs * (1.0 - keep)).sum(1, keepdim=True)  # B, 1, H, W
    merged = probs * keep
    return torch.cat([merged[:, :1] + extra, merged[:, 1:]], dim=1)


def target_adaptive_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor,
    *,
    dice: str = "dice",
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Target adaptive loss (PIPO-FAN): CE + Dice on background-merged probabilities.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)``; organs not labeled by the sample's dataset are 0 there.
        labeled: ``(B, C)`` bool, which classes each sample's dataset labels.
        dice: ``"dice"`` or ``"godc"`` for the Dice term.
        ce_weight, dice_weight: term weights.

    Returns:
        Scalar ``ce_weight * NLL(log merged) + dice_weight * Dice(merged, labeled organs)``.
    """
    merged = merge_unlabeled(logits.softmax(1), labeled)
    ce = F.nll_loss(torch.log(merged.clamp_min(eps)), target.long())
    fn = godc_loss_probs if dice == "godc" else dice_loss_probs
    b, c = logits.shape[:2]
    d = fn(merged, target, classes=labeled.to(torch.bool).expand(b, c))
    return ce_weight * ce + dice_weight * d


def supervised_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "dice_ce",
    labeled: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss named by ``kind`` (one of :data:`LOSSES`); TAL when ``labeled`` is partial.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)``.
        kind: ``dice_ce`` | ``godc_ce`` | ``dice`` | ``ce`` | ``lovasz`` | ``lovasz_ce``.
        labeled: optional ``(B, C)`` bool; if some sample does not label every class, the
            target adaptive loss (with the Dice or GODC term of ``kind``) is used.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
    if labeled is not None and not bool(labeled.all()):
        return target_adaptive_loss(logits, target, labeled, dice="godc" if kind == "godc_ce" else "dice",
                                    ce_weight=0.0 if kind == "dice" else 1.0)
    if kind == "dice_ce":
        return dice_loss(logits, target) + ce_loss(logits, target)
    if kind == "godc_ce":
        return godc_loss(logits, target) + ce_loss(logits, target)
    if kind == "dice":
        return dice_loss(logits, target)
    if kind == "ce":
        return ce_loss(logits, target)
    if kind == "lovasz":
        return lovasz_softmax(logits, target)
    return lovasz_softmax(logits, target) + ce_loss(logits, target)
