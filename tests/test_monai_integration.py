"""MONAI patchers (medattn_kernels/integrations/monai.py): per block, the patched module's outputs, every
gradient and the BatchNorm running statistics equal the stock module's in float64 on odd 2-D and 3-D shapes;
every fallback reason (at patch time and per call); unpatch; state dicts; torch.compile; and per network
(UNETR, DynUNet(norm_name="batch"), MedNeXt, DiffusionModelUNet with SpatialAttentionBlocks; 2-D and 3-D)
float64 parity and a Liger-style convergence test (20 training steps, stock vs patched, float32)."""
import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

pytest.importorskip("monai", reason="needs monai (the [monai] extra; `make test` installs it)")

from monai.networks.blocks import CrossAttentionBlock, SABlock, SpatialAttentionBlock  # noqa: E402
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock  # noqa: E402

import medattn_kernels as mk  # noqa: E402
from medattn_kernels.bench.monai import build_variants, network_specs, training_step  # noqa: E402
from medattn_kernels.patch import FUSED, patch_state  # noqa: E402
from medattn_kernels.testing import assert_close_to_reference, make_tensor, rel_error, tolerance  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """These modules are tiny: one thread runs them faster than two (no OpenMP hand-offs per op; on a loaded
    2-core machine the hand-offs made a 12x12 U-Net step 30x slower) and they need no parallelism."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patched_copy(module):
    clone = copy.deepcopy(module)
    report = mk.patch(clone)
    return clone, report


def assert_same_function(stock, patched, inputs, dtype=F64, steps=1, grad_floor=1e-3):
    """Outputs, gradients of every input and parameter, and buffers (running statistics) after `steps`
    forward/backward passes. A parameter gradient that is 0 up to rounding (a bias before a normalisation)
    is compared against grad_floor times the largest gradient of the module."""
    for _ in range(steps):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = []
        for model in (stock, patched):
            model.zero_grad(set_to_none=True)
            for t in leaves:
                t.grad = None
            out = model(*leaves)
            grad = torch.randn_like(out) if not outs else outs[0][1]
            out.backward(grad)
            outs.append((out, grad, [t.grad for t in leaves if t.requires_grad]))
        assert_close_to_reference(outs[1][0], outs[0][0], dtype, "output")
        for g, g_ref in zip(outs[1][2], outs[0][2]):
            assert_close_to_reference(g, g_ref, dtype, "input gradient")
    largest = max(p.grad.abs().max().item() for p in stock.parameters() if p.grad is not None)
    for (name, p), p_ref in zip(patched.named_parameters(), stock.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            err = (p.grad - p_ref.grad).abs().max().item() / max(p_ref.grad.abs().max().item(), grad_floor * largest)
            assert err <= tolerance(dtype), f"grad {name}: {err:.2e}"
    for (name, b), b_ref in zip(patched.named_buffers(), stock.buffers()):
        if b.is_floating_point():
            assert_close_to_reference(b, b_ref, dtype, name)
        else:
            assert torch.equal(b, b_ref), name


# ---------------------------------------------------------------- attention blocks
@pytest.mark.parametrize("kwargs", [
    dict(hidden_size=12, num_heads=3),                                              # combined qkv
    dict(hidden_size=16, num_heads=2, use_combined_linear=False, qkv_bias=True),    # to_q / to_k / to_v
    dict(hidden_size=12, num_heads=2, dim_head=5, hidden_input_size=7, include_fc=False),
    dict(hidden_size=12, num_heads=4, use_flash_attention=True, qkv_bias=True),     # MONAI's SDPA path
    dict(hidden_size=8, num_heads=2, dropout_rate=0.3, attention_dtype=F64),       # eval: no dropout
])
def test_sablock_matches_stock(kwargs):
    block = SABlock(**kwargs).double().eval()
    patched, report = patched_copy(block)
    assert len(report) == 1 and report.rows[0].op == "cross_attention"
    x = make_tensor((2, 37, kwargs.get("hidden_input_size", kwargs["hidden_size"])), F64)
    assert_same_function(block, patched, [x])
    assert dict(patch_state(patched).calls) == {FUSED: 1}


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5), (11,)])
@pytest.mark.parametrize("combined", [False, True])
def test_spatial_attention_block_matches_stock(spatial, combined):
    block = SpatialAttentionBlock(len(spatial), 12, num_head_channels=4, norm_num_groups=3,
                                  use_combined_linear=combined).double()
    patched, report = patched_copy(block)
    assert [(r.module, r.patched, r.detail) for r in report.rows][0] == ("", True, "via .attn")
    assert [r.module for r in report.patched] == ["attn"]
    assert_same_function(block, patched, [make_tensor((2, 12) + spatial, F64)])


@pytest.mark.parametrize("with_context", [False, True])
def test_cross_attention_block_matches_stock(with_context):
    block = CrossAttentionBlock(12, 3, hidden_input_size=10, context_input_size=6 if with_context else 10,
                                dim_head=5, qkv_bias=True).double()
    patched, report = patched_copy(block)
    assert len(report) == 1
    x = make_tensor((2, 9, 10), F64)
    if with_context:
        context = make_tensor((2, 14, 6), F64)
        assert_same_function(block, patched, [x, context])
    else:
        assert_same_function(block, patched, [x])


@pytest.mark.parametrize("make, reason", [
    (lambda: SABlock(8, 2, causal=True, sequence_length=16), "causal=True: the op has no causal mask"),
    (lambda: SABlock(8, 2, rel_pos_embedding="decomposed", input_size=(4, 4)),
     "rel_pos_embedding: added to the N x N scores"),
    (lambda: SABlock(8, 2, save_attn=True), "save_attn=True: keeps the N x N attention matrix"),
    (lambda: SABlock(8, 2, dropout_rate=0.1, use_flash_attention=True),
     "use_flash_attention with dropout_rate=0.1: MONAI's SDPA call drops attention weights in eval mode too"),
    (lambda: CrossAttentionBlock(8, 2, causal=True, sequence_length=16), "causal=True"),
])
def test_attention_configurations_left_alone(make, reason):
    block = make()
    report = mk.patch(block)
    assert len(report) == 0 and reason in report.left_alone[0].detail
    assert "forward" not in block.__dict__


def test_attention_per_call_fallbacks():
    block = SABlock(8, 2, dropout_rate=0.5).double()
    patched, _ = patched_copy(block)
    x = make_tensor((2, 6, 8), F64)
    calls = patch_state(patched).calls
    # Training with attention dropout: the stock forward (same RNG stream, same output).
    torch.manual_seed(7)
    expected = block(x)
    torch.manual_seed(7)
    assert torch.equal(patched(x), expected) and calls["training with attention dropout"] == 1
    patched.eval(), block.eval()
    assert_close_to_reference(patched(x), block(x), F64) and calls[FUSED] == 1
    mask = torch.ones(2, 6)
    mask[:, -2:] = 0
    assert torch.equal(patched(x, attn_mask=mask), block(x, attn_mask=mask)) and calls["attn_mask given"] == 1
    # A dtype without a fused kernel on this device (float16 on CPU): stock.
    half, half_stock = copy.deepcopy(patched).half(), copy.deepcopy(block).half()
    xh = x.half()
    assert torch.equal(half(xh), half_stock(xh))
    assert patch_state(half).calls["no fused kernel for float16 on cpu"] == 1
    # attention_dtype other than the input's: stock, which fails as MONAI does (q, k cast, v not).
    upcast = SABlock(8, 2, attention_dtype=torch.float32).double()
    report = mk.patch(upcast)
    assert len(report) == 1
    with pytest.raises(RuntimeError, match="expected scalar type"):
        upcast(x)
    assert patch_state(upcast).calls == {"attention_dtype float32 differs from the input's float64": 1}


def test_metatensor_input_and_compile_fullgraph():
    from monai.data import MetaTensor
    block = SpatialAttentionBlock(2, 8, num_head_channels=4, norm_num_groups=2)
    patched, _ = patched_copy(block)
    x = MetaTensor(make_tensor((2, 8, 5, 6)))
    out = patched(x)
    assert isinstance(out, MetaTensor)
    assert_close_to_reference(out.as_tensor(), block(x).as_tensor().double(), torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(patched, fullgraph=True, backend=counter)
    x = make_tensor((2, 8, 5, 6), requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert counter.frame_count == 1 and counter.op_count > 0  # traced, not run eagerly
    assert_close_to_reference(out, block(x).double(), torch.float32)
    assert x.grad is not None and patched.attn.to_q.weight.grad is not None


def test_bn_block_compiles_with_a_graph_break_per_batch_norm():
    # The signed-weight check reads the weights (one host sync per BatchNorm): torch.compile breaks the
    # graph there, so fullgraph=True is refused and the default compile matches the stock block.
    block = bn_block(UnetBasicBlock, 2).float()
    patched, _ = patched_copy(block)
    x = make_tensor((2, 3, 7, 6))
    with pytest.raises(Exception, match="tolist"):
        torch.compile(copy.deepcopy(patched), fullgraph=True, backend="eager")(x)
    counter = CompileCounter()
    out = torch.compile(patched, backend=counter)(x)
    assert counter.frame_count >= 2
    assert_close_to_reference(out, block(x).double(), torch.float32)


# ---------------------------------------------------------------- BatchNorm + LeakyReLU blocks
def bn_block(cls, dims, in_ch=3, out_ch=5, stride=1, norm="batch", act=("leakyrelu", {"negative_slope": 0.01})):
    block = cls(dims, in_ch, out_ch, kernel_size=3, stride=stride, norm_name=norm, act_name=act)
    with torch.no_grad():  # weights of both signs (the x flip) and biases: not the default 1 and 0
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.3, 1.5).mul_(torch.where(torch.rand(m.num_features) < 0.4, -1.0, 1.0))
                m.bias.uniform_(-0.5, 0.5)
    return block.double()


@pytest.mark.parametrize("cls", [UnetBasicBlock, UnetResBlock])
@pytest.mark.parametrize("spatial, stride", [((9, 7), 1), ((7, 6, 5), 2), ((13,), 1)])
def test_bn_leaky_relu_blocks_match_stock(cls, spatial, stride):
    block = bn_block(cls, len(spatial), stride=stride)
    patched, report = patched_copy(block)
    assert len(report) == 1 and report.rows[0].op == "activated_batch_norm"
    x = make_tensor((2, 3) + spatial, F64, low=-1, high=3)
    assert_same_function(block, patched, [x], steps=2)  # running statistics after two training steps
    assert int(patched.norm1.num_batches_tracked) == 2
    fused_per_step = 2 if cls is UnetBasicBlock else 1
    assert dict(patch_state(patched).calls) == {FUSED: 2 * fused_per_step}


@pytest.mark.parametrize("norm_kwargs", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False)])
def test_batch_norm_options(norm_kwargs):
    block = bn_block(UnetBasicBlock, 2, norm=("batch", norm_kwargs))
    patched, report = patched_copy(block)
    assert len(report) == 1
    assert_same_function(block, patched, [make_tensor((3, 3, 6, 5), F64)], steps=3)


def test_bn_per_call_fallbacks():
    block = bn_block(UnetBasicBlock, 3)
    patched, _ = patched_copy(block)
    calls = patch_state(patched).calls
    x = make_tensor((2, 3, 4, 5, 3), F64)
    assert_same_function(block, patched, [x])
    block.eval(), patched.eval()  # running statistics: stock, per BatchNorm
    assert_close_to_reference(patched(x), block(x), F64)
    assert calls["eval mode (running statistics)"] == 2
    block.train(), patched.train()
    with torch.no_grad():
        for b in (block, patched):
            b.norm2.weight[1] = 1e-6  # within eps of 0: the op's scale |w'| + eps cannot represent it
    assert_same_function(block, patched, [x])
    assert calls["a BatchNorm weight within eps (1e-05) of 0: the op's scale cannot represent it"] == 1
    assert calls[FUSED] == 2 + 1
    half, half_stock = copy.deepcopy(patched).half(), copy.deepcopy(block).half()
    xh = x.half()
    assert torch.equal(half(xh), half_stock(xh))
    assert patch_state(half).calls["no fused kernel for float16 on cpu"] == 2


@pytest.mark.parametrize("make, reason", [
    (lambda: bn_block(UnetBasicBlock, 2, norm="instance"), "norm1 is InstanceNorm2d: activated_batch_norm fuses "
                                                           "BatchNorm only"),
    (lambda: bn_block(UnetResBlock, 3, norm="group" if False else ("group", {"num_groups": 1})),
     "norm1 is GroupNorm"),
    (lambda: bn_block(UnetBasicBlock, 2, act="prelu"), "activation PReLU: activated_batch_norm computes LeakyReLU"),
    (lambda: bn_block(UnetBasicBlock, 2, act=("leakyrelu", {"negative_slope": 0.0})),
     "LeakyReLU slope 0.0: the op inverts the activation, so it needs slope > 0"),
])
def test_bn_blocks_left_alone(make, reason):
    block = make()
    report = mk.patch(block)
    assert len(report) == 0 and reason in report.left_alone[0].detail, report.left_alone[0].detail


# ---------------------------------------------------------------- networks
SPECS = {f"{s.name}-{s.spatial_dims}d": s for s in network_specs(tiny=True)}
EXPECTED_OPS = {"UNETR": {"cross_attention": 12}, "DynUNet": {"activated_batch_norm": 5},
                "MedNeXt": {"depthwise_conv2d": 9}, "AttentionUNet": {"cross_attention": 7}}


def expected_ops(spec):
    if spec.name == "MedNeXt" and spec.spatial_dims == 3:
        return {}  # Conv3d depthwise: left alone, every one with its reason
    return EXPECTED_OPS[spec.name]


@pytest.mark.parametrize("key", SPECS)
def test_network_float64_parity_and_report(key, fresh_seed):
    spec = SPECS[key]
    models = build_variants(spec, seed=fresh_seed, dtype=F64)
    stock, patched = models["stock"], models["patched"]
    report = patched.medattn_report
    assert report.by_op() == expected_ops(spec), str(report)
    for row in report.left_alone:
        assert row.detail, row  # nothing is left alone without a reason
    batch = spec.batch(torch.Generator().manual_seed(fresh_seed + 1), F64)
    losses = [spec.loss(m, batch) for m in (stock, patched)]
    assert rel_error(losses[1], losses[0]) <= 1e-10
    for loss in losses:
        loss.backward()
    largest = max(p.grad.abs().max().item() for p in stock.parameters() if p.grad is not None)
    for (name, p), p_ref in zip(patched.named_parameters(), stock.parameters()):
        if p_ref.grad is not None:
            err = (p.grad - p_ref.grad).abs().max().item() / max(p_ref.grad.abs().max().item(), 1e-3 * largest)
            assert err <= 1e-10, f"{key} grad {name}: {err:.2e}"
    # State dicts: same keys and values, loadable into and out of the patched model.
    assert list(patched.state_dict()) == list(stock.state_dict())
    patched.load_state_dict(stock.state_dict())
    stock.load_state_dict(patched.state_dict())
    assert mk.unpatch(patched) == len(report)
    assert not any("forward" in m.__dict__ for m in patched.modules())


# Float32 training amplifies rounding: over 20 steps the losses of two float32 runs of the *same* function
# drift apart. Measured on the tiny networks over 8 seeds, stock UNETR against stock UNETR switched to MONAI's
# own SDPA path (use_flash_attention=True, mathematically identical): up to 2.4e-5 (losses) and 1.7e-5
# (parameters); stock vs patched stayed within the same range (1.7e-5, 3.6e-5). Liger-Kernel's float32
# convergence tests allow 2e-5 on losses and 5e-3 on parameters. Identity of the function itself is the
# float64 test above (1e-10). One seed (MEDATTN_TEST_SEED=955195776, DynUNet-2d) put the patched float32
# losses 1.06e-4 from the stock ones, while the same 20 steps in float64 agree to 4e-16 and the activated
# batch norm's float32 outputs and gradients are as close to float64 as BatchNorm's: a non-smooth point
# (LeakyReLU's kink, whose slope the backward reads from the sign of y) decided differently by the two
# float32 roundings changes a gradient element by O(dy), not O(eps * dy). Hence 2e-4 on losses.
LOSS_TOLERANCE, PARAM_TOLERANCE = 2e-4, 1e-3
# The float32 drift is chaotic, so a fixed bound alone fails now and then (seed 8 put UNETR-3d's patched
# losses 2.9e-4 from the stock ones). The same 20 steps of the stock network in float64 are the exact run:
# the patched network passes when it is within the bounds above of the stock float32 run, or no farther
# from the exact run than DRIFT_FACTOR times the stock float32 run is. A wrong kernel is off by far more.
DRIFT_FACTOR = 4.0


def to_float64(value):
    """A batch (dict / tuple / list of tensors and other values) with its floating tensors in float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_float64(v) for v in value)
    return value


