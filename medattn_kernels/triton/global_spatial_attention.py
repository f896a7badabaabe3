"""Triton kernels of global spatial attention (see medattn_kernels/ops/global_spatial_attention.py).

One program owns BLOCK_P pixels of one image and walks the channels twice: once to sum them (the gate),
once to write the output, the second pass hitting L2. Pointers advance by the channel stride, so the
same kernel serves NCHW (pixels unit-stride) and channels_last (pixels C apart) with 64-bit addresses.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import launch, map_strides, output_layout

BLOCK_P = 256
NUM_WARPS, NUM_STAGES = 4, 3  # 2 pixels per thread; the channel loops hold no shared memory


@triton.jit
def _pixel_tile(HW, tiles, stride_b, stride_p, BLOCK_P: tl.constexpr):
    """This program's pixel tile: 64-bit element offsets of its pixels in channel 0, and the tail mask."""
    pid = tl.program_id(0)
    offs = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    return (pid // tiles).to(tl.int64) * stride_b + offs.to(tl.int64) * stride_p, offs < HW


@triton.jit
def _gsa_forward_kernel(x_ptr, y_ptr, out_ptr, C, HW, tiles, stride_b, stride_c, stride_p,
                        HAS_Y: tl.constexpr, BLOCK_P: tl.constexpr):
    base, mask = _pixel_tile(HW, tiles, stride_b, stride_p, BLOCK_P)
    sum_x = tl.zeros([BLOCK_P], dtype=tl.float32)
    sum_y = tl.zeros([BLOCK_P], dtype=tl.float32)
    xp = x_ptr + base
    yp = y_ptr + base
    for _ in range(0, C):
        sum_x += tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        xp += stride_c
        if HAS_Y:
            sum_y += tl.load(yp, mask=mask, other=0.0).to(tl.float32)
            yp += stride_c
    gate_x = tl.sigmoid(sum_x / C)
    gate_y = tl.sigmoid(sum_y / C)
    xp = x_ptr + base
    yp = y_ptr + base
    op = out_ptr + base
    for _ in range(0, C):
        val = tl.load(xp, mask=mask, other=0.0).to(tl.float32) * gate_x
        xp += stride_c
        if HAS_Y:
            val += tl.load(yp, mask=mask, other=0.0).to(tl.float32) * gate_y
            yp += stride_c
        tl.store(op, val.to(out_ptr.dtype.element_ty), mask=mask)
        op += stride_c


@triton.jit
def _gsa_backward_kernel(g_ptr, x_ptr, gx_ptr, C, HW, tiles, stride_b, stride_c, stride_p, BLOCK_P: tl.constexpr):
    base, mask = _pixel_tile(HW, tiles, stride_b, stride_p, BLOCK_P)
    sum_x = tl.zeros([BLOCK_P], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_P], dtype=tl.float32)
    xp = x_ptr + base
    gp = g_ptr + base
    for _ in range(0, C):
        xv = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        sum_x += xv
        sum_gx += xv * tl.load(gp, mask=mask, other=0.0).to(tl.float32)
        xp += stride_c
        gp += stride_c
    # grad_x_c = g_c s + (sum_c' g_c' x_c') s (1 - s) / C
    s = tl.sigmoid(sum_x / C)
    coef = sum_gx * s * (1.0 - s) / C
    gp = g_ptr + base
    op = gx_ptr + base
    for _ in range(0, C):
        val = tl.load(gp, mask=mask, other=0.0).to(tl.float32) * s + coef
        tl.store(op, val.to(gx_ptr.dtype.element_ty), mask=mask)
        gp += stride_c
        op += stride_c


def _grid(x: torch.Tensor):
    tiles = triton.cdiv(x.shape[2] * x.shape[3], BLOCK_P)
    return tiles, (x.shape[0] * tiles,)


def forward(x: torch.Tensor, y=None) -> torch.Tensor:
    layout = output_layout(x)
    x = x.contiguous(memory_format=layout)
    y = None if y is None else y.contiguous(memory_format=layout)
    out = torch.empty_like(x, memory_format=layout)
    if out.numel() == 0:
        return out
    tiles, grid = _grid(x)
    launch(_gsa_forward_kernel, grid, (x, x if y is None else y, out, x.shape[1], x.shape[2] * x.shape[3], tiles,
                                       *map_strides(x)), dict(HAS_Y=y is not None, BLOCK_P=BLOCK_P),
           NUM_WARPS, NUM_STAGES)
    return out


def _backward_one(grad_out: torch.Tensor, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    x = x.contiguous(memory_format=layout)
    grad_x = torch.empty_like(x, memory_format=layout)
    if grad_x.numel() == 0:
        return grad_x
    tiles, grid = _grid(x)
    launch(_gsa_backward_kernel, grid, (grad_out, x, grad_x, x.shape[1], x.shape[2] * x.shape[3], tiles,
                                        *map_strides(x)), dict(BLOCK_P=BLOCK_P), NUM_WARPS, NUM_STAGES)
    return grad_x


def backward(grad_out: torch.Tensor, x: torch.Tensor,
             y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_y) with the schema's signature; grad_y has shape [0] without y. One launch per map."""
    layout = output_layout(x)
    grad_out = grad_out.contiguous(memory_format=layout)
    grad_y = _backward_one(grad_out, y, layout) if y is not None else x.new_empty((0,))
    return _backward_one(grad_out, x, layout), grad_y
