"""sobel_boundary_loss: parity with the float64 reference (loss and d loss / d pred) for float and int64
targets, ignore_index, from_logits, reductions, odd sizes; gradcheck, opcheck, torch.compile, memory
kept for backward, Triton under the interpreter, bad input."""
import pytest
import torch
import torch.nn.functional as F

import medattn_kernels as mk
from medattn_kernels import reference
from medattn_kernels.ops.sobel_boundary_loss import NO_IGNORE_INDEX, REDUCTION_CODES
from medattn_kernels.testing import (as_float64_leaves, assert_close_to_reference, grads_of, make_tensor,
                                     saved_tensor_bytes)

from conftest import triton_device

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SIZES = [(1, 1), (2, 5), (17, 23)]


def make_pred(shape, dtype=torch.float32, device="cpu", layout="contiguous", from_logits=False):
    """Logits in [-3, 3) or probabilities in [0, 1)."""
    low, high = (-3.0, 3.0) if from_logits else (0.0, 1.0)
    return make_tensor(shape, dtype, device, layout, requires_grad=True, low=low, high=high)


# |d| has a kink at d = G(P_s(p)) - G(P_s(y)) = 0. A pixel whose d lies within float32 rounding of 0 may
# land on either side of it in a float32 kernel (the summation order differs between backends and ISA
# passes), and that flips the sign of its whole gradient contribution: a correct kernel then misses the
# float64 gradient by far more than rounding. Seen in CI on the AVX2 pass: d = -7.9e-9 at G = 0.18 made
# a (3, 4, 13, 10) float32 case miss by 3e-2. Float32 gradient comparisons therefore draw predictions
# whose |d| clears KINK_MARGIN (17 float32 ulps at G = 0.5; G < 1 here) at every pixel of every scale.
# (A wider margin would reject most draws of the larger maps: |d| < 1e-6 has a chance of ~1e-5 per pixel.)
# d = 0 exactly is no risk: both G are then sqrt(eps) of flat neighbourhoods (a 1x1 map, ignored pixels,
# which zero p and y alike), exactly 0 in any precision and with no gradient through G.
KINK_MARGIN = 1e-6
# gradcheck's central differences (step 1e-6 on one element) straddle a kink for |d| below about 3.5e-7
# (one element moves a gradient component by at most its tap, 2/8, and G by at most sqrt(2) times that),
# and then miss the analytic gradient by O(1). In 20000 draws of each gradcheck case below, about 1 in 500
# had some |d| below 1e-6.
GRADCHECK_KINK_MARGIN = 1e-5


def make_pred_off_kinks(shape, target, dtype=torch.float32, device="cpu", layout="contiguous", from_logits=False,
                        scales=(1, 2, 4), ignore_index=None, margin=None):
    """make_pred, redrawn while some |d| != 0 is within `margin` of 0: by default KINK_MARGIN, and no
    redraw for float64 comparisons, whose rounding lies far below any |d| drawn."""
    if margin is None:
        margin = 0.0 if dtype == torch.float64 else KINK_MARGIN
    target64 = target.cpu() if target.dtype == torch.int64 else target.cpu().double()
    for _ in range(100):
        pred = make_pred(shape, dtype, device, layout, from_logits)
        if margin == 0.0:
            return pred
        diffs = reference.sobel_differences(pred.detach().cpu().double(), target64, scales, 1e-6, from_logits,
                                            ignore_index)
        if not any(d is not None and bool(((d != 0) & (d.abs() <= margin)).any()) for d in diffs):
            return pred
    raise AssertionError(f"no prediction of shape {shape} clears the kink margin in 100 draws")


def make_target(shape, kind, dtype=torch.float32, device="cpu", ignore_index=None):
    B, C, H, W = shape
    if kind == "labels":
        labels = torch.randint(0, C, (B, H, W), device=device)
        if ignore_index is not None:
            labels[torch.rand(B, H, W, device=device) < 0.3] = ignore_index
        return labels
    if kind == "onehot":
        return F.one_hot(torch.randint(0, C, (B, H, W), device=device), C).permute(0, 3, 1, 2).to(dtype)
    return make_tensor(shape, dtype, device, low=0.0, high=1.0)  # soft


