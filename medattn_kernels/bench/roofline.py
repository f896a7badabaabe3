"""Performance model of the GPU benchmark tables: per benchmark case, the FLOPs and the minimum bytes moved
(forward, and forward + backward), and from them the roofline time on an H100 SXM / H200:

    roofline time = max(FLOPs / peak FLOP/s of the math the kernel can use, bytes / HBM bandwidth)

FLOPs are the nominal algorithmic count (matrix products as 2 m n k; the elementwise work of the
memory-bound ops counted per element as documented per op); the backward of the attention ops is counted
FlashAttention-style with the score recomputation (2.5x the forward for D = Dv). Minimum bytes: every
input read once and every output written once (the compulsory traffic; saved statistics included),
nothing else. The harness prints measured / roofline as "% roof" (the fraction of the roofline achieved)
next to each measured GPU time.

Peaks (dense, no sparsity): H100 SXM 989 TFLOP/s fp16/bf16 tensor cores, 495 TF32, 67 fp32 (FMA); HBM3
3.35 TB/s. H200: the same FLOP/s, 4.8 TB/s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch


@dataclass(frozen=True)
class GPU:
    name: str
    flops: Dict[str, float]  # math class -> peak FLOP/s
    bandwidth: float  # bytes/s of HBM


_HOPPER_FLOPS = {"fp16": 989e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
H100_SXM = GPU("H100 SXM", _HOPPER_FLOPS, 3.35e12)
H200 = GPU("H200", _HOPPER_FLOPS, 4.8e12)


@dataclass(frozen=True)
class Work:
    """FLOPs and minimum bytes of one call (forward) and of one training call (forward + backward)."""

    fwd_flops: float
    fwd_bytes: float
    fwd_bwd_flops: float
    fwd_bwd_bytes: float
    math: str  # the math class whose peak bounds the FLOPs ("fp16", "bf16", "tf32", "fp32")


def roofline_seconds(flops: float, nbytes: float, math: str, gpu: GPU) -> float:
    return max(flops / gpu.flops[math], nbytes / gpu.bandwidth)


def gpu_of(device_name: str) -> Optional[GPU]:
    """The modelled GPU for a torch.cuda device name (H100 SXM / H200), None for any other."""
    name = device_name.upper()
    if "H200" in name:
        return H200
    if "H100" in name and "PCIE" not in name:
        return H100_SXM
    return None


def math_class(dtype: torch.dtype, tf32: bool) -> str:
    """fp16 / bf16 tensor cores; fp32 on TF32 tensor cores when the kernel may use them, else FMAs."""
    if dtype in (torch.float16, torch.bfloat16):
        return "fp16" if dtype == torch.float16 else "bf16"
    return "tf32" if tf32 else "fp32"


def _elem(t: torch.Tensor) -> int:
    return t.element_size()


# ------------------------------------------------------------------------------------------ per op
LSE_BYTES = 4  # float32 log-sum-exp per query row, saved by the forward and read by the backward


def attention_work(b: int, h: int, nq: int, nk: int, d: int, dv: int, elem: int, math: str) -> Work:
    """One direction softmax(q k^T) v: q [b,h,nq,d], k [b,h,nk,d], v [b,h,nk,dv].
    Forward 2 nq nk (d + dv) per (b, h); backward 2 nq nk (3 d + 2 dv) (S recomputed, dV, dP, dQ, dK).
    Bytes: forward reads q, k, v, writes o and lse; backward reads q, k, v, o, dO, lse, writes dq, dk, dv."""
    bh = b * h
    fwd_flops = 2.0 * bh * nq * nk * (d + dv)
    bwd_flops = 2.0 * bh * nq * nk * (3 * d + 2 * dv)
    q, k, v, o = bh * nq * d, bh * nk * d, bh * nk * dv, bh * nq * dv
    fwd_bytes = elem * (q + k + v + o) + LSE_BYTES * bh * nq
    bwd_bytes = elem * (q + k + v + 2 * o + q + k + v) + LSE_BYTES * bh * nq
    return Work(fwd_flops, fwd_bytes, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes, math)


def tied_work(b: int, h: int, na: int, nb: int, d: int, dva: int, dvb: int, elem: int, math: str) -> Work:
    """One similarity S = r_a r_b^T [na, nb], o_a = softmax_row(S) v_b, o_b = softmax_col(S)^T v_a.
    Forward 2 na nb (d + dva + dvb); backward 2 na nb (3 d + 2 dva + 2 dvb) (S, dV_b, dV_a, dP_row, dP_col,
    dr_a, dr_b). Bytes: forward reads r_a, v_a, r_b, v_b, writes o_a, o_b and both lse; backward reads the
    inputs, both outputs, both output gradients and both lse, writes the four input gradients."""
    bh = b * h
    fwd_flops = 2.0 * bh * na * nb * (d + dva + dvb)
    bwd_flops = 2.0 * bh * na * nb * (3 * d + 2 * dva + 2 * dvb)
    inputs = bh * (na * d + na * dva + nb * d + nb * dvb)
    outputs = bh * (na * dvb + nb * dva)
    lse = LSE_BYTES * bh * (na + nb)
    fwd_bytes = elem * (inputs + outputs) + lse
    bwd_bytes = elem * (inputs + 2 * outputs + inputs) + lse
    return Work(fwd_flops, fwd_bytes, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes, math)


def depthwise_work(b: int, c: int, h: int, w: int, kh: int, kw: int, ho: int, wo: int, elem: int, bias: bool,
                   math: str) -> Work:
    """Forward 2 b c ho wo kh kw; grad input and grad weight the same each (3x in all).
    Bytes: forward reads x, weight (and bias), writes out; backward reads grad_out, x, weight, writes
    grad_x, grad_weight (and grad_bias)."""
    fwd_flops = 2.0 * b * c * ho * wo * kh * kw
    x, out, wgt = b * c * h * w, b * c * ho * wo, c * kh * kw + (c if bias else 0)
    fwd_bytes = elem * (x + wgt + out)
    bwd_bytes = elem * (out + x + wgt + x + wgt)
    return Work(fwd_flops, fwd_bytes, 3 * fwd_flops, fwd_bytes + bwd_bytes, math)


def gsa_work(n: int, inputs: int, elem: int, math: str) -> Work:
    """x * sigmoid(mean_c x) per input (and the sum of the two branches). FLOPs per element: 1 (channel
    sum) + 1 (product) per input, + 1 per element for the sum of two; backward 4 per element per input
    (g s, g x, the sums, the rank-one term). Bytes: forward reads the inputs, writes out; backward reads
    grad_out once and each input, writes each input's gradient. n: elements per input (any spatial dims)."""
    fwd_flops = n * (2.0 * inputs + (inputs - 1))
    bwd_flops = 4.0 * n * inputs
    fwd_bytes = elem * n * (inputs + 1)
    bwd_bytes = elem * n * (1 + 2 * inputs)
    return Work(fwd_flops, fwd_bytes, fwd_flops + bwd_flops, fwd_bytes + bwd_bytes, math)


