"""depthwise_conv2d: parity with the float64 reference (output, grad input, grad weight, grad bias) over
kernel sizes 1..51, strips, dilation, odd maps, maps smaller than the kernel, layouts; gradcheck,
opcheck, torch.compile, determinism, Triton under the interpreter, bad input; the modules
(DepthwiseConv2d, LargeKernelDWConv2d re-parameterisation); patch() of depthwise convs: tests/test_patch.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medattn_kernels as mk
from medattn_kernels import reference
from medattn_kernels.nn import DepthwiseConv2d, LargeKernelDWConv2d
from medattn_kernels.ops.depthwise_conv2d import choose_gpu
from medattn_kernels.testing import (as_float64_leaves, assert_close_to_reference, grads_of, make_tensor,
                                     saved_tensor_bytes, sum_tolerance)

from conftest import triton_device

# (x shape, (KH, KW), dilation, padding or None for "same")
CASES = [
    ((2, 3, 37, 29), (3, 3), 1, None),
    ((2, 3, 37, 29), (7, 7), 2, None),
    ((1, 4, 37, 29), (13, 13), 3, None),
    ((2, 2, 37, 29), (21, 21), 1, None),
    ((1, 2, 37, 29), (31, 31), 1, None),
    ((2, 3, 37, 29), (1, 9), 2, None),
    ((2, 3, 37, 29), (9, 1), 3, None),
    ((1, 3, 20, 70), (51, 5), 1, None),         # H < KH
    ((1, 1, 5, 6), (13, 13), 1, None),          # H and W < K, B = C = 1
    ((3, 2, 9, 11), (4, 6), 1, (1, 2)),         # even kernel, explicit padding, smaller output
    ((2, 2, 8, 8), (3, 3), 1, (3, 5)),          # padding beyond the kernel's reach (output grows)
    ((2, 5, 17, 40), (7, 7), 1, (0, 0)),        # "valid"
    # Rows ending on a half-register vector (AVX-512 grouped blocks): W = 56 is 3.5 zmm of floats; W = 20
    # is 1.25 zmm of floats and 2.5 of doubles.
    ((1, 3, 13, 56), (7, 7), 1, None),
    ((2, 2, 9, 20), (5, 5), 2, None),
]
IDS = [f"{s[2]}x{s[3]}-k{k[0]}x{k[1]}-d{d}-p{p}" for s, k, d, p in CASES]
LOW_PRECISION_CASES = [CASES[1], CASES[4], CASES[7], CASES[12], CASES[13]]


def run_parity(backend, shape, kernel, dilation, padding, dtype=torch.float32, layout="contiguous", bias=True,
               device="cpu"):
    C = shape[1]
    x = make_tensor(shape, dtype, device, layout, requires_grad=True)
    w = make_tensor((C, 1) + kernel, dtype, device, requires_grad=True)
    b = make_tensor((C,), dtype, device, requires_grad=True) if bias else None
    out = mk.depthwise_conv2d(x, w, b, padding=padding, dilation=dilation, backend=backend)
    x64, w64, b64 = as_float64_leaves([x, w, b])
    dil = (dilation, dilation) if isinstance(dilation, int) else dilation
    pad = padding if padding is not None else tuple(d * (k - 1) // 2 for d, k in zip(dil, kernel))
    pad = (pad, pad) if isinstance(pad, int) else pad
    ref = reference.depthwise_conv2d(x64, w64, b64, pad, dil)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close_to_reference(out, ref, dtype, "out")
    grad = torch.randn(ref.shape, dtype=torch.float64, device=device)
    for name, g, g_ref in zip(["x", "weight", "bias"], grads_of(out, [x, w, b], grad), grads_of(ref, [x64, w64, b64], grad)):
        if g_ref is None:
            assert g is None
            continue
        assert g.shape == g_ref.shape
        # grad bias = sum of grad_out over (B, H, W): a sum that can cancel
        tol = sum_tolerance(dtype, grad, g_ref, (0, 2, 3)) if name == "bias" else None
        assert_close_to_reference(g, g_ref, dtype, f"grad {name}", tol=tol)
    return out, x


@pytest.mark.parametrize("shape, kernel, dilation, padding", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_matches_reference(shape, kernel, dilation, padding, layout, bias):
    out, x = run_parity("cpu", shape, kernel, dilation, padding, layout=layout, bias=bias)
    if layout == "channels_last" and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("shape, kernel, dilation, padding", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_other_dtypes(shape, kernel, dilation, padding, dtype):
    run_parity("cpu", shape, kernel, dilation, padding, dtype=dtype)


# channels_last x with C >= the vector width runs the native NHWC kernels (vectorised over C; 16 floats
# with AVX-512, 8 with AVX2, 4 in the DEFAULT pass), smaller C the NCHW kernel on a copy. C = 17, 33, 67
# end on a C-vector that overlaps the one before on every pass; W (and the pixels of each dilation
# residue) below / between the pixel blocks hit every strip width; tap groups of one size (KW = 3, 5,
# 7), two sizes (31 = 11 + 10 + 10 with AVX-512, 13 = 7 + 6 with AVX2), one tap (k x 1).
NHWC_CASES = [
    ((2, 17, 9, 5), (3, 3), 1, None),            # W below every pixel block
    ((1, 33, 12, 23), (7, 7), 2, None),          # dilation 2: strips of pixels 2 apart, 12 + 11 per row
    ((1, 67, 11, 37), (31, 31), 1, None),        # K > H, W: most taps fall in the padding
    ((1, 24, 10, 41), (13, 13), 1, None),
    ((2, 20, 13, 6), (9, 1), 1, None),           # 1-tap groups
    ((1, 18, 20, 26), (51, 5), 1, None),         # H < KH
    ((2, 19, 9, 11), (4, 6), 1, (1, 2)),         # even kernel, explicit padding
    ((1, 18, 6, 5), (3, 3), 1, (3, 5)),          # padding beyond the kernel's reach (output grows)
    ((2, 3, 10, 9), (5, 5), 1, None),            # C below the vector width: NCHW kernel on a copy
    ((2, 1, 8, 7), (3, 3), 1, None),             # C = 1: channels_last is NCHW
]
NHWC_IDS = [f"{s[1]}ch-{s[2]}x{s[3]}-k{k[0]}x{k[1]}-d{d}-p{p}" for s, k, d, p in NHWC_CASES]


@pytest.mark.parametrize("shape, kernel, dilation, padding", NHWC_CASES, ids=NHWC_IDS)
def test_cpu_channels_last_matches_reference(shape, kernel, dilation, padding):
    out, x = run_parity("cpu", shape, kernel, dilation, padding, layout="channels_last", bias=shape[1] % 2 == 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = mk.depthwise_conv2d(x, torch.randn(shape[1], 1, *kernel), padding=padding, dilation=dilation)
    grad_x, = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


# NCHW float32 with C a multiple of 16 and at least 9 x 9 taps (26 x 26 on AMD CPUs) runs, in the AVX-512
# pass, through 16-channel NHWC slabs (16 x 16 transposes in and out, the NHWC strip kernel between; forward
# and grad input). Both paths on every machine: MEDATTN_DEPTHWISE_NCHW forces one. W below, at and between
# multiples of 16 (the transposes' column blocks) and of the strip widths; row tiles of 1 and 2 rows and whole
# planes; dilation; rectangular kernels; padding beyond the reach and "valid". On the other passes (and other
# dtypes) these are more cases of the NCHW row kernel.
BLOCKED_CASES = [
    ((1, 16, 9, 5), (9, 9), 1, None),            # W below a column block and below the kernel
    ((2, 32, 19, 16), (13, 13), 1, None),        # W one column block, slab 28 wide
    ((1, 16, 23, 37), (11, 9), 2, None),         # dilation 2, rectangular, W a ragged 37
    ((3, 48, 13, 56), (21, 21), 1, None),        # the networks' W = 56; 9 (b, group) planes
    ((1, 16, 30, 33), (51, 5), 1, None),         # H < KH
    ((2, 16, 12, 17), (10, 12), 1, (2, 7)),      # even kernel, explicit padding
    ((1, 32, 7, 9), (9, 9), 1, (6, 6)),          # padding beyond the reach: the output grows
    ((1, 16, 20, 24), (9, 9), 1, (0, 0)),        # "valid"
    ((4, 256, 11, 20), (9, 9), 1, None),         # 64 (b, group) planes: one row tile per plane
]

# NCHW float32 with W = 8 mod 16 (the networks' 56), an output as wide as the input and no row dilation runs,
# in the AVX-512 pass on AMD CPUs, as flat runs of row pairs (zero-masked loads at the row ends; forward and
# grad input). Forced here against the row kernel on every machine: W = 8 (one vector per pair, every tap
# column masked somewhere), 24, 40, 56, 120; odd row counts (the last pair half stored), row tiles of one
# row (few planes, many rows), H < KH, kernels of 1 to 13 rows in one weight group and taller ones in
# groups, column dilation, H padding beyond the reach and none. The last cases do not fit the flat form (row
# dilation, W = 4 mod 16, "valid" width) and check that forcing it falls back to the row kernel.
FLAT_CASES = [
    ((2, 3, 56, 56), (13, 13), 1, None),         # the networks' shape, one weight group of 13 rows
    ((1, 5, 7, 24), (7, 7), 1, None),            # 7 rows: 4 pairs, the last one half
    ((1, 1, 57, 8), (3, 3), 1, None),            # 1 plane, 57 rows: row tiles of 1 row; W = 8
    ((2, 4, 5, 8), (13, 13), 1, None),           # H < KH, every tap column past the row
    ((1, 2, 30, 40), (21, 5), 1, None),          # 21 rows: groups of 7
    ((1, 3, 11, 120), (1, 9), (1, 2), None),     # 1 kernel row, column dilation
    ((2, 2, 6, 24), (3, 3), 1, (4, 1)),          # H padding beyond the reach: the output grows in H only
    # 11-row kernels with whole blocks of zero rows, none, and rows 2 apart
    ((1, 2, 9, 24), (11, 3), 1, (13, 1)),        # whole blocks of zero rows
    ((1, 2, 20, 40), (11, 5), 1, (0, 2)),        # "valid" height: no zero rows
    ((1, 2, 16, 24), (11, 3), (2, 1), (7, 1)),   # row dilation (not flat): rows 2 apart, some zero
    ((1, 3, 9, 40), (5, 5), (2, 1), None),       # row dilation: not flat
    ((1, 3, 9, 20), (5, 5), 1, None),            # W = 4 mod 16: not flat
    ((1, 3, 9, 24), (5, 5), 1, (2, 0)),          # "valid" width, 20 columns out of 24: not flat
]
# Each list under its path and under the row kernel.
NCHW_PATH_CASES = ([(case, path) for case in BLOCKED_CASES for path in ("slabs", "rows")]
                   + [(case, path) for case in FLAT_CASES for path in ("flat", "rows")])
NCHW_PATH_IDS = [f"{path}-{s[1]}ch-{s[2]}x{s[3]}-k{k[0]}x{k[1]}-d{d}-p{p}" for (s, k, d, p), path in NCHW_PATH_CASES]


@pytest.mark.parametrize("case, nchw_path", NCHW_PATH_CASES, ids=NCHW_PATH_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_cpu_nchw_paths_match_reference(case, nchw_path, layout, monkeypatch):
    shape, kernel, dilation, padding = case
    monkeypatch.setenv("MEDATTN_DEPTHWISE_NCHW", nchw_path)
    out, _ = run_parity("cpu", shape, kernel, dilation, padding, layout=layout, bias=layout == "contiguous")
    assert out.is_contiguous()


def test_cpu_nchw_path_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("MEDATTN_DEPTHWISE_NCHW", "slab")
    x, w = make_tensor((1, 16, 9, 9)), make_tensor((16, 1, 9, 9))
    with pytest.raises(RuntimeError, match="MEDATTN_DEPTHWISE_NCHW: expected 'slabs', 'rows' or 'flat', got 'slab'"):
        mk.depthwise_conv2d(x, w, backend="cpu")


# NCHW x with C >= 16 and 9 x 9 taps or more: in the AVX-512 pass, grad weight (and bias) through channels_last
# copies and the NHWC kernel, also for float64 and bfloat16 (elsewhere the NCHW kernel: the same check).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_cpu_nchw_large_kernel_weight_grad(dtype, layout):
    run_parity("cpu", (2, 17, 11, 20), (9, 11), 1, None, dtype=dtype, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", [NHWC_CASES[1], NHWC_CASES[3]], ids=[NHWC_IDS[1], NHWC_IDS[3]])
def test_cpu_channels_last_other_dtypes(case, dtype):
    out, _ = run_parity("cpu", *case, dtype=dtype, layout="channels_last")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_default_backend_and_padding_forms():
    x = make_tensor((2, 3, 11, 13), requires_grad=True)
    w = make_tensor((3, 1, 5, 3))
    ref = F.conv2d(x.double(), w.double(), padding=(2, 1), groups=3)
    for padding in (None, (2, 1), [2, 1]):
        assert_close_to_reference(mk.depthwise_conv2d(x, w, padding=padding), ref, torch.float32)
    ref = F.conv2d(x.double(), w.double(), padding=2, dilation=(1, 2), groups=3)
    assert_close_to_reference(mk.depthwise_conv2d(x, w, padding=2, dilation=(1, 2)), ref, torch.float32)


def test_only_requested_gradients():
    x = make_tensor((2, 3, 9, 9), requires_grad=True)
    w = make_tensor((3, 1, 7, 7))
    b = make_tensor((3,), requires_grad=True)
    out = mk.depthwise_conv2d(x, w, b, backend="cpu")
    gx, gb = torch.autograd.grad(out.sum(), [x, b])
    assert gx.shape == x.shape and gb.shape == b.shape
    absent = torch.ops.medattn.depthwise_conv2d_backward(torch.ones_like(out), x.detach(), w, [3, 3], [1, 1],
                                                         [False, True, False])
    assert absent[0].shape == (0,) and absent[2].shape == (0,) and absent[1].shape == w.shape


def test_gradcheck_float64():
    x = make_tensor((1, 2, 6, 5), torch.float64, requires_grad=True)
    w = make_tensor((2, 1, 3, 5), torch.float64, requires_grad=True)
    b = make_tensor((2,), torch.float64, requires_grad=True)
    fn = lambda a, k, c: mk.depthwise_conv2d(a, k, c, padding=(2, 3), dilation=(2, 1), backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradgradcheck_float64():
    # Double backward goes through the same two ops (ops/depthwise_conv2d._double_backward).
    x = make_tensor((1, 2, 4, 3), torch.float64, requires_grad=True)
    w = make_tensor((2, 1, 3, 2), torch.float64, requires_grad=True)
    b = make_tensor((2,), torch.float64, requires_grad=True)
    fn = lambda a, k, c: mk.depthwise_conv2d(a, k, c, padding=(2, 1), dilation=(1, 2), backend="cpu")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_deterministic_and_keeps_only_inputs():
    x = make_tensor((3, 8, 23, 19), requires_grad=True)
    w = make_tensor((8, 1, 9, 9), requires_grad=True)
    b = make_tensor((8,), requires_grad=True)
    grad = make_tensor((3, 8, 23, 19))

    def grads():
        return torch.autograd.grad(mk.depthwise_conv2d(x, w, b, backend="cpu"), [x, w, b], grad)

    first, second = grads(), grads()
    assert all(torch.equal(a, c) for a, c in zip(first, second))
    assert saved_tensor_bytes(lambda *t: mk.depthwise_conv2d(*t, backend="cpu"), x, w, b) == 0


# (20, "contiguous"): in the AVX-512 pass, NCHW grad weight from 9 x 9 taps runs the NHWC kernel on copies.
@pytest.mark.parametrize("channels, layout", [(3, "contiguous"), (20, "contiguous"), (20, "channels_last")])
def test_grad_weight_independent_of_thread_count(channels, layout):
    x = make_tensor((2, channels, 31, 27), layout=layout)
    w = make_tensor((channels, 1, 13, 13))
    g = make_tensor((2, channels, 31, 27), layout=layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.medattn.depthwise_conv2d_backward(g, x, w, [6, 6], [1, 1], [True, True, True]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_empty_batch():
    x = make_tensor((0, 3, 9, 8), requires_grad=True)
    w = make_tensor((3, 1, 5, 5), requires_grad=True)
    b = make_tensor((3,), requires_grad=True)
    out = mk.depthwise_conv2d(x, w, b, backend="cpu")
    assert out.shape == (0, 3, 9, 8)
    gx, gw, gb = torch.autograd.grad(out.sum(), [x, w, b])
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


# 3 channels: the last one holds only the -inf, in the bottom row, which kernel row 0 never reaches (its
# grad weight taps stay finite, where a kernel that multiplied that row by a zero grad_out row would not).
@pytest.mark.parametrize("channels, layout", [(2, "contiguous"), (3, "contiguous"), (17, "channels_last")])
def test_nan_and_inf_propagate(channels, layout):
    x = make_tensor((1, channels, 9, 9))
    x[0, 1, 4, 4] = float("nan")
    x[0, 0, 2, 6] = float("inf")
    x[0, -1, 8, 0] = float("-inf")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w = make_tensor((channels, 1, 3, 3)).abs()
    out = mk.depthwise_conv2d(x, w, backend="cpu")
    ref = reference.depthwise_conv2d(x, w, None, (1, 1), (1, 1))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    # grad weight: a non-finite input inside the window makes its taps' sums non-finite, and nothing else
    g = make_tensor(out.shape)
    grad_w = torch.ops.medattn.depthwise_conv2d_backward(g, x, w, [1, 1], [1, 1], [False, True, False])[1]
    w_ = w.double().requires_grad_()
    (ref_w,) = torch.autograd.grad(F.conv2d(x.double(), w_, padding=1, groups=channels), [w_], g.double())
    assert torch.equal(torch.isfinite(grad_w), torch.isfinite(ref_w))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x = make_tensor((2, 3, 7, 6), requires_grad=True)
    w = make_tensor((3, 1, 5, 3), requires_grad=True)
    b = make_tensor((3,), requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.medattn.depthwise_conv2d.default, (x, w, b, [2, 2], [1, 2]))
    g = make_tensor((2, 3, 7, 6))
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        torch.library.opcheck(torch.ops.medattn.depthwise_conv2d_backward.default,
                              (g, x.detach(), w.detach(), [2, 2], [1, 2], mask))
    xc = make_tensor((2, 3, 7, 6), layout="channels_last", requires_grad=True)
    torch.library.opcheck(torch.ops.medattn.depthwise_conv2d.default, (xc, w, b, [2, 2], [1, 2]))


def test_torch_compile_fullgraph():
    x = make_tensor((2, 4, 13, 11), requires_grad=True)
    w = make_tensor((4, 1, 7, 7), requires_grad=True)
    compiled = torch.compile(lambda a, k: mk.depthwise_conv2d(a, k, dilation=2) * 2, fullgraph=True, backend="eager")
    out = compiled(x, w)
    out.sum().backward()
    x64, w64 = as_float64_leaves([x, w])
    assert_close_to_reference(out, F.conv2d(x64, w64, padding=6, dilation=2, groups=4) * 2, torch.float32)
    assert x.grad is not None and w.grad is not None


def test_force_reference_env(monkeypatch):
    from medattn_kernels.ops._registry import FORCE_REFERENCE_ENV
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    x = make_tensor((1, 2, 5, 5), requires_grad=True)
    out = mk.depthwise_conv2d(x, make_tensor((2, 1, 3, 3)), backend="cpu")
    assert "Convolution" in type(out.grad_fn).__name__


def test_float16_default_falls_back_to_reference_on_cpu():
    x, w = make_tensor((1, 3, 6, 6), torch.float16), make_tensor((3, 1, 3, 3), torch.float16)
    out = mk.depthwise_conv2d(x, w)
    assert_close_to_reference(out, F.conv2d(x.double(), w.double(), padding=1, groups=3), torch.float16)


def test_gpu_rule():
    x = torch.empty(1, 4, 8, 8, device="meta")
    small, large, strip = (torch.empty(4, 1, k, j, device="meta") for k, j in ((7, 7), (21, 21), (51, 5)))
    assert choose_gpu(x, small, None, [3, 3], [1, 1]) == "triton"
    assert choose_gpu(x, large, None, [10, 10], [1, 1]) == "cuda"
    assert choose_gpu(x, x, strip, [25, 2], [1, 1], [True, True, True]) == "cuda"  # backward's arguments
    assert choose_gpu(x, x, small, [3, 3], [1, 1], [True, True, True]) == "triton"


X, W7 = torch.randn(2, 3, 9, 9), torch.randn(3, 1, 7, 7)


@pytest.mark.parametrize("call, error, match", [
    (lambda: mk.depthwise_conv2d(torch.randn(3, 9, 9), W7), ValueError, r"x: expected a 4-D tensor"),
    (lambda: mk.depthwise_conv2d(X.long(), W7.long()), TypeError, r"x: expected a floating"),
    (lambda: mk.depthwise_conv2d(X, W7.double()), TypeError, r"weight: expected dtype float32"),
    (lambda: mk.depthwise_conv2d(X, torch.randn(4, 1, 7, 7)), ValueError, r"weight: expected a depthwise kernel"),
    (lambda: mk.depthwise_conv2d(X, torch.randn(3, 3, 7, 7)), ValueError, r"weight: expected a depthwise kernel"),
    (lambda: mk.depthwise_conv2d(X, torch.randn(3, 1, 7)), ValueError, r"weight: expected a 4-D tensor"),
    (lambda: mk.depthwise_conv2d(X, torch.randn(3, 1, 65, 3), padding=1), ValueError, r"between 1 and 63"),
    (lambda: mk.depthwise_conv2d(X, W7, torch.randn(4)), ValueError, r"bias: expected shape \[3\]"),
    (lambda: mk.depthwise_conv2d(X, W7, torch.randn(3).double()), TypeError, r"bias: expected dtype float32"),
    (lambda: mk.depthwise_conv2d(X, torch.randn(3, 1, 4, 4)), ValueError, r"padding: .*odd kernel.*explicitly"),
    (lambda: mk.depthwise_conv2d(X, W7, padding=-1), ValueError, r"padding: expected values >= 0"),
    (lambda: mk.depthwise_conv2d(X, W7, padding=(1, 2, 3)), TypeError, r"padding: expected an int or a pair"),
    (lambda: mk.depthwise_conv2d(X, W7, dilation=0), ValueError, r"dilation: expected values >= 1"),
    (lambda: mk.depthwise_conv2d(X, W7, dilation=(1.5, 1)), TypeError, r"dilation: expected an int or a pair"),
    (lambda: mk.depthwise_conv2d(X, W7, padding=1.5), TypeError, r"padding: expected an int or a pair of ints, got 1.5"),
    (lambda: mk.depthwise_conv2d(X, W7, padding=0, dilation=2), ValueError, r"output size -3x-3 is below 1"),
    (lambda: mk.depthwise_conv2d(X, W7, stride=2), TypeError, r"unexpected keyword argument 'stride'"),
    (lambda: mk.depthwise_conv2d(X, W7, backend="nope"), ValueError, r"backend: expected one"),
    (lambda: mk.depthwise_conv2d(X.half(), W7.half(), backend="cpu"), TypeError, r"backend 'cpu' .* got float16"),
    (lambda: mk.depthwise_conv2d(X, W7, backend="cuda"), RuntimeError, r"backend 'cuda' is not available"),
    (lambda: torch.ops.medattn.depthwise_conv2d(X, torch.randn(4, 1, 3, 3), None, [1, 1], [1, 1]), RuntimeError,
     r"weight: expected shape \[C, 1, KH, KW\] with C = 3"),
    (lambda: torch.ops.medattn.depthwise_conv2d(X, W7, None, [0, 0], [2, 2]), RuntimeError, r"output size"),
    (lambda: torch.ops.medattn.depthwise_conv2d_backward(torch.randn(2, 3, 8, 8), X, W7, [3, 3], [1, 1],
                                                         [True, True, True]), RuntimeError,
     r"grad_out: expected shape \[2, 3, 9, 9\]"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- modules

def test_depthwise_module_matches_conv2d():
    conv = nn.Conv2d(6, 6, (7, 5), padding=(6, 4), dilation=2, groups=6)
    module = DepthwiseConv2d.from_conv(conv)
    assert module.weight is conv.weight and module.bias is conv.bias
    x = make_tensor((2, 6, 15, 12))
    assert_close_to_reference(module(x), conv(x.double()) if False else conv.double()(x.double()), torch.float32)
    fresh = DepthwiseConv2d(6, 9, dilation=2)
    assert fresh.padding == (8, 8) and "fused=True" in repr(fresh)
    assert fresh(x).shape == x.shape


@pytest.mark.parametrize("kernel, small, dilation", [(21, 3, 1), (13, 5, 2), (7, None, 1)])
def test_reparameterize_equivalence(kernel, small, dilation):
    block = LargeKernelDWConv2d(8, kernel, small_kernel=small, dilation=dilation).double()
    x = make_tensor((2, 8, 19, 23), torch.float64)
    block.train()
    for _ in range(2):  # non-trivial running statistics
        block(x * 3 + 1)
    with torch.no_grad():
        for bn in [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    block.eval()
    before = block(x)
    unfused = LargeKernelDWConv2d(8, kernel, small_kernel=small, dilation=dilation).double().eval()
    unfused.load_state_dict(block.state_dict())
    unfused.fused = False
    assert_close_to_reference(before, unfused(x), torch.float64)
    block.reparameterize()
    assert block.reparam is not None and not hasattr(block, "large_bn")
    after = block(x)
    assert_close_to_reference(after, before, torch.float64)
    assert_close_to_reference(block.float()(x.float()), before, torch.float32)


def test_large_kernel_block_validates():
    with pytest.raises(ValueError, match="kernel_size: expected an odd int"):
        LargeKernelDWConv2d(4, 20)
    with pytest.raises(ValueError, match="small_kernel: expected an odd int"):
        LargeKernelDWConv2d(4, 7, small_kernel=9)


# ---- Triton (GPU, or CPU tensors under TRITON_INTERPRET=1: small shapes)

TRITON_CASES = [
    ((2, 3, 11, 9), (3, 3), 1, None),
    ((1, 2, 7, 19), (5, 9), 2, (4, 8)),
    ((1, 2, 9, 40), (1, 9), 3, None),
    ((1, 1, 5, 6), (13, 13), 1, None),
    ((2, 2, 6, 5), (4, 2), 1, (1, 0)),
]


@pytest.mark.triton
@pytest.mark.parametrize("shape, kernel, dilation, padding", TRITON_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_triton_matches_reference(shape, kernel, dilation, padding, layout):
    run_parity("triton", shape, kernel, dilation, padding, layout=layout, bias=layout != "noncontiguous",
               device=triton_device())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    run_parity("triton", (2, 3, 13, 10), (7, 7), 1, None, dtype=dtype, device=triton_device())


# ---- CUDA GPU

@pytest.mark.cuda
@pytest.mark.parametrize("kernel, dilation", [((7, 7), 1), ((13, 13), 2), ((31, 31), 1), ((51, 5), 1), ((63, 63), 3)])
@pytest.mark.parametrize("backend", ["cuda", "triton", None])
def test_cuda_matches_reference(kernel, dilation, backend):
    run_parity(backend, (2, 8, 61, 53), kernel, dilation, None, layout="channels_last", device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    run_parity("cuda", (2, 8, 40, 33), (21, 21), 1, None, dtype=dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_deterministic_and_opcheck():
    x = make_tensor((2, 4, 33, 29), device="cuda", requires_grad=True)
    w = make_tensor((4, 1, 21, 21), device="cuda", requires_grad=True)
    g = make_tensor((2, 4, 33, 29), device="cuda")
    a = torch.autograd.grad(mk.depthwise_conv2d(x, w, backend="cuda"), [x, w], g)
    b = torch.autograd.grad(mk.depthwise_conv2d(x, w, backend="cuda"), [x, w], g)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    torch.library.opcheck(torch.ops.medattn.depthwise_conv2d.default, (x, w, None, [10, 10], [1, 1]))
