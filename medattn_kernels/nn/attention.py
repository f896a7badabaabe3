"""Attention modules of the target networks, on feature maps ``[B, C, H, W]``: 1x1-conv projections
to heads over the H*W tokens, a fused attention op, and a 1x1-conv projection back. Each takes
``fused: bool``; ``fused=False`` runs the pure-PyTorch references (same parameters, same math), and
``sdpa=True`` with it computes the attention with PyTorch's ``F.scaled_dot_product_attention`` on
contiguous q/k/v instead of the naive reference: the best a PyTorch user has, the benchmarks' baseline."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.cross_attention import bidirectional_cross_attention, cross_attention
from ..ops.global_spatial_attention import global_spatial_attention
from ..reference.cross_attention import sdpa_bidirectional_cross_attention, sdpa_cross_attention


def to_tokens(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, heads * d, H, W] -> [B, heads, H*W, d] (a strided view; the kernels accept it)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w).transpose(-1, -2)


def from_tokens(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, heads, H*W, d] -> [B, heads * d, H, W]."""
    b, heads, _, d = t.shape
    return t.transpose(-1, -2).reshape(b, heads * d, height, width)


def _head_dim(channels: int, heads: int, head_dim: Optional[int]) -> int:
    if heads < 1:
        raise ValueError(f"heads: expected >= 1, got {heads}")
    if head_dim is None:
        if channels % heads:
            raise ValueError(f"heads: expected a divisor of channels={channels}, got {heads}")
        return channels // heads
    if head_dim < 1:
        raise ValueError(f"head_dim: expected >= 1, got {head_dim}")
    return head_dim


def _backend(fused: bool) -> Optional[str]:
    return None if fused else "reference"


def _check_variant(fused: bool, sdpa: bool) -> None:
    if fused and sdpa:
        raise ValueError("sdpa: expected False with fused=True (sdpa=True selects PyTorch's SDPA for the "
                         "unfused variant)")


class CrossImageAttention(nn.Module):
    """Tokens of ``x`` attend to the tokens of ``context`` (same batch and channels; the spatial sizes
    may differ): ``proj(softmax(q k^T / sqrt(d)) v)`` with q from x, k and v from context."""

    def __init__(self, channels: int, heads: int = 1, head_dim: Optional[int] = None, fused: bool = True,
                 sdpa: bool = False):
        super().__init__()
        _check_variant(fused, sdpa)
        self.heads, self.head_dim = heads, _head_dim(channels, heads, head_dim)
        inner = heads * self.head_dim
        self.to_q = nn.Conv2d(channels, inner, 1)
        self.to_kv = nn.Conv2d(channels, 2 * inner, 1)
        self.proj = nn.Conv2d(inner, channels, 1)
        self.fused, self.sdpa = fused, sdpa

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = to_tokens(self.to_q(x), self.heads)
        k, v = (to_tokens(t, self.heads) for t in self.to_kv(context).chunk(2, dim=1))
        if self.sdpa:
            out = sdpa_cross_attention(q, k, v)
        else:
            out = cross_attention(q, k, v, backend=_backend(self.fused))
        return self.proj(from_tokens(out, x.shape[2], x.shape[3]))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, fused={self.fused}, sdpa={self.sdpa}"


class _FeedForward(nn.Sequential):
    def __init__(self, channels: int, expansion: int):
        super().__init__(nn.Conv2d(channels, expansion * channels, 1), nn.GELU(),
                         nn.Conv2d(expansion * channels, channels, 1))


class DualInteractiveFusion(nn.Module):
    """DIN's dual interactive fusion module (DIFM, design.md section 3).

    Branch 1: Q from the original image's features, K and V from the enhanced image's:
    ``y1 = softmax(Q1 K1^T / sqrt(d)) V1 + Q1``, ``y1 = y1 + FFN(y1)``, then global spatial attention.
    Branch 2 mirrors it (Q from the enhanced, K and V from the original). The output, the decoder's
    skip, is ``GSA(y1) + GSA(y2)``. Both attentions run as one bidirectional_cross_attention launch and
    the two GSAs as one fused two-input GSA pass. The FFN's residual and the 1x1 projections are our
    reading of the paper (no code is public).
    """

    def __init__(self, channels: int, heads: int = 1, ffn_expansion: int = 2, fused: bool = True,
                 sdpa: bool = False):
        super().__init__()
        _check_variant(fused, sdpa)
        self.heads, self.head_dim = heads, _head_dim(channels, heads, None)
        # one 1x1 conv per image yields its query (for its own branch) and key/value (for the other)
        self.qkv_original = nn.Conv2d(channels, 3 * channels, 1)
        self.qkv_enhanced = nn.Conv2d(channels, 3 * channels, 1)
        self.ffn_original = _FeedForward(channels, ffn_expansion)
        self.ffn_enhanced = _FeedForward(channels, ffn_expansion)
        self.fused, self.sdpa = fused, sdpa

    def forward(self, original: torch.Tensor, enhanced: torch.Tensor) -> torch.Tensor:
        if original.shape != enhanced.shape:
            raise ValueError(f"enhanced: expected shape {tuple(original.shape)} (as original), "
                             f"got {tuple(enhanced.shape)}")
        h, w = original.shape[2:]
        q_a, k_a, v_a = (to_tokens(t, self.heads) for t in self.qkv_original(original).chunk(3, dim=1))
        q_b, k_b, v_b = (to_tokens(t, self.heads) for t in self.qkv_enhanced(enhanced).chunk(3, dim=1))
        if self.sdpa:
            o_a, o_b = sdpa_bidirectional_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b)
        else:
            o_a, o_b = bidirectional_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, backend=_backend(self.fused))
        y1 = from_tokens(o_a + q_a, h, w)
        y2 = from_tokens(o_b + q_b, h, w)
        y1 = y1 + self.ffn_original(y1)
        y2 = y2 + self.ffn_enhanced(y2)
        return global_spatial_attention(y1, y2, backend=_backend(self.fused))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, fused={self.fused}, sdpa={self.sdpa}"


class JointAttention(nn.Module):
    """Joint attention of the Joint Attention DenseUNet: self-attention over the H*W positions combined
    with a point-wise sigmoid gate per position (and head), whose logits come from a 1x1 conv:
    ``x + proj(sigmoid(g) * softmax(q k^T / sqrt(d)) v)``; the gate is fused into the attention op."""

    def __init__(self, channels: int, heads: int = 1, head_dim: Optional[int] = None, fused: bool = True,
                 sdpa: bool = False):
        super().__init__()
        _check_variant(fused, sdpa)
        self.heads, self.head_dim = heads, _head_dim(channels, heads, head_dim)
        inner = heads * self.head_dim
        self.to_qkv = nn.Conv2d(channels, 3 * inner, 1)
        self.to_gate = nn.Conv2d(channels, heads, 1)
        self.proj = nn.Conv2d(inner, channels, 1)
        self.fused, self.sdpa = fused, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (to_tokens(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        gate = self.to_gate(x).reshape(b, self.heads, h * w)
        if self.sdpa:
            out = sdpa_cross_attention(q, k, v, gate=gate)
        else:
            out = cross_attention(q, k, v, gate=gate, backend=_backend(self.fused))
        return x + self.proj(from_tokens(out, h, w))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, fused={self.fused}, sdpa={self.sdpa}"


__all__ = ["CrossImageAttention", "DualInteractiveFusion", "JointAttention", "to_tokens", "from_tokens"]
