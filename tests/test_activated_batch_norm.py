"""activated_batch_norm: parity with the float64 reference (y, batch statistics and all gradients),
layouts, gradcheck, opcheck, torch.compile, memory kept, the nn module's running statistics, Triton
under the interpreter, bad input."""
import pytest
import torch

import medattn_kernels as mk
from medattn_kernels import reference
from medattn_kernels.ops.activated_batch_norm import signed_weight_plan
from medattn_kernels.testing import (as_float64_leaves, assert_close_to_reference, grads_of, make_tensor,
                                     rel_error, saved_tensor_bytes, sum_tolerance, tolerance,
                                     unit_width_channels_last)

from conftest import triton_device

SHAPES = [(2, 3, 17, 23), (1, 5, 1, 3), (4, 1, 3, 5), (3, 16, 9, 1)]
# [B, C, L] and [B, C, D, H, W] (issue 11): odd sizes, a single depth slice, C = 1.
ND_SHAPES = [(3, 5, 29), (1, 2, 3), (2, 3, 5, 7, 6), (1, 4, 1, 9, 5), (2, 1, 3, 4, 5)]
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# In bfloat16 the gradients are sums over B*H*W values that cancel (grad weight, grad bias) or a
# projection that removes most of dz (grad x when B*H*W is a handful), computed from an 8-bit-mantissa
# y; their error relative to max |grad| then exceeds the generic 2e-2. The tolerance there: 0.1, or twice
# the error of PyTorch's own composite (BatchNorm2d + LeakyReLU) run in bfloat16 on the same inputs
# when that is larger; the composite reached 0.38 on grad weight against float64 over 12 seeds of the
# (2, 3, 17, 23) case (ours: 0.08).
BF16_GRAD_TOLERANCE, SAME_DTYPE_FACTOR = 0.1, 2.0


def make_params(channels, dtype=torch.float32, device="cpu"):
    """Weights of both signs with |w| in [0.3, 1.5] (the scale |w| + eps), biases in [-1, 1]."""
    sign = torch.where(torch.rand(channels, device=device) < 0.5, -1.0, 1.0)
    weight = (sign * torch.empty(channels, device=device).uniform_(0.3, 1.5)).to(dtype).requires_grad_()
    bias = torch.empty(channels, device=device).uniform_(-1, 1).to(dtype).requires_grad_()
    return weight, bias


# leaky ReLU has a kink at z = 0 (z: the normalised, scaled, shifted x). A z within float32 rounding of 0
# may land on either side of it in a float32 kernel and take the other slope for its gradient: off by
# (1 - slope) g at that element, far beyond rounding, with a correct kernel. So where |z| (float64) is
# within KINK_MARGIN (~40 float32 ulps of |z| <= 3) the upstream gradient is 0, and either slope gives
# the same gradients; any tensor size works, unlike redrawing (~6e-6 of the elements are affected).
KINK_MARGIN = 1e-5


# gradcheck's central differences (step 1e-6 on one input) straddle the kink when some |z| is of the order
# of the step, and then miss the analytic Jacobian by (1 - slope) times an entry. gradcheck inputs are
# redrawn while some |z| lies within GRADCHECK_KINK_MARGIN of 0 (about 1 draw in 170 at 120 elements).
GRADCHECK_KINK_MARGIN = 1e-4


def make_gradcheck_inputs(shape, layout="contiguous", eps=1e-5):
    """float64 (x, weight, bias) leaves whose every |z| clears GRADCHECK_KINK_MARGIN."""
    for _ in range(100):
        x = make_tensor(shape, torch.float64, layout=layout, requires_grad=True)
        weight, bias = make_params(shape[1], torch.float64)
        z = reference.activated_batch_norm(x.detach(), weight.detach(), bias.detach(), eps, 1.0)[0]
        if not bool((z.abs() <= GRADCHECK_KINK_MARGIN).any()):
            return x, weight, bias
    raise AssertionError(f"no input of shape {shape} clears the kink margin in 100 draws")


