"""global_spatial_attention: parity with the float64 reference (outputs and gradients), layouts,
gradcheck, opcheck, torch.compile, Triton under the interpreter, bad input."""
import pytest
import torch

import medattn_kernels as mk
from medattn_kernels import reference
from medattn_kernels.testing import (as_float64_leaves, assert_close_to_reference, grads_of, make_tensor,
                                     saved_tensor_bytes, unit_width_channels_last)

from conftest import triton_device

SHAPES = [(1, 3, 17, 23), (2, 96, 14, 14), (3, 1, 5, 1), (2, 7, 1, 1)]
ND_SHAPES = [(2, 5, 37), (1, 1, 3), (2, 6, 3, 7, 5), (1, 9, 1, 4, 1), (3, 2, 5, 1, 6)]  # issue 11: 1-D and 3-D
CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def check_parity(backend, shape, dtype, layout, two_inputs, device="cpu"):
    x = make_tensor(shape, dtype, device, layout, requires_grad=True)
    y = make_tensor(shape, dtype, device, layout, requires_grad=True) if two_inputs else None
    out = mk.global_spatial_attention(x, y, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    x64, y64 = as_float64_leaves([x, y])
    ref = reference.global_spatial_attention(x64, y64)
    assert_close_to_reference(out, ref, dtype, "out")
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    inputs, inputs64 = [x, y] if two_inputs else [x], [x64, y64] if two_inputs else [x64]
    for name, g, g_ref in zip(["x", "y"], grads_of(out, inputs, grad), grads_of(ref, inputs64, grad)):
        assert_close_to_reference(g, g_ref, dtype, f"grad {name}")
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("two_inputs", [False, True])
def test_cpu_matches_reference(shape, dtype, layout, two_inputs):
    out = check_parity("cpu", shape, dtype, layout, two_inputs)
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", ND_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("two_inputs", [False, True])
def test_cpu_1d_and_3d_maps(shape, dtype, layout, two_inputs):
    out = check_parity("cpu", shape, dtype, layout, two_inputs)
    if layout == "channels_last" and len(shape) == 5 and shape[1] > 1 and out.numel() > shape[0] * shape[1]:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_3d_gradcheck_memory_and_mixed_layouts():
    x = make_tensor((2, 3, 3, 2, 3), torch.float64, requires_grad=True)
    y = make_tensor((2, 3, 3, 2, 3), torch.float64, layout="channels_last", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mk.global_spatial_attention(a, b, backend="cpu"), (x, y))
    # The [B, C, 1, P] view keeps x's storage: nothing but the inputs is kept.
    assert saved_tensor_bytes(lambda a, b: mk.global_spatial_attention(a, b, backend="cpu"), x, y) == 0


# Several pixel tiles per image in the CPU kernel (NCHW: ~128 KiB tiles of at least 32 pixels, so
# C = 256 with both maps splits 67 x 71 pixels into 75 float32 tiles of 64 pixels, the last partial, each
# thread prefetching its next tile, across images too; channels_last: ~16K-value tiles).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_several_tiles_per_image(dtype, layout):
    check_parity("cpu", (2, 256, 67, 71), dtype, layout, two_inputs=True)


# Calls touching >= 16 MiB write their output with streaming stores (csrc/include/medattn/stream_store.h):
# 8.6 MB per map here, 2 maps forward (3 with y) and 3 backward. HW = 16770 is not a multiple of the
# vector width, so channel rows start at every offset within a line (normal stores up to the row's first
# whole line, streaming stores for its whole lines, normal ones for the partial line at its end), and every
# row ends in a partial vector.
@pytest.mark.parametrize("dtype, channels", [(torch.float32, 64), (torch.float64, 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("two_inputs", [False, True])
def test_cpu_streaming_stores(dtype, channels, layout, two_inputs):
    check_parity("cpu", (2, channels, 129, 130), dtype, layout, two_inputs)


def test_mixed_layouts_and_default_backend():
    x = make_tensor((2, 5, 9, 11), layout="channels_last", requires_grad=True)
    y = make_tensor((2, 5, 9, 11), layout="noncontiguous", requires_grad=True)
    out = mk.global_spatial_attention(x, y)
    ref = reference.global_spatial_attention(*as_float64_leaves([x, y]))
    assert_close_to_reference(out, ref, torch.float32)


def test_gradcheck_float64():
    x = make_tensor((2, 4, 5, 3), torch.float64, requires_grad=True)
    y = make_tensor((2, 4, 5, 3), torch.float64, layout="channels_last", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mk.global_spatial_attention(a, b, backend="cpu"), (x, y))


def test_nan_and_inf_propagate():
    x = make_tensor((1, 3, 4, 4))
    x[0, 1, 2, 2] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    out = mk.global_spatial_attention(x, backend="cpu")
    ref = reference.global_spatial_attention(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


def test_keeps_only_inputs_for_backward():
    x = make_tensor((2, 8, 6, 6), requires_grad=True)
    y = make_tensor((2, 8, 6, 6), requires_grad=True)
    assert saved_tensor_bytes(lambda a, b: mk.global_spatial_attention(a, b, backend="cpu"), x, y) == 0
    assert saved_tensor_bytes(lambda a, b: mk.global_spatial_attention(a, b, backend="reference"), x, y) > 0


def test_deterministic():
    x = make_tensor((3, 33, 20, 21))
    a = mk.global_spatial_attention(x, backend="cpu")
    b = mk.global_spatial_attention(x, backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("two_inputs", [False, True])
def test_opcheck(two_inputs):
    x = make_tensor((2, 5, 7, 3), requires_grad=True)
    y = make_tensor((2, 5, 7, 3), requires_grad=True) if two_inputs else None
    torch.library.opcheck(torch.ops.medattn.global_spatial_attention.default, (x, y))
    g = make_tensor((2, 5, 7, 3))
    torch.library.opcheck(torch.ops.medattn.global_spatial_attention_backward.default,
                          (g, x.detach(), None if y is None else y.detach()))


# The two-branch backward is one kernel call when both maps need gradients, one call for the map that
# does otherwise.
@pytest.mark.parametrize("grad_x, grad_y", [(True, False), (False, True), (True, True)])
def test_gradients_of_either_branch(grad_x, grad_y):
    x = make_tensor((2, 6, 9, 10), requires_grad=grad_x)
    y = make_tensor((2, 6, 9, 10), layout="channels_last", requires_grad=grad_y)
    out = mk.global_spatial_attention(x, y, backend="cpu")
    x64, y64 = as_float64_leaves([x, y])
    ref = reference.global_spatial_attention(x64, y64)
    grad = torch.randn(out.shape, dtype=torch.float64)
    leaves = [t for t, want in ((x, grad_x), (y, grad_y)) if want]
    leaves64 = [t for t, want in ((x64, grad_x), (y64, grad_y)) if want]
    for g, g_ref in zip(grads_of(out, leaves, grad), grads_of(ref, leaves64, grad)):
        assert_close_to_reference(g, g_ref, torch.float32, "grad")


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 5, 7), (2, 6, 9)])
def test_torch_compile_fullgraph(shape):
    x = make_tensor(shape, requires_grad=True)
    y = make_tensor(shape, requires_grad=True)
    compiled = torch.compile(lambda a, b: mk.global_spatial_attention(a, b) * 2, fullgraph=True, backend="eager")
    out = compiled(x, y)
    out.sum().backward()
    ref = reference.global_spatial_attention(*as_float64_leaves([x, y])) * 2
    assert_close_to_reference(out, ref, torch.float32)
    assert x.grad is not None and y.grad is not None


def test_module():
    x = make_tensor((2, 6, 5, 7), requires_grad=True)
    y = make_tensor((2, 6, 5, 7))
    fused, plain = mk.nn.GlobalSpatialAttention(), mk.nn.GlobalSpatialAttention(fused=False)
    assert_close_to_reference(fused(x, y), plain(x.double(), y.double()), torch.float32)
    assert "fused=True" in repr(fused)


def test_force_reference_env(monkeypatch):
    from medattn_kernels.ops._registry import FORCE_REFERENCE_ENV
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    x = make_tensor((1, 2, 3, 3), requires_grad=True)
    out = mk.global_spatial_attention(x, backend="cpu")
    assert out.grad_fn is not None and "Mul" in type(out.grad_fn).__name__


@pytest.mark.parametrize("call, error, match", [
    (lambda: mk.global_spatial_attention(torch.randn(2, 3)), ValueError,
     r"x: expected a 3-D, 4-D or 5-D tensor \[B, C, \*spatial\] with 1 to 3 spatial dims"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3, 3, 3)), ValueError, r"x: expected a 3-D, 4-D or 5-D"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 9)), ValueError,
     r"y: expected shape \(1, 2, 3, 3\)"),
    (lambda: mk.global_spatial_attention(torch.randint(0, 3, (1, 2, 3, 3))), TypeError, r"x: expected a floating"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4)), ValueError,
     r"y: expected shape \(1, 2, 3, 3\)"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3).double()), TypeError,
     r"y: expected dtype float32"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3), backend="nope"), ValueError, r"backend: expected one"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3).half(), backend="cpu"), TypeError,
     r"x: backend 'cpu' .* supports float32, float64, bfloat16, got float16"),
    (lambda: mk.global_spatial_attention(torch.randn(1, 2, 3, 3), backend="cuda"), RuntimeError,
     r"backend 'cuda' is not available"),
    (lambda: torch.ops.medattn.global_spatial_attention(torch.randn(2, 3, 4)), RuntimeError, r"x: expected a 4-D"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float16_default_falls_back_to_reference_on_cpu():
    x = make_tensor((1, 3, 4, 4), torch.float16)
    out = mk.global_spatial_attention(x)
    assert_close_to_reference(out, reference.global_spatial_attention(x.double()), torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (2, 5, 1, 300), (2, 3, 3, 5, 7), (2, 4, 33)])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("two_inputs", [False, True])