@pytest.mark.parametrize("key", SPECS)
def test_network_convergence(key, fresh_seed):
    """Liger-Kernel's convergence test: same initial weights and batches, 20 SGD steps (lr 0.003, momentum 0.9)
    of the stock and the patched network in float32; losses and final parameters agree to float32 tolerance.
    (SGD rather than Adam: Adam divides by the gradients' running RMS, which turns the rounding noise of
    gradients that are 0 in exact arithmetic, like a bias before a GroupNorm, into updates of size lr.)"""
    spec = SPECS[key]
    models = build_variants(spec, seed=fresh_seed)
    models["exact"] = build_variants(spec, variants=("stock",), seed=fresh_seed, dtype=F64)["stock"]
    generator = torch.Generator().manual_seed(fresh_seed + 1)
    batches = [spec.batch(generator) for _ in range(4)]
    batches64 = [to_float64(b) for b in batches]
    losses = {name: [] for name in models}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
        for step in range(20):
            data = batches64 if name == "exact" else batches
            losses[name].append(training_step(spec, model, optimizer, data[step % len(data)]))
    stock_losses, patched_losses = torch.tensor(losses["stock"]), torch.tensor(losses["patched"])
    exact_losses = torch.tensor(losses["exact"], dtype=torch.float64)
    # Training makes progress: the last pass over the 4 batches against the first pass over the same batches
    # (a mean over unequal mixes of batches, steps 0-4 against 15-19, did not always fall for MedNeXt-2d,
    # whose loss moves little in 20 steps at this learning rate).
    n = len(batches)
    assert bool(torch.isfinite(stock_losses).all()) and stock_losses[-n:].mean() < stock_losses[:n].mean()

    def close(patched, stock, exact, bound):
        drift = rel_error(stock, exact)
        return rel_error(patched, stock) <= bound or rel_error(patched, exact) <= DRIFT_FACTOR * drift

    assert close(patched_losses, stock_losses, exact_losses, LOSS_TOLERANCE), (
        losses["stock"], losses["patched"], losses["exact"])
    # All parameters (and BatchNorm statistics) as one vector: a parameter that is 0 in exact arithmetic
    # (a bias before a GroupNorm: 1e-18 either way) has no relative error of its own.
    for what in ("parameters", "buffers"):
        flat = [torch.cat([t.detach().double().flatten() for t in getattr(models[n], what)() if t.is_floating_point()]
                          or [torch.zeros(0)]) for n in ("patched", "stock", "exact")]
        assert close(*flat, PARAM_TOLERANCE), f"{key} {what}: {rel_error(*flat[:2]):.2e}, exact {rel_error(*flat[1:]):.2e}"


