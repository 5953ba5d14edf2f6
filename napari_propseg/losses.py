"""Losses of the propagation network (training and online adaptation; the reference losses share the Lovasz extension): bootstrapped cross-entropy + Lovasz-softmax.

* :func:`bootstrapped_ce`: online hard-example mining. Pixels whose cross-entropy is
  above ``-ln 0.5`` (the true class has probability below 0.5) are kept; if fewer than
  ``min_fraction`` (1/16) of the pixels qualify, the ``min_fraction`` hardest are kept.
* :func:`lovasz_softmax`: the Lovasz extension of the Jaccard loss (Berman et al., CVPR
  2018), averaged over the classes present in the target.
* :func:`lovasz_hinge`: the binary (per-object) variant on logits.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[[4.0]], [[-4.0]]]])   # (B=1, C=2, H=1, W=1)
    >>> target = torch.tensor([[[0]]])
    >>> round(float(bootstrapped_ce(logits, target)), 4)
    0.0003
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: CE of a pixel whose true class has probability 0.5.
CE_THRESHOLD = -math.log(0.5)


def bootstrapped_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    threshold: float = CE_THRESHOLD,
    min_fraction: float = 1.0 / 16.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Bootstrapped (hard-pixel) cross-entropy.

    Args:
        logits: (N, C, H, W) class scores (float; computed in float32).
        target: (N, H, W) int64 class ids in [0, C).
        threshold: pixels with CE above this are kept (default ``-ln 0.5``).
        min_fraction: at least this fraction of all pixels is kept (the hardest ones).
        ignore_index: target value that is left out.

    Returns:
        Scalar: mean CE over the kept pixels (0 if every pixel is ignored).
    """
    raw = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=ignore_index).flatten()
    valid = (target.flatten() != ignore_index)
    raw = raw[valid]
    n = raw.numel()
    if n == 0:
        return logits.sum() * 0.0
    min_keep = max(1, int(math.ceil(n * min_fraction)))
    hard = raw[raw > threshold]
    if hard.numel() >= min_keep:
        return hard.mean()
    return torch.topk(raw, min_keep, sorted=False).values.mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors.

    Args:
        gt_sorted: (P,) 0/1 ground truth, in the order of decreasing error.

    Returns:
        (P,) weights ``J(i) - J(i-1)`` where ``J(i)`` is the Jaccard loss of predicting the
        ``i`` first pixels wrongly.
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_flat(probas: torch.Tensor, labels: torch.Tensor, *, classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax on flattened pixels.

    Args:
        probas: (P, C) class probabilities.
        labels: (P,) int64 class ids.
        classes: ``"present"`` (classes in ``labels`` only) or ``"all"``.

    Returns:
        Scalar, mean over the classes considered (0 if none).
    """
    if probas.numel() == 0:
        return probas.sum() * 0.0
    losses = []
    for c in range(probas.shape[1]):
        fg = (labels == c).to(probas.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    if not losses:
        return probas.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(
    logits: torch.Tensor, target: torch.Tensor, *, per_image: bool = False, classes: str = "present", ignore_index: int = -100
) -> torch.Tensor:
    """Multi-class Lovasz-softmax loss.

    Args:
        logits: (N, C, H, W) class scores; softmax is taken over C (in float32).
        target: (N, H, W) int64 class ids.
        per_image: average the loss image by image instead of over the whole batch.
        classes: ``"present"`` or ``"all"``.
        ignore_index: target value that is left out.

    Returns:
        Scalar loss in [0, 1].
    """
    probas = logits.float().softmax(dim=1)
    c = probas.shape[1]

    def flat(p: torch.Tensor, t: torch.Tensor):
        p = p.permute(0, 2, 3, 1).reshape(-1, c)
        t = t.reshape(-1)
        keep = t != ignore_index
        return p[keep], t[keep]

    if per_image:
        return torch.stack([lovasz_softmax_flat(*flat(probas[i : i + 1], target[i : i + 1]), classes=classes) for i in range(probas.shape[0])]).mean()
    return lovasz_softmax_flat(*flat(probas, target), classes=classes)


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, *, per_image: bool = True) -> torch.Tensor:
    """Binary Lovasz hinge loss (one object against the rest).

    Args:
        logits: (N, H, W) object scores (positive = object).
        target: (N, H, W) 0/1 masks.
        per_image: average image by image (default) or over the whole batch.

    Returns:
        Scalar loss.
    """

    def flat(lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        lg = lg.reshape(-1).float()
        lb = lb.reshape(-1).float()
        if lg.numel() == 0:
            return lg.sum() * 0.0
        signs = 2.0 * lb - 1.0
        errors = 1.0 - lg * signs
        errors_sorted, perm = torch.sort(errors, descending=True)
        return torch.dot(F.relu(errors_sorted), lovasz_grad(lb[perm]))

    if per_image:
        return torch.stack([flat(logits[i], target[i]) for i in range(logits.shape[0])]).mean()
    return flat(logits, target)


def propagation_loss(
    logits: torch.Tensor, target: torch.Tensor, *, lovasz_weight: float = 1.0, threshold: float = CE_THRESHOLD, min_fraction: float = 1.0 / 16.0
) -> dict[str, torch.Tensor]:
    """The training loss of the propagation network on a batch of clips.

    Args:
        logits: (B, T', K+1, H, W) logits of the predicted frames (index 0 = background).
        target: (B, T', H, W) int64 ids in [0, K] (0 = background, k = object k).

    Returns:
        ``{"loss", "ce", "lovasz"}`` scalars; ``loss = ce + lovasz_weight * lovasz``.
    """
    b, t, c, h, w = logits.shape
    flat_logits = logits.reshape(b * t, c, h, w)
    flat_target = target.reshape(b * t, h, w)
    ce = bootstrapped_ce(flat_logits, flat_target, threshold=threshold, min_fraction=min_fraction)
    lov = lovasz_softmax(flat_logits, flat_target, per_image=False) if lovasz_weight > 0 else ce * 0.0
    return {"loss": ce + lovasz_weight * lov, "ce": ce, "lovasz": lov}
