"""Task losses and policy regularisers, as AdaShare computes them (DESIGN.md §1).

Predictions come at the head's resolution (1/8 of the input); targets are resized to it with nearest
interpolation, as AdaShare does in training.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "seg_loss",
    "sn_loss",
    "depth_loss",
    "keypoint_loss",
    "edge_loss",
    "task_loss",
    "sparsity_loss",
    "sharing_loss",
    "total_task_loss",
    "normal_valid_mask",
    "IGNORE_INDEX",
]

IGNORE_INDEX = 255


def _resize_nearest(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="nearest")


def seg_loss(pred: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over pixels, ignoring label 255; 0 (with a gradient path) when every pixel is ignored.

    Args:
        pred: ``(B, C, h, w)`` logits.
        target: ``(B, H, W)`` or ``(B, 1, H, W)`` integer labels (255 = ignore), resized to ``(h, w)``.
        class_weights: optional ``(C,)`` weights (AdaShare weights Taskonomy's classes by
            ``semseg_prior_factor.npy``): ``sum_i w_(y_i) CE_i / sum_i w_(y_i)``.
    """
    if target.ndim == 3:
        target = target.unsqueeze(1)
    if pred.ndim != 4 or target.shape[0] != pred.shape[0]:
        raise ValueError(f"seg_loss: pred (B, C, h, w) and target (B, H, W) disagree: "
                         f"{tuple(pred.shape)} vs {tuple(target.shape)}")
    if class_weights is not None and tuple(class_weights.shape) != (pred.shape[1],):
        raise ValueError(f"seg_loss: class_weights must have shape ({pred.shape[1]},), got "
                         f"{tuple(class_weights.shape)}")
    labels = _resize_nearest(target.float(), pred.shape[-2:]).squeeze(1).long()
    if not bool((labels != IGNORE_INDEX).any()):
        return pred.sum() * 0.0  # cross_entropy's mean over no pixel is 0 / 0
    weight = None if class_weights is None else class_weights.to(device=pred.device, dtype=torch.float32)
    return F.cross_entropy(pred.float(), labels, weight=weight, ignore_index=IGNORE_INDEX)


def normal_valid_mask(target: torch.Tensor) -> torch.Tensor:
    """Valid normal pixels of a ``(B, 3, H, W)`` target: not all zero and no channel at 255 (ignore)."""
    return (target.abs().sum(1) > 0) & (target.amax(1) < IGNORE_INDEX)


def sn_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Surface-normal loss ``1 - mean cos(pred, target)`` over valid pixels (both unit-normalised).

    Args:
        pred: ``(B, 3, h, w)``; target: ``(B, 3, H, W)``, resized to ``(h, w)``; invalid pixels are all
            zero or hold 255 in a channel.
    """
    if pred.shape[1] != 3 or target.shape[1] != 3:
        raise ValueError(f"sn_loss needs 3-channel pred and target, got {tuple(pred.shape)}, {tuple(target.shape)}")
    gt = _resize_nearest(target.float(), pred.shape[-2:])
    valid = normal_valid_mask(gt)
    p = pred.float().permute(0, 2, 3, 1)[valid]
    g = gt.permute(0, 2, 3, 1)[valid]
    if p.shape[0] == 0:
        return pred.sum() * 0.0
    cos = F.cosine_similarity(F.normalize(p, dim=1), F.normalize(g, dim=1), dim=1)
    return 1 - cos.mean()


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 depth loss over valid pixels (target > 3e-5, AdaShare's NYU/CityScapes rule).

    Args:
        pred: ``(B, 1, h, w)``; target: ``(B, 1, H, W)`` metres, resized to ``(h, w)``.
    """
    if target.ndim == 3:
        target = target.unsqueeze(1)
    gt = _resize_nearest(target.float(), pred.shape[-2:])
    valid = gt.sum(1, keepdim=True) > 3e-5
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return F.l1_loss(pred.float().masked_select(valid), gt.masked_select(valid))