def check_parity(backend, shape, dtype, layout="contiguous", slope=0.01, device="cpu", low=-2.0, high=3.0):
    x = make_tensor(shape, dtype, device, layout, requires_grad=True, low=low, high=high)
    weight, bias = make_params(shape[1], dtype, device)
    y, mean, var = mk.activated_batch_norm(x, weight, bias, 1e-5, slope, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype and not mean.requires_grad and not var.requires_grad
    leaves64 = as_float64_leaves([x, weight, bias])
    y_ref, mean_ref, var_ref = reference.activated_batch_norm(*leaves64, 1e-5, slope)
    assert_close_to_reference(y, y_ref, dtype, "y")
    assert_close_to_reference(mean, mean_ref, dtype, "mean")
    assert_close_to_reference(var, var_ref, dtype, "var")
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    if dtype != torch.float64:
        z64 = reference.activated_batch_norm(*(t.detach() for t in leaves64), 1e-5, 1.0)[0]
        grad = torch.where(z64.abs() <= KINK_MARGIN, 0.0, grad)
    grads, grads_ref = grads_of(y, [x, weight, bias], grad), grads_of(y_ref, leaves64, grad)
    floor = [0.0] * 3
    if dtype != torch.float64:
        # grad weight = sum dz * xhat and grad bias = sum dz over B*H*W terms, which can cancel (float32,
        # B*H*W = 60: grad bias 0.016 from terms of size 1 gave 2.7e-5 against the generic 2e-5).
        x64 = leaves64[0].detach()
        dims = [d for d in range(x64.dim()) if d != 1]
        var64, mean64 = torch.var_mean(x64, dim=dims, correction=0, keepdim=True)
        dz = torch.where(y_ref.detach() > 0, grad, grad * slope)
        xhat = (x64 - mean64) / torch.sqrt(var64 + 1e-5)
        floor[1] = sum_tolerance(dtype, dz * xhat, grads_ref[1], dims)
        floor[2] = sum_tolerance(dtype, dz, grads_ref[2], dims)
        # grad x = (w / sigma) (dz - mean dz - x_hat mean(dz x_hat)) per channel, a projection that can cancel
        # too (B*H*W = 3, float32: 3.3e-5 and 2.2e-5 against the generic 2e-5 in 2 of 3000 draws): the
        # tolerance times its condition number, max of the terms' magnitudes over max |grad x|.
        w_abs = leaves64[1].detach().abs().view([1, -1] + [1] * (x64.dim() - 2))
        terms = w_abs / torch.sqrt(var64 + 1e-5) * (dz.abs() + dz.abs().mean(dims, keepdim=True)
                                                     + xhat.abs() * (dz * xhat).abs().mean(dims, keepdim=True))
        denom = grads_ref[0].detach().abs().max().item()
        floor[0] = tolerance(dtype) * max(1.0, terms.max().item() / denom if denom > 0 else 1.0)
    if dtype == torch.bfloat16:
        # bfloat16 y (8-bit mantissa), from which x_hat is rebuilt: also accept 0.1, or twice the error
        # of the composite computed in bfloat16 from the same inputs.
        leaves_same = [t.detach().requires_grad_() for t in (x, weight, bias)]
        y_same = reference.activated_batch_norm(*leaves_same, 1e-5, slope)[0]
        floor = [max(f, BF16_GRAD_TOLERANCE, SAME_DTYPE_FACTOR * rel_error(g, r))
                 for f, g, r in zip(floor, grads_of(y_same, leaves_same, grad), grads_ref)]
    for name, g, g_ref, f in zip(["x", "weight", "bias"], grads, grads_ref, floor):
        assert_close_to_reference(g, g_ref, dtype, f"grad {name}", tol=max(tolerance(dtype), f))
    return y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
def test_cpu_matches_reference(shape, dtype, layout):
    y = check_parity("cpu", shape, dtype, layout)
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", ND_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
def test_cpu_1d_and_3d_maps(shape, dtype, layout):
    y = check_parity("cpu", shape, dtype, layout)
    x = make_tensor(shape, layout=layout)
    if layout == "channels_last" and len(shape) == 5 and shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        # channels_last_3d reaches the kernel as a channels_last view: no copy of x, none of y.
        assert mk.activated_batch_norm(x, *make_params(shape[1]))[0].is_contiguous(
            memory_format=torch.channels_last_3d)


def test_channels_last_with_unit_width():
    # PyTorch keeps any stride for a size-1 W and still calls the tensor channels_last; the public op hands
    # the kernels [B, C, 1, H * W] (regression: an earlier C++ kernel read such a [3, 5, 9, 1] map with pixel
    # stride 1 instead of 5; direct kernel calls on such maps: test_unit_width_channels_last_map).
    x = torch.randn(3, 5, 9, 1).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert x.stride(3) == 1 and x.is_contiguous(memory_format=torch.channels_last)
    weight, bias = make_params(5)
    y = mk.activated_batch_norm(x, weight, bias)[0]
    assert_close_to_reference(y, reference.activated_batch_norm(*as_float64_leaves([x, weight, bias]))[0],
                              torch.float32)


def test_gradcheck_float64_3d():
    for layout in ("contiguous", "channels_last"):
        assert torch.autograd.gradcheck(lambda a, w, b: mk.activated_batch_norm(a, w, b, backend="cpu")[0],
                                        make_gradcheck_inputs((2, 3, 3, 2, 3), layout))
    assert torch.autograd.gradcheck(lambda a, w, b: mk.activated_batch_norm(a, w, b, backend="cpu")[0],
                                    make_gradcheck_inputs((2, 3, 5)))


@pytest.mark.parametrize("shape", [(2, 5, 4, 3, 6), (3, 5, 7)])
def test_signed_weight_is_batch_norm(shape):
    # signed_weight=True is nn.BatchNorm + LeakyReLU with the signed weight: weights of both signs (the
    # x flip), all positive (w - eps), and an error where |w| <= eps.
    x = make_tensor(shape, torch.float64, requires_grad=True)
    for weight in (make_params(5, torch.float64)[0], torch.rand(5, dtype=torch.float64).add(0.1).requires_grad_()):
        bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
        y, mean, var = mk.activated_batch_norm(x, weight, bias, 1e-5, 0.2, signed_weight=True)
        y_bn = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(
            x, None, None, weight, bias, training=True, eps=1e-5), 0.2)
        assert_close_to_reference(y, y_bn, torch.float64)
        dims = [d for d in range(len(shape)) if d != 1]
        assert_close_to_reference(mean, x.detach().mean(dims), torch.float64, "mean")
        grad = torch.randn(shape, dtype=torch.float64)
        for g, g_bn, name in zip(grads_of(y, [x, weight, bias], grad), grads_of(y_bn, [x, weight, bias], grad),
                                 ["x", "weight", "bias"]):
            assert_close_to_reference(g, g_bn, torch.float64, f"grad {name}")
    tiny = torch.tensor([1.0, -1e-6, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert signed_weight_plan(tiny, 1e-5) is None
    with pytest.raises(ValueError, match=r"weight: signed_weight=True needs \|weight\| > eps"):
        mk.activated_batch_norm(x, tiny, bias, signed_weight=True)


@pytest.mark.parametrize("module, shape", [("ActivatedBatchNorm1d", (6, 4)), ("ActivatedBatchNorm1d", (3, 4, 9)),
                                           ("ActivatedBatchNorm3d", (2, 4, 3, 5, 4))])
def test_1d_and_3d_modules_match_batch_norm(module, shape):
    fused = getattr(mk.nn, module)(4, negative_slope=0.1, momentum=None).double()
    plain = getattr(torch.nn, module.replace("Activated", ""))(4, momentum=None).double()
    with torch.no_grad():
        plain.weight.copy_(fused.weight.abs() + fused.eps)
    for _ in range(2):
        x = make_tensor(shape, torch.float64, low=-1, high=3)
        assert_close_to_reference(fused(x), torch.nn.functional.leaky_relu(plain(x), 0.1), torch.float64)
    assert_close_to_reference(fused.running_var, plain.running_var, torch.float64, "running_var")
    assert int(fused.num_batches_tracked) == 2
    fused.eval(), plain.eval()
    assert_close_to_reference(fused(x), torch.nn.functional.leaky_relu(plain(x), 0.1), torch.float64, "eval")
    with pytest.raises(ValueError, match="expected"):
        fused(torch.randn(2, 4, 3, 3, 3, 3, dtype=torch.float64))


# Past one block and one chunk of the CPU kernel: NCHW rows of more than its 2048-value blocks (partial
# last block), channels_last over several ~64K-value chunks (partial last chunk) with C not dividing the
# vector width (lane k holds channel k % C over a period of lcm(C, width) lanes).
@pytest.mark.parametrize("shape", [(3, 12, 70, 75), (2, 7, 61, 67)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_blocks_and_chunks(shape, dtype, layout):
    check_parity("cpu", shape, dtype, layout)


# Calls touching >= 16 MiB write their output with streaming stores (csrc/include/medattn/stream_store.h):
# 8.6 MB per map here, 2 maps forward and 3 backward; NCHW rows of 16770 values alternate between
# aligned (streamed) and unaligned starts (normal stores), each ending in a partial vector.
@pytest.mark.parametrize("dtype, channels", [(torch.float32, 64), (torch.float64, 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_streaming_stores(dtype, channels, layout):
    check_parity("cpu", (2, channels, 129, 130), dtype, layout)


# The backward computes only the gradients asked for (output_mask); without grad x, the NCHW kernel's
# channel pipeline runs its sums pass alone. Each subset equals the same entries of the full call, on
# several channels per thread (the pipeline hands each channel's constants on to the next pass).
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_gradient_subsets(layout):
    x = make_tensor((3, 9, 13, 11), layout=layout)
    weight, bias = make_params(9)
    y, _, var = torch.ops.medattn.activated_batch_norm(x, weight, bias, 1e-5, 0.01)
    grad = torch.randn_like(y)
    backward = torch.ops.medattn.activated_batch_norm_backward
    full = backward(grad, y, weight, bias, var, 1e-5, 0.01, [True, True, True])
    for mask in ([True, False, False], [False, True, True], [False, True, False], [True, False, True]):
        part = backward(grad, y, weight, bias, var, 1e-5, 0.01, mask)
        for name, wanted, got, want in zip(["x", "weight", "bias"], mask, part, full):
            assert torch.equal(got, want) if wanted else got.numel() == 0, f"grad {name}, mask {mask}"


@pytest.mark.parametrize("slope", [0.01, 0.2, 1.0])
def test_slopes_and_offset_inputs(slope):
    # A large common offset: the shifted sums must not lose the variance to cancellation.
    check_parity("cpu", (2, 4, 11, 13), torch.float32, slope=slope, low=1000.0, high=1003.0)


def test_two_values_per_channel():
    # The smallest batch: each channel normalises to about -1 and +1 whatever x is, so grad x is
    # almost 0 and a relative comparison would compare rounding noise; gradcheck checks it instead.
    x, weight, bias = make_gradcheck_inputs((2, 4, 1, 1))
    assert_close_to_reference(mk.activated_batch_norm(x, weight, bias, backend="cpu")[0],
                              reference.activated_batch_norm(x, weight, bias)[0], torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, w, b: mk.activated_batch_norm(a, w, b, backend="cpu")[0], (x, weight, bias))


def test_gradcheck_float64():
    assert torch.autograd.gradcheck(lambda a, w, b: mk.activated_batch_norm(a, w, b, backend="cpu")[0],
                                    make_gradcheck_inputs((2, 3, 4, 5)))
    assert torch.autograd.gradcheck(lambda a, w, b: mk.activated_batch_norm(a, w, b, 1e-3, 0.3, backend="cpu")[0],
                                    make_gradcheck_inputs((2, 3, 4, 5), "channels_last", eps=1e-3))


def test_keeps_only_the_output():
    x = make_tensor((4, 8, 16, 16), requires_grad=True)
    weight, bias = make_params(8)
    y_bytes = x.numel() * x.element_size()
    # x is formed inside (as a conv output would be), so that keeping it counts.
    fused = saved_tensor_bytes(lambda a: mk.activated_batch_norm(a * 2, weight, bias, backend="cpu")[0], x)
    ref = saved_tensor_bytes(lambda a: mk.activated_batch_norm(a * 2, weight, bias, backend="reference")[0], x)
    assert y_bytes <= fused < y_bytes + 1024  # y plus [C] statistics
    assert ref >= 2 * y_bytes  # BatchNorm's input and the activation's output


def test_deterministic():
    x = make_tensor((3, 7, 20, 21))
    weight, bias = make_params(7)
    a = mk.activated_batch_norm(x, weight, bias, backend="cpu")[0]
    assert torch.equal(a, mk.activated_batch_norm(x, weight, bias, backend="cpu")[0])


def test_opcheck():
    x = make_tensor((2, 5, 7, 3), requires_grad=True)
    weight, bias = make_params(5)
    torch.library.opcheck(torch.ops.medattn.activated_batch_norm.default, (x, weight, bias, 1e-5, 0.01))
    y, _, var = torch.ops.medattn.activated_batch_norm(x.detach(), weight.detach(), bias.detach(), 1e-5, 0.01)
    torch.library.opcheck(torch.ops.medattn.activated_batch_norm_backward.default,
                          (make_tensor((2, 5, 7, 3)), y, weight.detach(), bias.detach(), var, 1e-5, 0.01,
                           [True, True, False]))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 4, 5)])
def test_torch_compile_fullgraph(shape):
    x = make_tensor(shape, requires_grad=True)
    weight, bias = make_params(6)
    compiled = torch.compile(lambda a, w, b: mk.activated_batch_norm(a, w, b)[0] * 2, fullgraph=True,
                             backend="eager")
    out = compiled(x, weight, bias)
    out.sum().backward()
    ref = reference.activated_batch_norm(*as_float64_leaves([x, weight, bias]))[0] * 2
    assert_close_to_reference(out, ref, torch.float32)
    assert x.grad is not None and weight.grad is not None and bias.grad is not None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_statistics_and_eval(momentum):
    fused = mk.nn.ActivatedBatchNorm2d(6, momentum=momentum)
    plain = mk.nn.ActivatedBatchNorm2d(6, momentum=momentum, fused=False)
    torch_bn = torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        for m in (fused, plain, torch_bn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        torch_bn.weight.copy_(fused.weight.abs() + fused.eps)
        torch_bn.bias.copy_(fused.bias)
        plain.load_state_dict(fused.state_dict())
    for _ in range(3):
        x = make_tensor((3, 6, 8, 9), low=-1, high=4)
        y_f, y_p = fused(x), plain(x)
        assert_close_to_reference(y_f, y_p.double(), torch.float32)
        torch_bn(x)
    for name in ("running_mean", "running_var"):
        assert_close_to_reference(getattr(fused, name), getattr(torch_bn, name).double(), torch.float32, name)
    fused.eval()
    x = make_tensor((2, 6, 4, 4))
    expected = torch.nn.functional.leaky_relu(torch_bn.eval()(x), 0.01)
    assert_close_to_reference(fused(x), expected.double(), torch.float32, "eval output")
    assert "fused=True" in repr(fused)


# The op moves a BatchNorm layer's running estimates in its own call, as ATen's batch_norm does: checked
# against ATen's batch_norm moving float64 buffers from the same values. The buffers are strided views (every
# other value of a wider tensor): the kernel must write through their stride and nowhere else.
@pytest.mark.parametrize("backend, dtype, stat_dtype", [
    ("cpu", torch.float32, torch.float32), ("cpu", torch.bfloat16, torch.float32), ("cpu", torch.float64,
    torch.float64), ("cpu", torch.float32, torch.bfloat16), ("reference", torch.float32, torch.float32),
    pytest.param("triton", torch.float32, torch.float32, marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape, layout", [((3, 6, 9, 7), "contiguous"), ((3, 6, 9, 7), "channels_last"),
                                           ((2, 6, 11), "noncontiguous"), ((2, 6, 3, 4, 5), "channels_last")])
def test_op_updates_running_statistics(backend, dtype, stat_dtype, shape, layout):
    device = triton_device() if backend == "triton" else "cpu"
    x = make_tensor(shape, dtype, device, layout=layout, low=-1, high=3)
    weight, bias = make_params(6, dtype, device)
    momentum = float(torch.empty(()).uniform_(0.05, 0.95))
    start_mean = torch.randn(6, dtype=torch.float64, device=device)
    start_var = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    wide = torch.randn(2, 12, dtype=stat_dtype, device=device)
    outside = wide[:, 1::2].clone()
    running_mean, running_var = wide[0, ::2], wide[1, ::2]
    running_mean.copy_(start_mean), running_var.copy_(start_var)
    expected_mean, expected_var = start_mean.clone(), start_var.clone()
    torch.nn.functional.batch_norm(x.double(), expected_mean, expected_var, training=True, momentum=momentum)
    versions = running_mean._version, running_var._version
    y, mean, var = mk.activated_batch_norm(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                           momentum=momentum, backend=backend)
    y.sum().backward()  # the running statistics are no input of the backward
    assert_close_to_reference(running_mean, expected_mean, stat_dtype, "running_mean")
    assert_close_to_reference(running_var, expected_var, stat_dtype, "running_var")
    assert torch.equal(wide[:, 1::2], outside), "values between the strided buffers' elements changed"
    # as ATen's in-place ops: the version counters move, so a backward that saved a buffer before is refused
    assert running_mean._version > versions[0] and running_var._version > versions[1]
    assert weight.grad is not None and running_mean.grad is None


def test_signed_weight_updates_running_statistics():
    # Negative weights flip x's channels inside signed_weight: the running mean must still be x's own.
    bn = torch.nn.BatchNorm2d(5, momentum=0.2).double()
    with torch.no_grad():
        bn.weight.copy_(make_params(5, torch.float64)[0])
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    x = make_tensor((3, 5, 6, 7), torch.float64, low=-1, high=3)
    y = mk.activated_batch_norm(x, bn.weight, bn.bias, bn.eps, 0.1, signed_weight=True, running_mean=running_mean,
                                running_var=running_var, momentum=0.2)[0]
    assert_close_to_reference(y, torch.nn.functional.leaky_relu(bn(x), 0.1), torch.float64)
    assert_close_to_reference(running_mean, bn.running_mean, torch.float64, "running_mean")
    assert_close_to_reference(running_var, bn.running_var, torch.float64, "running_var")


def test_opcheck_running_statistics():
    x = make_tensor((2, 5, 7, 3), requires_grad=True)
    weight, bias = make_params(5)
    running_mean, running_var = torch.randn(5), torch.rand(5) + 0.5
    torch.library.opcheck(torch.ops.medattn.activated_batch_norm.default,
                          (x, weight, bias, 1e-5, 0.01, running_mean, running_var, 0.3))


def test_module_torch_compile_updates_running_statistics():
    # aot_eager functionalises the op's in-place running statistics and writes them back to the buffers.
    eager = mk.nn.ActivatedBatchNorm2d(6)
    module = mk.nn.ActivatedBatchNorm2d(6)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = make_tensor((3, 6, 5, 7), low=-1, high=3, requires_grad=True)
        compiled(x).sum().backward()
        eager(x.detach()).sum()
    for name in ("running_mean", "running_var"):
        assert_close_to_reference(getattr(module, name), getattr(eager, name).double(), torch.float32, name)
    assert int(module.num_batches_tracked) == 2 and x.grad is not None


@pytest.mark.parametrize("call, error, match", [
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3), w, b), ValueError,
     r"x: expected a 3-D, 4-D or 5-D tensor \[B, C, \*spatial\] with 1 to 3 spatial dims"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2, 2, 2), w, b), ValueError,
     r"x: expected a 3-D, 4-D or 5-D tensor"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(1, 3, 1, 1, 1), w, b), ValueError,
     r"x: expected more than 1 value per channel"),
    (lambda w, b: mk.activated_batch_norm(torch.randint(0, 3, (2, 3, 2, 2)), w, b), TypeError,
     r"x: expected a floating"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 4, 2, 2), w, b), ValueError,
     r"weight: expected shape \[C\] = \[4\]"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b.double()), TypeError,
     r"bias: expected dtype float32"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(1, 3, 1, 1), w, b), ValueError,
     r"x: expected more than 1 value per channel"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, negative_slope=0.0), ValueError,
     r"negative_slope: expected > 0"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, eps=0.0), ValueError, r"eps: expected > 0"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2).half(), w.half(), b.half(), backend="cpu"),
     TypeError, r"x: backend 'cpu' .* supports float32, float64, bfloat16, got float16"),
    (lambda w, b: torch.ops.medattn.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, 1e-5, -1.0), RuntimeError,
     r"negative_slope: expected > 0"),
    (lambda w, b: torch.ops.medattn.activated_batch_norm(torch.randn(2, 3, 2, 2), w[:2], b, 1e-5, 0.1),
     RuntimeError, r"weight: expected shape \[C\]"),
    (lambda w, b: mk.nn.ActivatedBatchNorm2d(3, negative_slope=0.0), ValueError, r"negative_slope: expected > 0"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, running_mean=torch.zeros(3)), ValueError,
     r"running_mean, running_var: expected both or neither, got no running_var"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, running_mean=torch.zeros(3),
                                          running_var=torch.ones(4)), ValueError,
     r"running_var: expected shape \[C\] = \[3\]"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, running_var=torch.ones(3),
                                          running_mean=torch.zeros(3, dtype=torch.long)), TypeError,
     r"running_mean: expected a floating"),
    (lambda w, b: mk.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, running_mean=torch.zeros(3),
                                          running_var=torch.ones(3).double()), TypeError,
     r"running_var: expected dtype float32 \(as running_mean\)"),
    (lambda w, b: torch.ops.medattn.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, 1e-5, 0.1, None,
                                                         torch.ones(3)), RuntimeError,
     r"running_mean, running_var: expected both or neither, got only running_var"),
    (lambda w, b: torch.ops.medattn.activated_batch_norm(torch.randn(2, 3, 2, 2), w, b, 1e-5, 0.1, torch.zeros(3),
                                                         torch.ones(3, dtype=torch.int32)), RuntimeError,
     r"running_var: expected a floating dtype"),
])
def test_bad_input(call, error, match):
    weight, bias = make_params(3)
    with pytest.raises(error, match=match):
        call(weight.detach(), bias.detach())