def test_conditioned_unet_cross_attention_and_swin_report():
    """DiffusionModelUNet with conditioning: SpatialTransformer blocks hold an SABlock and a CrossAttentionBlock
    attending to a context; SwinUNETR's window attention is reported, not patched."""
    from monai.networks.nets import DiffusionModelUNet, SwinUNETR
    torch.manual_seed(0)
    unet = DiffusionModelUNet(2, 1, 1, num_res_blocks=1, channels=(8, 8), attention_levels=(False, True),
                              norm_num_groups=4, num_head_channels=4, with_conditioning=True,
                              cross_attention_dim=6).double()
    patched, report = patched_copy(unet)
    assert report.by_op() == {"cross_attention": 8} and {r.type for r in report.patched} == {
        "SABlock", "CrossAttentionBlock"}
    x, t, context = make_tensor((2, 1, 8, 8), F64), torch.tensor([3, 500]), make_tensor((2, 5, 6), F64)
    assert_close_to_reference(patched(x, t, context=context), unet(x, t, context=context), F64)
    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1))
    rows = [r for r in mk.patch(swin).left_alone if r.type == "WindowAttention"]
    assert len(rows) == 4 and all("SwinUNETR window attention" in r.detail for r in rows)


def test_benchmark_compare_reports_less_memory_kept():
    """The benchmark's measurement on the tiny networks (memory only; times are not tested): DynUNet keeps
    BatchNorm's inputs no more, the attention U-Net no N x N matrices."""
    from medattn_kernels.bench.monai import compare
    for key, at_least in (("DynUNet-2d", 1.4), ("AttentionUNet-2d", 1.2)):
        result = compare(SPECS[key], steps=1, warmup=0, isolated_peak=False, log=lambda *_: None)
        assert result["patched"]["patched"] == len(result["patched"]["report"]) > 0
        assert result["patched"]["kept_less"] >= at_least, (key, result["patched"]["kept_less"])


