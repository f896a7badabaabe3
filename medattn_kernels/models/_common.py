"""Building blocks and losses the five reference networks share (plain PyTorch: convolutions, norms,
upsampling; the layers medattn accelerates come from medattn_kernels.nn / the functional ops)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def backend_of(fused: bool) -> Optional[str]:
    """The `backend=` argument of the functional ops for a module's `fused` flag."""
    return None if fused else "reference"


class ConvBNAct(nn.Sequential):
    """conv(k) -> BatchNorm -> ReLU (or GELU)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, act: str = "relu"):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True) if act == "relu" else nn.GELU())


class DoubleConv(nn.Sequential):
    """The U-Net block: two conv3x3-BN-ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(ConvBNAct(cin, cout), ConvBNAct(cout, cout))


class UpBlock(nn.Module):
    """Bilinear x2 (to the skip's size), concat with the skip, DoubleConv."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = DoubleConv(cin + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class SegmentationModel(nn.Module):
    """What the demo, the trainer and the tests rely on, for every network:

    * ``inputs_of(batch)``: the positional inputs of ``forward`` taken from a batch dict with keys
      ``image`` [B,1,H,W], ``enhanced`` [B,1,H,W] (contrast-enhanced copy) and ``label`` [B,H,W];
    * ``forward(*inputs)`` -> dict of outputs; ``outputs["logits"]`` [B,K,H,W] is the segmentation;
    * ``loss(outputs, target, **extras)`` with ``extras = loss_extras(batch)`` -> scalar training loss.
    """

    def inputs_of(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        return (batch["image"],)

    def loss_extras(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {}

    def training_loss(self, batch: Dict[str, torch.Tensor]):
        """(loss, outputs) for one batch; the one call the trainer makes."""
        outputs = self(*self.inputs_of(batch))
        return self.loss(outputs, batch["label"], **self.loss_extras(batch)), outputs


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   include_background: bool = True) -> torch.Tensor:
    """1 - mean over classes of 2 |p y| / (|p| + |y|), summed over the batch and pixels (softmax p)."""
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1 - (dice if include_background else dice[1:]).mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.5,
                 dice_weight: float = 0.5) -> torch.Tensor:
    return ce_weight * F.cross_entropy(logits, target) + dice_weight * soft_dice_loss(logits, target)


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Self-attention-distillation map: channel sum of squared activations, softmax over H*W -> [B, H*W]."""
    return torch.softmax(feature.pow(2).sum(1).flatten(1), dim=1)


def to_tokens(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, heads, H*W, C/heads] (the attention ops' layout)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w).transpose(-1, -2)


def from_tokens(t: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """[B, heads, H*W, D] -> [B, heads*D, H, W]."""
    b, heads, n, d = t.shape
    return t.transpose(-1, -2).reshape(b, heads * d, *hw)