def test_float16_default_falls_back_to_reference_on_cpu():
    x = make_tensor((2, 3, 4, 4), torch.float16)
    weight, bias = make_params(3, torch.float16)
    y = mk.activated_batch_norm(x, weight, bias)[0]
    ref = reference.activated_batch_norm(*as_float64_leaves([x, weight, bias]))[0]
    assert_close_to_reference(y, ref, torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (3, 2, 1, 700), (2, 3, 3, 5, 7), (2, 3, 41)])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
def test_triton_matches_reference(shape, layout):
    check_parity("triton", shape, torch.float32, layout, device=triton_device())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    check_parity("triton", (2, 8, 9, 7), dtype, device=triton_device())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_unit_width_channels_last_map(backend):
    # Direct kernel calls: the public op hands the kernels [B, C, 1, P] maps. The Triton launchers took W's
    # stride as the pixel stride here (map_strides) and read garbage; the CPU kernel reads the data dense.
    device = "cpu" if backend == "cpu" else triton_device()
    x = unit_width_channels_last(3, 6, 40, torch.float64, device)
    weight, bias = (p.detach() for p in make_params(6, torch.float64, device))
    if backend == "cpu":
        forward = lambda *a: torch.ops.medattn.activated_batch_norm(*a)
        backward = lambda *a: torch.ops.medattn.activated_batch_norm_backward(*a)
    else:
        from medattn_kernels.triton.activated_batch_norm import backward, forward
    y, mean, var = forward(x, weight, bias, 1e-5, 0.1)
    leaves = as_float64_leaves([x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()])
    y_ref, mean_ref, var_ref = reference.activated_batch_norm(*leaves, 1e-5, 0.1)
    for out, ref in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        assert_close_to_reference(out, ref, torch.float64)
    grad = unit_width_channels_last(3, 6, 40, torch.float64, device)
    grads = backward(grad, y, weight.detach(), bias.detach(), var, 1e-5, 0.1, [True, True, True])
    for g, g_ref in zip(grads, grads_of(y_ref, leaves, grad)):
        assert_close_to_reference(g, g_ref, torch.float64)


