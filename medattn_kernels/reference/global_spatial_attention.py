from typing import Optional

import torch


def _gate(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x.mean(dim=1, keepdim=True))


def global_spatial_attention(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x * sigmoid(mean over channels of x), plus the same of y when given (DIFM's branch sum)."""
    out = _gate(x)
    return out if y is None else out + _gate(y)
