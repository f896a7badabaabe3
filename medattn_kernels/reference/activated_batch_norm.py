from typing import Tuple

import torch
import torch.nn.functional as F


def activated_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         negative_slope: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm followed by leaky ReLU, the composite the fused op replaces:
    ``y = leaky_relu((x - mean) / sqrt(var + eps) * (|weight| + eps) + bias)`` with the biased batch
    statistics over every dimension but 1. Returns (y, mean, var), mean and var of shape [C] and
    detached (they feed the running statistics, not the loss)."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
    y = F.batch_norm(x, None, None, weight.abs() + eps, bias, training=True, momentum=0.0, eps=eps)
    # In place, as the composite is best written: leaky_relu_ then keeps only its output (BN keeps x).
    return F.leaky_relu(y, negative_slope, inplace=True), mean, var
