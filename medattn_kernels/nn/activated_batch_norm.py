import torch
import torch.nn.functional as F
from torch import nn

from ..ops.activated_batch_norm import activated_batch_norm


class ActivatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d + LeakyReLU in one layer that keeps only its output for backward (InPlace-ABN).

    The scale applied is ``|weight| + eps`` (invertibility; ``medattn_kernels.activated_batch_norm``),
    so the layer differs from ``BatchNorm2d`` + ``LeakyReLU`` only by that reparameterisation: with
    ``fused=False`` it runs the reference composite with the same parameters and buffers. Training
    mode normalises with the batch statistics and updates the running estimates like BatchNorm2d
    (momentum, or a cumulative average with ``momentum=None``; unbiased running variance); eval mode
    uses the running estimates (a per-channel affine map, plain PyTorch in both variants).
    """

    def __init__(self, num_features: int, negative_slope: float = 0.01, eps: float = 1e-5,
                 momentum: float | None = 0.1, fused: bool = True):
        if not negative_slope > 0:
            raise ValueError(f"negative_slope: expected > 0 (the activation must be invertible), got {negative_slope}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.negative_slope = negative_slope
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps, self.bias,
                             training=False, eps=self.eps)
            return F.leaky_relu(y, self.negative_slope, inplace=True)
        y, mean, var = activated_batch_norm(x, self.weight, self.bias, self.eps, self.negative_slope,
                                            backend=None if self.fused else "reference")
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            count = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negative_slope={self.negative_slope}, fused={self.fused}"
