"""medattn_kernels.patch / unpatch: the mechanism (instance forwards, report, per-call fallbacks, state
dicts, unpatch, compile) on the built-in depthwise nn.Conv2d patcher. MONAI's patchers:
tests/test_monai_integration.py."""
import copy
import re

import pytest
import torch
from torch import nn

import medattn_kernels as mk
from medattn_kernels.patch import FUSED, is_patchable_depthwise, patch_state
from medattn_kernels.testing import assert_close_to_reference, make_tensor


pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def depthwise_zoo():
    """Every case of the depthwise patcher, in the order the report lists them."""
    return nn.Sequential(
        nn.Conv2d(8, 8, 7, padding=3, groups=8),                                  # 0 patched
        nn.Sequential(nn.Conv2d(8, 8, (1, 9), padding=(0, 4), groups=8, bias=False),  # 1.0 patched (strip)
                      nn.ReLU()),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),                                  # 2 small kernel
        nn.Conv2d(8, 8, 5, padding=2, groups=8, stride=2),                        # 3 stride 2 (8 -> 4 px)
        nn.Upsample(scale_factor=2),
        nn.Conv2d(8, 8, 5, padding=2, groups=8, padding_mode="reflect"),          # 5 padding mode
        nn.Conv2d(8, 16, 5, padding=2, groups=8),                                 # 6 not depthwise: not listed
        nn.Conv2d(16, 16, 5, padding="same", dilation=2, groups=16),              # 7 patched
        nn.Conv2d(16, 16, (4, 5), padding="same", groups=16),                     # 8 'same' with an even kernel
    )


REASONS = {"2": "kernel 3x3 < 5x5", "3": "stride (2, 2)", "5": "padding_mode 'reflect'",
           "8": "padding='same' with an even kernel"}


def grads_of_model(model, x):
    out = model(x)
    grad = torch.randn_like(out)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out, [x] + params, grad)
    return out, grad, grads


def test_patch_keeps_outputs_gradients_modules_and_state_dict():
    model = depthwise_zoo().double()
    stock = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    report = mk.patch(model)
    # Same module objects and types, same Parameters (an optimizer built before patching keeps working).
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == list(state_before)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert [r.module for r in report.patched] == ["0", "1.0", "7"] and len(report) == 3 == int(report)
    assert {r.module: r.detail for r in report.left_alone}.keys() == REASONS.keys()
    for row in report.left_alone:
        assert REASONS[row.module] in row.detail, row
    x = make_tensor((2, 8, 11, 13), torch.float64, requires_grad=True)
    out, grad, grads = grads_of_model(model, x)
    out_ref = stock(x)
    grads_ref = torch.autograd.grad(out_ref, [x] + list(stock.parameters()), grad)
    assert_close_to_reference(out, out_ref, torch.float64)
    for g, g_ref in zip(grads, grads_ref):
        assert_close_to_reference(g, g_ref, torch.float64, "gradient")
    assert dict(patch_state(model[0]).calls) == {FUSED: 1}
    assert patch_state(model[2]) is None


def test_report_table_and_count_compatibility():
    model = depthwise_zoo()
    report = mk.patch(model)
    text = str(report)
    assert text.splitlines()[0] == ("medattn_kernels.patch(Sequential): 3 modules patched (depthwise_conv2d x3), "
                                    "4 left alone")
    assert re.search(r"^1\.0 +Conv2d +depthwise_conv2d +patched +1x9, dilation \(1, 1\)$", text, re.M)
    assert "stride (2, 2): the op is stride 1" in text
    assert "Conv2d runs its stock forward for a call when the input is unbatched" in text
    assert repr(report) == "<PatchReport Sequential: 3 patched, 4 left alone>"
    assert report.by_op() == {"depthwise_conv2d": 3} and [0, 1, 2, 3][report] == 3
    with pytest.warns(DeprecationWarning, match="compare len"):
        assert report == 3  # patch() returned the count before issue 11
    again = mk.patch(model)  # patched modules are left as they are
    assert len(again) == 0 and [r.detail for r in again.rows if r.patched] == ["already patched"] * 3


