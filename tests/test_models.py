"""The five reference networks: with the same weights and inputs, fused=True (medattn kernels) and
fused=False (pure-PyTorch references) give the same outputs, loss and parameter gradients (float64);
plus shapes, the demo interface and MS-LKSeg's reparameterisation."""
import inspect

import pytest
import torch

from medattn_kernels.models import NETWORKS, build_model
from medattn_kernels.testing import (NETWORK_FLOAT32_MAX_CROSSINGS, NETWORK_FLOAT32_TOLERANCE, TOLERANCES,
                                     assert_close_to_reference, network_float32_errors, rel_error)

# Small configurations (odd-ish sizes: 48 px is not a power of two, so every stride-2 / pool / upsample
# path meets a non-divisible size somewhere).
CONFIGS = {
    "din": dict(widths=(8, 12, 16, 24), stem_width=8, depth=1, heads=2),
    "joint-attention-dense-unet": dict(stem_width=8, growth=4, layers=2, levels=2, heads=2),
    "mslkseg": dict(widths=(8, 8, 12, 16, 16), blocks=2, kernel_size=21),
    "ds2f": dict(widths=(8, 12, 16)),
    "cross-modal-sad": dict(stem_width=8, widths=(8, 12, 16, 24), heads=2),
}
SIZE = {"din": 48, "joint-attention-dense-unet": 40, "mslkseg": 48, "ds2f": 48, "cross-modal-sad": 40}


def make_batch(size, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 1, size, size, generator=g, dtype=dtype)
    return {"image": image, "enhanced": (image + 0.3 * torch.rand(batch, 1, size, size, generator=g, dtype=dtype)) / 1.3,
            "label": torch.randint(0, 3, (batch, size, size), generator=g)}


