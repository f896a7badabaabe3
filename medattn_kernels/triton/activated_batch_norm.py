"""Triton kernels of activated batch norm (see medattn_kernels/ops/activated_batch_norm.py).

A channel's B * H * W values are split into SPLITS chunks so that a [C, SPLITS] grid fills the GPU
even for the narrow, high-resolution maps where this op matters (C = 12 at 224 x 224). Each pass is
one launch over that grid: partial sums per (channel, chunk) written to a [C, SPLITS] buffer and
combined in float64 by torch (a handful of [C] operations), then an elementwise launch. Forward: the
shifted sums (around the channel's first value, which avoids the cancellation of E[x^2] - E[x]^2) and
the output; backward: sum dz and sum dz * xhat, then grad_x. Addresses are 64-bit; the flat index i of
a channel's values maps to (b, p) = (i // HW, i % HW), so NCHW and channels_last share the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.activated_batch_norm import update_running_stats_
from ._common import launch, map_strides, output_layout

BLOCK = 1024
TARGET_PROGRAMS = 2048  # about 16 waves of programs on a 132-SM H100
NUM_WARPS, NUM_STAGES = 4, 3  # 8 values per thread per step


@triton.jit
def _offsets(c, start, HW, M, stride_b, stride_c, stride_p, BLOCK: tl.constexpr):
    i = start + tl.arange(0, BLOCK).to(tl.int64)
    return (i // HW) * stride_b + c.to(tl.int64) * stride_c + (i % HW) * stride_p, i < M


@triton.jit
def _store_partials(part_ptr, c, s, SPLITS, s1, s2):
    """This (channel, chunk) program's two partial sums, into the [C, SPLITS, 2] buffer."""
    out = part_ptr + (c * SPLITS + s) * 2
    tl.store(out, tl.sum(s1, 0))
    tl.store(out + 1, tl.sum(s2, 0))


@triton.jit
def _shifted_sums_kernel(x_ptr, part_ptr, M, HW, chunk, SPLITS, stride_b, stride_c, stride_p,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    shift = tl.load(x_ptr + c.to(tl.int64) * stride_c).to(ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, M), BLOCK):
        offs, mask = _offsets(c, start, HW, M, stride_b, stride_c, stride_p, BLOCK)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
        s1 += d
        s2 += d * d
    _store_partials(part_ptr, c, s, SPLITS, s1, s2)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_hi_ptr, mean_lo_ptr, scale_ptr, beta_ptr, M, HW, chunk, stride_b, stride_c, stride_p, slope,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    mean_hi = tl.load(mean_hi_ptr + c)
    mean_lo = tl.load(mean_lo_ptr + c)
    scale = tl.load(scale_ptr + c)
    beta = tl.load(beta_ptr + c)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, M), BLOCK):
        offs, mask = _offsets(c, start, HW, M, stride_b, stride_c, stride_p, BLOCK)
        # ((x - mean_hi) - mean_lo) * scale + beta: x - mean_hi is exact near the mean and mean_lo holds the
        # float64 mean's low bits, so a large common offset of x does not cost y its low bits.
        z = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean_hi) - mean_lo) * scale + beta
        tl.store(y_ptr + offs, tl.where(z > 0, z, z * slope).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rebuild(y_ptr, g_ptr, offs, mask, slope, beta, inv_gamma, ACC: tl.constexpr):
    """dz and xhat from y and grad_y: the inverse of the leaky activation and of the affine map."""
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    pos = y > 0
    dz = tl.where(pos, g, g * slope)
    xhat = (tl.where(pos, y, y / slope) - beta) * inv_gamma
    return dz, xhat


@triton.jit
def _backward_sums_kernel(y_ptr, g_ptr, beta_ptr, inv_gamma_ptr, part_ptr, M, HW, chunk, SPLITS,
                          stride_b, stride_c, stride_p, slope, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    beta = tl.load(beta_ptr + c)
    inv_gamma = tl.load(inv_gamma_ptr + c)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, M), BLOCK):
        offs, mask = _offsets(c, start, HW, M, stride_b, stride_c, stride_p, BLOCK)
        dz, xhat = _rebuild(y_ptr, g_ptr, offs, mask, slope, beta, inv_gamma, ACC)
        s1 += dz  # masked lanes load y = g = 0, so dz = 0 there
        s2 += dz * xhat
    _store_partials(part_ptr, c, s, SPLITS, s1, s2)


