"""depthwise_conv2d: large-kernel depthwise (groups = C) stride-1 zero-padded convolution.

Same result as ``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)``, for kernels
from 1x1 up to 63x63, square or rectangular (1-D k x 1 / 1 x k strips), any dilation.

Autograd saves only x and weight (no padded copy, no im2col buffer); the backward op computes the
requested gradients only (output_mask): grad input is a correlation of grad_out with the flipped kernel,
grad weight a reduction over (B, H, W) done per work item and summed in a fixed order (deterministic),
grad bias a plain sum.

Layout: the output (and grad input) keep channels_last when x is channels_last, else NCHW-contiguous
(the rule of triton/_common.output_layout). The CPU kernel computes in NCHW internally and
converts channels_last inputs (a copy in each direction; see csrc/cpu/depthwise_conv2d.cpp).

GPU backend rule (choose_gpu): the CUDA C++ kernel stages the padded input tile and the whole kernel in
shared memory once per block and reuses every staged element KH*KW times from shared memory; the Triton
kernel loads, for each of the KH*KW taps, a shifted [BLOCK_H, BLOCK_W] window of the input tile (L1/L2
hits after the first tap, but KH*KW load instructions per output tile and no explicit reuse). For small
kernels the load count is small and the Triton kernel (autotuned blocks, fp16/bf16 vector loads) is at
least as fast and cheaper to maintain; from about 9x9 taps (81) the shared-memory reuse wins. Rule:
``KH * KW >= 81`` (i.e. 9x9, 13x13, 21x21, 31x31, or a 51x5 strip) -> "cuda", else "triton". The
threshold is the reasoning above, not yet a measurement: re-tune with the benchmark on an H100.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import reference
from ..triton._common import output_layout
from ._checks import check_floating, check_int_pair, check_like, check_tensor
from ._registry import FusedOp, needs_grad, none_if_absent

MAX_KERNEL = 63
# KH * KW from which the CUDA C++ shared-memory kernel serves the GPU (see the module docstring).
CUDA_MIN_TAPS = 81

IntPair = Union[int, Sequence[int]]


def output_size(x: torch.Tensor, weight: torch.Tensor, padding, dilation) -> Tuple[int, int]:
    kh, kw = weight.shape[2], weight.shape[3]
    return (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1),
            x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1))


def _fake(x, weight, bias, padding, dilation):
    ho, wo = output_size(x, weight, padding, dilation)
    out = x.new_empty((x.shape[0], x.shape[1], ho, wo))
    return out.contiguous(memory_format=output_layout(x))


def _backward_fake(grad_out, x, weight, padding, dilation, output_mask):
    grad_x = torch.empty_like(x, memory_format=output_layout(x)) if output_mask[0] else x.new_empty((0,))
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else x.new_empty((0,))
    grad_b = x.new_empty((x.shape[1],)) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (list(padding), list(dilation), bias is not None)


def _backward(ctx, backward_fn, grad):
    x, weight = ctx.saved_tensors
    padding, dilation, has_bias = ctx.conv_args
    mask = [needs_grad(ctx, 0), needs_grad(ctx, 1), has_bias and needs_grad(ctx, 2)]
    if not any(mask):
        return None, None, None, None, None
    grad_x, grad_w, grad_b = backward_fn(grad, x, weight, padding, dilation, mask)
    return none_if_absent(grad_x), none_if_absent(grad_w), none_if_absent(grad_b), None, None


def choose_gpu(*args) -> str:
    """Per-shape GPU rule, called with the forward's arguments (x, weight, ...) or the backward's
    (grad_out, x, weight, ...): CUDA C++ from KH*KW >= CUDA_MIN_TAPS (shared-memory reuse wins for
    large kernels), Triton below (see the module docstring)."""
    # Forward: (x, weight, bias, ...); backward: (grad_out, x, weight, ...). The weight is the first
    # [C, 1, KH, KW] argument after the first map.
    weight = args[2] if isinstance(args[2], torch.Tensor) and args[2].dim() == 4 else args[1]
    return "cuda" if weight.shape[2] * weight.shape[3] >= CUDA_MIN_TAPS else "triton"


def _present(t) -> bool:
    return t is not None and not (t.dim() == 1 and t.numel() == 0)


def _backward_setup_context(ctx, inputs, output):
    grad_out, x, weight, padding, dilation, output_mask = inputs
    ctx.save_for_backward(grad_out, x, weight)
    ctx.conv_args = (list(padding), list(dilation), list(output_mask))


def _double_backward(ctx, ggx, ggw, ggb):
    """Autograd of the backward op (double backward), in terms of the two ops themselves. With the
    forward out = A_w x (+ b): grad_x = A_w^T g, <grad_w, v> = <g, A_v x>, grad_b = sum g, so
      d/dg = A_w ggx + A_ggw x + ggb,   d/dx = A_ggw^T g,   d/dw = weight-grad of (input ggx, grad g)."""
    grad_out, x, weight = ctx.saved_tensors
    padding, dilation, mask = ctx.conv_args
    forward, backward = torch.ops.medattn.depthwise_conv2d, torch.ops.medattn.depthwise_conv2d_backward
    use_gx, use_gw, use_gb = mask[0] and _present(ggx), mask[1] and _present(ggw), mask[2] and _present(ggb)
    d_g = d_x = d_w = None
    if ctx.needs_input_grad[0]:
        terms = []
        if use_gx:
            terms.append(forward(ggx, weight, None, padding, dilation))
        if use_gw:
            terms.append(forward(x, ggw, None, padding, dilation))
        if use_gb:
            terms.append(ggb.reshape(1, -1, 1, 1).expand_as(grad_out))
        d_g = sum(terms[1:], terms[0]) if terms else None
    if ctx.needs_input_grad[1] and use_gw:
        d_x = backward(grad_out, x, ggw, padding, dilation, [True, False, False])[0]
    if ctx.needs_input_grad[2] and use_gx:
        d_w = backward(grad_out, ggx, weight, padding, dilation, [False, True, False])[1]
    return d_g, d_x, d_w, None, None, None


def _triton():
    try:
        from ..triton import depthwise_conv2d as kernels
    except ImportError:  # triton missing: the reference and C++ backends remain
        return None
    return kernels.forward, kernels.backward


SPEC = FusedOp(
    name="depthwise_conv2d",
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_fake=_backward_fake,
    triton=_triton(),
    cuda_cpp=True,
    choose_gpu=choose_gpu,
).register()
if SPEC.defined:  # double backward through the registered ops (the C++ kernel, or the GPU kernels)
    torch.library.register_autograd(f"{SPEC.qualname}_backward", _double_backward,
                                    setup_context=_backward_setup_context)


def resolve_padding(weight: torch.Tensor, padding: Optional[IntPair], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """padding=None -> "same": dilation*(K-1)//2 per side, which keeps H and W only for odd K."""
    if padding is None:
        kh, kw = weight.shape[2], weight.shape[3]
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"padding: 'same' padding (padding=None) needs an odd kernel, got {kh}x{kw}; "
                             "pass padding explicitly (an int or an (h, w) pair)")
        return dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2
    return check_int_pair(padding, "padding", 0)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Optional[IntPair] = None, dilation: IntPair = 1, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise 2-D convolution, stride 1, zero padding:
    ``F.conv2d(x, weight, bias, padding=padding, dilation=dilation, groups=C)``.

    Args:
        x: ``[B, C, H, W]`` floating tensor, NCHW, channels_last or strided (the output keeps
            channels_last, otherwise it is NCHW-contiguous).
        weight: ``[C, 1, KH, KW]`` depthwise kernel, 1 <= KH, KW <= 63, same dtype and device as x.
        bias: optional ``[C]``.
        padding: ``None`` = "same" (``dilation * (K - 1) // 2`` per side; odd kernels only), an int, or
            an ``(h, w)`` pair of non-negative ints.
        dilation: int or ``(h, w)`` pair, >= 1.
        backend: ``None`` (fastest available), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    There is no ``stride`` argument (stride is always 1): passing one raises TypeError. The output is
    ``[B, C, H + 2 ph - dh (KH - 1), W + 2 pw - dw (KW - 1)]``; a size below 1 raises ValueError.
    """
    check_tensor(x, "x", 4, "[B, C, H, W]")
    check_floating(x, "x")
    check_tensor(weight, "weight", 4, "[C, 1, KH, KW]")
    check_like(weight, "weight", x, "x")
    C = x.shape[1]
    if C < 1:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight: expected a depthwise kernel of shape [C, 1, KH, KW] with C = {C} (as x), "
                         f"got {tuple(weight.shape)}")
    kh, kw = weight.shape[2], weight.shape[3]
    if not (1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
        raise ValueError(f"weight: expected kernel sizes between 1 and {MAX_KERNEL}, got {kh}x{kw}")
    if bias is not None:
        check_tensor(bias, "bias", 1, "[C]")
        check_like(bias, "bias", x, "x")
        if bias.shape[0] != C:
            raise ValueError(f"bias: expected shape [{C}] (C of x), got {tuple(bias.shape)}")
    dilation = check_int_pair(dilation, "dilation", 1)
    padding = resolve_padding(weight, padding, dilation)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x: expected H, W >= 1, got shape {tuple(x.shape)}")
    ho, wo = output_size(x, weight, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"x: output size {ho}x{wo} is below 1 (input {x.shape[2]}x{x.shape[3]}, kernel {kh}x{kw}, "
                         f"padding {padding}, dilation {dilation}): increase padding or reduce the kernel")
    padding, dilation = list(padding), list(dilation)
    chosen = SPEC.resolve(backend, x, "x")
    if chosen == "reference":
        return reference.depthwise_conv2d(x, weight, bias, padding, dilation)
    return SPEC.run(chosen, x, weight, bias, padding, dilation)
