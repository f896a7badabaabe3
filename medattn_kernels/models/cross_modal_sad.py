"""Cross-modal self-attention distillation network (our reading of the paper; no public code).

One encoder per modality (``modalities``, 2 by default; the demo uses T1 and its CLAHE-enhanced copy
as the two "modalities", since the shipped template has only T1). Each encoder: a full-resolution stem
and ``len(widths)`` stride-2 stages. Attention maps (channel sum of squared activations, softmax over
H*W: self-attention distillation) of every stage are distilled across modalities: the loss is the
mean over stages and modality pairs of MSE(A_i, A_j) (symmetric, no teacher is detached).
Fusion (spatial correlation): at every stage from S/4 down (at S and S/2 the attention would be the
dominant cost; there the modalities' features are averaged) each modality's feature map queries the others' through
`medattn_kernels.nn.CrossImageAttention` (cross attention over the H*W positions); the fused feature is
the mean over modalities of ``f_i + attend(f_i, f_j)``. Fused features are the skips of a U-Net decoder. Loss: 0.5 CE + 0.5 Dice +
``distill_weight`` * distillation (the attention maps are probabilities over H*W, so their MSE is tiny:
it is scaled by H*W per stage to make it O(1)).
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CrossImageAttention
from ._common import ConvBNAct, SegmentationModel, UpBlock, attention_map, ce_dice_loss


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, stem_width: int, widths: Sequence[int]):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_width)
        stages, cin = [], stem_width
        for c in widths:
            stages.append(nn.Sequential(ConvBNAct(cin, c, stride=2), ConvBNAct(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class CrossModalSADNet(SegmentationModel):
    """forward(*modalities) -> {"logits", "attention_maps": per stage a [M, B, H*W] tensor}. sdpa_attention (with
    fused=False): the fusion attention through PyTorch's F.scaled_dot_product_attention instead of the naive
    reference (the benchmarks' third variant)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, modalities: int = 2, stem_width: int = 16,
                 widths: Sequence[int] = (24, 32, 48, 64), heads: int = 1, distill_weight: float = 1.0,
                 fused: bool = True, sdpa_attention: bool = False):
        super().__init__()
        widths = tuple(widths)
        if modalities < 2:
            raise ValueError(f"modalities: expected at least 2, got {modalities}")
        self.fused, self.modalities, self.distill_weight = fused, modalities, distill_weight
        self.encoders = nn.ModuleList(_Encoder(in_channels, stem_width, widths) for _ in range(modalities))
        self.fusions = nn.ModuleList(CrossImageAttention(c, heads=heads, fused=fused, sdpa=sdpa_attention)
                                     for c in widths[1:])
        ups, cin = [], widths[-1]
        for c in reversed((stem_width,) + widths[:-1]):
            ups.append(UpBlock(cin, c, c))
            cin = c
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(stem_width, num_classes, 1)

    def inputs_of(self, batch):
        return batch["image"], batch["enhanced"]

    def forward(self, *images: torch.Tensor):
        if len(images) != self.modalities:
            raise ValueError(f"images: expected {self.modalities} modalities, got {len(images)}")
        feats = [enc(x) for enc, x in zip(self.encoders, images)]  # [modality][stage]
        stages = len(feats[0])
        fused, maps = [], []
        for s in range(stages):
            per_mod = [f[s] for f in feats]
            if s >= 1:
                maps.append(torch.stack([attention_map(f) for f in per_mod]))
            if s < 2:
                fused.append(torch.stack(per_mod).mean(0))
                continue
            attn = self.fusions[s - 2]  # stage s has widths[s - 1] channels
            acc = 0
            for i, f_i in enumerate(per_mod):
                others = [f_j for j, f_j in enumerate(per_mod) if j != i]
                acc = acc + f_i + sum(attn(f_i, f_j) for f_j in others) / len(others)
            fused.append(acc / len(per_mod))
        x = fused[-1]
        for up, skip in zip(self.ups, reversed(fused[:-1])):
            x = up(x, skip)
        return {"logits": self.head(x), "attention_maps": maps}

    def distillation_loss(self, maps) -> torch.Tensor:
        total = 0
        for stage_maps in maps:
            n = stage_maps.shape[-1]
            pairs = list(combinations(range(stage_maps.shape[0]), 2))
            total = total + sum(F.mse_loss(stage_maps[i] * n, stage_maps[j] * n) for i, j in pairs) / len(pairs)
        return total / len(maps)

    def loss(self, outputs, target):
        return ce_dice_loss(outputs["logits"], target) + self.distill_weight * self.distillation_loss(
            outputs["attention_maps"])
