"""DS2F: dual-stream shared-feature network (our reading of the paper; no public code).

Input: the image downsampled by ``upscale`` (2); outputs at ``upscale`` times the input size, as in
DSRL (segmentation super-resolution). A U-Net encoder feeds two decoders of the same shape: a
segmentation stream and a super-resolution stream (training only), each upsampled to the output size
by a pixel-shuffle tail. The multi-scale cross gate (MSCG) fuses the last features of both streams:

    fusion = Gate(GELU(BN(Conv1x1(cat(sr, seg)))))
    Gate(x) = x + MultiScaleConv(PixelGate(x)),   PixelGate(x) = x * sigmoid(Conv1x1(x))
    MultiScaleConv(x) = Conv1x1(cat(DW3x3_d1(x), DW3x3_d2(x), broadcast(Conv1x1(mean_hw(x)))))

(depthwise 3x3 with dilations 1 and 2 through `medattn_kernels.nn.DepthwiseConv2d`). Each stream is
then cross-gated by the fusion, ``s' = s + s * sigmoid(Conv1x1(fusion))``, and its gated feature gives
a proxy output (segmentation logits, SR image). Main outputs come from the ungated streams (what runs at
inference); the proxy outputs are trained with the same losses (weight ``proxy_weight``).
Loss = CE/Dice(seg) + MSE(sr, high-res image) + proxy_weight * (same on the proxies)
       + affinity_weight * DSRL's feature affinity |S_seg - S_sr|_1, S = F^T F over L2-normalised pixel
         features of both streams pooled by 8 (an N x N similarity, as in DSRL).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DepthwiseConv2d
from ._common import ConvBNAct, DoubleConv, SegmentationModel, UpBlock, ce_dice_loss


class MultiScaleCrossGate(nn.Module):
    def __init__(self, channels: int, fused: bool = True):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.GELU())
        self.pixel_gate = nn.Conv2d(channels, channels, 1)
        self.dw1 = DepthwiseConv2d(channels, 3, dilation=1, fused=fused)
        self.dw2 = DepthwiseConv2d(channels, 3, dilation=2, fused=fused)
        self.pool_proj = nn.Conv2d(channels, channels, 1)
        self.mix = nn.Conv2d(3 * channels, channels, 1)
        self.gate_seg = nn.Conv2d(channels, channels, 1)
        self.gate_sr = nn.Conv2d(channels, channels, 1)

    def forward(self, seg: torch.Tensor, sr: torch.Tensor):
        x = self.reduce(torch.cat([sr, seg], 1))
        g = x * torch.sigmoid(self.pixel_gate(x))
        pooled = self.pool_proj(g.mean((2, 3), keepdim=True)).expand_as(g)
        fusion = x + self.mix(torch.cat([self.dw1(g), self.dw2(g), pooled], 1))
        return seg + seg * torch.sigmoid(self.gate_seg(fusion)), sr + sr * torch.sigmoid(self.gate_sr(fusion))


class _Decoder(nn.Module):
    def __init__(self, widths: Sequence[int], upscale: int):
        super().__init__()
        self.ups = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        c = widths[0]
        self.tail = nn.Sequential(nn.Conv2d(c, c * upscale * upscale, 3, padding=1), nn.PixelShuffle(upscale),
                                  ConvBNAct(c, c))

    def forward(self, feats):
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
        return self.tail(x)


class DS2F(SegmentationModel):
    """forward(low_res_image) -> {"logits", "sr", "proxy_logits", "proxy_sr"} at upscale x input size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths: Sequence[int] = (16, 32, 48, 64),
                 upscale: int = 2, proxy_weight: float = 0.5, affinity_weight: float = 0.1, fused: bool = True):
        super().__init__()
        widths = tuple(widths)
        self.fused, self.upscale = fused, upscale
        self.proxy_weight, self.affinity_weight = proxy_weight, affinity_weight
        self.enc = nn.ModuleList([DoubleConv(in_channels, widths[0])] +
                                 [nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i - 1], widths[i]))
                                  for i in range(1, len(widths))])
        self.seg_decoder, self.sr_decoder = _Decoder(widths, upscale), _Decoder(widths, upscale)
        self.cross_gate = MultiScaleCrossGate(widths[0], fused)
        self.seg_head, self.sr_head = nn.Conv2d(widths[0], num_classes, 1), nn.Conv2d(widths[0], in_channels, 1)
        self.proxy_seg_head = nn.Conv2d(widths[0], num_classes, 1)
        self.proxy_sr_head = nn.Conv2d(widths[0], in_channels, 1)

    def inputs_of(self, batch):
        return (F.avg_pool2d(batch["image"], self.upscale),)

    def loss_extras(self, batch):
        return {"image": batch["image"]}

    def forward(self, image: torch.Tensor):
        feats, x = [], image
        for stage in self.enc:
            x = stage(x)
            feats.append(x)
        seg, sr = self.seg_decoder(feats), self.sr_decoder(feats)
        out = {"logits": self.seg_head(seg), "sr": self.sr_head(sr)}
        if self.training:
            seg_g, sr_g = self.cross_gate(seg, sr)
            out.update(proxy_logits=self.proxy_seg_head(seg_g), proxy_sr=self.proxy_sr_head(sr_g),
                       seg_feature=seg, sr_feature=sr)
        return out

    @staticmethod
    def feature_affinity(feature: torch.Tensor, pool: int = 8) -> torch.Tensor:
        f = F.normalize(F.avg_pool2d(feature, pool, pool).flatten(2), dim=1)  # [B, C, N]
        return f.transpose(1, 2) @ f  # [B, N, N]

    def loss(self, outputs, target, image: torch.Tensor):
        total = ce_dice_loss(outputs["logits"], target) + F.mse_loss(outputs["sr"], image)
        if "proxy_logits" in outputs:
            total = total + self.proxy_weight * (ce_dice_loss(outputs["proxy_logits"], target)
                                                 + F.mse_loss(outputs["proxy_sr"], image))
            if self.affinity_weight:
                total = total + self.affinity_weight * (self.feature_affinity(outputs["seg_feature"])
                                                        - self.feature_affinity(outputs["sr_feature"])).abs().mean()
        return total
