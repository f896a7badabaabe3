"""Loss modules: the multi-scale Sobel boundary loss and DIN's full segmentation loss.

Each has a ``fused`` switch: ``fused=True`` runs medattn_kernels.ops.sobel_boundary_loss (fastest
backend for the tensors, which keeps only d loss / d pred for backward), ``fused=False`` the pure-PyTorch
reference (medattn_kernels.reference), e.g. for debugging or for gradients w.r.t. a soft target.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..ops.sobel_boundary_loss import sobel_boundary_loss


class SobelBoundaryLoss(nn.Module):
    """``sum_s w_s * reduce |G(P_s(p)) - G(P_s(y))|`` (see ops.sobel_boundary_loss for the arguments)."""

    def __init__(self, scales: Sequence[int] = (1, 2, 4), weights: Optional[Sequence[float]] = None,
                 eps: float = 1e-6, from_logits: bool = False, reduction: str = "mean",
                 ignore_index: Optional[int] = None, fused: bool = True):
        super().__init__()
        self.scales = tuple(scales)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.eps = eps
        self.from_logits = from_logits
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.fused = fused

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The reference path goes through the public op too, so that arguments are validated the same way.
        return sobel_boundary_loss(pred, target, self.scales, self.weights, self.eps, self.from_logits,
                                   self.reduction, self.ignore_index,
                                   backend=None if self.fused else "reference")

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, weights={self.weights}, eps={self.eps}, from_logits={self.from_logits}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, fused={self.fused}")


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: Optional[int] = None,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Soft multi-class Dice loss from logits [B, C, H, W] and int64 labels [B, H, W]:
    ``1 - mean_c (2 sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth)``, sums over batch and pixels,
    ignored pixels excluded from every sum."""
    probs = torch.softmax(logits, dim=1)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    one_hot = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, one_hot = probs * mask, one_hot * mask
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


class DINLoss(nn.Module):
    """DIN's training loss: ``ce_weight * CE + dice_weight * Dice + boundary_weight * boundary``, from
    logits [B, C, H, W] and int64 labels [B, H, W]; the boundary term is the Sobel boundary loss at
    scales (1, 2, 4) on the softmax probabilities (fused softmax with ``fused=True``)."""

    def __init__(self, ce_weight: float = 0.3, dice_weight: float = 0.7, boundary_weight: float = 1.0,
                 scales: Sequence[int] = (1, 2, 4), ignore_index: Optional[int] = None, fused: bool = True):
        super().__init__()
        self.ce_weight, self.dice_weight, self.boundary_weight = ce_weight, dice_weight, boundary_weight
        self.ignore_index = ignore_index
        self.boundary = SobelBoundaryLoss(scales, from_logits=True, ignore_index=ignore_index, fused=fused)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels, ignore_index=-100 if self.ignore_index is None else self.ignore_index)
        dice = soft_dice_loss(logits, labels, self.ignore_index)
        return self.ce_weight * ce + self.dice_weight * dice + self.boundary_weight * self.boundary(logits, labels)


__all__ = ["SobelBoundaryLoss", "DINLoss", "soft_dice_loss"]
