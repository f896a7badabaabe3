"""DIN: dual interaction network with cross-image attention (our reading of the paper; no public code).

Two encoders of the same shape, one for the original image and one for its contrast-enhanced copy
(CLAHE). Each encoder has a full-resolution stem, a stride-2 stem (S/2) and four stages at S/4, S/8,
S/16, S/32 (so a 224 input meets the DIFM at 56x56 = 3136 tokens, as in the paper's scale).
At every stage each encoder merges its low-level feature (the previous stage, average-pooled to this
stage's size) with its high-level feature (this stage) by concat + conv1x1-BN-ReLU; the two merged maps
go through a DIFM (`medattn_kernels.nn.DualInteractiveFusion`: bidirectional cross attention
``softmax(QK^T)V + Q`` each way, FFN, GSA, sum of the two branches) whose output is the decoder's skip.
The deepest DIFM output is the decoder's input. The two stems' features (S and S/2) are merged by
concat + conv1x1 into plain skips (our addition: the paper's figure has no full-resolution path, and
thin grey-matter ribbons need one at 96-128 px). Decoder: U-Net up-blocks to full resolution, conv1x1
head. Loss: `medattn_kernels.nn.DINLoss` = 0.3 CE + 0.7 Dice + multi-scale Sobel boundary loss
(scales 1, 2, 4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DINLoss, DualInteractiveFusion
from ._common import ConvBNAct, SegmentationModel, UpBlock


class DINEncoder(nn.Module):
    def __init__(self, in_channels: int, stem_width: int, widths: Sequence[int], depth: int, **block_kwargs):
        super().__init__()
        self.stem_full = ConvBNAct(in_channels, stem_width, **block_kwargs)
        self.stem_half = ConvBNAct(stem_width, stem_width, stride=2, **block_kwargs)
        stages, cin = [], stem_width
        for c in widths:
            stages.append(nn.Sequential(ConvBNAct(cin, c, stride=2, **block_kwargs),
                                        *[ConvBNAct(c, c, **block_kwargs) for _ in range(depth)]))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor):
        full = self.stem_full(x)
        half = self.stem_half(full)
        feats, f = [], half
        for stage in self.stages:
            f = stage(f)
            feats.append(f)
        return full, half, feats


class LowHighMerge(nn.Module):
    """concat(avg_pool(previous stage), this stage) -> conv1x1-BN-ReLU."""

    def __init__(self, c_low: int, c_high: int, **block_kwargs):
        super().__init__()
        self.conv = ConvBNAct(c_low + c_high, c_high, kernel_size=1, **block_kwargs)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([F.adaptive_avg_pool2d(low, high.shape[-2:]), high], 1))


class DIN(SegmentationModel):
    """forward(image, enhanced) -> {"logits": [B, num_classes, H, W]}.

    Args:
        widths: channels of the four encoder stages (S/4 .. S/32).
        stem_width: channels at S and S/2.
        depth: extra conv3x3 blocks per encoder stage after the stride-2 one.
        heads: attention heads in every DIFM.
        activated_bn: every conv block is conv -> ActivatedBatchNorm2d (BatchNorm + leaky ReLU 0.01,
            scale |weight| + eps), which keeps one activation per block for backward instead of two
            when fused (True, the default); False: conv -> BatchNorm2d -> ReLU in both variants.
        fused: medattn fused ops (True) or the pure-PyTorch references (False), same parameters.
        sdpa_attention: with fused=False, the DIFM attentions through PyTorch's F.scaled_dot_product_attention
            on contiguous q/k/v instead of the naive reference (the benchmarks' third variant).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths: Sequence[int] = (32, 48, 64, 96),
                 stem_width: int = 16, depth: int = 1, heads: int = 1, fused: bool = True,
                 boundary_scales: Sequence[int] = (1, 2, 4), activated_bn: bool = True, sdpa_attention: bool = False):
        super().__init__()
        widths = tuple(widths)
        self.fused = fused
        blk = dict(act="abn", fused=fused) if activated_bn else {}
        self.enc_orig = DINEncoder(in_channels, stem_width, widths, depth, **blk)
        self.enc_enh = DINEncoder(in_channels, stem_width, widths, depth, **blk)
        lows = (stem_width,) + widths[:-1]
        self.merge_orig = nn.ModuleList(LowHighMerge(lo, hi, **blk) for lo, hi in zip(lows, widths))
        self.merge_enh = nn.ModuleList(LowHighMerge(lo, hi, **blk) for lo, hi in zip(lows, widths))
        self.difm = nn.ModuleList(DualInteractiveFusion(c, heads=heads, fused=fused, sdpa=sdpa_attention)
                                  for c in widths)
        self.skip_full = ConvBNAct(2 * stem_width, stem_width, kernel_size=1, **blk)
        self.skip_half = ConvBNAct(2 * stem_width, stem_width, kernel_size=1, **blk)
        ups, cin = [], widths[-1]
        for c in reversed(widths[:-1]):
            ups.append(UpBlock(cin, c, c, **blk))
            cin = c
        ups += [UpBlock(cin, stem_width, stem_width, **blk), UpBlock(stem_width, stem_width, stem_width, **blk)]
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(stem_width, num_classes, 1)
        self.criterion = DINLoss(scales=tuple(boundary_scales), fused=fused)

    def inputs_of(self, batch):
        return batch["image"], batch["enhanced"]

    def forward(self, image: torch.Tensor, enhanced: torch.Tensor):
        full_o, half_o, feats_o = self.enc_orig(image)
        full_e, half_e, feats_e = self.enc_enh(enhanced)
        skips, low_o, low_e = [], half_o, half_e
        for merge_o, merge_e, difm, f_o, f_e in zip(self.merge_orig, self.merge_enh, self.difm, feats_o, feats_e):
            m_o, m_e = merge_o(low_o, f_o), merge_e(low_e, f_e)
            skips.append(difm(m_o, m_e))
            low_o, low_e = f_o, f_e
        x = skips[-1]
        for up, skip in zip(self.ups, list(reversed(skips[:-1])) + [self.skip_half(torch.cat([half_o, half_e], 1)),
                                                                     self.skip_full(torch.cat([full_o, full_e], 1))]):
            x = up(x, skip)
        return {"logits": self.head(x)}

    def loss(self, outputs, target):
        return self.criterion(outputs["logits"], target)
