"""Triton kernels of the cross attention ops (see medattn_kernels/ops/cross_attention.py), FlashAttention-2
style.

* Forward: one program per (query block, batch x head, direction); it streams the key / value blocks
  with an online softmax and writes the output and lse = max + log(sum). The gate's sigmoid is applied
  in the epilogue. bidirectional_cross_attention is one launch whose third grid axis is the direction;
  the tied op's forward is the same launch (rows: queries r_a against keys r_b; columns: queries r_b
  against keys r_a, whose row softmax is the column softmax of S).
* Backward: delta = rowsum(dO * out) (and the gate's dO * sigmoid(g)) are formed by the launcher; one
  kernel owns a key block and loops over the queries (dK, dV; it forms the transposed tiles S^T, dS^T
  so that no tile is transposed in registers), another owns a query block and loops over the keys (dQ):
  two launches, no atomics, deterministic. For the tied op one kernel, launched once per side, owns a
  block of that side's tokens (a row block: dr_a, dv_a; a column block: dr_b, dv_b) and loops over the
  other side; both form the one dS = P_row (dP_row - delta_row) + P_col (dP_col - delta_col) (S^T for
  the columns).
* Launch plans: tile sizes, num_warps and num_stages per kernel, operand class (fp16/bf16, TF32, IEEE
  fp32) and head-dim width (`tiles`, `_TILES`), chosen so that every launched specialization fits an
  sm_90 block without register spills (checked by `python -m medattn_kernels.gpu_check`).
* Any N (masked tails), head dims up to 256 (padded to the next power of two and masked), strided
  inputs (64-bit offsets from the tensors' own strides), fp32 / fp16 / bf16 with fp32 accumulation.

fp32 precision: `tl.dot` on fp32 inputs uses TF32 tensor cores by default on the GPU (about 3e-4
relative error). Set ``medattn_kernels.triton.cross_attention.ALLOW_TF32 = False`` (or the environment
variable MEDATTN_TRITON_TF32=0 before import) for IEEE fp32 products: FMAs instead of tensor cores
(67 against 495 TFLOP/s dense on an H100), with their own, smaller tiles. The interpreter always
computes in IEEE fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import AcceptedSpill, launch, lse_dtype

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


@dataclass(frozen=True)
class Tiles:
    """One kernel's tiles and compile options: BLOCK_M query rows and BLOCK_N key rows per tile (for the
    tied op: rows of side a and columns = tokens of side b), num_warps, num_stages (software pipelining
    depth of the streamed tiles: each stage holds one more set of them in shared memory)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# kernel -> operand class -> head-dim width -> Tiles. The width is max(16, next_pow2(D), next_pow2(Dv)).