@pytest.mark.triton
def test_triton_float64_launcher():
    # float64 is not a GPU dtype of the op (it falls back to the reference there), but the launchers
    # accumulate in float64 for it; checked through them directly.
    from medattn_kernels.triton.activated_batch_norm import backward, forward
    x = make_tensor((2, 3, 5, 7), torch.float64, triton_device())
    weight, bias = (p.detach() for p in make_params(3, torch.float64, triton_device()))
    y, mean, var = forward(x, weight, bias, 1e-5, 0.1)
    leaves = as_float64_leaves([x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()])
    y_ref, mean_ref, var_ref = reference.activated_batch_norm(*leaves, 1e-5, 0.1)
    for out, ref in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        assert_close_to_reference(out, ref, torch.float64)
    grad = torch.randn_like(y)
    grads = backward(grad, y, weight.detach(), bias.detach(), var, 1e-5, 0.1, [True, True, True])
    for g, g_ref in zip(grads, grads_of(y_ref, leaves, grad)):
        assert_close_to_reference(g, g_ref, torch.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_op_matches_reference(dtype):
    y = check_parity(None, (8, 12, 224, 224), dtype, device="cuda")
    assert y.is_cuda
    check_parity(None, (2, 8, 32, 48, 40), dtype, "channels_last", device="cuda")


@pytest.mark.cuda
def test_cuda_opcheck():
    x = make_tensor((2, 5, 7, 3), device="cuda", requires_grad=True)
    weight, bias = make_params(5, device="cuda")
    torch.library.opcheck(torch.ops.medattn.activated_batch_norm.default, (x, weight, bias, 1e-5, 0.01))