def activated_bn_work(n: int, elem: int, math: str) -> Work:
    """Batch statistics (3 FLOPs per element: shift, add, square-add) and the affine + leaky ReLU (4);
    backward: the two sums (4) and grad_x (5). Bytes: forward reads x, writes y; backward reads y and
    grad_y, writes grad_x (the per-channel parameters and statistics are negligible and left out). n: elements
    of x (any spatial dims)."""
    return Work(7.0 * n, 2.0 * elem * n, 16.0 * n, 5.0 * elem * n, math)


# Sobel loss FLOPs per pooled pixel and map: 2 x 3-tap stencils of each gradient (10), the magnitude (5);
# per pooled pixel: both maps (30), |difference| and its sum (3); backward: the adjoint (about 20).
SOBEL_FORWARD_FLOPS_PER_PIXEL = 33
SOBEL_BACKWARD_FLOPS_PER_PIXEL = 20


def sobel_work(b: int, c: int, h: int, w: int, scales, elem: int, target_bytes: float, math: str) -> Work:
    """Per scale s: pooling reads every full-resolution element of both maps once (1 FLOP each), then the
    per-pooled-pixel work above; the backward spreads dP / s^2 back (1 FLOP per element per scale).
    Bytes: forward reads pred and the target (one-hot maps, or int64 labels); forward + backward also
    writes grad_pred (the fused op forms it in the forward)."""
    n = b * c * h * w
    pooled = sum(b * c * (h // s) * (w // s) for s in scales)
    fwd_flops = 2.0 * n * len(scales) + SOBEL_FORWARD_FLOPS_PER_PIXEL * pooled
    bwd_flops = 1.0 * n * len(scales) + SOBEL_BACKWARD_FLOPS_PER_PIXEL * pooled
    fwd_bytes = elem * n + target_bytes
    return Work(fwd_flops, fwd_bytes, fwd_flops + bwd_flops, fwd_bytes + elem * n, math)


DEFAULT_SOBEL_SCALES = (1, 2, 4)


def case_work(op: str, inputs: Dict[str, Any], tf32: Optional[bool] = None) -> Optional[Work]:
    """The Work of one benchmark case of `op` from its inputs (medattn_kernels/bench/<op>.py's
    make_inputs); None for composite cases (e.g. a conv in front of the op) the model does not cover.
    tf32: whether fp32 attention may use TF32 (default: the Triton kernels' setting). The elementwise ops
    compute in fp32 whatever the storage dtype: their FLOPs count against the fp32 peak (they are
    bandwidth-bound by far)."""
    tf32 = attention_tf32() if tf32 is None else tf32
    t = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    first = next(iter(t.values()))
    elem, dtype = _elem(first), first.dtype
    if op in ("cross_attention", "bidirectional_cross_attention"):
        math = math_class(dtype, tf32)
        if "qkv_a0" in t:  # DIN's DIFM stages: [B, 3c, s, s] per image, one head of width c over s*s tokens
            shapes = [t[k].shape for k in sorted(t) if k.startswith("qkv_a")]
            works = [attention_work(b, 1, s * s, s * s, c3 // 3, c3 // 3, elem, math)
                     for b, c3, s, _ in shapes for _direction in range(2)]
        else:
            pairs = [("q", "k", "v")] if op == "cross_attention" else [("q_a", "k_b", "v_b"), ("q_b", "k_a", "v_a")]
            works = [attention_work(t[q].shape[0], t[q].shape[1], t[q].shape[2], t[k].shape[2], t[q].shape[3],
                                    t[v].shape[3], elem, math) for q, k, v in pairs]
        gate = elem * t["gate"].numel() if "gate" in t else 0  # read forward and backward, d gate written
        return Work(sum(w.fwd_flops for w in works), sum(w.fwd_bytes for w in works) + gate,
                    sum(w.fwd_bwd_flops for w in works), sum(w.fwd_bwd_bytes for w in works) + 3 * gate, math)
    if op == "tied_cross_attention":
        ra, va, rb, vb = t["r_a"], t["v_a"], t["r_b"], t["v_b"]
        return tied_work(ra.shape[0], ra.shape[1], ra.shape[2], rb.shape[2], ra.shape[3], va.shape[3], vb.shape[3],
                         elem, math_class(dtype, tf32))
    if op == "depthwise_conv2d":
        x, wgt = t["x"], t["weight"]
        kh, kw = wgt.shape[2], wgt.shape[3]
        # the benchmark cases use "same" padding (output size = input size); fp16 / bf16 may run on tensor
        # cores (the Triton kernel's banded matrix products), fp32 is IEEE by design
        return depthwise_work(*x.shape, kh, kw, x.shape[2], x.shape[3], elem, "bias" in t, math_class(dtype, False))
    if op == "global_spatial_attention":
        return gsa_work(t["x"].numel(), 2 if "y" in t else 1, elem, "fp32")
    if op == "activated_batch_norm":
        if "conv" in t:
            return None
        return activated_bn_work(t["x"].numel(), elem, "fp32")
    if op == "sobel_boundary_loss":
        pred, target = t["pred"], t["target"]
        return sobel_work(*pred.shape, DEFAULT_SOBEL_SCALES, elem, target.numel() * target.element_size(), "fp32")
    return None


def attention_tf32() -> bool:
    """Whether the fp32 attention kernels use TF32 (medattn_kernels.triton.cross_attention.ALLOW_TF32)."""
    try:
        from ..triton import cross_attention
    except ImportError:  # no triton: no GPU attention kernels to model
        return True
    return cross_attention.ALLOW_TF32


def annotate(results, op: str, inputs: Dict[str, Any], device_name: str, tf32: Optional[bool] = None) -> None:
    """Put the roofline times (ms) of the case into each result's `extra` (GPU runs on a modelled GPU)."""
    gpu = gpu_of(device_name)
    work = case_work(op, inputs, tf32) if gpu is not None else None
    if work is None:
        return
    for r in results:
        r.extra["roofline_fwd_ms"] = 1e3 * roofline_seconds(work.fwd_flops, work.fwd_bytes, work.math, gpu)
        r.extra["roofline_fwd_bwd_ms"] = 1e3 * roofline_seconds(work.fwd_bwd_flops, work.fwd_bwd_bytes, work.math,
                                                                gpu)
        r.extra["roofline_gpu"] = gpu.name


def fraction(result, which: str) -> float:
    """roofline time / measured time (1.0 = at the roofline); NaN without a model."""
    roof = result.extra.get(f"roofline_{which}_ms")
    measured = result.fwd_ms if which == "fwd" else result.fwd_bwd_ms
    if roof is None or measured is None or not measured == measured or measured <= 0:
        return float("nan")
    return roof / measured