@triton.jit
def _grad_x_kernel(y_ptr, g_ptr, gx_ptr, beta_ptr, inv_gamma_ptr, coef_ptr, mean_dz_ptr, mean_dz_xhat_ptr,
                   M, HW, chunk, stride_b, stride_c, stride_p, slope, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    beta = tl.load(beta_ptr + c)
    inv_gamma = tl.load(inv_gamma_ptr + c)
    coef = tl.load(coef_ptr + c)
    mean_dz = tl.load(mean_dz_ptr + c)
    mean_dz_xhat = tl.load(mean_dz_xhat_ptr + c)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, M), BLOCK):
        offs, mask = _offsets(c, start, HW, M, stride_b, stride_c, stride_p, BLOCK)
        dz, xhat = _rebuild(y_ptr, g_ptr, offs, mask, slope, beta, inv_gamma, ACC)
        val = coef * (dz - mean_dz - xhat * mean_dz_xhat)
        tl.store(gx_ptr + offs, val.to(gx_ptr.dtype.element_ty), mask=mask)


def _launch_shape(x: torch.Tensor):
    """(M, HW, chunk, splits): each of the C x splits programs covers `chunk` values (a multiple of BLOCK)."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    M = x.shape[0] * HW
    blocks = triton.cdiv(M, BLOCK)
    splits = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, max(C, 1))))
    chunk = triton.cdiv(blocks, splits) * BLOCK
    return M, HW, chunk, triton.cdiv(M, chunk)


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, negative_slope: float,
            running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
            momentum: float = 0.1):
    layout = output_layout(x)
    x = x.contiguous(memory_format=layout)
    tl_acc, acc = _acc(x.dtype)
    C = x.shape[1]
    y = torch.empty_like(x, memory_format=layout)
    M, HW, chunk, splits = _launch_shape(x)
    partial = torch.empty((C, splits, 2), dtype=acc, device=x.device)
    grid = (C, splits)
    launch(_shifted_sums_kernel, grid, (x, partial, M, HW, chunk, splits, *map_strides(x)),
           dict(ACC=tl_acc, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    shift = x[0, :, 0, 0].double()
    sums = partial.double().sum(1)
    m1 = sums[:, 0] / M
    var = (sums[:, 1] / M - m1 * m1).clamp_min(0.0)
    mean = shift + m1
    scale = (weight.double().abs() + eps) * torch.rsqrt(var + eps)
    mean_hi = mean.to(acc)
    launch(_apply_kernel, grid, (x, y, mean_hi, (mean - mean_hi.double()).to(acc), scale.to(acc),
                                 bias.to(acc).contiguous(), M, HW, chunk, *map_strides(x), float(negative_slope)),
           dict(ACC=tl_acc, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    if running_mean is not None:  # [C] work beside the map's passes: torch ops, no launch of our own
        update_running_stats_(running_mean, running_var, mean, var, momentum, M)
    return y, mean.to(acc), var.to(acc)


def backward(grad_y: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, var: torch.Tensor,
             eps: float, negative_slope: float, output_mask):
    layout = output_layout(y)
    y = y.contiguous(memory_format=layout)
    grad_y = grad_y.contiguous(memory_format=layout)
    tl_acc, acc = _acc(y.dtype)
    C = y.shape[1]
    M, HW, chunk, splits = _launch_shape(y)
    gamma = weight.to(acc).abs() + eps
    beta, inv_gamma = bias.to(acc).contiguous(), (1.0 / gamma).contiguous()
    partial = torch.empty((C, splits, 2), dtype=acc, device=y.device)
    grid = (C, splits)
    launch(_backward_sums_kernel, grid, (y, grad_y, beta, inv_gamma, partial, M, HW, chunk, splits, *map_strides(y),
                                         float(negative_slope)), dict(ACC=tl_acc, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    sums = partial.double().sum(1)
    sum_dz, sum_dz_xhat = sums[:, 0], sums[:, 1]
    absent = y.new_empty((0,))
    grad_w = (sum_dz_xhat * torch.sgn(weight.double())).to(weight.dtype) if output_mask[1] else absent
    grad_b = sum_dz.to(bias.dtype) if output_mask[2] else absent
    grad_x = absent
    if output_mask[0]:
        grad_x = torch.empty_like(y, memory_format=layout)
        coef = (gamma.double() * torch.rsqrt(var.double() + eps)).to(acc)
        launch(_grad_x_kernel, grid, (y, grad_y, grad_x, beta, inv_gamma, coef, (sum_dz / M).to(acc),
                                      (sum_dz_xhat / M).to(acc), M, HW, chunk, *map_strides(y), float(negative_slope)),
               dict(ACC=tl_acc, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    return grad_x, grad_w, grad_b