def _l1_not_ignored(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 3:
        target = target.unsqueeze(1)
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"{name}: pred (B, C, h, w) and target (B, C, H, W) disagree: "
                         f"{tuple(pred.shape)} vs {tuple(target.shape)}")
    gt = _resize_nearest(target.float(), pred.shape[-2:])
    valid = gt != IGNORE_INDEX
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return F.l1_loss(pred.float().masked_select(valid), gt.masked_select(valid))


def keypoint_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 over pixels whose target is not 255 (AdaShare's Taskonomy keypoint loss).

    Args:
        pred: ``(B, 1, h, w)``; target: ``(B, 1, H, W)`` or ``(B, H, W)``, resized to ``(h, w)``.
    """
    return _l1_not_ignored("keypoint_loss", pred, target)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 over pixels whose target is not 255 (AdaShare's Taskonomy edge loss).

    Args:
        pred: ``(B, 1, h, w)``; target: ``(B, 1, H, W)`` or ``(B, H, W)``, resized to ``(h, w)``.
    """
    return _l1_not_ignored("edge_loss", pred, target)


_TASK_LOSSES = {"seg": seg_loss, "sn": sn_loss, "depth": depth_loss, "keypoint": keypoint_loss, "edge": edge_loss}


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor,
              seg_class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of an AdaShare task by name: ``seg``, ``sn``, ``depth``, ``keypoint`` or ``edge``
    (``seg_class_weights``: see :func:`seg_loss`)."""
    try:
        fn = _TASK_LOSSES[task]
    except KeyError:
        raise ValueError(f"no loss for task {task!r}; known tasks: {', '.join(_TASK_LOSSES)}") from None
    if task == "seg":
        return seg_loss(pred, target, seg_class_weights)
    return fn(pred, target)


def _block_weights(n: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device, dtype=torch.float32) + 1) / n


def sparsity_loss(alpha: torch.Tensor, num_train_layers: int | None = None, diff_sparsity_weights: bool = False,
                  is_sharing: bool = False) -> torch.Tensor:
    """Sum over tasks of the cross-entropy of the trained blocks' logits towards "skip" (column 1).

    Args:
        alpha: ``(K, Lp, 2)`` logits.
        num_train_layers: the curriculum stage n (the last ``min(n, Lp)`` blocks); None = all.
        diff_sparsity_weights, is_sharing: with weights on and sharing off, each task's term is
            ``2 * mean(w_l * CE_l)`` with ``w_l = (l + 1) / Lp`` over the trained blocks (AdaShare's rule);
            otherwise the plain mean cross-entropy.
    """
    k, lp, _ = alpha.shape
    n = lp if num_train_layers is None else min(int(num_train_layers), lp)
    logits = alpha[:, lp - n:].float()
    skip = torch.ones(k * n, dtype=torch.long, device=alpha.device)
    ce = F.cross_entropy(logits.reshape(k * n, 2), skip, reduction="none").reshape(k, n)
    if diff_sparsity_weights and not is_sharing:
        w = _block_weights(lp, alpha.device)[lp - n:]
        return (2 * (w * ce).mean(dim=1)).sum()
    return ce.mean(dim=1).sum()


def sharing_loss(alpha: torch.Tensor, diff_sparsity_weights: bool = True) -> torch.Tensor:
    """``sum_{i <= j} sum_l w_l |alpha[i,l,0] - alpha[j,l,0]|``, ``w_l = (l + 1) / Lp`` (1 when weights off).

    Args:
        alpha: ``(K, Lp, 2)`` logits.
    """
    k, lp, _ = alpha.shape
    w = _block_weights(lp, alpha.device) if diff_sparsity_weights else torch.ones(lp, device=alpha.device)
    sel = alpha[..., 0].float()
    diff = (sel[:, None, :] - sel[None, :, :]).abs()  # (K, K, Lp)
    upper = torch.triu(torch.ones(k, k, device=alpha.device, dtype=torch.bool))
    return (diff[upper] * w).sum()


def total_task_loss(losses: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]) -> torch.Tensor:
    """``sum_k lambda_k * loss_k`` over the tasks in ``losses``."""
    missing = set(losses) - set(lambdas)
    if missing:
        raise ValueError(f"no lambda for task(s) {sorted(missing)}")
    return sum(lambdas[t] * losses[t] for t in losses)