# Chosen per width and operand size so that every launched specialization fits an sm_90 block
# (227 KB of shared memory) without register spills, checked by `python -m medattn_kernels.gpu_check`
# (docs/gpu_resources.md): fp32 operands take twice the shared memory and registers of fp16/bf16 ones,
# and the IEEE fp32 path (TF32 off) multiplies on FMAs, whose operands live in registers, hence its
# small tiles and 8 warps. To re-tune on a GPU: the benchmark, then this table, then gpu_check.
_TILES = {
    # programs own BLOCK_M queries, stream BLOCK_N keys
    "forward": {
        "16-bit": {64: Tiles(64, 64, 4, 3), 128: Tiles(64, 64, 8, 2), 256: Tiles(32, 16, 8, 2)},
        "tf32": {64: Tiles(64, 32, 4, 3), 128: Tiles(32, 32, 8, 2), 256: Tiles(32, 16, 8, 2)},
        "ieee": {64: Tiles(32, 32, 8, 2), 128: Tiles(32, 32, 8, 2), 256: Tiles(32, 16, 8, 1)},
    },
    # programs own BLOCK_N keys, stream BLOCK_M queries
    "backward_kv": {
        "16-bit": {64: Tiles(64, 64, 8, 2), 128: Tiles(32, 32, 8, 2), 256: Tiles(32, 16, 8, 2)},
        "tf32": {64: Tiles(32, 64, 4, 2), 128: Tiles(32, 32, 8, 2), 256: Tiles(16, 16, 8, 2)},
        # IEEE fp32 at width <= 64 on one stage: two stages spilled 48 B on DIN's strided DIFM token views at D 32
        "ieee": {64: Tiles(32, 32, 8, 1), 128: Tiles(32, 32, 8, 2), 256: Tiles(16, 16, 8, 2)},
    },
    # programs own BLOCK_M queries, stream BLOCK_N keys
    "backward_q": {
        "16-bit": {64: Tiles(64, 64, 4, 3), 128: Tiles(32, 32, 8, 1), 256: Tiles(32, 16, 8, 2)},
        "tf32": {64: Tiles(64, 32, 4, 2), 128: Tiles(32, 16, 8, 2), 256: Tiles(16, 16, 8, 2)},
        "ieee": {64: Tiles(32, 32, 8, 2), 128: Tiles(32, 16, 8, 1), 256: Tiles(16, 16, 8, 2)},
    },
    # programs own BLOCK_M tokens of one side, stream BLOCK_N tokens of the other
    "tied_backward": {
        "16-bit": {64: Tiles(64, 32, 4, 3), 128: Tiles(16, 32, 8, 2), 256: Tiles(16, 16, 8, 2)},
        "tf32": {64: Tiles(32, 16, 8, 2), 128: Tiles(16, 32, 8, 2), 256: Tiles(16, 16, 8, 1)},
        "ieee": {64: Tiles(32, 32, 8, 2), 128: Tiles(32, 32, 8, 2), 256: Tiles(16, 16, 8, 1)},
    },
}
# The one accepted spill (see docs/gpu_resources.md): the tied backward owner keeps its r, v and dO tiles as
# tensor-core operands, which every warp holds whole; at fp32 (TF32) and head dims 129-256 three [16, 256]
# fp32 tiles exceed 255 registers at the smallest tiles (16 x 16, 8 warps, 1 stage) and ptxas spills up to
# 24 + 20 B per thread (the D 200 sweep; 16 + 16 B on strided tokens, none on aligned contiguous D 256).
# Checked on sm_90: 4 warps spill 84-404 B, 16 warps (128 registers each) 264-864 B, 2 stages up to 220 B.
ACCEPTED_SPILLS = (
    AcceptedSpill("_tied_side_kernel", {"PRECISION": "tf32", "BLOCK_D": 256}, dtype="fp32", max_bytes=44,
                  reason="TF32 tied backward, head dims 129-256: the owner's three [16, 256] fp32 operand tiles "
                         "exceed 255 registers per thread at the smallest tiles; a few words spill"),
)


