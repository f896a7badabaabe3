"""Fused cross-image attention, flash-attention style: cross_attention (optionally gated),
bidirectional_cross_attention (DIFM's two directions in one launch) and tied_cross_attention (one
similarity matrix, row softmax one way and column softmax the other, as in BiXT).

Tokens layout ``[B, H, N, D]``. The forward ops return the outputs and a log-sum-exp per softmax row
(and per column for the tied op); autograd saves only the inputs, outputs and those O(N) statistics,
and the backward recomputes the scores block by block: never an N x N buffer.
GPU: Triton only (the blocked online-softmax kernels are what Triton is made for).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..triton._common import lse_dtype
from ._checks import check_floating, check_like, check_scale, check_tensor
from ._registry import FusedOp, needs_grad, none_if_absent, zeros_if_none

_TOKENS = "[B, H, N, D]"


def _stats(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], n), dtype=lse_dtype(x.dtype))


def _out(x: torch.Tensor, n: int, dv: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], n, dv))


def _grad(t: Optional[torch.Tensor], wanted: bool) -> Optional[torch.Tensor]:
    return none_if_absent(t) if wanted and t is not None else None


# ---------------------------------------------------------------- cross_attention
def _ca_fake(q, k, v, scale=None, gate=None):
    return _out(q, q.shape[2], v.shape[3]), _stats(q, q.shape[2])


def _ca_backward_fake(grad_out, q, k, v, out, lse, scale=None, gate=None):
    dgate = torch.empty_like(gate) if gate is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgate


def _ca_setup_context(ctx, inputs, output):
    q, k, v, scale, gate = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, gate, out, lse)
    ctx.scale = scale


def _ca_backward(ctx, backward_fn, grad_out, _grad_lse=None):
    q, k, v, gate, out, lse = ctx.saved_tensors
    if not any(needs_grad(ctx, i) for i in (0, 1, 2, 4)):
        return None, None, None, None, None
    dq, dk, dv, dgate = backward_fn(zeros_if_none(grad_out, out), q, k, v, out, lse, ctx.scale, gate)
    return (_grad(dq, needs_grad(ctx, 0)), _grad(dk, needs_grad(ctx, 1)), _grad(dv, needs_grad(ctx, 2)), None,
            _grad(dgate, gate is not None and needs_grad(ctx, 4)))


# ---------------------------------------------------------------- bidirectional
def _bi_fake(q_a, k_a, v_a, q_b, k_b, v_b, scale=None):
    na, nb = q_a.shape[2], q_b.shape[2]
    return _out(q_a, na, v_b.shape[3]), _out(q_b, nb, v_a.shape[3]), _stats(q_a, na), _stats(q_b, nb)


def _bi_backward_fake(grad_o_a, grad_o_b, q_a, k_a, v_a, q_b, k_b, v_b, o_a, o_b, lse_a, lse_b, scale=None):
    return tuple(torch.empty_like(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b))


# ---------------------------------------------------------------- two-direction autograd glue
# The two-direction ops (bidirectional, tied) share their autograd glue: inputs are (*tensors, scale),
# outputs (o_a, o_b, lse_a, lse_b), and the backward op takes (grad_o_a, grad_o_b, *tensors, *outputs, scale)
# and returns one gradient per input tensor.
def _two_way_setup_context(ctx, inputs, output):
    *tensors, scale = inputs
    o_a, o_b, lse_a, lse_b = output
    ctx.mark_non_differentiable(lse_a, lse_b)
    ctx.save_for_backward(*tensors, o_a, o_b, lse_a, lse_b)
    ctx.scale = scale


def _two_way_backward(ctx, backward_fn, grad_o_a, grad_o_b, _grad_lse_a=None, _grad_lse_b=None):
    *tensors, o_a, o_b, lse_a, lse_b = ctx.saved_tensors
    wanted = [needs_grad(ctx, i) for i in range(len(tensors))]
    if not any(wanted):
        return (None,) * (len(tensors) + 1)
    grads = backward_fn(zeros_if_none(grad_o_a, o_a), zeros_if_none(grad_o_b, o_b), *tensors,
                        o_a, o_b, lse_a, lse_b, ctx.scale)
    return tuple(_grad(g, w) for g, w in zip(grads, wanted)) + (None,)


# ---------------------------------------------------------------- tied
def _tied_fake(r_a, v_a, r_b, v_b, scale=None):
    na, nb = r_a.shape[2], r_b.shape[2]
    return _out(r_a, na, v_b.shape[3]), _out(r_b, nb, v_a.shape[3]), _stats(r_a, na), _stats(r_a, nb)


def _tied_backward_fake(grad_o_a, grad_o_b, r_a, v_a, r_b, v_b, o_a, o_b, lse_row, lse_col, scale=None):
    return tuple(torch.empty_like(t) for t in (r_a, v_a, r_b, v_b))



def _triton(which: str):
    try:
        from ..triton import cross_attention as kernels
    except ImportError:  # triton not installed: the op still works on CPU and with the reference
        return None
    return getattr(kernels, f"{which}_forward"), getattr(kernels, f"{which}_backward")


CROSS_ATTENTION = FusedOp(
    name="cross_attention", fake=_ca_fake, setup_context=_ca_setup_context, backward=_ca_backward,
    backward_fake=_ca_backward_fake, triton=_triton("cross_attention"),
).register()
BIDIRECTIONAL = FusedOp(
    name="bidirectional_cross_attention", fake=_bi_fake, setup_context=_two_way_setup_context, backward=_two_way_backward,
    backward_fake=_bi_backward_fake, triton=_triton("bidirectional"),
).register()
TIED = FusedOp(
    name="tied_cross_attention", fake=_tied_fake, setup_context=_two_way_setup_context, backward=_two_way_backward,
    backward_fake=_tied_backward_fake, triton=_triton("tied"),
).register()


# ---------------------------------------------------------------- argument checks
def _check_tokens(t, name: str, ref: Optional[torch.Tensor] = None, ref_name: str = "") -> torch.Tensor:
    check_tensor(t, name, 4, _TOKENS)
    check_floating(t, name)
    if ref is not None:
        check_like(t, name, ref, ref_name)
        if t.shape[:2] != ref.shape[:2]:
            raise ValueError(f"{name}: expected batch and heads {tuple(ref.shape[:2])} (as {ref_name}), "
                             f"got shape {tuple(t.shape)}")
    return t


def _check_head_dim(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.shape[3] != ref.shape[3]:
        raise ValueError(f"{name}: expected head dim {ref.shape[3]} (as {ref_name}), got shape {tuple(t.shape)}")


def _check_tokens_count(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.shape[2] != ref.shape[2]:
        raise ValueError(f"{name}: expected {ref.shape[2]} tokens (as {ref_name}), got shape {tuple(t.shape)}")


# ---------------------------------------------------------------- public API
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    gate: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v``, times ``sigmoid(gate)`` per query when a gate is given.

    Args:
        q: queries ``[B, H, Nq, D]``.
        k: keys ``[B, H, Nk, D]``.
        v: values ``[B, H, Nk, Dv]`` (Dv may differ from D).
        scale: softmax temperature, default ``D ** -0.5``.
        gate: optional point-wise attention logits ``[B, H, Nq]``: ``out *= sigmoid(gate)[..., None]``
            (Joint Attention's gate).
        backend: ``None`` (fastest available), ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns ``[B, H, Nq, Dv]``. Memory kept for backward: inputs, output and one float per query.
    """
    _check_tokens(q, "q")
    _check_tokens(k, "k", q, "q")
    _check_tokens(v, "v", q, "q")
    _check_head_dim(k, "k", q, "q")
    _check_tokens_count(v, "v", k, "k")
    scale = check_scale(scale)
    if gate is not None:
        check_tensor(gate, "gate", 3, "[B, H, Nq]")
        check_like(gate, "gate", q, "q")
        if tuple(gate.shape) != tuple(q.shape[:3]):
            raise ValueError(f"gate: expected shape [B, H, Nq] = {tuple(q.shape[:3])}, got {tuple(gate.shape)}")
    chosen = CROSS_ATTENTION.resolve(backend, q, "q")
    if chosen == "reference":
        return reference.cross_attention(q, k, v, scale, gate)
    return CROSS_ATTENTION.run(chosen, q, k, v, scale, gate)[0]


