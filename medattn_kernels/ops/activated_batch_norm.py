"""activated_batch_norm: training-mode batch norm + leaky ReLU that keeps only its output (InPlace-ABN).

``y = leaky_relu((x - mean) / sqrt(var + eps) * (|weight| + eps) + bias, negative_slope)`` with the
biased batch statistics over (B, *spatial). Autograd saves y, the two [C] parameters and var, never x:
for slope > 0 and gamma = |weight| + eps > 0 the activation and the affine map can be inverted, so
the backward rebuilds x_hat from y (csrc/cpu/activated_batch_norm.cpp has the formulas). In a
conv-BN-act stack the next conv keeps y as its input anyway, so this halves what the stack keeps.
The op also returns the batch mean and variance (not differentiable) for the running estimates.
1-D and 3-D maps reach the 4-D kernels as views (_checks.as_4d_map): the statistics run over all pixels.
``signed_weight=True`` computes nn.BatchNorm's function (signed scale ``weight``) on the same kernels.

GPU: Triton only (two memory-bound passes with per-channel reductions; nothing for CUDA C++ to win).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..reference.activated_batch_norm import update_running_stats_
from ..triton._common import output_layout
from ._checks import (as_4d_map, check_dims, check_floating, check_like, check_spatial_map, check_tensor,
                      from_4d_map)
from ._registry import FusedOp, needs_grad, none_if_absent


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the returned mean and var: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(x, weight, bias, eps, negative_slope, running_mean=None, running_var=None, momentum=0.1):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=output_layout(x)), x.new_empty((c,), dtype=stat_dtype(x.dtype)),
            x.new_empty((c,), dtype=stat_dtype(x.dtype)))


def _backward_fake(grad_y, y, weight, bias, var, eps, negative_slope, output_mask):
    return (torch.empty_like(y, memory_format=output_layout(y)) if output_mask[0] else y.new_empty((0,)),
            torch.empty_like(weight) if output_mask[1] else y.new_empty((0,)),
            torch.empty_like(bias) if output_mask[2] else y.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    _, weight, bias, eps, negative_slope = inputs[:5]
    y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(y, weight, bias, var)
    ctx.abn_args = (eps, negative_slope)


def _backward(ctx, backward_fn, grad_y, grad_mean=None, grad_var=None):
    y, weight, bias, var = ctx.saved_tensors
    mask = [needs_grad(ctx, 0), needs_grad(ctx, 1), needs_grad(ctx, 2)]
    not_differentiable = (None,) * 5  # eps, negative_slope, running_mean, running_var, momentum
    if grad_y is None or not any(mask):
        return (None, None, None) + not_differentiable
    grad_x, grad_w, grad_b = backward_fn(grad_y, y, weight, bias, var, *ctx.abn_args, mask)
    return (none_if_absent(grad_x), none_if_absent(grad_w), none_if_absent(grad_b)) + not_differentiable


def _triton():
    from ..triton import activated_batch_norm as kernels
    return kernels.forward, kernels.backward


SPEC = FusedOp(
    name="activated_batch_norm",
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_fake=_backward_fake,
    triton=_triton(),
).register()


def activated_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         negative_slope: float = 0.01, *, signed_weight: bool = False,
                         running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                         momentum: float = 0.1, backend=None):
    """Training-mode batch norm followed by leaky ReLU, keeping only the output for backward.

    Args:
        x: ``[B, C, *spatial]`` floating tensor with 1 to 3 spatial dims (``[B, C, L]``, ``[B, C, H, W]``,
            ``[B, C, D, H, W]``), contiguous or channels_last(_3d) (the output keeps channels_last);
            B * prod(spatial) must exceed 1 (batch statistics).
        weight, bias: ``[C]``, x's dtype and device; the scale applied is ``|weight| + eps``.
        eps: added to the variance and to |weight| (> 0).
        negative_slope: leaky ReLU slope (> 0: the backward inverts the activation).
        signed_weight: apply ``weight`` itself as the scale, as ``nn.BatchNorm`` does, instead of
            ``|weight| + eps``: exact for every channel with ``|weight| > eps`` (see
            ``signed_weight_plan``); raises ValueError otherwise.
        running_mean, running_var: a BatchNorm layer's running estimates ``[C]`` (both or neither; any
            floating dtype, x's device), updated in place in the same call as ATen's ``batch_norm`` does:
            ``running = (1 - momentum) * running + momentum * statistic``, the variance unbiased by
            M / (M - 1) for M = B * prod(spatial) values per channel. Not differentiable.
        momentum: the update's factor (a layer with ``momentum=None`` passes 1 / num_batches_tracked).
        backend: ``None`` (fastest available), ``"reference"``, ``"cpu"`` or ``"triton"``.

    Returns:
        ``(y, mean, var)``: the activation, and the biased batch mean and variance ``[C]`` (float32,
        float64 for float64 x; not differentiable) for updating running estimates.
    """
    if not _well_formed(x, weight, bias, running_mean, running_var):
        _check_tensors(x, weight, bias, running_mean, running_var)
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"x: expected more than 1 value per channel (B * prod(spatial) > 1) for batch "
                         f"statistics, got shape {tuple(x.shape)}")
    if not float(eps) > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    if not float(negative_slope) > 0:
        raise ValueError(f"negative_slope: expected > 0 (the activation must be invertible), got {negative_slope}")
    if signed_weight:
        flip = signed_weight_plan(weight, eps)
        if flip is None:
            raise ValueError(f"weight: signed_weight=True needs |weight| > eps = {eps} in every channel (the "
                             f"op's scale |w'| + eps cannot go below eps)")
        return signed_weight_activated_batch_norm(x, weight, bias, eps, negative_slope, flip, backend=backend,
                                                  running_mean=running_mean, running_var=running_var,
                                                  momentum=momentum)
    return _activated_batch_norm(x, weight, bias, float(eps), float(negative_slope), backend, running_mean,
                                 running_var, float(momentum))


def _well_formed(x, weight, bias, running_mean, running_var) -> bool:
    """The common case that `_check_tensors` accepts, in one expression: a layer calls the op at every step,
    and at a U-Net's small maps the full checks' dozen calls cost a tenth of the kernel. False sends the
    call through them, which then name what is wrong."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
            and 3 <= x.dim() <= 5 and x.is_floating_point()):
        return False
    dtype, device, channels = x.dtype, x.device, (x.shape[1],)
    if not (weight.shape == bias.shape == channels and weight.dtype == bias.dtype == dtype
            and weight.device == bias.device == device):
        return False
    if running_mean is None and running_var is None:
        return True
    return (isinstance(running_mean, torch.Tensor) and isinstance(running_var, torch.Tensor)
            and running_mean.is_floating_point() and running_mean.dtype == running_var.dtype
            and running_mean.shape == running_var.shape == channels
            and running_mean.device == running_var.device == device)


