"""Triton kernels of depthwise conv2d (see medattn_kernels/ops/depthwise_conv2d.py).

Each kernel row is a matrix product. For output tile rows oh (BLOCK_H) and columns ow (BLOCK_W) of one
plane, and kernel row kh, the input rows oh + dh kh (all BLOCK_W + dw (KW - 1) columns the tile
reaches, padded to BLOCK_WP) are loaded ONCE as a [BLOCK_H, BLOCK_WP] tile X_kh, and

    out[:, :] += X_kh @ T_kh,   T_kh[j, w] = weight[kh, (j - w) / dw]  if (j - w) >= 0, divisible by dw
                                                                       and (j - w) / dw < KW, else 0

(a banded Toeplitz matrix gathered from the KW taps of kernel row kh). So each input element is read
KH times (once per kernel row) instead of KH*KW times, and the KW-tap row sums run on tl.dot (tensor
cores for fp16/bf16; IEEE fp32 for float32 so that float32 matches the reference to ~1e-6, not TF32).

* forward: the correlation above with the window origin at (-ph, -pw), plus bias.
* grad input: the same kernel over grad_out with the flipped kernel and origin
  (ph - dh (KH-1), pw - dw (KW-1)).
* grad weight: one program per (channel, kernel row kh, output column tile) accumulates
  M = sum_{b, row tiles} G^T X_kh  ([BLOCK_W, BLOCK_WP]) over the whole batch, then
  grad_w[kh, kw] = sum_w M[w, w + dw kw] (the band's diagonals). The per-column-tile partials are
  summed by torch in a fixed order: deterministic, no atomics. grad bias = grad_out.sum((0, 2, 3)).

Masks cover every tail (rows, columns, taps); all offsets are int64; any strides (NCHW, channels_last,
strided views) are read in place, and outputs follow ops.depthwise_conv2d's layout rule.
Limitation: a tail lane of grad_out (zero) times an Inf/NaN input in the tile's reach inside tl.dot can
turn a grad-weight sum into NaN where the reference stays finite (only with non-finite inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import launch, output_layout

BLOCK_H = 16
BLOCK_W = 32
# the kernel-row loops' loads are software-pipelined 3 deep (shared memory per stage: an input tile and a
# banded matrix), but for the IEEE fp32 correlation 2 deep (see correlate_stages)
NUM_STAGES = 3


@triton.jit
def _toeplitz(w_ptr, w_base, kh, KH, KW, DW, FLIP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_WP: tl.constexpr):
    """T[j, w] = weight[kh, (j - w) / DW] on the band, 0 elsewhere (flipped kernel when FLIP)."""
    diff = tl.arange(0, BLOCK_WP)[:, None] - tl.arange(0, BLOCK_W)[None, :]
    tap = diff // DW
    ok = (diff >= 0) & (diff % DW == 0) & (tap < KW)
    if FLIP:
        idx = (KH - 1 - kh) * KW + (KW - 1 - tap)
    else:
        idx = kh * KW + tap
    return tl.load(w_ptr + w_base + idx, mask=ok, other=0.0)


@triton.jit
def _dw_correlate_kernel(src_ptr, w_ptr, bias_ptr, dst_ptr, C, SRC_H, SRC_W, OUT_H, OUT_W, row0, col0,
                         KH, KW, DH, DW, tiles_w,
                         s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
                         HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_WP: tl.constexpr):
    plane = tl.program_id(0)
    tile = tl.program_id(1)
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    oh = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_start = (tile % tiles_w) * BLOCK_W
    ow = col_start + tl.arange(0, BLOCK_W)
    j = tl.arange(0, BLOCK_WP)
    in_cols = col0 + col_start + j
    col_ok = (in_cols >= 0) & (in_cols < SRC_W) & (j < BLOCK_W + DW * (KW - 1))
    src = src_ptr + b * s_b + c * s_c + in_cols.to(tl.int64)[None, :] * s_w
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for kh in range(0, KH):
        rows = row0 + oh + kh * DH
        row_ok = (rows >= 0) & (rows < SRC_H)
        x = tl.load(src + rows.to(tl.int64)[:, None] * s_h, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        t = _toeplitz(w_ptr, c * KH * KW, kh, KH, KW, DW, FLIP, BLOCK_W, BLOCK_WP)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, t)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c).to(tl.float32)
    out_ok = (oh < OUT_H)[:, None] & (ow < OUT_W)[None, :]
    dst = dst_ptr + b * d_b + c * d_c + oh.to(tl.int64)[:, None] * d_h + ow.to(tl.int64)[None, :] * d_w
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _dw_weight_grad_kernel(g_ptr, x_ptr, part_ptr, B, C, H, W, HO, WO, PH, PW, KH, KW, DH, DW, tiles_w,
                           g_b, g_c, g_h, g_w, x_b, x_c, x_h, x_w,
                           IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_WP: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    tw = tl.program_id(2)
    col_start = tw * BLOCK_W
    ow = col_start + tl.arange(0, BLOCK_W)
    j = tl.arange(0, BLOCK_WP)
    in_cols = col_start - PW + j
    col_ok = (in_cols >= 0) & (in_cols < W) & (j < BLOCK_W + DW * (KW - 1))
    m = tl.zeros([BLOCK_W, BLOCK_WP], dtype=tl.float32)
    g_plane = g_ptr + c * g_c + ow.to(tl.int64)[None, :] * g_w
    x_plane = x_ptr + c * x_c + in_cols.to(tl.int64)[None, :] * x_w
    for _ in range(0, B):  # the planes advance by the batch stride (64-bit pointer arithmetic)
        for h0 in range(0, HO, BLOCK_H):
            oh = h0 + tl.arange(0, BLOCK_H)
            oh_ok = oh < HO
            g = tl.load(g_plane + oh.to(tl.int64)[:, None] * g_h, mask=oh_ok[:, None] & (ow < WO)[None, :], other=0.0)
            rows = oh - PH + kh * DH
            row_ok = oh_ok & (rows >= 0) & (rows < H)
            x = tl.load(x_plane + rows.to(tl.int64)[:, None] * x_h, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                m += tl.dot(tl.trans(g.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
            else:
                m += tl.dot(tl.trans(g), x)
        g_plane += g_b
        x_plane += x_b
    # grad_w[kh, kw] (this column tile's part) = sum_w m[w, w + DW kw]
    diff = j[None, :] - tl.arange(0, BLOCK_W)[:, None]
    out = part_ptr + ((c * KH + kh) * tl.num_programs(2) + tw) * KW
    for kw in range(0, KW):
        tl.store(out + kw, tl.sum(tl.sum(tl.where(diff == DW * kw, m, 0.0), axis=1), axis=0))


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 operands -> IEEE fp32 dot (not TF32). bf16 also under the interpreter, whose tl.dot
    mis-reads bf16 operands (numpy has no bfloat16; errors of 1e10 with triton 3.9), so there the
    operands are upcast; on a GPU bf16/fp16 go to the tensor cores with fp32 accumulation."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1")


def num_warps(dtype: torch.dtype) -> int:
    """Warps per 16 x 32 output tile: 4 on tensor cores (fp16 / bf16); 8 for the IEEE fp32 products, which
    run on FMAs with their operands in registers (with 4 warps ptxas spills a few words per thread; see
    docs/gpu_resources.md)."""
    return 8 if _ieee(dtype) else 4


def correlate_stages(dtype: torch.dtype) -> int:
    """Pipelining depth of the correlation's kernel-row loop. The IEEE fp32 products keep their operands in
    registers; with a third stage ptxas spills a few words per thread (flipped correlation, BLOCK_WP 64,
    sm_90), with 2 it does not, and FMAs, not loads, bound that path. (The weight-gradient kernel is the
    other way round: it spills at 2 stages, not at 3.)"""
    return 2 if _ieee(dtype) else NUM_STAGES


def _block_wp(kw: int, dw: int) -> int:
    return max(16, triton.next_power_of_2(BLOCK_W + dw * (kw - 1)))


def _correlate(src, weight, bias, out_shape, row0, col0, dilation, flip, layout_of):
    B, C = src.shape[0], src.shape[1]
    KH, KW = weight.shape[2], weight.shape[3]
    dst = torch.empty(out_shape, dtype=src.dtype, device=src.device).contiguous(memory_format=output_layout(layout_of))
    if dst.numel() == 0:
        return dst
    w = weight.contiguous()
    tiles_w = triton.cdiv(out_shape[3], BLOCK_W)
    grid = (B * C, triton.cdiv(out_shape[2], BLOCK_H) * tiles_w)
    launch(_dw_correlate_kernel, grid,
           (src, w, w if bias is None else bias.contiguous(), dst, C, src.shape[2], src.shape[3], out_shape[2],
            out_shape[3], row0, col0, KH, KW, dilation[0], dilation[1], tiles_w, *src.stride(), *dst.stride()),
           dict(HAS_BIAS=bias is not None, FLIP=flip, IEEE=_ieee(src.dtype), BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W,
                BLOCK_WP=_block_wp(KW, dilation[1])), num_warps(src.dtype), correlate_stages(src.dtype))
    return dst


def forward(x, weight, bias, padding, dilation):
    KH, KW = weight.shape[2], weight.shape[3]
    ho = x.shape[2] + 2 * padding[0] - dilation[0] * (KH - 1)
    wo = x.shape[3] + 2 * padding[1] - dilation[1] * (KW - 1)
    return _correlate(x, weight, bias, (x.shape[0], x.shape[1], ho, wo), -padding[0], -padding[1], dilation,
                      False, x)


def backward(grad_out, x, weight, padding, dilation, output_mask):
    KH, KW = weight.shape[2], weight.shape[3]
    absent = x.new_empty((0,))
    grad_x = grad_w = grad_b = absent
    if output_mask[0]:
        grad_x = _correlate(grad_out, weight, None, tuple(x.shape), padding[0] - dilation[0] * (KH - 1),
                            padding[1] - dilation[1] * (KW - 1), dilation, True, x)
    if output_mask[1]:
        B, C, H, W = x.shape
        HO, WO = grad_out.shape[2], grad_out.shape[3]
        tiles_w = triton.cdiv(WO, BLOCK_W)
        part = torch.zeros((C, KH, tiles_w, KW), dtype=torch.float32, device=x.device)
        if B > 0:
            launch(_dw_weight_grad_kernel, (C, KH, tiles_w),
                   (grad_out, x, part, B, C, H, W, HO, WO, padding[0], padding[1], KH, KW, dilation[0], dilation[1],
                    tiles_w, *grad_out.stride(), *x.stride()),
                   dict(IEEE=_ieee(x.dtype), BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, BLOCK_WP=_block_wp(KW, dilation[1])),
                   num_warps(x.dtype), NUM_STAGES)
        grad_w = part.sum(2).reshape(C, 1, KH, KW).to(x.dtype)
    if output_mask[2]:
        grad_b = grad_out.sum((0, 2, 3), dtype=torch.float32).to(x.dtype)
    return grad_x, grad_w, grad_b