def operand_class(dtype: torch.dtype) -> str:
    """'16-bit' (fp16/bf16 tensor cores), 'tf32' (fp32 on TF32 tensor cores) or 'ieee' (fp32 on FMAs)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16-bit"
    return "tf32" if _precision(dtype) == "tf32" else "ieee"


def head_width(d: int, dv: int) -> int:
    """The padded width of the head-dim tiles (BLOCK_D / BLOCK_DV are next powers of two, at least 16)."""
    return max(16, triton.next_power_of_2(d), triton.next_power_of_2(dv))


def tiles(kernel: str, d: int, dv: int, dtype: torch.dtype) -> Tiles:
    """The launch plan's tiles of `kernel` (a key of _TILES) for head dims d, dv and the inputs' dtype."""
    by_width = _TILES[kernel][operand_class(dtype)]
    return by_width[max(64, head_width(d, dv))]


def _head_constexprs(d: int, dv: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                PRECISION=_precision(dtype), UPCAST=_upcast(dtype))


def _launch_tiled(kernel, plan: Tiles, grid, args, d: int, dv: int, dtype: torch.dtype, **constexprs) -> None:
    launch(kernel, grid, args, dict(constexprs, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                                    **_head_constexprs(d, dv, dtype)), plan.num_warps, plan.num_stages)


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
    plan = tiles("forward", D, max_dv, q0.dtype)
    grid = (triton.cdiv(max(p[0].shape[2] for p in problems), plan.block_m), B * H, len(problems))
    _launch_tiled(_fwd_kernel, plan, grid, (H, D, _scale(D, scale), *args), D, max_dv, q0.dtype,
                  HAS_GATE=gate is not None)
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
        # the transposed tiles S^T = K Q^T, P^T, dP^T = V dO^T, dS^T [keys, queries]: k and v are the left
        # operands (kept in registers across the loop) and dV, dK need no transposed copy of P or dS
        p_t = tl.where(mask_n[:, None] & mask_m[None, :],
                       tl.exp(_dot(k, tl.trans(q), PRECISION, UPCAST) * scale - lse[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        ds_t = p_t * (_dot(v, tl.trans(do), PRECISION, UPCAST) - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)
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
def _bwd_owned_block(pid, bh, H, Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb,
                     svh, svn, svd, NQ, NK, D, DV, scale, OWN_KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    if OWN_KEYS:
        if pid * BLOCK_N < NK:
            _bwd_kv_problem(pid, bh, H, Q, K, V, DO, LSE, DELTA, DK, DV_, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb,
                            svh, svn, svd, NQ, NK, D, DV, scale, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, UPCAST)
    else:
        if pid * BLOCK_M < NQ:
            _bwd_q_problem(pid, bh, H, Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh,
                           svn, svd, NQ, NK, D, DV, scale, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, UPCAST)


@triton.jit
def _bwd_kernel(H, D, scale,
                Q0, K0, V0, DO0, LSE0, DELTA0, DQ0, DK0, DV0_, sqb0, sqh0, sqn0, sqd0, skb0, skh0, skn0, skd0,
                svb0, svh0, svn0, svd0, NQ0, NK0, DV0,
                Q1, K1, V1, DO1, LSE1, DELTA1, DQ1, DK1, DV1_, sqb1, sqh1, sqn1, sqd1, skb1, skh1, skn1, skd1,
                svb1, svh1, svn1, svd1, NQ1, NK1, DV1,
                OWN_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grid: (owned blocks, B * H, direction). OWN_KEYS: programs own a key block (dK, dV), else a query
    # block (dQ); the launcher launches both specializations.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        _bwd_owned_block(pid, bh, H, Q0, K0, V0, DO0, LSE0, DELTA0, DQ0, DK0, DV0_, sqb0, sqh0, sqn0, sqd0, skb0, skh0,
                         skn0, skd0, svb0, svh0, svn0, svd0, NQ0, NK0, D, DV0, scale, OWN_KEYS, BLOCK_M, BLOCK_N,
                         BLOCK_D, BLOCK_DV, PRECISION, UPCAST)
    else:
        _bwd_owned_block(pid, bh, H, Q1, K1, V1, DO1, LSE1, DELTA1, DQ1, DK1, DV1_, sqb1, sqh1, sqn1, sqd1, skb1, skh1,
                         skn1, skd1, svb1, svh1, svn1, svd1, NQ1, NK1, D, DV1, scale, OWN_KEYS, BLOCK_M, BLOCK_N,
                         BLOCK_D, BLOCK_DV, PRECISION, UPCAST)


def _backward_problems(problems, scale):
    """problems: one or two (q, k, v, grad_out (already gated), delta, lse); returns [(dq, dk, dv), ...]."""
    q0 = problems[0][0]
    B, H, _, D = q0.shape
    max_dv = max(p[2].shape[3] for p in problems)
    results, args = [], []
    for q, k, v, grad, delta, lse in problems:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        results.append((dq, dk, dv))
        args += [q, k, v, grad.contiguous(), lse.contiguous(), delta.contiguous(), dq, dk, dv, *q.stride(),
                 *k.stride(), *v.stride(), q.shape[2], k.shape[2], v.shape[3]]
    if len(problems) == 1:
        args += args
    args = (H, D, _scale(D, scale), *args)
    # dK, dV (programs own key blocks) and dQ (programs own query blocks): two launches, so that each
    # specialization compiles with only its own tiles live (registers, shared memory) and has its own tiles
    kv = tiles("backward_kv", D, max_dv, q0.dtype)
    grid = (triton.cdiv(max(p[1].shape[2] for p in problems), kv.block_n), B * H, len(problems))
    _launch_tiled(_bwd_kernel, kv, grid, args, D, max_dv, q0.dtype, OWN_KEYS=True)
    qp = tiles("backward_q", D, max_dv, q0.dtype)
    grid = (triton.cdiv(max(p[0].shape[2] for p in problems), qp.block_m), B * H, len(problems))
    _launch_tiled(_bwd_kernel, qp, grid, args, D, max_dv, q0.dtype, OWN_KEYS=False)
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
def _tied_side_kernel(H, D, scale, RO, VO, DOO, LSE_O, DELTA_O, RT, VT, DOT, LSE_T, DELTA_T, DRO, DVO,
                      srob, sroh, sron, srod, svob, svoh, svon, svod, srtb, srth, srtn, srtd, svtb, svth, svtn, svtd,
                      NO, NT, DVO_DIM, DVT_DIM,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grid: (blocks of BLOCK_M tokens of the owner side O, B * H). O keeps its tiles, accumulates its dr, dv
    # and loops over the other side T in BLOCK_N steps. With S_OT = scale r_O r_T^T (S for O = a, S^T for
    # O = b), P_O = exp(S_OT - lse_O) is O's own softmax and P_T = exp(S_OT - lse_T) the other's,
    # transposed, so dS_OT = P_O (dO_O v_T^T - delta_O) + P_T (v_O dO_T^T - delta_T), dr_O = scale dS_OT r_T
    # and dv_O = P_T dO_T: the same kernel serves both sides (launched once per side), no transposed tile.
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_vo = offs_dv < DVO_DIM
    mask_vt = offs_dv < DVT_DIM
    first_o = bh.to(tl.int64) * NO
    first_t = bh.to(tl.int64) * NT
    offs_o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_o = offs_o < NO
    r_o, v_o, do_o, lse_o, delta_o = _tied_side_tiles(RO + b * srob + h * sroh, VO + b * svob + h * svoh, DOO, LSE_O,
                                                      DELTA_O, first_o, offs_o, mask_o, sron, srod, svon, svod,
                                                      DVT_DIM, offs_d, mask_d, offs_dv, mask_vo, mask_vt)
    rt_base = RT + b * srtb + h * srth
    vt_base = VT + b * svtb + h * svth
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_v = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_t in range(0, NT, BLOCK_N):
        offs_t = start_t + tl.arange(0, BLOCK_N)
        mask_t = offs_t < NT
        r_t, v_t, do_t, lse_t, delta_t = _tied_side_tiles(rt_base, vt_base, DOT, LSE_T, DELTA_T, first_t, offs_t,
                                                          mask_t, srtn, srtd, svtn, svtd, DVO_DIM, offs_d, mask_d,
                                                          offs_dv, mask_vt, mask_vo)
        s = _dot(r_o, tl.trans(r_t), PRECISION, UPCAST) * scale
        valid = mask_o[:, None] & mask_t[None, :]
        p_o = tl.where(valid, tl.exp(s - lse_o[:, None]), 0.0)
        p_t = tl.where(valid, tl.exp(s - lse_t[None, :]), 0.0)
        ds = p_o * (_dot(do_o, tl.trans(v_t), PRECISION, UPCAST) - delta_o[:, None]) + \
            p_t * (_dot(v_o, tl.trans(do_t), PRECISION, UPCAST) - delta_t[None, :])
        acc_v += _dot(p_t.to(do_t.dtype), do_t, PRECISION, UPCAST)
        acc_r += _dot(ds.to(r_t.dtype), r_t, PRECISION, UPCAST)
    _store_tile(DRO + first_o * D, offs_o, mask_o, D, offs_d, mask_d, acc_r * scale)
    _store_tile(DVO + first_o * DVO_DIM, offs_o, mask_o, DVO_DIM, offs_dv, mask_vo, acc_v)


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
    dv_width = max(dva_dim, dvb_dim)
    plan = tiles("tied_backward", D, dv_width, r_a.dtype)
    side_a = (r_a, v_a, grad_o_a.contiguous(), lse_row.contiguous(), _delta(grad_o_a, o_a))
    side_b = (r_b, v_b, grad_o_b.contiguous(), lse_col.contiguous(), _delta(grad_o_b, o_b))
    # one launch per owner side: rows (dr_a, dv_a) with side a owning, columns (dr_b, dv_b) with side b
    for own, other, grads, n_own, n_other, dv_own, dv_other in (
            (side_a, side_b, (dr_a, dv_a), NA, NB, dva_dim, dvb_dim),
            (side_b, side_a, (dr_b, dv_b), NB, NA, dvb_dim, dva_dim)):
        args = (H, D, _scale(D, scale), *own, *other, *grads, *own[0].stride(), *own[1].stride(), *other[0].stride(),
                *other[1].stride(), n_own, n_other, dv_own, dv_other)
        _launch_tiled(_tied_side_kernel, plan, (triton.cdiv(n_own, plan.block_m), B * H), args, D, dv_width, r_a.dtype)
    return dr_a, dv_a, dr_b, dv_b
