"""global_spatial_attention: x * sigmoid(mean_c x), optionally + y * sigmoid(mean_c y) in one pass.

Autograd saves only the inputs: the backward recomputes the per-pixel gate (one channel sum) instead
of keeping a [B,1,H,W] gate or the [B,C,H,W] products, so nothing beyond x (and y) is kept.
1-D and 3-D maps reach the 4-D kernels as views (_checks.as_4d_map): the gate is per pixel.
GPU: Triton only (a memory-bound elementwise-plus-reduction kernel gains nothing from CUDA C++).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..triton._common import output_layout
from ._checks import as_4d_map, check_floating, check_like, check_spatial_map, from_4d_map
from ._registry import FusedOp, needs_grad


def _fake(x, y=None):
    return torch.empty_like(x, memory_format=output_layout(x))


def _backward_fake(grad_out, x, y=None):
    grad_y = torch.empty_like(x, memory_format=output_layout(x)) if y is not None else x.new_empty((0,))
    return torch.empty_like(x, memory_format=output_layout(x)), grad_y


def _setup_context(ctx, inputs, output):
    x, y = inputs
    ctx.save_for_backward(x, y)


def _backward(ctx, backward_fn, grad):
    # One call for both branches when both need gradients: grad_out is read once for the two.
    x, y = ctx.saved_tensors
    want_x, want_y = needs_grad(ctx, 0), y is not None and needs_grad(ctx, 1)
    if want_x and want_y:
        return backward_fn(grad, x, y)
    if want_x:
        return backward_fn(grad, x, None)[0], None
    if want_y:
        return None, backward_fn(grad, y, None)[0]
    return None, None


def _triton():
    from ..triton import global_spatial_attention as kernels
    return kernels.forward, kernels.backward


SPEC = FusedOp(
    name="global_spatial_attention",
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_fake=_backward_fake,
    triton=_triton(),
).register()


def global_spatial_attention(x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                             backend: Optional[str] = None) -> torch.Tensor:
    """Global spatial attention gate of DIN's DIFM: ``x * sigmoid(x.mean(1, keepdim=True))``, plus the
    same of ``y`` when given (the sum of DIFM's two branches, fused into one pass).

    Args:
        x: ``[B, C, *spatial]`` floating tensor with 1 to 3 spatial dims (``[B, C, L]``, ``[B, C, H, W]``,
            ``[B, C, D, H, W]``), contiguous or channels_last(_3d) (the output keeps channels_last).
        y: optional second map of x's shape, dtype and device.
        backend: ``None`` (fastest available), ``"reference"``, ``"cpu"`` or ``"triton"``.
    """
    check_spatial_map(x, "x")
    check_floating(x, "x")
    if y is not None:
        check_spatial_map(y, "y")
        check_like(y, "y", x, "x")
        if y.shape != x.shape:
            raise ValueError(f"y: expected shape {tuple(x.shape)} (as x), got {tuple(y.shape)}")
    chosen = SPEC.resolve(backend, x, "x")
    if chosen == "reference":
        return reference.global_spatial_attention(x, y)
    x_map = as_4d_map(x)
    return from_4d_map(SPEC.run(chosen, x_map, None if y is None else as_4d_map(y)), x, x_map)
