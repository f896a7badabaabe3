from typing import Optional

import torch
from torch import nn

from ..ops.global_spatial_attention import global_spatial_attention


class GlobalSpatialAttention(nn.Module):
    """x * sigmoid(mean_c x) (DIN's GSA); `forward(x, y)` returns gsa(x) + gsa(y) in one fused pass."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return global_spatial_attention(x, y, backend=None if self.fused else "reference")

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
