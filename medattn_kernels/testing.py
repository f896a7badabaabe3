"""Helpers every op's tests and benchmarks share: per-dtype tolerances (Liger-Kernel style), the
error metric of design.md (max |out - ref| / max |ref| against a float64 reference), input factories
for odd layouts, and the "memory kept for backward" measurement."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

# Relative tolerances (max |out - ref| / max |ref|) against the float64 reference, per dtype the kernel
# computes in. They leave headroom over the typical errors of design.md section 6 (fp64 ~1e-12, fp32
# ~1e-6, TF32 ~3e-4, fp16/bf16 1e-3..1e-2) for reductions over a few thousand terms.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
TF32_TOLERANCE = 2e-3

LAYOUTS = ("contiguous", "noncontiguous", "channels_last")


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_TOLERANCE if tf32 and dtype == torch.float32 else TOLERANCES[dtype]


def sum_tolerance(dtype: torch.dtype, terms: torch.Tensor, reference: torch.Tensor, dims) -> float:
    """Tolerance for a result that is a sum of `terms` over `dims` (a bias or normalisation-parameter
    gradient): the dtype's tolerance times the sum's condition number max_c sum |terms| / max |reference|.
    Rounding, including that of the inputs to the dtype, scales with the terms' magnitudes, not with a
    sum that cancels (a bias gradient of 0.016 made of 60 terms of size 1)."""
    scale = terms.detach().abs().sum(dims).max().item()
    denom = reference.detach().abs().max().item()
    return tolerance(dtype) * max(1.0, scale / denom if denom > 0 else 1.0)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64; NaN where out and ref disagree on NaN positions, 0 for
    empty tensors. Positions where both are NaN, or both the same Inf, count as equal."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    same_nonfinite = (torch.isnan(o) & torch.isnan(r)) | (torch.isinf(o) & (o == r))
    if bool((torch.isfinite(o) != torch.isfinite(r))[~same_nonfinite].any()):
        return float("nan")
    o, r = o[~same_nonfinite], r[~same_nonfinite]
    if o.numel() == 0:
        return 0.0
    denom = r.abs().max().item()
    err = (o - r).abs().max().item()
    return err / denom if denom > 0 else err


def _kinked_activations(model):
    """(name, module) of the activations whose derivative jumps at 0 that the networks use as modules:
    ActivatedBatchNorm (leaky ReLU inside), nn.LeakyReLU, nn.ReLU. (A functional F.relu is not seen: the
    networks apply theirs as modules for this reason.)"""
    from .nn.activated_batch_norm import _ActivatedBatchNorm

    kinds = (_ActivatedBatchNorm, torch.nn.LeakyReLU, torch.nn.ReLU)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _on_branch(x, positive, slope: float):
    """A (leaky) ReLU of x on the given branches (positive: the identity one). The derivative is the
    branch's (1 or slope); the value is the activation's wherever x lies on its branch's side of 0 and,
    where it does not (an input within rounding of 0 that crossed), |x| with the branch's sign: what comes
    next then sees the same order as in the network the branches came from (a max pool over a window of
    ReLU zeros picks the same element)."""
    linear = torch.where(positive, x, slope * x)
    signed = torch.where(positive, x.abs(), -slope * x.abs())
    return linear + (signed - linear).detach()


def _follow_activation_pattern(model, patterns):
    """Make `model` take each kinked activation's branch from `patterns` (name -> bool tensor, True: the
    identity branch) instead of from the sign of its own input (`_on_branch`). The values move by at most
    the distance of those inputs to zero (rounding); the derivative is the pattern's. Activations without
    a pattern (they did not run) are left alone."""
    from .nn.activated_batch_norm import _ActivatedBatchNorm

    for name, module in _kinked_activations(model):
        if name not in patterns:
            continue
        positive = patterns[name]
        if isinstance(module, _ActivatedBatchNorm):
            # leaky ReLU with a positive slope is invertible: recover its input from its output
            def hook(mod, inputs, out, positive=positive):
                s = mod.negative_slope
                return _on_branch(torch.where(out > 0, out, out / s), positive, s)
        else:
            module.inplace = False  # the hook reads the activation's input

            def hook(mod, inputs, out, positive=positive):
                return _on_branch(inputs[0], positive, getattr(mod, "negative_slope", 0.0))
        module.register_forward_hook(hook)


def loss_and_gradients(model, batch, patterns=None):
    """A network's `training_loss(batch)` on a copy of it (running statistics untouched): the loss and the
    gradient vector of every trainable parameter (zeros where unused) in float64, and the branch each
    kinked activation took (name -> output > 0); with `patterns`, the copy takes those branches instead.
    A kinked activation module called twice in one forward is refused (one pattern per module)."""
    import copy

    model = copy.deepcopy(model)
    seen = {}

    def record(name, out):
        if name in seen:
            raise RuntimeError(f"{name}: a kinked activation module ran twice in one forward; the float32 "
                               f"parity check keeps one branch pattern per module (use one module per call)")
        seen[name] = out > 0

    for name, module in _kinked_activations(model):
        module.register_forward_hook(lambda mod, inputs, out, name=name: record(name, out))
    if patterns is not None:
        _follow_activation_pattern(model, patterns)
    loss, _ = model.training_loss(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() for g, p in zip(grads, params)])
    return loss.detach().double(), flat, seen


# float32 against float64 through a whole network (depth, BatchNorm's batch statistics), for the loss and the
# whole gradient vector: the demo's first-step check and the models' float32 parity test (tests/test_models.py).
NETWORK_FLOAT32_TOLERANCE = 1e-4
# Kink crossings (see network_float32_errors) are rare: 0 to 3 per network in every run so far. Many would
# mean pre-activations shifted by more than rounding, which following the float32 branches would hide.
NETWORK_FLOAT32_MAX_CROSSINGS = 16


def float64_batch(batch):
    """A training batch (name -> tensor) with its floating tensors in float64 (labels unchanged)."""
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


def network_float32_errors(model, batch, oracle_model, oracle=None):
    """A float32 network's loss and gradient-vector errors (`rel_error`) against the float64
    `oracle_model` (same weights; `oracle`: its `loss_and_gradients` on the float64 batch, if at hand),
    and the number of kink crossings.

    A kinked activation's input within float32 rounding of zero can land on the other side than in
    float64; that element's derivative then differs by 1 - slope, times 1/sigma through the BatchNorm
    before it: an O(1) local difference that no float32 implementation avoids and that reaches every
    gradient upstream (one such element in DIN's last decoder block made 5e-4 of the whole gradient vector
    on the Zen 3 AVX2 pass). So where the float32 network crossed, the float64 one runs again on the
    float32 network's branches: what the errors measure is rounding. Returns (loss error, gradient error,
    crossings)."""
    loss64, grads64, pattern64 = oracle if oracle is not None else loss_and_gradients(oracle_model,
                                                                                       float64_batch(batch))
    loss, grads, pattern = loss_and_gradients(model, batch)
    crossings = sum(int((pattern[k] != pattern64[k]).sum()) for k in pattern64)
    if crossings:
        loss64, grads64, _ = loss_and_gradients(oracle_model, float64_batch(batch), pattern)
    return rel_error(loss, loss64), rel_error(grads, grads64), crossings


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output",
                              tol: Optional[float] = None, tf32: bool = False) -> float:
    tol = tolerance(dtype, tf32) if tol is None else tol
    err = rel_error(out, ref)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {tol:.1e} ({dtype})")
    return err


def make_tensor(shape: Sequence[int], dtype: torch.dtype = torch.float32, device="cpu",
                layout: str = "contiguous", requires_grad: bool = False, low: float = -2.0,
                high: float = 2.0) -> torch.Tensor:
    """Fresh uniform random values in [low, high) with the given memory layout:
    "contiguous"; "noncontiguous" (every other element of the last dimension of a wider buffer);
    "channels_last" (channels innermost: channels_last for 4-D, channels_last_3d for 5-D, [B, L, C] memory
    order for 3-D)."""
    shape = tuple(shape)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout == "noncontiguous" and shape:
        wide = shape[:-1] + (2 * shape[-1],)
        t = torch.empty(wide, dtype=torch.float64, device=device).uniform_(low, high).to(dtype)[..., ::2]
    else:
        t = torch.empty(shape, dtype=torch.float64, device=device).uniform_(low, high).to(dtype)
    if layout == "channels_last":
        if t.dim() == 3:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.requires_grad_(requires_grad)


def unit_width_channels_last(batch: int, channels: int, height: int, dtype: torch.dtype = torch.float32,
                             device="cpu") -> torch.Tensor:
    """A fresh [batch, channels, height, 1] map that PyTorch counts as channels_last with stride 1 on its
    size-1 W (as `unsqueeze(-1)` of a channels-innermost [B, C, L] gives): PyTorch leaves a size-1 dim's
    stride arbitrary, so kernels must not read the pixel stride from W there."""
    x = make_tensor((batch, height, channels), dtype, device).transpose(1, 2).unsqueeze(-1)
    assert x.stride(3) == 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return x


def as_float64_leaves(tensors: Iterable[Optional[torch.Tensor]]):
    """Detached float64 copies (same requires_grad) for running the reference as the oracle."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grads_of(outputs, inputs, grad_outputs) -> list:
    """d(sum_i <outputs_i, grad_outputs_i>) / d inputs, None for inputs without requires_grad."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    gouts = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for o, g in zip(outs, gouts)], allow_unused=True)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def saved_tensor_bytes(fn: Callable, *inputs) -> int:
    """Bytes autograd keeps for backward when running fn(*inputs) (design.md section 6): the unique
    storages seen by saved_tensors_hooks, minus the storages of the inputs themselves."""
    storages = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    input_ptrs = {t.untyped_storage().data_ptr() for t in _flatten(inputs) if isinstance(t, torch.Tensor)}
    del out
    return sum(n for ptr, n in storages.items() if ptr not in input_ptrs)


def _flatten(items):
    for it in items:
        if isinstance(it, (list, tuple)):
            yield from _flatten(it)
        elif isinstance(it, dict):
            yield from _flatten(it.values())
        else:
            yield it