def check_parity(backend, shape, dtype, target_kind, from_logits=False, reduction="mean", ignore_index=None,
                 scales=(1, 2, 4), weights=None, layout="contiguous", device="cpu"):
    target = make_target(shape, target_kind, dtype, device, ignore_index)
    pred = make_pred_off_kinks(shape, target, dtype, device, layout, from_logits, scales, ignore_index)
    kwargs = dict(scales=scales, weights=weights, from_logits=from_logits, reduction=reduction,
                  ignore_index=ignore_index)
    loss = mk.sobel_boundary_loss(pred, target, **kwargs, backend=backend)
    assert loss.dtype == dtype and loss.shape == ((shape[0],) if reduction == "none" else ())
    (pred64,) = as_float64_leaves([pred])
    target64 = target if target.dtype == torch.int64 else target.double()
    ref = reference.sobel_boundary_loss(pred64, target64, scales, weights, 1e-6, from_logits, ignore_index, reduction)
    assert_close_to_reference(loss, ref, dtype, "loss")
    grad = torch.rand(loss.shape, dtype=torch.float64, device=device) + 0.5
    (g,), (g_ref,) = grads_of(loss, [pred], grad), grads_of(ref, [pred64], grad)
    assert_close_to_reference(g, g_ref, dtype, "grad pred")
    return loss, g


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("target_kind", ["soft", "labels"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_cpu_matches_reference(size, dtype, target_kind, from_logits):
    check_parity("cpu", (2, 3) + size, dtype, target_kind, from_logits)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_cpu_reductions_and_layouts(reduction, layout):
    check_parity("cpu", (3, 4, 13, 10), torch.float32, "onehot", reduction=reduction, layout=layout,
                 scales=(1, 3, 2), weights=(0.5, 2.0, 1.0))


def test_cpu_224_float64():
    """The benchmark's spatial size. float64, where no rounding can move a |d| across 0 (abs is not
    differentiable there: in float32 a flip among 10^5 pixels could make the gradients differ)."""
    check_parity("cpu", (1, 2, 224, 224), torch.float64, "labels", from_logits=True, ignore_index=255)
    check_parity("cpu", (1, 2, 224, 224), torch.float64, "soft", reduction="none")


def test_cpu_224_float32_loss():
    pred = make_pred((1, 3, 224, 224))
    target = make_target((1, 3, 224, 224), "labels")
    loss = mk.sobel_boundary_loss(pred, target, backend="cpu")
    ref = reference.sobel_boundary_loss(pred.double(), target)
    assert_close_to_reference(loss, ref, torch.float32)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_labels_equal_one_hot(from_logits, reduction):
    shape = (2, 4, 19, 12)
    pred = make_pred(shape, from_logits=from_logits)
    labels = make_target(shape, "labels")
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    pred_b = pred.detach().clone().requires_grad_()
    a = mk.sobel_boundary_loss(pred, labels, from_logits=from_logits, reduction=reduction, backend="cpu")
    b = mk.sobel_boundary_loss(pred_b, one_hot, from_logits=from_logits, reduction=reduction, backend="cpu")
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(pred.grad, pred_b.grad)


@pytest.mark.parametrize("ignore_index", [-100, 255, 1])
@pytest.mark.parametrize("from_logits", [False, True])
def test_ignore_index(ignore_index, from_logits):
    _, grad = check_parity("cpu", (2, 3, 11, 9), torch.float32, "labels", from_logits=from_logits,
                           ignore_index=ignore_index)
    # Ignored pixels carry no gradient at all (both channels' predictions are zeroed there).
    pred = make_pred((2, 3, 11, 9), from_logits=from_logits)
    labels = make_target((2, 3, 11, 9), "labels", ignore_index=ignore_index)
    mk.sobel_boundary_loss(pred, labels, from_logits=from_logits, ignore_index=ignore_index).backward()
    ignored = (labels == ignore_index).unsqueeze(1).expand_as(pred)
    assert bool(ignored.any()) and torch.all(pred.grad[ignored] == 0)


def test_all_pixels_ignored_gives_zero():
    pred = make_pred((1, 2, 6, 6))
    labels = torch.full((1, 6, 6), 7)
    loss = mk.sobel_boundary_loss(pred, labels, ignore_index=7, backend="cpu")
    loss.backward()
    assert loss.item() == 0 and torch.all(pred.grad == 0)


def test_from_logits_equals_softmax_then_loss():
    logits = make_pred((2, 3, 15, 14), torch.float64, from_logits=True)
    target = make_target((2, 3, 15, 14), "soft", torch.float64)
    logits_b = logits.detach().clone().requires_grad_()
    a = mk.sobel_boundary_loss(logits, target, from_logits=True, backend="cpu")
    b = mk.sobel_boundary_loss(torch.softmax(logits_b, 1), target, backend="cpu")
    assert_close_to_reference(a, b, torch.float64)
    a.backward()
    b.backward()
    assert_close_to_reference(logits.grad, logits_b.grad, torch.float64)


def test_scale_larger_than_map_contributes_zero():
    pred = make_pred((2, 2, 5, 9), torch.float64)
    target = make_target((2, 2, 5, 9), "soft", torch.float64)
    a = mk.sobel_boundary_loss(pred, target, scales=(1, 8), backend="cpu")
    b = mk.sobel_boundary_loss(pred, target, scales=(1,), backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind, from_logits, ignore_index", [("soft", False, None), ("labels", True, 2)])
def test_gradcheck_float64(reduction, target_kind, from_logits, ignore_index):
    shape = (2, 3, 6, 5)
    target = make_target(shape, target_kind, torch.float64, ignore_index=ignore_index)
    pred = make_pred_off_kinks(shape, target, torch.float64, from_logits=from_logits, scales=(1, 2),
                               ignore_index=ignore_index, margin=GRADCHECK_KINK_MARGIN)
    fn = lambda p: mk.sobel_boundary_loss(p, target, scales=(1, 2), from_logits=from_logits,  # noqa: E731
                                          reduction=reduction, ignore_index=ignore_index, backend="cpu")
    assert torch.autograd.gradcheck(fn, (pred,))


@pytest.mark.parametrize("from_logits", [False, True])
def test_nan_propagates(from_logits):
    pred = make_pred((1, 2, 6, 7), from_logits=from_logits)
    with torch.no_grad():
        pred[0, 1, 3, 3] = float("nan")
    target = make_target((1, 2, 6, 7), "labels")
    loss = mk.sobel_boundary_loss(pred, target, from_logits=from_logits, backend="cpu")
    loss.backward()
    ref = reference.sobel_boundary_loss(pred.detach().double(), target, from_logits=from_logits)
    assert torch.isnan(loss) and torch.isnan(ref) and torch.isnan(pred.grad).any()


def test_keeps_at_most_pred_for_backward():
    pred = make_pred((2, 4, 32, 32))
    target = make_target((2, 4, 32, 32), "onehot")
    fused = saved_tensor_bytes(lambda p, t: mk.sobel_boundary_loss(p, t, backend="cpu"), pred, target)
    ref = saved_tensor_bytes(lambda p, t: mk.sobel_boundary_loss(p, t, backend="reference"), pred, target)
    pred_bytes = pred.numel() * pred.element_size()
    assert 0 < fused <= pred_bytes < ref


def test_no_grad_forms_no_gradient():
    pred = make_pred((2, 3, 8, 8))
    target = make_target((2, 3, 8, 8), "labels")
    op = torch.ops.medattn.sobel_boundary_loss
    loss, grad = op(pred.detach(), target, [1, 2], [1.0, 1.0], 1e-6, False, NO_IGNORE_INDEX, 1, False)
    assert grad.shape == (0,)
    with torch.no_grad():
        assert_close_to_reference(mk.sobel_boundary_loss(pred, target, scales=(1, 2)), loss.double(), torch.float32)


def test_backward_without_compute_grad_raises():
    pred = make_pred((1, 2, 5, 5))
    loss, _ = torch.ops.medattn.sobel_boundary_loss(pred, make_target((1, 2, 5, 5), "labels"), [1], [1.0], 1e-6,
                                                   False, NO_IGNORE_INDEX, 1, False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_deterministic():
    pred = make_pred((3, 5, 40, 33), from_logits=True)
    target = make_target((3, 5, 40, 33), "labels")
    runs = []
    for threads in (1, 2, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p = pred.detach().clone().requires_grad_()
            loss = mk.sobel_boundary_loss(p, target, from_logits=True, backend="cpu")
            loss.backward()
        finally:
            torch.set_num_threads(before)
        runs.append((loss, p.grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["soft", "labels"])
def test_opcheck(reduction, target_kind):
    shape = (2, 3, 7, 6)
    pred = make_pred(shape, from_logits=True)
    target = make_target(shape, target_kind, ignore_index=None)
    args = (pred, target, [1, 2], [1.0, 0.5], 1e-6, True, NO_IGNORE_INDEX, REDUCTION_CODES[reduction], True)
    torch.library.opcheck(torch.ops.medattn.sobel_boundary_loss.default, args)
    loss, grad_pred = torch.ops.medattn.sobel_boundary_loss(*args)
    torch.library.opcheck(torch.ops.medattn.sobel_boundary_loss_backward.default,
                          (torch.rand_like(loss).detach() + 0.5, grad_pred.detach(), REDUCTION_CODES[reduction]))


def test_torch_compile_fullgraph():
    labels = make_target((2, 3, 9, 10), "labels", ignore_index=-100)
    pred = make_pred_off_kinks((2, 3, 9, 10), labels, from_logits=True, ignore_index=-100)
    compiled = torch.compile(lambda p, t: 2 * mk.sobel_boundary_loss(p, t, from_logits=True, ignore_index=-100),
                             fullgraph=True, backend="eager")
    loss = compiled(pred, labels)
    loss.backward()
    (pred64,) = as_float64_leaves([pred])
    ref = 2 * reference.sobel_boundary_loss(pred64, labels, from_logits=True, ignore_index=-100)
    ref.backward()
    assert_close_to_reference(loss, ref, torch.float32)
    assert_close_to_reference(pred.grad, pred64.grad, torch.float32, "grad pred")


def test_reference_replicate_pad_is_f_pad():
    import importlib
    ref_module = importlib.import_module("medattn_kernels.reference.sobel_boundary_loss")
    for shape in [(2, 3, 7, 10), (1, 1, 1, 1), (1, 2, 1, 5)]:
        u = make_tensor(shape, torch.float64)
        assert torch.equal(ref_module.replicate_pad1(u), F.pad(u, (1, 1, 1, 1), mode="replicate"))


def test_reference_runs_under_inductor():
    """The reference is the benchmark's torch.compile baseline: Inductor must compile its forward and
    backward and agree with eager."""
    labels = make_target((2, 3, 12, 10), "labels")
    pred = make_pred_off_kinks((2, 3, 12, 10), labels, from_logits=True)
    compiled = torch.compile(reference.sobel_boundary_loss)
    loss = compiled(pred, labels, from_logits=True)
    (grad,) = torch.autograd.grad(loss, [pred])
    pred_eager = pred.detach().clone().requires_grad_()
    loss_eager = reference.sobel_boundary_loss(pred_eager, labels, from_logits=True)
    (grad_eager,) = torch.autograd.grad(loss_eager, [pred_eager])
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad, grad_eager)


@pytest.mark.parametrize("fused", [True, False])
def test_modules(fused):
    labels = make_target((2, 4, 16, 12), "labels", ignore_index=255)
    logits = make_pred_off_kinks((2, 4, 16, 12), labels, from_logits=True, ignore_index=255)
    din = mk.nn.DINLoss(ignore_index=255, fused=fused)
    loss = din(logits, labels)
    loss.backward()
    (logits64,) = as_float64_leaves([logits])
    ref = (0.3 * F.cross_entropy(logits64, labels, ignore_index=255)
           + 0.7 * mk.nn.soft_dice_loss(logits64, labels, 255)
           + reference.sobel_boundary_loss(logits64, labels, from_logits=True, ignore_index=255))
    ref.backward()
    assert_close_to_reference(loss, ref, torch.float32)
    assert_close_to_reference(logits.grad, logits64.grad, torch.float32, "grad logits")
    module = mk.nn.SobelBoundaryLoss(scales=(1, 2), reduction="none", fused=fused)
    probs = make_pred((2, 4, 16, 12))
    assert module(probs, labels.clamp(0, 3)).shape == (2,)
    assert f"fused={fused}" in repr(module)


def test_soft_dice_perfect_prediction_is_zero():
    labels = torch.randint(0, 3, (2, 8, 8))
    logits = 50.0 * F.one_hot(labels, 3).permute(0, 3, 1, 2).double()
    assert mk.nn.soft_dice_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_force_reference_env(monkeypatch):
    from medattn_kernels.ops._registry import FORCE_REFERENCE_ENV
    monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
    pred = make_pred((1, 2, 4, 4))
    loss = mk.sobel_boundary_loss(pred, make_target((1, 2, 4, 4), "soft"), backend="cpu")
    assert "SobelBoundaryLoss" not in type(loss.grad_fn).__name__ and "Add" in type(loss.grad_fn).__name__


def _p(*shape):
    return torch.rand(*shape)


@pytest.mark.parametrize("call, error, match", [
    (lambda: mk.sobel_boundary_loss(_p(2, 3, 4), _p(2, 3, 4)), ValueError, r"pred: expected a 4-D tensor"),
    (lambda: mk.sobel_boundary_loss(torch.ones(1, 2, 3, 3, dtype=torch.int64), _p(1, 2, 3, 3)), TypeError,
     r"pred: expected a floating"),
    (lambda: mk.sobel_boundary_loss(_p(0, 2, 3, 3), _p(0, 2, 3, 3)), ValueError, r"pred: expected at least one"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 4)), ValueError, r"target: expected shape \(1, 2, 3, 3\)"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.int64)), ValueError,
     r"target: expected int64 labels of shape \[B, H, W\] = \(1, 3, 3\)"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int32)), TypeError,
     r"target: expected a floating-point tensor of pred's shape or int64 labels"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), torch.full((1, 3, 3), 2)), ValueError,
     r"target: labels must lie in \[0, 2\)"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), torch.full((1, 3, 3), -1), backend="reference"), ValueError,
     r"target: labels must lie in \[0, 2\)"),
    (lambda: torch.ops.medattn.sobel_boundary_loss(_p(1, 2, 3, 3), torch.full((1, 3, 3), 5), [1], [1.0], 1e-6, False,
                                                   NO_IGNORE_INDEX, 1, False), ValueError,
     r"target: labels must lie in \[0, 2\) .* got 5 in image 0"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3).requires_grad_()), ValueError,
     r"target: .*pred only.*detach"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), ignore_index=0), ValueError,
     r"ignore_index: applies to int64 label targets only"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), scales=(1, 0)), ValueError,
     r"scales: expected positive"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), scales=(1, 2.0)), TypeError,
     r"scales: expected a non-empty sequence of ints"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), scales=()), TypeError, r"scales: expected a non-empty"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), weights=(1.0,)), ValueError,
     r"weights: expected 3 values \(one per scale\), got 1"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), eps=0.0), ValueError, r"eps: expected a finite float > 0"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), reduction="avg"), ValueError,
     r"reduction: expected one of \('none', 'mean', 'sum'\)"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64),
                                    ignore_index=NO_IGNORE_INDEX), ValueError, r"ignore_index: .* reserved"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), backend="nope"), ValueError,
     r"backend: expected one"),
    (lambda: mk.sobel_boundary_loss(_p(1, 2, 3, 3).half(), _p(1, 2, 3, 3), backend="cpu"), TypeError,
     r"pred: backend 'cpu' .* supports float32, float64, bfloat16, got float16"),
    (lambda: torch.ops.medattn.sobel_boundary_loss(_p(1, 2, 3, 3), _p(1, 2, 3, 3), [1], [1.0, 2.0], 1e-6, False,
                                                   NO_IGNORE_INDEX, 1, False), RuntimeError, r"weights: expected 1"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float16_default_falls_back_to_reference_on_cpu():
    pred = make_pred((1, 2, 6, 6), torch.float16)
    target = make_target((1, 2, 6, 6), "labels")
    loss = mk.sobel_boundary_loss(pred, target)
    assert_close_to_reference(loss, reference.sobel_boundary_loss(pred.double(), target), torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 2, 5), (2, 3, 9, 10)])
