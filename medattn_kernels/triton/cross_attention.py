"""Triton kernels of the cross attention ops (see medattn_kernels/ops/cross_attention.py), FlashAttention-2
style.

* Forward: one program per (query block, batch x head, direction); it streams the key / value blocks
  with an online softmax and writes the output and lse = max + log(sum). The gate's sigmoid is applied
  in the epilogue. bidirectional_cross_attention is one launch whose third grid axis is the direction;
  the tied op's forward is the same launch (rows: queries r_a against keys r_b; columns: queries r_b
  against keys r_a, whose row softmax is the column softmax of S).
* Backward: delta = rowsum(dO * out) (and the gate's dO * sigmoid(g)) are formed by the launcher; one
  kernel owns a key block and loops over the queries (dK, dV), another owns a query block and loops
  over the keys (dQ): no atomics, deterministic. For the tied op the key-side kernel owns a column
  block (dr_b, dv_b) and the query-side kernel a row block (dr_a, dv_a); both form the one
  dS = P_row (dP_row - delta_row) + P_col (dP_col - delta_col).
* Any N (masked tails), head dims up to 256 (padded to the next power of two and masked), strided
  inputs (64-bit offsets from the tensors' own strides), fp32 / fp16 / bf16 with fp32 accumulation.

fp32 precision: `tl.dot` on fp32 inputs uses TF32 tensor cores by default on the GPU (about 3e-4
relative error). Set ``medattn_kernels.triton.cross_attention.ALLOW_TF32 = False`` (or the environment
variable MEDATTN_TRITON_TF32=0 before import) for IEEE fp32 products, about 3x slower on Hopper. The
interpreter always computes in IEEE fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.cross_attention import lse_dtype
from ._common import launch

ALLOW_TF32 = os.environ.get("MEDATTN_TRITON_TF32", "1") not in ("0", "false", "False")
MAX_HEAD_DIM = 256


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if (dtype == torch.float32 and ALLOW_TF32) else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bfloat16 operands as raw integers (triton 3.9): upcast there."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_tile(base, offs_n, mask_n, stride_n, offs_c, stride_c, mask_c):
    # rows offs_n (int64 offsets) x columns offs_c, zero outside the masks
    return tl.load(base + offs_n[:, None].to(tl.int64) * stride_n + offs_c[None, :] * stride_c,
                   mask=mask_n[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _store_tile(base, offs_n, mask_n, width, offs_c, mask_c, value):
    # into a contiguous [., width] output
    tl.store(base + offs_n[:, None].to(tl.int64) * width + offs_c[None, :], value.to(base.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _load_row_stats(LSE, DELTA, first, offs, mask):
    # the saved log-sum-exp and rowsum(dO * O) of rows first + offs
    lse = tl.load(LSE + first + offs, mask=mask, other=0.0)
    delta = tl.load(DELTA + first + offs, mask=mask, other=0.0)
    return lse, delta


def _blocks(d: int, dv: int):
    width = max(triton.next_power_of_2(d), triton.next_power_of_2(dv))
    if width <= 64:
        return 64, 64
    if width <= 128:
        return 64, 32
    return 32, 32


def _check_head_dims(*dims):
    for d in dims:
        if d > MAX_HEAD_DIM:
            raise ValueError(f"head dim: the Triton kernels support up to {MAX_HEAD_DIM}, got {d}")


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_problem(pid_m, bh, H, Q, K, V, O, LSE, G, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 NQ, NK, D, DV, scale, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < NQ
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, mask_m, sqn, offs_d, sqd, mask_d)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < NK
        k = _load_tile(k_base, offs_n, mask_n, skn, offs_d, skd, mask_d)
        v = _load_tile(v_base, offs_n, mask_n, svn, offs_dv, svd, mask_dv)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # exp(m_i - m_new) is NaN while both are -inf (no key seen): nothing accumulated yet, use 1
        alpha = tl.where(m_i == m_new, 1.0, tl.exp(m_i - m_new))
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    inv = tl.where(l_i == 0.0, 0.0, 1.0 / l_i)  # l = 0 only without keys: an empty sum, zeros
    out = acc * inv[:, None]
    row = bh.to(tl.int64) * NQ + offs_m
    if HAS_GATE:
        g = tl.load(G + row, mask=mask_m, other=0.0).to(tl.float32)
        out = out * tl.sigmoid(g)[:, None]
    _store_tile(O + bh.to(tl.int64) * NQ * DV, offs_m, mask_m, DV, offs_dv, mask_dv, out)
    tl.store(LSE + row, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _fwd_kernel(H, D, scale,
                Q0, K0, V0, O0, LSE0, G0, sqb0, sqh0, sqn0, sqd0, skb0, skh0, skn0, skd0, svb0, svh0, svn0, svd0,
                NQ0, NK0, DV0,
                Q1, K1, V1, O1, LSE1, G1, sqb1, sqh1, sqn1, sqd1, skb1, skh1, skn1, skd1, svb1, svh1, svn1, svd1,
                NQ1, NK1, DV1,
                HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        if pid_m * BLOCK_M < NQ0:
            _fwd_problem(pid_m, bh, H, Q0, K0, V0, O0, LSE0, G0, sqb0, sqh0, sqn0, sqd0, skb0, skh0, skn0, skd0,
                         svb0, svh0, svn0, svd0, NQ0, NK0, D, DV0, scale, HAS_GATE, BLOCK_M, BLOCK_N, BLOCK_D,
                         BLOCK_DV, PRECISION, UPCAST)
    else:
        if pid_m * BLOCK_M < NQ1:
            _fwd_problem(pid_m, bh, H, Q1, K1, V1, O1, LSE1, G1, sqb1, sqh1, sqn1, sqd1, skb1, skh1, skn1, skd1,
                         svb1, svh1, svn1, svd1, NQ1, NK1, D, DV1, scale, False, BLOCK_M, BLOCK_N, BLOCK_D,
                         BLOCK_DV, PRECISION, UPCAST)


def _scale(d: int, scale):
    return d ** -0.5 if scale is None else float(scale)


def _forward_problems(problems, scale, gate=None):
    """problems: one or two (q, k, v); returns [(out, lse), ...] from one launch."""
    q0 = problems[0][0]
    B, H, _, D = q0.shape
    _check_head_dims(D, *(p[2].shape[3] for p in problems))
    results, args = [], []
    for i, (q, k, v) in enumerate(problems):
        out = torch.empty((B, H, q.shape[2], v.shape[3]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, q.shape[2]), dtype=lse_dtype(q.dtype), device=q.device)
        g = gate.contiguous() if (gate is not None and i == 0) else lse
        results.append((out, lse))
        args += [q, k, v, out, lse, g, *q.stride(), *k.stride(), *v.stride(), q.shape[2], k.shape[2], v.shape[3]]
    if len(problems) == 1:
        args += args  # the second direction's slots are unused (grid axis 2 has size 1)
    max_dv = max(p[2].shape[3] for p in problems)
    block_m, block_n = _blocks(D, max_dv)
    max_nq = max(p[0].shape[2] for p in problems)
    grid = (triton.cdiv(max_nq, block_m), B * H, len(problems))
    launch(_fwd_kernel, grid, (H, D, _scale(D, scale), *args),
           dict(HAS_GATE=gate is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(max_dv)), PRECISION=_precision(q0.dtype),
                UPCAST=_upcast(q0.dtype)), num_warps=4, num_stages=3)
    return results


# ------------------------------------------------------------------------------------------ backward
@triton.jit
def _bwd_kv_problem(pid_n, bh, H, Q, K, V, DO, LSE, DELTA, DK, DV_, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh,
                    svn, svd, NQ, NK, D, DV, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # owns keys [pid_n * BLOCK_N, +BLOCK_N): dV = sum_i P^T dO, dK = scale sum_i dS^T Q
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < NK
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    k = _load_tile(K + b * skb + h * skh, offs_n, mask_n, skn, offs_d, skd, mask_d)
    v = _load_tile(V + b * svb + h * svh, offs_n, mask_n, svn, offs_dv, svd, mask_dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_base = Q + b * sqb + h * sqh
    row0 = bh.to(tl.int64) * NQ
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < NQ
        q = _load_tile(q_base, offs_m, mask_m, sqn, offs_d, sqd, mask_d)
        do = _load_tile(DO + row0 * DV, offs_m, mask_m, DV, offs_dv, 1, mask_dv)
        lse, delta = _load_row_stats(LSE, DELTA, row0, offs_m, mask_m)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
    col0 = bh.to(tl.int64) * NK
    _store_tile(DK + col0 * D, offs_n, mask_n, D, offs_d, mask_d, dk * scale)
    _store_tile(DV_ + col0 * DV, offs_n, mask_n, DV, offs_dv, mask_dv, dv)


@triton.jit
def _bwd_q_problem(pid_m, bh, H, Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn,
                   svd, NQ, NK, D, DV, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # owns queries [pid_m * BLOCK_M, +BLOCK_M): dQ = scale sum_j dS K
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < NQ
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    row0 = bh.to(tl.int64) * NQ
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, mask_m, sqn, offs_d, sqd, mask_d)
    do = _load_tile(DO + row0 * DV, offs_m, mask_m, DV, offs_dv, 1, mask_dv)
    lse, delta = _load_row_stats(LSE, DELTA, row0, offs_m, mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < NK
        k = _load_tile(k_base, offs_n, mask_n, skn, offs_d, skd, mask_d)
        v = _load_tile(v_base, offs_n, mask_n, svn, offs_dv, svd, mask_dv)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    _store_tile(DQ + row0 * D, offs_m, mask_m, D, offs_d, mask_d, dq * scale)


@triton.jit
def _bwd_kernel(H, D, scale,
                Q0, K0, V0, DO0, LSE0, DELTA0, DQ0, DK0, DV0_, sqb0, sqh0, sqn0, sqd0, skb0, skh0, skn0, skd0,
                svb0, svh0, svn0, svd0, NQ0, NK0, DV0,
                Q1, K1, V1, DO1, LSE1, DELTA1, DQ1, DK1, DV1_, sqb1, sqh1, sqn1, sqd1, skb1, skh1, skn1, skd1,
                svb1, svh1, svn1, svd1, NQ1, NK1, DV1, KV_BLOCKS0, KV_BLOCKS1,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grid axis 0: the key blocks (dK, dV) of the direction first, then its query blocks (dQ)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        if pid < KV_BLOCKS0:
            _bwd_kv_problem(pid, bh, H, Q0, K0, V0, DO0, LSE0, DELTA0, DK0, DV0_, sqb0, sqh0, sqn0, sqd0, skb0, skh0,
                            skn0, skd0, svb0, svh0, svn0, svd0, NQ0, NK0, D, DV0, scale, BLOCK_M, BLOCK_N, BLOCK_D,
                            BLOCK_DV, PRECISION, UPCAST)
        elif (pid - KV_BLOCKS0) * BLOCK_M < NQ0:
            _bwd_q_problem(pid - KV_BLOCKS0, bh, H, Q0, K0, V0, DO0, LSE0, DELTA0, DQ0, sqb0, sqh0, sqn0, sqd0, skb0,
                           skh0, skn0, skd0, svb0, svh0, svn0, svd0, NQ0, NK0, D, DV0, scale, BLOCK_M, BLOCK_N,
                           BLOCK_D, BLOCK_DV, PRECISION, UPCAST)
    else:
        if pid < KV_BLOCKS1:
            _bwd_kv_problem(pid, bh, H, Q1, K1, V1, DO1, LSE1, DELTA1, DK1, DV1_, sqb1, sqh1, sqn1, sqd1, skb1, skh1,
                            skn1, skd1, svb1, svh1, svn1, svd1, NQ1, NK1, D, DV1, scale, BLOCK_M, BLOCK_N, BLOCK_D,
                            BLOCK_DV, PRECISION, UPCAST)
        elif (pid - KV_BLOCKS1) * BLOCK_M < NQ1:
            _bwd_q_problem(pid - KV_BLOCKS1, bh, H, Q1, K1, V1, DO1, LSE1, DELTA1, DQ1, sqb1, sqh1, sqn1, sqd1, skb1,
                           skh1, skn1, skd1, svb1, svh1, svn1, svd1, NQ1, NK1, D, DV1, scale, BLOCK_M, BLOCK_N,
                           BLOCK_D, BLOCK_DV, PRECISION, UPCAST)


def _backward_problems(problems, scale):
    """problems: one or two (q, k, v, grad_out (already gated), delta, lse); returns [(dq, dk, dv), ...]."""
    q0 = problems[0][0]
    B, H, _, D = q0.shape
    max_dv = max(p[2].shape[3] for p in problems)
    block_m, block_n = _blocks(D, max_dv)
    results, args, kv_blocks, programs = [], [], [], []
    for q, k, v, grad, delta, lse in problems:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        results.append((dq, dk, dv))
        args += [q, k, v, grad.contiguous(), lse.contiguous(), delta.contiguous(), dq, dk, dv, *q.stride(),
                 *k.stride(), *v.stride(), q.shape[2], k.shape[2], v.shape[3]]
        kv_blocks.append(triton.cdiv(k.shape[2], block_n))
        programs.append(kv_blocks[-1] + triton.cdiv(q.shape[2], block_m))
    if len(problems) == 1:
        args += args
        kv_blocks += kv_blocks
    launch(_bwd_kernel, (max(programs), B * H, len(problems)), (H, D, _scale(D, scale), *args, *kv_blocks),
           dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(max_dv)), PRECISION=_precision(q0.dtype),
                UPCAST=_upcast(q0.dtype)), num_warps=4, num_stages=3)
    return results


def _delta(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (grad_out.float() * out.float()).sum(-1).to(lse_dtype(out.dtype))


# ------------------------------------------------------------------------------------------ tied backward
@triton.jit
def _tied_side_tiles(r_base, v_base, DO, LSE, DELTA, first, offs, mask, srn, srd, svn, svd, do_width, offs_d, mask_d,
                     offs_dv, mask_v, mask_do):
    # One side's tiles for its tokens `offs` (first: the flat index of this (b, h)'s token 0): its r and v,
    # the gradient of the output its tokens index (o_a for side a, o_b for side b), that output's lse and delta.
    r = _load_tile(r_base, offs, mask, srn, offs_d, srd, mask_d)
    v = _load_tile(v_base, offs, mask, svn, offs_dv, svd, mask_v)
    do = _load_tile(DO + first * do_width, offs, mask, do_width, offs_dv, 1, mask_do)
    lse, delta = _load_row_stats(LSE, DELTA, first, offs, mask)
    return r, v, do, lse, delta


@triton.jit
def _tied_ds(ra, va, doa, lse_r, delta_r, rb, vb, dob, lse_c, delta_c, valid, scale, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    # P_row = exp(S - lse_row), P_col = exp(S - lse_col) and
    # dS = P_row (dO_a v_b^T - delta_row) + P_col (v_a dO_b^T - delta_col) of one [rows, columns] tile
    s = _dot(ra, tl.trans(rb), PRECISION, UPCAST) * scale
    p_row = tl.where(valid, tl.exp(s - lse_r[:, None]), 0.0)
    p_col = tl.where(valid, tl.exp(s - lse_c[None, :]), 0.0)
    dp_row = _dot(doa, tl.trans(vb), PRECISION, UPCAST)
    dp_col = _dot(va, tl.trans(dob), PRECISION, UPCAST)
    ds = p_row * (dp_row - delta_r[:, None]) + p_col * (dp_col - delta_c[None, :])
    return p_row, p_col, ds


@triton.jit
def _tied_bwd_kernel(H, D, scale, RA, VA, RB, VB, DOA, DOB, LSE_ROW, LSE_COL, DELTA_ROW, DELTA_COL, DRA, DVA, DRB,
                     DVB, srab, srah, sran, srad, svab, svah, svan, svad, srbb, srbh, srbn, srbd, svbb, svbh, svbn,
                     svbd, NA, NB, DVA_DIM, DVB_DIM, COL_BLOCKS,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grid axis 0: column blocks (own dr_b, dv_b; loop over rows), then row blocks (own dr_a, dv_a; loop
    # over columns). Both form dS with _tied_ds.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dva = offs_dv < DVA_DIM
    mask_dvb = offs_dv < DVB_DIM
    row0 = bh.to(tl.int64) * NA
    col0 = bh.to(tl.int64) * NB
    ra_base = RA + b * srab + h * srah
    va_base = VA + b * svab + h * svah
    rb_base = RB + b * srbb + h * srbh
    vb_base = VB + b * svbb + h * svbh
    own_cols = pid < COL_BLOCKS
    if own_cols:
        fixed0 = pid * BLOCK_N
        steps = NA
    else:
        fixed0 = (pid - COL_BLOCKS) * BLOCK_M
        steps = NB
    if own_cols:
        offs_n = fixed0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < NB
        acc_r = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        acc_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        rb, vb, dob, lse_c, delta_c = _tied_side_tiles(rb_base, vb_base, DOB, LSE_COL, DELTA_COL, col0, offs_n,
                                                       mask_n, srbn, srbd, svbn, svbd, DVA_DIM, offs_d, mask_d,
                                                       offs_dv, mask_dvb, mask_dva)
        for start_m in range(0, steps, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < NA
            ra, va, doa, lse_r, delta_r = _tied_side_tiles(ra_base, va_base, DOA, LSE_ROW, DELTA_ROW, row0, offs_m,
                                                           mask_m, sran, srad, svan, svad, DVB_DIM, offs_d, mask_d,
                                                           offs_dv, mask_dva, mask_dvb)
            p_row, p_col, ds = _tied_ds(ra, va, doa, lse_r, delta_r, rb, vb, dob, lse_c, delta_c,
                                        mask_m[:, None] & mask_n[None, :], scale, PRECISION, UPCAST)
            acc_v += _dot(tl.trans(p_row).to(doa.dtype), doa, PRECISION, UPCAST)
            acc_r += _dot(tl.trans(ds).to(ra.dtype), ra, PRECISION, UPCAST)
        _store_tile(DRB + col0 * D, offs_n, mask_n, D, offs_d, mask_d, acc_r * scale)
        _store_tile(DVB + col0 * DVB_DIM, offs_n, mask_n, DVB_DIM, offs_dv, mask_dvb, acc_v)
    else:
        offs_m = fixed0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < NA
        if fixed0 < NA:
            acc_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            acc_v = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            ra, va, doa, lse_r, delta_r = _tied_side_tiles(ra_base, va_base, DOA, LSE_ROW, DELTA_ROW, row0, offs_m,
                                                           mask_m, sran, srad, svan, svad, DVB_DIM, offs_d, mask_d,
                                                           offs_dv, mask_dva, mask_dvb)
            for start_n in range(0, steps, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                mask_n = offs_n < NB
                rb, vb, dob, lse_c, delta_c = _tied_side_tiles(rb_base, vb_base, DOB, LSE_COL, DELTA_COL, col0,
                                                               offs_n, mask_n, srbn, srbd, svbn, svbd, DVA_DIM,
                                                               offs_d, mask_d, offs_dv, mask_dvb, mask_dva)
                p_row, p_col, ds = _tied_ds(ra, va, doa, lse_r, delta_r, rb, vb, dob, lse_c, delta_c,
                                            mask_m[:, None] & mask_n[None, :], scale, PRECISION, UPCAST)
                acc_v += _dot(p_col.to(dob.dtype), dob, PRECISION, UPCAST)
                acc_r += _dot(ds.to(rb.dtype), rb, PRECISION, UPCAST)
            _store_tile(DRA + row0 * D, offs_m, mask_m, D, offs_d, mask_d, acc_r * scale)
            _store_tile(DVA + row0 * DVA_DIM, offs_m, mask_m, DVA_DIM, offs_dv, mask_dva, acc_v)


# ------------------------------------------------------------------------------------------ launchers
def cross_attention_forward(q, k, v, scale=None, gate=None):
    (out, lse), = _forward_problems([(q, k, v)], scale, gate)
    return out, lse


def cross_attention_backward(grad_out, q, k, v, out, lse, scale=None, gate=None):
    delta = _delta(grad_out, out)
    dgate = q.new_empty((0,))
    if gate is not None:
        # out = sigmoid(g) A: the softmax sees dO sigmoid(g); delta = rowsum(dO out) serves both, and
        # d gate = delta (1 - sigmoid(g))
        sig = torch.sigmoid(gate.float())
        dgate = (delta.float() * (1 - sig)).to(gate.dtype)
        grad_out = (grad_out.float() * sig[..., None]).to(grad_out.dtype)
    (dq, dk, dv), = _backward_problems([(q, k, v, grad_out, delta, lse)], scale)
    return dq, dk, dv, dgate


def bidirectional_forward(q_a, k_a, v_a, q_b, k_b, v_b, scale=None):
    (o_a, lse_a), (o_b, lse_b) = _forward_problems([(q_a, k_b, v_b), (q_b, k_a, v_a)], scale)
    return o_a, o_b, lse_a, lse_b


def bidirectional_backward(grad_o_a, grad_o_b, q_a, k_a, v_a, q_b, k_b, v_b, o_a, o_b, lse_a, lse_b, scale=None):
    (dq_a, dk_b, dv_b), (dq_b, dk_a, dv_a) = _backward_problems(
        [(q_a, k_b, v_b, grad_o_a, _delta(grad_o_a, o_a), lse_a),
         (q_b, k_a, v_a, grad_o_b, _delta(grad_o_b, o_b), lse_b)], scale)
    return dq_a, dk_a, dv_a, dq_b, dk_b, dv_b


def tied_forward(r_a, v_a, r_b, v_b, scale=None):
    # rows: r_a attends to r_b; columns: the column softmax of S is the row softmax of S^T = s r_b r_a^T
    (o_a, lse_row), (o_b, lse_col) = _forward_problems([(r_a, r_b, v_b), (r_b, r_a, v_a)], scale)
    return o_a, o_b, lse_row, lse_col


def tied_backward(grad_o_a, grad_o_b, r_a, v_a, r_b, v_b, o_a, o_b, lse_row, lse_col, scale=None):
    B, H, NA, D = r_a.shape
    NB = r_b.shape[2]
    dva_dim, dvb_dim = v_a.shape[3], v_b.shape[3]
    _check_head_dims(D, dva_dim, dvb_dim)
    dr_a, dv_a, dr_b, dv_b = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (r_a, v_a, r_b, v_b))
    block_m, block_n = _blocks(D, max(dva_dim, dvb_dim))
    col_blocks = triton.cdiv(NB, block_n)
    programs = col_blocks + triton.cdiv(NA, block_m)
    launch(_tied_bwd_kernel, (programs, B * H),
           (H, D, _scale(D, scale), r_a, v_a, r_b, v_b, grad_o_a.contiguous(), grad_o_b.contiguous(),
            lse_row.contiguous(), lse_col.contiguous(), _delta(grad_o_a, o_a), _delta(grad_o_b, o_b),
            dr_a, dv_a, dr_b, dv_b, *r_a.stride(), *v_a.stride(), *r_b.stride(), *v_b.stride(), NA, NB, dva_dim,
            dvb_dim, col_blocks),
           dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(max(dva_dim, dvb_dim))), PRECISION=_precision(r_a.dtype),
                UPCAST=_upcast(r_a.dtype)), num_warps=4, num_stages=3)
    return dr_a, dv_a, dr_b, dv_b
