"""Joint Attention DenseUNet (our reading of the paper; no public code).

DenseNet-style U-Net: every encoder level is a dense block (``layers`` BN-ReLU-conv3x3 layers with
growth rate ``growth``, each seeing the concatenation of all previous outputs) followed by a
transition (conv1x1 + 2x2 average pool). At the bottleneck (the deepest level, S / 2**levels) a joint
attention module (`medattn_kernels.nn.JointAttention`: self-attention over the H*W positions combined
with a point-wise sigmoid gate per position, one fused op) refines the features. The decoder upsamples,
concatenates the dense block outputs (skips) and runs a dense block per level; conv1x1 head.
Loss: 0.5 CE + 0.5 Dice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import JointAttention
from ._common import ConvBNAct, SegmentationModel, ce_dice_loss


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(inplace=False),
                          nn.Conv2d(cin + i * growth, growth, 3, padding=1, bias=False))
            for i in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class JointAttentionDenseUNet(SegmentationModel):
    """forward(image) -> {"logits"}. levels: down-sampling steps; growth, layers: dense block shape;
    heads: joint attention heads at the bottleneck. sdpa_attention (with fused=False): the attention through
    PyTorch's F.scaled_dot_product_attention instead of the naive reference (the benchmarks' third variant)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, stem_width: int = 16, growth: int = 8,
                 layers: int = 3, levels: int = 3, heads: int = 1, fused: bool = True, sdpa_attention: bool = False):
        super().__init__()
        self.fused = fused
        self.stem = ConvBNAct(in_channels, stem_width)
        self.down_blocks, self.transitions, skips, c = nn.ModuleList(), nn.ModuleList(), [], stem_width
        for _ in range(levels):
            block = DenseBlock(c, growth, layers)
            self.down_blocks.append(block)
            skips.append(block.out_channels)
            c = block.out_channels // 2
            self.transitions.append(nn.Sequential(nn.BatchNorm2d(block.out_channels), nn.ReLU(),
                                                  nn.Conv2d(block.out_channels, c, 1, bias=False), nn.AvgPool2d(2)))
        self.bottleneck = DenseBlock(c, growth, layers)
        c = self.bottleneck.out_channels
        if c % heads:
            raise ValueError(f"heads: the bottleneck width {c} must be divisible by heads={heads}")
        self.attention = JointAttention(c, heads=heads, fused=fused, sdpa=sdpa_attention)
        self.up_blocks, self.up_convs = nn.ModuleList(), nn.ModuleList()
        for skip_c in reversed(skips):
            self.up_convs.append(nn.Conv2d(c, skip_c // 2, 1, bias=False))
            block = DenseBlock(skip_c // 2 + skip_c, growth, layers)
            self.up_blocks.append(block)
            c = block.out_channels
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, num_classes, 1))

    def forward(self, image: torch.Tensor):
        x, skips = self.stem(image), []
        for block, transition in zip(self.down_blocks, self.transitions):
            x = block(x)
            skips.append(x)
            x = transition(x)
        x = self.attention(self.bottleneck(x))
        for up_conv, block, skip in zip(self.up_convs, self.up_blocks, reversed(skips)):
            x = F.interpolate(up_conv(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return {"logits": self.head(x)}

    def loss(self, outputs, target):
        return ce_dice_loss(outputs["logits"], target)
