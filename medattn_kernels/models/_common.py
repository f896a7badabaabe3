"""Building blocks and losses the five reference networks share (plain PyTorch: convolutions, norms,
upsampling; the layers medattn accelerates come from medattn_kernels.nn / the functional ops)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.activated_batch_norm import ActivatedBatchNorm2d
from ..nn.losses import soft_dice_loss


def backend_of(fused: bool) -> Optional[str]:
    """The `backend=` argument of the functional ops for a module's `fused` flag."""
    return None if fused else "reference"


class ConvBNAct(nn.Sequential):
    """conv(k) -> BatchNorm -> ReLU (act="relu"), GELU (act="gelu"), or conv(k) ->
    ActivatedBatchNorm2d (act="abn": BatchNorm + leaky ReLU keeping only its output for backward,
    the fused op with fused=True, its reference composite with fused=False)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, act: str = "relu",
                 fused: bool = True):
        conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        if act == "abn":
            super().__init__(conv, ActivatedBatchNorm2d(cout, fused=fused))
        elif act in ("relu", "gelu"):
            super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True) if act == "relu" else nn.GELU())
        else:
            raise ValueError(f"act: expected 'relu', 'gelu' or 'abn', got {act!r}")


class DoubleConv(nn.Sequential):
    """The U-Net block: two conv3x3-BN-act (ConvBNAct's keyword arguments)."""

    def __init__(self, cin: int, cout: int, **block_kwargs):
        super().__init__(ConvBNAct(cin, cout, **block_kwargs), ConvBNAct(cout, cout, **block_kwargs))


class UpBlock(nn.Module):
    """Bilinear x2 (to the skip's size), concat with the skip, DoubleConv."""

    def __init__(self, cin: int, cskip: int, cout: int, **block_kwargs):
        super().__init__()
        self.conv = DoubleConv(cin + cskip, cout, **block_kwargs)

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


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.5,
                 dice_weight: float = 0.5) -> torch.Tensor:
    return ce_weight * F.cross_entropy(logits, target) + dice_weight * soft_dice_loss(logits, target)


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Self-attention-distillation map: channel sum of squared activations, softmax over H*W -> [B, H*W]."""
    return torch.softmax(feature.pow(2).sum(1).flatten(1), dim=1)