def _run_two_way(op: FusedOp, reference_fn, tensors, first_name: str, scale, backend):
    """(o_a, o_b) of a checked two-direction op (bidirectional, tied) from the chosen backend."""
    scale = check_scale(scale)
    chosen = op.resolve(backend, tensors[0], first_name)
    if chosen == "reference":
        return reference_fn(*tensors, scale)
    o_a, o_b, _, _ = op.run(chosen, *tensors, scale)
    return o_a, o_b


def bidirectional_cross_attention(q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor, q_b: torch.Tensor,
                                  k_b: torch.Tensor, v_b: torch.Tensor, scale: Optional[float] = None, *,
                                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIFM's two cross attentions in one launch: ``o_a = softmax(s q_a k_b^T) v_b`` (image a attends to
    image b) and ``o_b = softmax(s q_b k_a^T) v_a``.

    Args:
        q_a, k_a: ``[B, H, Na, D]``; v_a: ``[B, H, Na, Dva]``.
        q_b, k_b: ``[B, H, Nb, D]``; v_b: ``[B, H, Nb, Dvb]`` (Na may differ from Nb).
        scale: default ``D ** -0.5``.
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns ``(o_a [B, H, Na, Dvb], o_b [B, H, Nb, Dva])``.
    """
    _check_tokens(q_a, "q_a")
    names = ("k_a", "v_a", "q_b", "k_b", "v_b")
    for name, t in zip(names, (k_a, v_a, q_b, k_b, v_b)):
        _check_tokens(t, name, q_a, "q_a")
    for name, t in (("k_a", k_a), ("q_b", q_b), ("k_b", k_b)):
        _check_head_dim(t, name, q_a, "q_a")
    _check_tokens_count(k_a, "k_a", q_a, "q_a")
    _check_tokens_count(v_a, "v_a", q_a, "q_a")
    _check_tokens_count(k_b, "k_b", q_b, "q_b")
    _check_tokens_count(v_b, "v_b", q_b, "q_b")
    return _run_two_way(BIDIRECTIONAL, reference.bidirectional_cross_attention, (q_a, k_a, v_a, q_b, k_b, v_b),
                        "q_a", scale, backend)


def tied_cross_attention(r_a: torch.Tensor, v_a: torch.Tensor, r_b: torch.Tensor, v_b: torch.Tensor,
                         scale: Optional[float] = None, *,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional attention through one similarity ``S = scale * r_a @ r_b^T`` (BiXT):
    ``o_a = softmax(S, dim=-1) @ v_b`` and ``o_b = softmax(S, dim=-2)^T @ v_a``. Cheaper than two
    attentions: each score block serves both directions, forward and backward.

    Args:
        r_a: ``[B, H, Na, D]``; v_a: ``[B, H, Na, Dva]``; r_b: ``[B, H, Nb, D]``; v_b: ``[B, H, Nb, Dvb]``.
        scale: default ``D ** -0.5``.
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns ``(o_a [B, H, Na, Dvb], o_b [B, H, Nb, Dva])``.
    """
    _check_tokens(r_a, "r_a")
    for name, t in (("v_a", v_a), ("r_b", r_b), ("v_b", v_b)):
        _check_tokens(t, name, r_a, "r_a")
    _check_head_dim(r_b, "r_b", r_a, "r_a")
    _check_tokens_count(v_a, "v_a", r_a, "r_a")
    _check_tokens_count(v_b, "v_b", r_b, "r_b")
    return _run_two_way(TIED, reference.tied_cross_attention, (r_a, v_a, r_b, v_b), "r_a", scale, backend)
