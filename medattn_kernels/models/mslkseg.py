"""MS-LKSeg (our reading of the paper's description; no public code).

U-shape with ``len(widths)`` levels (5 by default), ``blocks`` MIS blocks per encoder level.

MIS block = dynamic conv, spatial branch, channel branch (each with a residual-free gate, as SCSA):
* dynamic conv: a 3x3 conv whose kernel is a softmax-weighted mix of ``experts`` kernels, the weights
  computed per sample from the globally pooled input (CondConv / DyConv style), then BN + ReLU;
* spatial branch: means over W ([B,C,H]) and over H ([B,C,W]); channels split in 4 groups; group i
  runs a depthwise 1-D conv with kernel 3, 5, 7, 9 (i = 0..3) whose weights are SHARED by the H path
  (a k x 1 kernel) and the W path (the same weights as a 1 x k kernel), both through
  `medattn_kernels.depthwise_conv2d`; GroupNorm(4); sigmoid; ``x * a_h * a_w``;
* channel branch: average pool (7x7, stride 7; smaller maps use their own size), GroupNorm(1),
  depthwise 1x1 q / k / v (a per-channel scale and shift), attention among channels
  (``softmax(q k^T / sqrt(N)) v`` with channels as tokens), mean over positions, sigmoid, multiply.
Skips go through LD: ``x + Conv1x1(ReLU(ReDWConv21x21(Conv1x1(BN(x)))))`` with ReDWConv =
`medattn_kernels.nn.LargeKernelDWConv2d` (21x21 depthwise + parallel 3x3 depthwise, each with BN,
foldable into one 21x21 kernel with ``.reparameterize()``; `MSLKSeg.reparameterize()` folds them all).
Loss: 0.5 CE + 0.5 Dice.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LargeKernelDWConv2d
from ..ops import depthwise_conv2d
from ._common import ConvBNAct, SegmentationModel, UpBlock, backend_of, ce_dice_loss

SPATIAL_KERNELS = (3, 5, 7, 9)


class DynamicConv2d(nn.Module):
    """3x3 conv with a per-sample kernel: sum_e softmax(fc(gap(x)))_e * W_e (one grouped conv)."""

    def __init__(self, cin: int, cout: int, experts: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, cout, cin, 3, 3))
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        self.route = nn.Linear(cin, experts)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()  # a module, so that float32 parity checks see its kink (testing.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        mix = torch.softmax(self.route(x.mean((2, 3))), -1)  # [B, E]
        kernel = torch.einsum("be,eoikl->boikl", mix, self.weight).reshape(-1, c, 3, 3)
        y = F.conv2d(x.reshape(1, b * c, h, w), kernel, padding=1, groups=b).reshape(b, -1, h, w)
        return self.act(self.bn(y))


class SpatialMultiScaleAttention(nn.Module):
    """SCSA-style spatial branch with shared 1-D depthwise kernels 3/5/7/9 (see the module docstring)."""

    def __init__(self, channels: int, fused: bool = True):
        super().__init__()
        if channels % 4:
            raise ValueError(f"channels: expected a multiple of 4 (four kernel groups), got {channels}")
        self.fused = fused
        g = channels // 4
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(g, 1, k) * (1.0 / k) ** 0.5) for k in SPATIAL_KERNELS)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(g)) for _ in SPATIAL_KERNELS)
        self.norm_h = nn.GroupNorm(4, channels)
        self.norm_w = nn.GroupNorm(4, channels)

    def _strips(self, pooled: torch.Tensor, vertical: bool) -> torch.Tensor:
        outs = []
        for part, w, b in zip(pooled.chunk(4, 1), self.weights, self.biases):
            kernel = w.unsqueeze(-1) if vertical else w.unsqueeze(-2)  # [g,1,k,1] or [g,1,1,k]
            outs.append(depthwise_conv2d(part, kernel, b, backend=backend_of(self.fused)))
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h = torch.sigmoid(self.norm_h(self._strips(x.mean(3, keepdim=True), vertical=True)))  # [B,C,H,1]
        a_w = torch.sigmoid(self.norm_w(self._strips(x.mean(2, keepdim=True), vertical=False)))  # [B,C,1,W]
        return x * a_h * a_w


class ChannelSelfAttention(nn.Module):
    """SCSA-style channel branch: pooled map, GroupNorm(1), depthwise 1x1 q/k/v, channel attention."""

    def __init__(self, channels: int, pool: int = 7):
        super().__init__()
        self.pool = pool
        self.norm = nn.GroupNorm(1, channels)
        self.qkv_scale = nn.Parameter(torch.ones(3, channels, 1))
        self.qkv_shift = nn.Parameter(torch.zeros(3, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = min(self.pool, x.shape[-2], x.shape[-1])
        p = self.norm(F.avg_pool2d(x, k, k)).flatten(2)  # [B, C, N]
        q, key, v = (p * self.qkv_scale[i] + self.qkv_shift[i] for i in range(3))
        attn = torch.softmax(q @ key.transpose(1, 2) * p.shape[-1] ** -0.5, -1)  # [B, C, C]
        gate = torch.sigmoid((attn @ v).mean(-1))  # [B, C]
        return x * gate[:, :, None, None]


class MISBlock(nn.Module):
    def __init__(self, cin: int, cout: int, fused: bool = True, experts: int = 4):
        super().__init__()
        self.dynamic = DynamicConv2d(cin, cout, experts)
        self.spatial = SpatialMultiScaleAttention(cout, fused)
        self.channel = ChannelSelfAttention(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel(self.spatial(self.dynamic(x)))


class LDSkip(nn.Module):
    """x + Conv1x1(ReLU(ReDWConv21x21(Conv1x1(BN(x)))))."""

    def __init__(self, channels: int, kernel_size: int = 21, fused: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, channels, 1)
        self.large = LargeKernelDWConv2d(channels, kernel_size, small_kernel=3, fused=fused)
        self.act = nn.ReLU()
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act(self.large(self.expand(self.norm(x)))))


class MSLKSeg(SegmentationModel):
    """forward(image) -> {"logits"}. widths: channels per level (multiples of 4); blocks: MIS blocks per
    encoder level; kernel_size: the LD skips' large kernel (21)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths: Sequence[int] = (16, 24, 32, 48, 64),
                 blocks: int = 2, kernel_size: int = 21, experts: int = 4, fused: bool = True):
        super().__init__()
        widths = tuple(widths)
        self.fused = fused
        self.stem = ConvBNAct(in_channels, widths[0])
        levels, cin = [], widths[0]
        for i, c in enumerate(widths):
            down = [] if i == 0 else [nn.MaxPool2d(2)]
            levels.append(nn.Sequential(*down, *[MISBlock(cin if j == 0 else c, c, fused, experts)
                                                 for j in range(blocks)]))
            cin = c
        self.levels = nn.ModuleList(levels)
        self.skips = nn.ModuleList(LDSkip(c, kernel_size, fused) for c in widths[:-1])
        self.ups = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, image: torch.Tensor):
        feats, x = [], self.stem(image)
        for level in self.levels:
            x = level(x)
            feats.append(x)
        for up, skip, feat in zip(self.ups, reversed(self.skips), reversed(feats[:-1])):
            x = up(x, skip(feat))
        return {"logits": self.head(x)}

    def loss(self, outputs, target):
        return ce_dice_loss(outputs["logits"], target)

    def reparameterize(self) -> "MSLKSeg":
        """Fold every LD skip's 21x21 + 3x3 (+BN) branches into one 21x21 kernel (inference)."""
        for skip in self.skips:
            skip.large.reparameterize()
        return self
