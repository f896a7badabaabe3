"""What the Triton launchers share."""
from __future__ import annotations

import torch


def map_strides(x: torch.Tensor):
    """(stride_b, stride_c, stride_p) of a [B, C, H, W] tensor that is NCHW- or channels_last-
    contiguous, with p = h * W + w the flattened pixel index (mergeable in both layouts)."""
    return x.stride(0), x.stride(1), x.stride(3)
