from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def activated_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         negative_slope: float = 0.01, running_mean: Optional[torch.Tensor] = None,
                         running_var: Optional[torch.Tensor] = None,
                         momentum: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm followed by leaky ReLU, the composite the fused op replaces:
    ``y = leaky_relu((x - mean) / sqrt(var + eps) * (|weight| + eps) + bias)`` with the biased batch
    statistics over every dimension but 1. Returns (y, mean, var), mean and var of shape [C] and
    detached (they feed the running statistics, not the loss). running_mean / running_var (both or
    neither), when given, move in place as ``update_running_stats_`` says."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
    y = F.batch_norm(x, None, None, weight.abs() + eps, bias, training=True, momentum=0.0, eps=eps)
    if running_mean is not None:
        update_running_stats_(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    # In place, as the composite is best written: leaky_relu_ then keeps only its output (BN keeps x).
    return F.leaky_relu(y, negative_slope, inplace=True), mean, var


def update_running_stats_(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                          var: torch.Tensor, momentum: float, count: int) -> None:
    """What ATen's training-mode batch_norm does to a layer's running estimates after normalising `count`
    values per channel with the biased batch statistics (mean, var): ``running = (1 - momentum) * running +
    momentum * statistic``, the variance unbiased by count / (count - 1); in place, in the buffers' dtype."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * count / (count - 1))