def test_unpatch_restores_the_stock_forward():
    model = depthwise_zoo()
    x = make_tensor((1, 8, 9, 10))
    before = model(x)
    mk.patch(model)
    assert all("forward" in m.__dict__ for m in (model[0], model[1][0], model[7]))
    assert mk.unpatch(model) == 3
    assert not any("forward" in m.__dict__ or patch_state(m) for m in model.modules())
    assert torch.equal(model(x), before)  # the class's forward: bit for bit the stock result
    assert mk.unpatch(model) == 0
    assert len(mk.patch(model)) == 3  # and it patches again


def test_state_dict_loads_into_and_out_of_a_patched_model():
    stock, patched = depthwise_zoo(), depthwise_zoo()
    mk.patch(patched)
    patched.load_state_dict(stock.state_dict())  # into
    x = make_tensor((2, 8, 9, 9))
    assert_close_to_reference(patched(x), stock(x).double(), torch.float32)
    fresh = depthwise_zoo()
    with torch.no_grad():
        for p in patched.parameters():
            p.mul_(1.5)
    fresh.load_state_dict(patched.state_dict())  # out of
    assert_close_to_reference(fresh(x), patched(x).double(), torch.float32)


def test_per_call_fallback_ops_filter_and_other_rows():
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4).double()
    wrapped = nn.Sequential(conv)
    assert len(mk.patch(wrapped)) == 1
    x = make_tensor((4, 9, 9), torch.float64)  # unbatched [C, H, W]: the op takes [B, C, H, W]
    assert torch.equal(conv(x), type(conv).forward(conv, x))
    assert dict(patch_state(conv).calls) == {"unbatched [C, H, W] input": 1}

    class MyConv(nn.Conv2d):
        pass

    other = nn.Sequential(MyConv(4, 4, 7, padding=3, groups=4), nn.Conv1d(4, 4, 7, groups=4),
                          nn.Conv3d(4, 4, 7, groups=4), nn.Conv2d(4, 4, 7, groups=4))
    other[3].forward = lambda t: t  # replaced by someone else
    rows = {r.module: r.detail for r in mk.patch(other).rows}
    assert rows == {"0": "subclass of Conv2d: its forward may differ (patchers match exact types)",
                    "1": "Conv1d: depthwise_conv2d is 2-D only", "2": "Conv3d: depthwise_conv2d is 2-D only",
                    "3": "forward already replaced on this instance (by another tool)"}
    model = depthwise_zoo()
    report = mk.patch(model, ops=["cross_attention"])
    assert len(report) == 0 and report.rows[0].detail == "op depthwise_conv2d not in ops=['cross_attention']"
    # The model itself may be the patched module.
    bare = nn.Conv2d(3, 3, 5, padding=2, groups=3)
    assert len(mk.patch(bare)) == 1 and mk.patch(nn.Conv2d(3, 3, 5, groups=3), ops="depthwise_conv2d").rows[0].patched
    assert is_patchable_depthwise(bare) and not is_patchable_depthwise(nn.Conv2d(3, 3, 3, groups=3))


def test_backend_choice_and_the_deprecated_fused_flag():
    model = depthwise_zoo()
    x = make_tensor((1, 8, 9, 9))
    expected = model(x)
    with pytest.warns(DeprecationWarning, match="backend='reference'"):
        mk.patch(model, fused=False)
    assert all(patch_state(m).backend == "reference" for m in model.modules() if patch_state(m))
    assert_close_to_reference(model(x), expected.double(), torch.float32)
    mk.unpatch(model)
    with pytest.warns(DeprecationWarning):
        mk.patch(model, False)  # the old positional form patch(model, fused)
    assert patch_state(model[0]).backend == "reference"


@pytest.mark.parametrize("call, error, match", [
    (lambda: mk.patch(depthwise_zoo(), ops=["nope"]), ValueError, r"ops: expected names of medattn_kernels ops"),
    (lambda: mk.patch(depthwise_zoo(), backend="gpu"), ValueError, r"backend: expected one of"),
    (lambda: mk.patch(torch.randn(3)), TypeError, r"model: expected an nn.Module, got Tensor"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_deepcopy_and_torch_compile_of_a_patched_model():
    model = depthwise_zoo()
    mk.patch(model)
    clone = copy.deepcopy(model)  # the bound forward follows the copy
    assert clone[0].forward.__self__ is clone[0] and patch_state(clone[0]) is not None
    x = make_tensor((2, 8, 10, 10), requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x)
    out.sum().backward()
    assert_close_to_reference(out, clone(x).double(), torch.float32)
    assert x.grad is not None and model[0].weight.grad is not None
