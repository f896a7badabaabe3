"""Depthwise convolution modules on the fused op: a drop-in depthwise conv, and the re-parameterisable
large-kernel block of RepLKNet / MS-LKSeg (Re-DWConv)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..ops._checks import check_int_pair
from ..ops.depthwise_conv2d import depthwise_conv2d

IntPair = Union[int, Tuple[int, int]]


class DepthwiseConv2d(nn.Module):
    """Depthwise (groups = channels) stride-1 zero-padded conv on ``medattn.depthwise_conv2d``.

    Same parameters and result as ``nn.Conv2d(channels, channels, kernel_size, padding=padding,
    dilation=dilation, groups=channels, bias=bias)``; ``padding=None`` is "same" (odd kernels).
    ``fused=False`` runs the reference (F.conv2d) instead.
    """

    def __init__(self, channels: int, kernel_size: IntPair, padding: Optional[IntPair] = None,
                 dilation: IntPair = 1, bias: bool = True, fused: bool = True, device=None, dtype=None):
        super().__init__()
        self.channels = channels
        self.kernel_size = check_int_pair(kernel_size, "kernel_size", 1)
        self.dilation = check_int_pair(dilation, "dilation", 1)
        if padding is None:
            if self.kernel_size[0] % 2 == 0 or self.kernel_size[1] % 2 == 0:
                raise ValueError(f"padding: 'same' padding (padding=None) needs an odd kernel, got "
                                 f"{self.kernel_size}; pass padding explicitly")
            padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        self.padding = check_int_pair(padding, "padding", 0)
        self.fused = fused
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((channels, 1) + self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation (kaiming uniform with a = sqrt(5); bias in +-1/sqrt(fan_in)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, fused: bool = True) -> "DepthwiseConv2d":
        """A module sharing `conv`'s weight and bias Parameters (so optimizers keep tracking them)."""
        padding = conv.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.channels = conv.in_channels
        module.kernel_size = tuple(conv.kernel_size)
        module.dilation = tuple(conv.dilation)
        module.padding = tuple(padding)
        module.fused = fused
        module.weight = conv.weight
        module.bias = conv.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.padding, self.dilation,
                                backend=None if self.fused else "reference")

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, fused={self.fused}")


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv(no bias) -> BN in eval mode: w * gamma / std, beta - mean * gamma / std."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return weight * scale.reshape(-1, 1, 1, 1), beta - bn.running_mean * scale


class LargeKernelDWConv2d(nn.Module):
    """Large-kernel depthwise conv + BN in parallel with a small-kernel depthwise conv + BN, summed
    (RepLKNet; MS-LKSeg's Re-DWConv, 21x21 with a parallel 3x3). Both branches use `dilation`, so the
    small kernel sits on the large kernel's dilated grid and folds exactly.

    ``reparameterize()`` folds both BatchNorms (running statistics, i.e. eval-mode behaviour) and the
    zero-padded, centred small kernel into one ``kernel_size`` depthwise conv with bias; afterwards the
    module runs that single conv. ``small_kernel=None`` (or 0) drops the small branch.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int] = 3, dilation: int = 1,
                 fused: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size!r}")
        if small_kernel and (not isinstance(small_kernel, int) or small_kernel % 2 == 0
                             or small_kernel > kernel_size):
            raise ValueError(f"small_kernel: expected an odd int <= kernel_size ({kernel_size}) or None, "
                             f"got {small_kernel!r}")
        self.channels, self.kernel_size, self.dilation = channels, kernel_size, dilation
        self.small_kernel = small_kernel or None
        self._fused = fused
        factory = {"device": device, "dtype": dtype}
        self.large = DepthwiseConv2d(channels, kernel_size, dilation=dilation, bias=False, fused=fused, **factory)
        self.large_bn = nn.BatchNorm2d(channels, **factory)
        if self.small_kernel:
            self.small = DepthwiseConv2d(channels, self.small_kernel, dilation=dilation, bias=False, fused=fused,
                                         **factory)
            self.small_bn = nn.BatchNorm2d(channels, **factory)
        self.reparam: Optional[DepthwiseConv2d] = None

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = value
        for m in self.modules():
            if isinstance(m, DepthwiseConv2d):
                m.fused = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam is not None:
            return self.reparam(x)
        out = self.large_bn(self.large(x))
        if self.small_kernel:
            out = out + self.small_bn(self.small(x))
        return out

    @torch.no_grad()
    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight [C, 1, K, K], bias [C]) of the single equivalent conv."""
        weight, bias = _fold_bn(self.large.weight, self.large_bn)
        if self.small_kernel:
            w_small, b_small = _fold_bn(self.small.weight, self.small_bn)
            pad = (self.kernel_size - self.small_kernel) // 2  # centred on the same dilated grid
            weight = weight + nn.functional.pad(w_small, (pad, pad, pad, pad))
            bias = bias + b_small
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> "LargeKernelDWConv2d":
        """Fold into one conv (in place) and drop the branches; returns self."""
        if self.reparam is not None:
            return self
        weight, bias = self.folded()
        conv = DepthwiseConv2d(self.channels, self.kernel_size, dilation=self.dilation, bias=True, fused=self._fused,
                               device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.reparam = conv
        for name in ("large", "large_bn", "small", "small_bn"):
            if hasattr(self, name):
                delattr(self, name)
        return self

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"dilation={self.dilation}, reparameterized={self.reparam is not None}, fused={self._fused}")