def test_triton_matches_reference(shape, layout, two_inputs):
    check_parity("triton", shape, torch.float32, layout, two_inputs, device=triton_device())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_unit_width_channels_last_map(backend):
    # Direct kernel calls (the public op hands the kernels [B, C, 1, P] maps): the Triton launchers took W's
    # stride as the pixel stride of such a map (map_strides) and read garbage; the CPU kernel reads it dense.
    device = "cpu" if backend == "cpu" else triton_device()
    x, y = (unit_width_channels_last(3, 6, 40, torch.float32, device) for _ in range(2))
    if backend == "cpu":
        forward, backward = torch.ops.medattn.global_spatial_attention, \
            torch.ops.medattn.global_spatial_attention_backward
    else:
        from medattn_kernels.triton.global_spatial_attention import backward, forward
    leaves = as_float64_leaves([x.requires_grad_(), y.requires_grad_()])
    out_ref = reference.global_spatial_attention(*leaves)
    assert_close_to_reference(forward(x.detach(), y.detach()), out_ref, torch.float32)
    grad = unit_width_channels_last(3, 6, 40, torch.float32, device)
    for g, g_ref in zip(backward(grad, x.detach(), y.detach()), grads_of(out_ref, leaves, grad.double())):
        assert_close_to_reference(g, g_ref, torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    check_parity("triton", (2, 8, 9, 7), dtype, "contiguous", True, device=triton_device())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_op_matches_reference(dtype):
    out = check_parity(None, (4, 96, 56, 56), dtype, "channels_last", True, device="cuda")
    assert out.is_cuda
    check_parity(None, (2, 32, 24, 40, 36), dtype, "channels_last", True, device="cuda")


@pytest.mark.cuda
def test_cuda_opcheck():
    x = make_tensor((2, 5, 7, 3), device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.medattn.global_spatial_attention.default, (x, None))
