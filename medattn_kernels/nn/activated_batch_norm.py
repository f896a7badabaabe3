"""BatchNorm + LeakyReLU layers on ``medattn.activated_batch_norm`` (InPlace-ABN), for 1-, 2- and 3-D maps,
and the running-statistics update they share with the MONAI patcher (medattn_kernels/integrations)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.activated_batch_norm import activated_batch_norm


def running_stats_step(bn: nn.modules.batchnorm._BatchNorm):
    """A training-mode ``nn.BatchNorm*d`` step's bookkeeping, for a call that normalises with batch statistics:
    num_batches_tracked += 1 (in place, no Module.__setattr__), and ``(running_mean, running_var, momentum)``
    for ``activated_batch_norm``, which moves the running estimates inside its kernel as ATen's batch_norm
    does (momentum = 1 / num_batches_tracked for ``momentum=None``, the cumulative average);
    ``(None, None, 0.0)`` when the module does not track running statistics. At the small maps of a
    U-Net's deep stages separate ops on the [C] buffers cost a fifth of the layer's call."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, None, 0.0
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return bn.running_mean, bn.running_var, momentum


class _ActivatedBatchNorm:
    """BatchNorm + LeakyReLU in one layer that keeps only its output for backward (InPlace-ABN).

    The scale applied is ``|weight| + eps`` (invertibility; ``medattn_kernels.activated_batch_norm``),
    so the layer differs from ``BatchNorm`` + ``LeakyReLU`` only by that reparameterisation: with
    ``fused=False`` it runs the reference composite with the same parameters and buffers. Training
    mode normalises with the batch statistics and updates the running estimates like BatchNorm
    (momentum, or a cumulative average with ``momentum=None``; unbiased running variance); eval mode
    uses the running estimates (a per-channel affine map, plain PyTorch in both variants).
    (To run an existing ``nn.BatchNorm*d`` + ``nn.LeakyReLU`` with its signed weight on the fused op,
    use ``medattn_kernels.patch``.)
    """

    def __init__(self, num_features: int, negative_slope: float = 0.01, eps: float = 1e-5,
                 momentum: float | None = 0.1, fused: bool = True):
        if not negative_slope > 0:
            raise ValueError(f"negative_slope: expected > 0 (the activation must be invertible), got {negative_slope}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.negative_slope = negative_slope
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps, self.bias,
                             training=False, eps=self.eps)
            return F.leaky_relu(y, self.negative_slope, inplace=True)
        x_map = x.unsqueeze(-1) if x.dim() == 2 else x  # BatchNorm1d's [B, C]: one pixel per sample
        running_mean, running_var, momentum = running_stats_step(self)
        y = activated_batch_norm(x_map, self.weight, self.bias, self.eps, self.negative_slope,
                                 running_mean=running_mean, running_var=running_var, momentum=momentum,
                                 backend=None if self.fused else "reference")[0]
        return y if x_map is x else y.view(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}, fused={self.fused}"


class ActivatedBatchNorm1d(_ActivatedBatchNorm, nn.BatchNorm1d):
    __doc__ = "For ``[B, C]`` and ``[B, C, L]`` inputs (a ``BatchNorm1d`` subclass). " + _ActivatedBatchNorm.__doc__


class ActivatedBatchNorm2d(_ActivatedBatchNorm, nn.BatchNorm2d):
    __doc__ = "For ``[B, C, H, W]`` inputs (a ``BatchNorm2d`` subclass). " + _ActivatedBatchNorm.__doc__


class ActivatedBatchNorm3d(_ActivatedBatchNorm, nn.BatchNorm3d):
    __doc__ = "For ``[B, C, D, H, W]`` inputs (a ``BatchNorm3d`` subclass). " + _ActivatedBatchNorm.__doc__