@pytest.mark.parametrize("target_kind, from_logits, ignore_index", [
    ("soft", False, None), ("labels", False, None), ("labels", True, 1), ("onehot", True, None)])
def test_triton_matches_reference(shape, target_kind, from_logits, ignore_index):
    check_parity("triton", shape, torch.float32, target_kind, from_logits, ignore_index=ignore_index,
                 device=triton_device())


@pytest.mark.triton
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_triton_reductions_layout(reduction):
    check_parity("triton", (3, 2, 7, 6), torch.float32, "soft", reduction=reduction, scales=(1, 3),
                 weights=(2.0, 0.5), layout="channels_last", device=triton_device())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    check_parity("triton", (2, 3, 8, 7), dtype, "labels", from_logits=True, device=triton_device())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_kind", ["onehot", "labels"])
def test_cuda_op_matches_reference(dtype, target_kind):
    check_parity(None, (2, 4, 96, 80), dtype, target_kind, from_logits=True, device="cuda")


@pytest.mark.cuda
def test_cuda_opcheck():
    pred = make_pred((2, 3, 7, 6), device="cuda")
    target = make_target((2, 3, 7, 6), "labels", device="cuda")
    torch.library.opcheck(torch.ops.medattn.sobel_boundary_loss.default,
                          (pred, target, [1, 2], [1.0, 1.0], 1e-6, False, NO_IGNORE_INDEX, 1, True))