@pytest.mark.parametrize("head_channels", [32, 8])
def test_attention_keeps_no_more_than_monai_flash(head_channels):
    """Kept for backward: the N x N matrix gone (stock keeps it), and no more than MONAI's SDPA path: the op's
    [B, heads, N, d] output feeds out_proj per head instead of through a rearranged copy that Linear keeps."""
    from medattn_kernels.testing import saved_tensor_bytes
    stock = SpatialAttentionBlock(2, 32, num_head_channels=head_channels, norm_num_groups=4)
    flash = SpatialAttentionBlock(2, 32, num_head_channels=head_channels, norm_num_groups=4, use_flash_attention=True)
    flash.load_state_dict(stock.state_dict())
    patched, _ = patched_copy(stock)
    x = make_tensor((2, 32, 32, 30), requires_grad=True)
    kept = {name: saved_tensor_bytes(lambda t, m=m: m(t), x) for name, m in
            (("stock", stock), ("flash", flash), ("patched", patched))}
    assert kept["patched"] <= kept["flash"] and kept["stock"] >= 4 * kept["patched"], kept
    # A hooked (or subclassed: a LoRA adapter) out_proj is called as a module, and the hook sees the call.
    seen = []
    patched.attn.out_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    assert_close_to_reference(patched(x), stock(x).double(), torch.float32)
    assert seen == [torch.Size([2, 960, 32])]