def _check_tensors(x, weight, bias, running_mean, running_var) -> None:
    check_spatial_map(x, "x")
    check_floating(x, "x")
    for name, p in (("weight", weight), ("bias", bias)):
        check_tensor(p, name)
        check_like(p, name, x, "x")
        check_dims(p, name, [x.shape[1]], f"[C] = [{x.shape[1]}]")
    if running_mean is not None or running_var is not None:
        _check_running_stats(x, running_mean, running_var)


def _check_running_stats(x: torch.Tensor, running_mean, running_var) -> None:
    if running_mean is None or running_var is None:
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean, running_var: expected both or neither, got no {missing}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(t, name)
        check_floating(t, name)
        check_dims(t, name, [x.shape[1]], f"[C] = [{x.shape[1]}]")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
    check_like(running_var, "running_var", running_mean, "running_mean")


def _activated_batch_norm(x, weight, bias, eps: float, negative_slope: float, backend, running_mean=None,
                          running_var=None, momentum: float = 0.1):
    chosen = SPEC.resolve(backend, x, "x")
    if chosen == "reference":
        return reference.activated_batch_norm(x, weight, bias, eps, negative_slope, running_mean, running_var,
                                              momentum)
    x_map = as_4d_map(x)
    if running_mean is None:  # the dispatcher fills the defaults: fewer arguments, less to convert
        y, mean, var = SPEC.run(chosen, x_map, weight, bias, eps, negative_slope)
    else:
        y, mean, var = SPEC.run(chosen, x_map, weight, bias, eps, negative_slope, running_mean, running_var,
                                momentum)
    return from_4d_map(y, x, x_map), mean, var


def signed_weight_plan(weight: torch.Tensor, eps: float):
    """How ``leaky_relu(batch_norm(x, weight))`` with BatchNorm's signed weight runs on this op, whose
    scale is ``|w'| + eps``: None when some ``|weight| <= eps`` (not representable: the caller keeps
    its stock computation); False when every weight exceeds eps (``w' = weight - eps``); True when some
    channels are negative, which then also flip the sign of x (``(-x - mean(-x)) * |w| = (x - mean) * w``).
    One host synchronisation (the answer depends on the values)."""
    smallest_magnitude, smallest = torch.stack([weight.detach().abs().min(), weight.detach().min()]).tolist()
    if not smallest_magnitude > eps:
        return None
    return smallest < 0


def signed_weight_activated_batch_norm(x, weight, bias, eps: float, negative_slope: float, flip: bool, *,
                                       backend=None, running_mean=None, running_var=None, momentum: float = 0.1):
    """``leaky_relu(batch_norm(x, weight, bias))`` with BatchNorm's signed weight, given
    ``flip = signed_weight_plan(weight, eps)`` (not None). The op's scale ``|weight - eps| + eps``
    equals ``|weight|`` up to one rounding; autograd carries the gradients through the conversion (and
    through the sign flip, whose x * sign pass only negative weights pay for). Running estimates as in
    ``activated_batch_norm``."""
    scale_weight = weight.abs() - eps
    if not flip:
        return _activated_batch_norm(x, scale_weight, bias, float(eps), float(negative_slope), backend,
                                     running_mean, running_var, float(momentum))
    sign = torch.where(weight.detach() < 0, -1.0, 1.0).to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
    y, mean, var = _activated_batch_norm(x * sign, scale_weight, bias, float(eps), float(negative_slope), backend)
    mean = mean * sign.view(-1).to(mean.dtype)
    if running_mean is not None:  # the kernel saw the flipped channels' mean: update from the true one here
        update_running_stats_(running_mean, running_var, mean, var, float(momentum),
                                        x.numel() // x.shape[1])
    return y, mean, var
