"""sobel_boundary_loss: multi-scale Sobel boundary loss of DIN (design.md section 2), fused.

    G(u) = sqrt(gx(u)^2 + gy(u)^2 + eps),  Sobel pair / 8, replicate padding
    loss = sum_s w_s * reduce_{b,c,h,w} | G(P_s(p)) - G(P_s(y)) |,  P_s = avg_pool(s, s) (floor)

The loss is a terminal node (Liger-Kernel fused-loss style): when `pred` requires grad, the forward
also forms d loss / d pred (the Sobel-magnitude, pooling, masking and softmax adjoints applied in the
same pass), and autograd keeps only that tensor, the size of pred. The backward op only rescales it by
grad_loss (per image for reduction "none"). The reference keeps the pooled maps, gradient maps and
magnitudes of both inputs at every scale, about 7x the input.

Schema conventions (csrc/ops.cpp): reduction 0 none ([B], one loss per image), 1 mean, 2 sum;
ignore_index = NO_IGNORE_INDEX (int64 min, which can never be a class or a usual ignore value such as
-100 or 255) means "no ignore_index". int64 labels [B, H, W] must lie in [0, C) or equal ignore_index.

Gradients: w.r.t. pred only. A float target that requires grad is refused with a ValueError (its
gradient needs a second adjoint pass and output; targets are data in every model here): detach it.
The gradient of the op's second output (grad_pred) is not propagated (no second-order support).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import reference
from ._checks import check_floating, check_tensor
from ._registry import FusedOp, needs_grad

NO_IGNORE_INDEX = -(2 ** 63)
REDUCTIONS = ("none", "mean", "sum")
REDUCTION_CODES = {name: code for code, name in enumerate(REDUCTIONS)}


def _fake(pred, target, scales, weights, eps, from_logits, ignore_index, reduction, compute_grad):
    loss = pred.new_empty((pred.shape[0],) if reduction == 0 else ())
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format) if compute_grad else pred.new_empty((0,))
    return loss, grad


def _backward_fake(grad_loss, grad_pred, reduction):
    return torch.empty_like(grad_pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, grad_pred = output
    ctx.save_for_backward(grad_pred)
    ctx.reduction = inputs[7]
    ctx.compute_grad = inputs[8]


def _backward(ctx, backward_fn, grad_loss, _grad_of_grad_pred):
    # The second output (d loss / d pred) is not differentiated: that would be the Hessian.
    if needs_grad(ctx, 1):
        raise ValueError("target: sobel_boundary_loss gives gradients w.r.t. pred only; detach the target")
    if not needs_grad(ctx, 0) or grad_loss is None:
        return (None,) * 9
    if not ctx.compute_grad:
        raise RuntimeError("sobel_boundary_loss: the forward ran with compute_grad=False, so d loss / d pred "
                           "was not formed; call it with compute_grad=True when pred requires grad")
    (grad_pred,) = ctx.saved_tensors
    return (backward_fn(grad_loss, grad_pred, ctx.reduction),) + (None,) * 8


def _triton():
    from ..triton import sobel_boundary_loss as kernels
    return kernels.forward, kernels.backward


def _lazy_triton():
    """Triton launchers, imported at first use (the module imports triton)."""
    def forward(*args):
        return _triton()[0](*args)

    def backward(*args):
        return _triton()[1](*args)
    return forward, backward


SPEC = FusedOp(
    name="sobel_boundary_loss",
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_fake=_backward_fake,
    triton=_lazy_triton(),
).register()


def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """int64 labels must be in [0, C) or equal ignore_index (the C++ kernel checks this itself)."""
    if target.device.type == "meta":  # shapes only, no values to check (medattn_kernels.gpu_check's traces)
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target: labels must lie in [0, {num_classes}) (C = pred.shape[1]) or equal "
                         f"ignore_index, got {value}")


def _check_arguments(pred, target, scales, weights, eps, reduction, ignore_index):
    check_tensor(pred, "pred", 4, "[B, C, H, W]")
    check_floating(pred, "pred")
    check_tensor(target, "target")
    if pred.shape[0] == 0 or pred.shape[1] == 0:
        raise ValueError(f"pred: expected at least one image and one class, got shape {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target: expected device {pred.device} (as pred), got {target.device}")
    B, C, H, W = pred.shape
    if target.dtype == torch.int64:
        if tuple(target.shape) != (B, H, W):
            raise ValueError(f"target: expected int64 labels of shape [B, H, W] = {(B, H, W)} matching pred, "
                             f"got {tuple(target.shape)}")
    elif target.is_floating_point():
        if target.shape != pred.shape:
            raise ValueError(f"target: expected shape {tuple(pred.shape)} (as pred) for a float target, "
                             f"got {tuple(target.shape)}")
        if target.requires_grad:
            raise ValueError("target: sobel_boundary_loss gives gradients w.r.t. pred only, but the float "
                             "target requires grad; detach it")
        if ignore_index is not None:
            raise ValueError("ignore_index: applies to int64 label targets only, got a float target")
    else:
        raise TypeError(f"target: expected a floating-point tensor of pred's shape or int64 labels [B, H, W], "
                        f"got {str(target.dtype).replace('torch.', '')}")
    if isinstance(scales, int) or not isinstance(scales, Sequence) or len(scales) == 0 or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in scales):
        raise TypeError(f"scales: expected a non-empty sequence of ints, got {scales!r}")
    if any(s < 1 for s in scales):
        raise ValueError(f"scales: expected positive pooling factors, got {tuple(scales)}")
    if weights is None:
        weights = [1.0] * len(scales)
    else:
        if isinstance(weights, (int, float)) or not isinstance(weights, Sequence) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise TypeError(f"weights: expected a sequence of floats or None, got {weights!r}")
        if len(weights) != len(scales):
            raise ValueError(f"weights: expected {len(scales)} values (one per scale), got {len(weights)}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights: expected finite values, got {tuple(weights)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0, got {eps}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int or None, got {type(ignore_index).__name__}")
        if ignore_index == NO_IGNORE_INDEX:
            raise ValueError(f"ignore_index: {NO_IGNORE_INDEX} is reserved for 'no ignore_index' (use None)")
    return [float(w) for w in weights]


def sobel_boundary_loss(pred: torch.Tensor, target: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
                        weights: Optional[Sequence[float]] = None, eps: float = 1e-6, from_logits: bool = False,
                        reduction: str = "mean", ignore_index: Optional[int] = None, *,
                        backend: Optional[str] = None) -> torch.Tensor:
    """Multi-scale Sobel boundary loss (DIN): ``sum_s w_s * reduce |G(P_s(p)) - G(P_s(y))|``.

    Args:
        pred: ``[B, C, H, W]`` probabilities (or logits with ``from_logits=True``: softmax over C inside).
        target: float ``[B, C, H, W]`` (one-hot or soft, converted to pred's dtype), or int64 labels
            ``[B, H, W]`` in ``[0, C)`` (one-hot encoded inside the kernel, never materialised).
        scales: average-pooling factors (kernel = stride = s, floor); a scale whose pooled map is empty
            contributes 0.
        weights: one weight per scale (default 1 each).
        eps: added under the square root of the gradient magnitude (> 0).
        from_logits: apply softmax over C to pred first.
        reduction: ``"mean"`` (over B, C and the pooled pixels, per scale), ``"sum"``, or ``"none"``
            (one mean per image, shape ``[B]``).
        ignore_index: with int64 labels, pixels of this label are zeroed in both the prediction and the
            one-hot target before pooling (no label, no gradient).
        backend: ``None`` (fastest available), ``"reference"``, ``"cpu"`` or ``"triton"``.

    Gradients flow to ``pred`` only; a float target that requires grad raises ValueError.
    """
    weights = _check_arguments(pred, target, scales, weights, eps, reduction, ignore_index)
    scales = [int(s) for s in scales]
    if target.is_floating_point() and target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    chosen = SPEC.resolve(backend, pred, "pred")
    if chosen == "reference":
        if target.dtype == torch.int64:
            check_labels(target, pred.shape[1], NO_IGNORE_INDEX if ignore_index is None else ignore_index)
        return reference.sobel_boundary_loss(pred, target, scales, weights, float(eps), bool(from_logits),
                                             ignore_index, reduction)
    compute_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = SPEC.run(chosen, pred, target, scales, weights, float(eps), bool(from_logits),
                       NO_IGNORE_INDEX if ignore_index is None else int(ignore_index), REDUCTION_CODES[reduction],
                       compute_grad)
    return loss


__all__ = ["sobel_boundary_loss", "NO_IGNORE_INDEX"]