def twin_models(name, dtype=torch.float64):
    torch.manual_seed(0)
    fused = build_model(name, fused=True, **CONFIGS[name]).to(dtype)
    ref = build_model(name, fused=False, **CONFIGS[name]).to(dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def flat_tensors(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for k in sorted(outputs) for t in flat_tensors(outputs[k])]
    return [t for o in outputs for t in flat_tensors(o)]


def test_every_network_has_a_config():
    assert set(CONFIGS) == set(NETWORKS)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_fused_matches_reference(name):
    """Same weights, same batch: outputs, loss and every parameter gradient agree in float64."""
    fused, ref = twin_models(name)
    batch = make_batch(SIZE[name])
    loss_f, out_f = fused.training_loss(batch)
    loss_r, out_r = ref.training_loss(batch)
    tensors_f, tensors_r = flat_tensors(out_f), flat_tensors(out_r)
    assert len(tensors_f) == len(tensors_r) > 0
    for i, (a, b) in enumerate(zip(tensors_f, tensors_r)):
        assert_close_to_reference(a, b, torch.float64, f"{name} output {i}")
    assert torch.isfinite(loss_f)
    assert_close_to_reference(loss_f, loss_r, torch.float64, f"{name} loss")
    loss_f.backward()
    loss_r.backward()
    named_f, named_r = dict(fused.named_parameters()), dict(ref.named_parameters())
    assert named_f.keys() == named_r.keys()
    grads_f = [named_f[k].grad for k in named_f]
    grads_r = [named_r[k].grad for k in named_f]
    assert all(g is not None for g in grads_f + grads_r), "every parameter gets a gradient"
    # Whole gradient vector against the reference, then each parameter with a floor at 1e-6 of the
    # largest gradient: some gradients are analytically ~0 (a bias followed by BatchNorm), and their
    # rounding noise relative to themselves means nothing.
    all_f, all_r = torch.cat([g.flatten() for g in grads_f]), torch.cat([g.flatten() for g in grads_r])
    assert_close_to_reference(all_f, all_r, torch.float64, f"{name} gradients")
    scale = all_r.abs().max().item()
    for key, g_f, g_r in zip(named_f, grads_f, grads_r):
        err = (g_f - g_r).abs().max().item() / max(g_r.abs().max().item(), 1e-6 * scale)
        assert err <= TOLERANCES[torch.float64], f"{name}: grad of {key}: relative error {err:.3e}"


SDPA_NETWORKS = [n for n in sorted(NETWORKS) if "sdpa_attention" in inspect.signature(NETWORKS[n]).parameters]


@pytest.mark.parametrize("name", SDPA_NETWORKS)
def test_sdpa_variant_matches_reference(name):
    """The benchmarks' third variant (references with PyTorch's SDPA attention) computes the same network."""
    _, ref = twin_models(name)
    sdpa = build_model(name, fused=False, sdpa_attention=True, **CONFIGS[name]).double()
    sdpa.load_state_dict(ref.state_dict())
    batch = make_batch(SIZE[name])
    loss_s, out_s = sdpa.training_loss(batch)
    loss_r, out_r = ref.training_loss(batch)
    assert_close_to_reference(out_s["logits"], out_r["logits"], torch.float64, f"{name} sdpa logits")
    loss_s.backward()
    loss_r.backward()
    grads_s = torch.cat([p.grad.flatten() for p in sdpa.parameters()])
    grads_r = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert_close_to_reference(grads_s, grads_r, torch.float64, f"{name} sdpa gradients")


def test_sdpa_variant_needs_the_unfused_model():
    with pytest.raises(ValueError, match="sdpa: expected False with fused=True"):
        build_model("din", fused=True, sdpa_attention=True, **CONFIGS["din"])


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_float32_fused_close_to_float64_reference(name):
    """The fused float32 network against the float64 reference network (same weights): outputs, loss
    and the whole gradient vector (float32 error grows through the depth: ~1e-6 for DIN at 64 px)."""
    fused, ref = twin_models(name)
    fused = fused.float()
    batch = make_batch(SIZE[name])
    batch32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        _, out_f = fused.training_loss(batch32)
        _, out_r = ref.training_loss(batch)
    assert rel_error(out_f["logits"], out_r["logits"]) < NETWORK_FLOAT32_TOLERANCE
    # gradients against the float64 network on the float32 one's branches at kinked activations
    e_loss, e_grad, crossings = network_float32_errors(fused, batch32, ref)
    assert crossings <= NETWORK_FLOAT32_MAX_CROSSINGS
    assert e_loss < NETWORK_FLOAT32_TOLERANCE
    assert e_grad < NETWORK_FLOAT32_TOLERANCE, f"gradient vector: relative error {e_grad:.2e} ({crossings} kink crossings)"


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_shapes_and_eval_mode(name):
    torch.manual_seed(1)
    model = build_model(name, fused=True, **CONFIGS[name])
    batch = make_batch(SIZE[name], batch=1, dtype=torch.float32, seed=3)
    loss, out = model.training_loss(batch)
    assert out["logits"].shape == (1, 3, SIZE[name], SIZE[name])
    assert loss.ndim == 0 and torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        logits = model(*model.inputs_of(batch))["logits"]
    assert logits.shape == (1, 3, SIZE[name], SIZE[name]) and torch.isfinite(logits).all()


def test_mslkseg_reparameterize_keeps_eval_output():
    torch.manual_seed(0)
    model = build_model("mslkseg", fused=True, **CONFIGS["mslkseg"]).double()
    batch = make_batch(SIZE["mslkseg"], seed=5)
    for _ in range(2):  # move the BatchNorm running statistics away from their initial values
        model.training_loss(batch)
    model.eval()
    with torch.no_grad():
        before = model(batch["image"])["logits"]
        after = model.reparameterize()(batch["image"])["logits"]
    assert_close_to_reference(after, before, torch.float64, "reparameterised MSLKSeg")


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="name: expected one of"):
        build_model("unet3000")


def test_cross_modal_needs_all_modalities():
    model = build_model("cross-modal-sad", **CONFIGS["cross-modal-sad"])
    with pytest.raises(ValueError, match="images: expected 2 modalities"):
        model(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("activated_bn", [True, False])
def test_din_block_choice(activated_bn):
    """DIN's conv blocks: activated batch norm (default) or conv-BN-ReLU, the same in both variants; the
    fused variant with activated batch norm keeps one map per block for backward instead of two."""
    from medattn_kernels.nn import ActivatedBatchNorm2d
    from medattn_kernels.train import kept_for_backward
    torch.manual_seed(0)
    config = dict(CONFIGS["din"], activated_bn=activated_bn)
    fused = build_model("din", fused=True, **config).double()
    ref = build_model("din", fused=False, **config).double()
    ref.load_state_dict(fused.state_dict())
    n_abn = sum(isinstance(m, ActivatedBatchNorm2d) for m in fused.modules())
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in fused.modules())
    assert (n_abn > 0 and n_bn == 0) if activated_bn else (n_abn == 0 and n_bn > 0)
    batch = make_batch(SIZE["din"])
    loss_f, _ = fused.training_loss(batch)
    loss_r, _ = ref.training_loss(batch)
    assert_close_to_reference(loss_f, loss_r, torch.float64, "loss")
    kept_f, kept_r = kept_for_backward(fused, batch), kept_for_backward(ref, batch)
    if activated_bn:
        # At 48 px attention is a small share; the blocks' second maps are most of the difference.
        assert kept_f < 0.7 * kept_r, (kept_f, kept_r)
    else:
        assert kept_f < kept_r
