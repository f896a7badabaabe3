"""Triton kernels of the multi-scale Sobel boundary loss (see medattn_kernels/ops/sobel_boundary_loss.py).

Per call, in fp32 whatever the input dtype (fp32/fp16/bf16):
  1. (from_logits) softmax over C into an fp32 probability buffer, one program per pixel block;
  2. per scale s, one program per block of pooled pixels of one (b, c) plane: the 8 Sobel taps of the
     pooled maps P = P_s(p), Q = P_s(y) are pooled on the fly from the full-resolution inputs (clamped
     indices = replicate padding; int64 labels become one-hot and the ignore mask on load), then
     G(P), G(Q), |d| summed into one partial per program (no atomics: the partials are summed by torch
     in a fixed order, so the loss is deterministic), and the adjoint coefficients
     ax = c sgn(d) gx(P) / G(P), ay = c sgn(d) gy(P) / G(P) stored per pooled pixel;
  3. per scale, one program per block of full-resolution pixels gathers d loss / d P at its pooled
     parent through the transposed stencils (gather form: no scatter, no atomics). The 1-D adjoint of a
     clamped 3-tap stencil sum_d w_d u[clamp(i+d)] is sum_d w_d a[k-d] (in range) + a[k] (w_-1 [k==0]
     + w_+1 [k==n-1]): replicate padding sends the out-of-range taps' gradient to the edge. It adds
     dP / s^2 into an fp32 gradient buffer (the average-pool adjoint);
  4. the ignore mask and (from_logits) the softmax adjoint p_c (g_c - sum_c' p_c' g_c'), cast to pred's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch

BLOCK = 256
NUM_WARPS, NUM_STAGES = 4, 3  # 2 pixels per thread


@triton.jit
def _softmax_kernel(z_ptr, p_ptr, C, HW, tiles, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = b.to(tl.int64) * C * HW + offs  # channel c at base + c * HW, reached by pointer steps (int64)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    zp = z_ptr + base
    for _ in range(0, C):
        mx = tl.maximum(mx, tl.load(zp, mask=mask, other=0.0).to(tl.float32))
        zp += HW
    total = tl.zeros([BLOCK], dtype=tl.float32)
    zp = z_ptr + base
    for _ in range(0, C):
        total += tl.exp(tl.load(zp, mask=mask, other=0.0).to(tl.float32) - mx)
        zp += HW
    zp = z_ptr + base
    pp = p_ptr + base
    for _ in range(0, C):
        tl.store(pp, tl.exp(tl.load(zp, mask=mask, other=0.0).to(tl.float32) - mx) / total, mask=mask)
        zp += HW
        pp += HW


@triton.jit
def _pooled(p_ptr, t_ptr, plane_off, lab_off, c, r, col, W, mask, ignore_index,
            S: tl.constexpr, LABELS: tl.constexpr):
    """(P_s(p), P_s(y)) at pooled pixels (r, col), with the one-hot target and ignore mask of labels."""
    sum_p = tl.zeros(r.shape, dtype=tl.float32)
    sum_y = tl.zeros(r.shape, dtype=tl.float32)
    for a in tl.static_range(S):
        for e in tl.static_range(S):
            pix = (r * S + a).to(tl.int64) * W + (col * S + e)
            pv = tl.load(p_ptr + plane_off + pix, mask=mask, other=0.0).to(tl.float32)
            if LABELS:
                lab = tl.load(t_ptr + lab_off + pix, mask=mask, other=0)
                valid = lab != ignore_index
                sum_p += pv * valid.to(tl.float32)  # a multiply: NaN still propagates
                sum_y += ((lab == c) & valid).to(tl.float32)
            else:
                sum_p += pv
                sum_y += tl.load(t_ptr + plane_off + pix, mask=mask, other=0.0).to(tl.float32)
    return sum_p * (1.0 / (S * S)), sum_y * (1.0 / (S * S))


@triton.jit
def _scale_forward_kernel(p_ptr, t_ptr, ax_ptr, ay_ptr, part_ptr, C, H, W, Hs, Ws, nblk, ignore_index, coef, eps,
                          S: tl.constexpr, LABELS: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    blk = tl.program_id(1)
    b = plane // C
    c = plane % C
    plane_off = plane.to(tl.int64) * H * W
    lab_off = b.to(tl.int64) * H * W
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < Hs * Ws
    i = offs // Ws
    j = offs % Ws
    im = tl.maximum(i - 1, 0)
    ip = tl.minimum(i + 1, Hs - 1)
    jm = tl.maximum(j - 1, 0)
    jp = tl.minimum(j + 1, Ws - 1)
    p_mm, y_mm = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, im, jm, W, mask, ignore_index, S, LABELS)
    p_m0, y_m0 = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, im, j, W, mask, ignore_index, S, LABELS)
    p_mp, y_mp = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, im, jp, W, mask, ignore_index, S, LABELS)
    p_0m, y_0m = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, i, jm, W, mask, ignore_index, S, LABELS)
    p_0p, y_0p = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, i, jp, W, mask, ignore_index, S, LABELS)
    p_pm, y_pm = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, ip, jm, W, mask, ignore_index, S, LABELS)
    p_p0, y_p0 = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, ip, j, W, mask, ignore_index, S, LABELS)
    p_pp, y_pp = _pooled(p_ptr, t_ptr, plane_off, lab_off, c, ip, jp, W, mask, ignore_index, S, LABELS)
    gxp = (p_mp - p_mm + 2.0 * (p_0p - p_0m) + p_pp - p_pm) * 0.125
    gyp = (p_pm - p_mm + 2.0 * (p_p0 - p_m0) + p_pp - p_mp) * 0.125
    gxy = (y_mp - y_mm + 2.0 * (y_0p - y_0m) + y_pp - y_pm) * 0.125
    gyy = (y_pm - y_mm + 2.0 * (y_p0 - y_m0) + y_pp - y_mp) * 0.125
    mag_p = tl.sqrt(gxp * gxp + gyp * gyp + eps)
    mag_y = tl.sqrt(gxy * gxy + gyy * gyy + eps)
    d = mag_p - mag_y
    tl.store(part_ptr + plane * nblk + blk, tl.sum(tl.where(mask, tl.abs(d), 0.0), axis=0) * coef)
    if GRAD:
        k = coef * ((d > 0).to(tl.float32) - (d < 0).to(tl.float32)) / mag_p
        out = plane.to(tl.int64) * Hs * Ws + offs
        tl.store(ax_ptr + out, k * gxp, mask=mask)
        tl.store(ay_ptr + out, k * gyp, mask=mask)


@triton.jit
def _row_adjoints(ax_ptr, ay_ptr, base, r, l, Ws, left, right, valid):
    """Horizontal adjoints at row r: Dh^T ax (taps -1/8, 0, 1/8) and Sh^T ay (taps 1/8, 2/8, 1/8)."""
    row = base + r.to(tl.int64) * Ws
    has_l = valid & (l >= 1)
    has_r = valid & (l + 1 < Ws)
    ax_c = tl.load(ax_ptr + row + l, mask=valid, other=0.0)
    ax_w = tl.load(ax_ptr + row + l - 1, mask=has_l, other=0.0)
    ax_e = tl.load(ax_ptr + row + l + 1, mask=has_r, other=0.0)
    ay_c = tl.load(ay_ptr + row + l, mask=valid, other=0.0)
    ay_w = tl.load(ay_ptr + row + l - 1, mask=has_l, other=0.0)
    ay_e = tl.load(ay_ptr + row + l + 1, mask=has_r, other=0.0)
    rx = (ax_w - ax_e + (right - left) * ax_c) * 0.125
    ry = (ay_w + 2.0 * ay_c + ay_e + (left + right) * ay_c) * 0.125
    return rx, ry


@triton.jit
def _scale_adjoint_kernel(ax_ptr, ay_ptr, g_ptr, H, W, Hs, Ws, S: tl.constexpr, FIRST: tl.constexpr,
                          BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    k = (offs // W) // S
    l = (offs % W) // S
    inside = mask & (k < Hs) & (l < Ws)
    base = plane.to(tl.int64) * Hs * Ws
    left = (l == 0).to(tl.float32)
    right = (l == Ws - 1).to(tl.float32)
    top = (k == 0).to(tl.float32)
    bottom = (k == Hs - 1).to(tl.float32)
    # Vertical adjoints: Sv (taps 1, 2, 1) for the gx part, Dv (taps -1, 0, 1) for the gy part; the
    # forward tap d reads row k + d, so pooled row k receives a[k - d].
    rx_n, ry_n = _row_adjoints(ax_ptr, ay_ptr, base, k + 1, l, Ws, left, right, inside & (k + 1 < Hs))  # d = -1
    rx_c, ry_c = _row_adjoints(ax_ptr, ay_ptr, base, k, l, Ws, left, right, inside)  # d = 0
    rx_s, ry_s = _row_adjoints(ax_ptr, ay_ptr, base, k - 1, l, Ws, left, right, inside & (k >= 1))  # d = +1
    dp = rx_n + 2.0 * rx_c + rx_s + (top + bottom) * rx_c
    dp += -ry_n + ry_s + (bottom - top) * ry_c
    g = tl.where(inside, dp * (1.0 / (S * S)), 0.0)
    out = g_ptr + plane.to(tl.int64) * H * W + offs
    if not FIRST:
        g += tl.load(out, mask=mask, other=0.0)
    tl.store(out, g, mask=mask)


@triton.jit
def _finalize_kernel(g_ptr, p_ptr, t_ptr, out_ptr, C, HW, tiles, ignore_index,
                     LABELS: tl.constexpr, FROM_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    base = b.to(tl.int64) * C * HW + offs
    valid = tl.full([BLOCK], 1.0, tl.float32)
    if LABELS:
        lab = tl.load(t_ptr + b.to(tl.int64) * HW + offs, mask=mask, other=0)
        valid = (lab != ignore_index).to(tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    if FROM_LOGITS:
        gp = g_ptr + base
        pp = p_ptr + base
        for _ in range(0, C):
            dot += tl.load(pp, mask=mask, other=0.0) * tl.load(gp, mask=mask, other=0.0) * valid
            gp += HW
            pp += HW
    gp = g_ptr + base
    pp = p_ptr + base
    op = out_ptr + base
    for _ in range(0, C):
        g = tl.load(gp, mask=mask, other=0.0) * valid
        if FROM_LOGITS:
            g = tl.load(pp, mask=mask, other=0.0) * (g - dot)
        tl.store(op, g.to(out_ptr.dtype.element_ty), mask=mask)
        gp += HW
        pp += HW
        op += HW


def forward(pred: torch.Tensor, target: torch.Tensor, scales, weights, eps: float, from_logits: bool,
            ignore_index: int, reduction: int, compute_grad: bool):
    B, C, H, W = pred.shape
    HW = H * W
    labels = target.dtype == torch.int64
    pred = pred.contiguous()
    target = target.contiguous()
    if not labels:
        target = target.to(pred.dtype)
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_grad else pred.new_empty((0,))
    per_image = torch.zeros(B, dtype=torch.float64, device=pred.device)
    if HW == 0:
        if compute_grad:
            grad.zero_()
        loss = per_image if reduction == 0 else per_image.sum()
        return loss.to(pred.dtype), grad
    tiles = triton.cdiv(HW, BLOCK)
    probs = pred
    if from_logits:
        probs = torch.empty(pred.shape, dtype=torch.float32, device=pred.device)
        launch(_softmax_kernel, (B * tiles,), (pred, probs, C, HW, tiles), dict(BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    gacc = torch.empty(pred.shape, dtype=torch.float32, device=pred.device) if compute_grad else None
    first = True
    for s, w in zip(scales, weights):
        Hs, Ws = H // s, W // s
        if Hs == 0 or Ws == 0:
            continue
        terms = B * C * Hs * Ws if reduction == 1 else (C * Hs * Ws if reduction == 0 else 1)
        nblk = triton.cdiv(Hs * Ws, BLOCK)
        partials = torch.empty((B * C, nblk), dtype=torch.float32, device=pred.device)
        if compute_grad:
            ax = torch.empty((B * C, Hs * Ws), dtype=torch.float32, device=pred.device)
            ay = torch.empty_like(ax)
        else:
            ax = ay = partials  # unused
        launch(_scale_forward_kernel, (B * C, nblk), (probs, target, ax, ay, partials, C, H, W, Hs, Ws, nblk,
                                                      ignore_index, float(w) / terms, float(eps)),
               dict(S=s, LABELS=labels, GRAD=compute_grad, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
        per_image += partials.view(B, -1).sum(dim=1, dtype=torch.float64)
        if compute_grad:
            launch(_scale_adjoint_kernel, (B * C, tiles), (ax, ay, gacc, H, W, Hs, Ws),
                   dict(S=s, FIRST=first, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
            first = False
    if compute_grad:
        if first:  # every scale was empty
            gacc.zero_()
        launch(_finalize_kernel, (B * tiles,), (gacc, probs, target, grad, C, HW, tiles, ignore_index),
               dict(LABELS=labels, FROM_LOGITS=from_logits, BLOCK=BLOCK), NUM_WARPS, NUM_STAGES)
    loss = per_image if reduction == 0 else per_image.sum()
    return loss.to(pred.dtype), grad


def backward(grad_loss: torch.Tensor, grad_pred: torch.Tensor, reduction: int) -> torch.Tensor:
    scale = grad_loss.reshape(-1, 1, 1, 1) if reduction == 0 else grad_loss.reshape(())
    return grad_pred * scale.to(grad_pred.dtype)
