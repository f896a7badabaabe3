"""patch(model): swap PyTorch depthwise convolutions for the fused DepthwiseConv2d in place."""
from __future__ import annotations

from torch import nn

from .nn.depthwise import DepthwiseConv2d
from .ops.depthwise_conv2d import MAX_KERNEL

MIN_KERNEL = 5  # below 5x5 PyTorch's own depthwise kernels are as fast: leave those convs alone


def is_patchable_depthwise(conv: nn.Module) -> bool:
    """An nn.Conv2d the fused op computes exactly: groups == in == out channels, stride 1, zero padding
    mode, symmetric padding (an int pair, 'valid', or 'same' with an odd kernel), largest kernel side
    >= MIN_KERNEL and both sides <= 63."""
    if type(conv) is not nn.Conv2d:  # subclasses may override forward
        return False
    kh, kw = conv.kernel_size
    if not (conv.groups == conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
            and conv.padding_mode == "zeros" and max(kh, kw) >= MIN_KERNEL and max(kh, kw) <= MAX_KERNEL):
        return False
    if conv.padding == "same" and (kh % 2 == 0 or kw % 2 == 0):
        return False  # PyTorch pads even kernels asymmetrically; the op pads symmetrically
    return True


def patch(model: nn.Module, fused: bool = True) -> int:
    """Replace, in place, every depthwise nn.Conv2d of `model` (see is_patchable_depthwise) by a
    DepthwiseConv2d sharing its weight and bias Parameters; returns how many were replaced. Outputs
    are unchanged up to rounding. `model` itself is not replaced if it is a bare Conv2d (wrap it)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_patchable_depthwise(child):
                setattr(parent, name, DepthwiseConv2d.from_conv(child, fused=fused))
                count += 1
    return count


__all__ = ["patch", "is_patchable_depthwise"]
