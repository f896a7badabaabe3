"""MONAI networks, stock vs `medattn_kernels.patch`: `medattn bench --monai` (and benchmarks/bench_monai.py).

Per network (UNETR, DynUNet(norm_name="batch"), MedNeXt and DiffusionModelUNet, MONAI's U-Net with
SpatialAttentionBlocks; 2-D and 3-D), a training step (forward, loss, backward, Adam) of the stock model and
of the patched one, built from the same weights and fed the same batch, timed interleaved in one process:
median step time, memory kept for backward (`testing.saved_tensor_bytes` over forward + loss with the batch
and the parameters as inputs: activations only) and the peak memory of one step in a fresh process
(`train.py`'s measure: the rise of the peak resident set on CPU, max_memory_allocated on CUDA). The
attention U-Net is also run as MONAI's ``use_flash_attention=True`` (F.scaled_dot_product_attention).
And per SpatialAttentionBlock at 32x32 and 64x64 (1024 and 4096 tokens): `cases` for the harness
(forward, forward+backward, kept for backward, error against float64) of stock, flash and patched blocks.

Needs monai (the `[monai]` extra). Network builders are shared with tests/test_monai_integration.py.
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..patch import patch
from ..testing import saved_tensor_bytes
from ..train import time_and_peak, use_threads
from .harness import Candidate, Case, device_name, format_table, run_case
from .training_step import interleaved_times

NETWORK_NAMES = ("UNETR", "DynUNet", "MedNeXt", "AttentionUNet")


@dataclass(frozen=True)
class NetworkSpec:
    """One network at one input size: `build(flash)` returns a fresh model (the weights are whatever the
    global RNG gives: seed before building); `batch` and `loss` make its training inputs and loss."""

    name: str
    spatial: tuple  # input size per spatial dim
    batch_size: int
    kwargs: tuple  # (key, value) pairs of the constructor's arguments

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial)

    @property
    def label(self) -> str:
        return f"{self.name} {self.spatial_dims}-D {'x'.join(map(str, self.spatial))} b{self.batch_size}"

    def build(self, flash: bool = False) -> nn.Module:
        from monai.networks.nets import UNETR, DiffusionModelUNet, DynUNet, MedNeXt

        kw, d = dict(self.kwargs), self.spatial_dims
        if self.name == "UNETR":
            return UNETR(1, 3, self.spatial, spatial_dims=d, **kw)
        if self.name == "DynUNet":
            levels = len(kw["filters"])
            return DynUNet(d, 1, 3, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                           upsample_kernel_size=[2] * (levels - 1), norm_name="batch", **kw)
        if self.name == "MedNeXt":
            return MedNeXt(d, in_channels=1, out_channels=3, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1,
                           blocks_up=(1, 1, 1, 1), **kw)
        if self.name == "AttentionUNet":  # MONAI's U-Net with SpatialAttentionBlocks at both levels and the middle
            return DiffusionModelUNet(d, 1, 1, num_res_blocks=1, attention_levels=(True, True),
                                      use_flash_attention=flash, **kw)
        raise ValueError(f"name: expected one of {NETWORK_NAMES}, got {self.name!r}")

    def batch(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> dict:
        shape = (self.batch_size, 1) + tuple(self.spatial)
        image = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if self.name == "AttentionUNet":  # a denoising step: predict the noise added at a random time
            noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            timesteps = torch.randint(0, 1000, (self.batch_size,), generator=generator)
            batch = {"args": (image + noise, timesteps), "target": noise}
        else:
            labels = torch.randint(0, 3, (self.batch_size,) + shape[2:], generator=generator)
            batch = {"args": (image,), "target": labels}
        return {"args": tuple(t.to(device) for t in batch["args"]), "target": batch["target"].to(device)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(*batch["args"])
        if self.name == "AttentionUNet":
            return F.mse_loss(out, batch["target"])
        return F.cross_entropy(out, batch["target"])


def network_specs(quick: bool = False, tiny: bool = False) -> List[NetworkSpec]:
    """The benchmarked configurations (tiny: the tests' sizes, seconds in float64; quick: small)."""
    specs = []
    for d in (2, 3):
        if tiny:
            unetr = dict(feature_size=8, hidden_size=32, mlp_dim=64, num_heads=4)
            # UNETR's patches are 16 pixels wide: 32 x 32 (x 16) gives it 4 tokens.
            sizes = {"UNETR": (32, 32, 16)[:d], "DynUNet": 12 if d == 3 else 20, "MedNeXt": 16,
                     "AttentionUNet": 8 if d == 3 else 12}
            batch, dyn, med = 2, [4, 8, 16], dict(init_filters=4, kernel_size=7)
            attn = dict(channels=(8, 16), norm_num_groups=4, num_head_channels=4)
        else:
            unetr = dict(feature_size=16, hidden_size=192, mlp_dim=384, num_heads=4)
            if quick:
                sizes = {"UNETR": 64 if d == 2 else 32, "DynUNet": 64 if d == 2 else 24, "MedNeXt": 64 if d == 2 else 32,
                         "AttentionUNet": 32 if d == 2 else 8}
            else:
                sizes = {"UNETR": 128 if d == 2 else 64, "DynUNet": 128 if d == 2 else 64,
                         "MedNeXt": 128 if d == 2 else 32, "AttentionUNet": 64 if d == 2 else 16}
            batch = 4 if d == 2 else 1
            dyn = [16, 32, 64, 128] if d == 2 else [8, 16, 32, 64]
            med = dict(init_filters=16 if d == 2 else 8, kernel_size=7)
            attn = dict(channels=(32, 64), norm_num_groups=8, num_head_channels=32)
        configs = {"UNETR": unetr, "DynUNet": dict(filters=dyn), "MedNeXt": med, "AttentionUNet": attn}
        for name in NETWORK_NAMES:
            b = 2 if name == "AttentionUNet" and d == 2 and not tiny else batch
            size = sizes[name]
            spatial = tuple(size) if isinstance(size, tuple) else (size,) * d
            specs.append(NetworkSpec(name, spatial, b, tuple(sorted(configs[name].items()))))
    return specs


def build_variants(spec: NetworkSpec, variants=("stock", "patched"), seed: int = 0, device="cpu",
                   dtype=torch.float32) -> Dict[str, nn.Module]:
    """The network as each variant, all with the stock model's initial weights: "stock", "patched"
    (stock + `patch`; its report is ``model.medattn_report``), "flash" (MONAI's use_flash_attention=True)."""
    torch.manual_seed(seed)
    stock = spec.build().to(device=device, dtype=dtype)
    models = {}
    for variant in variants:
        if variant == "stock":
            models[variant] = stock
        elif variant == "patched":
            model = copy.deepcopy(stock)
            model.medattn_report = patch(model)
            models[variant] = model
        elif variant == "flash":
            model = spec.build(flash=True).to(device=device, dtype=dtype)
            model.load_state_dict(stock.state_dict())
            models[variant] = model
        else:
            raise ValueError(f"variants: expected 'stock', 'patched' or 'flash', got {variant!r}")
    return models


def training_step(spec: NetworkSpec, model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = spec.loss(model, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def kept_for_backward(spec: NetworkSpec, model: nn.Module, batch: dict) -> int:
    """Activation bytes autograd keeps for the step (batch and parameters excluded)."""
    return saved_tensor_bytes(lambda b, _params: spec.loss(model, b), batch, list(model.parameters()))


def _isolated_peak(queue, spec: NetworkSpec, variant: str, device: str, threads: int, seed: int):
    """Child process: one training step of a freshly built variant; the rise of peak memory over the
    memory held before the step."""
    try:
        use_threads(threads)
        model = build_variants(spec, ("stock", variant) if variant != "stock" else ("stock",), seed, device)[variant]
        batch = spec.batch(torch.Generator().manual_seed(seed + 1), device=device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        _, peak = time_and_peak(lambda: training_step(spec, model, optimizer, batch), device)
        queue.put({"ok": True, "peak_bytes": peak})
    except (RuntimeError, MemoryError) as exc:
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})


def isolated_peak_bytes(spec: NetworkSpec, variant: str, device: str = "cpu", seed: int = 0,
                        timeout_s: float = 900.0) -> Optional[int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_peak, args=(queue, spec, variant, device, torch.get_num_threads(), seed))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception:  # noqa: BLE001  (the child died or hung)
        result = {"ok": False}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result.get("peak_bytes") if result.get("ok") else None


def compare(spec: NetworkSpec, variants=("stock", "patched"), steps: int = 5, warmup: int = 1, device: str = "cpu",
            isolated_peak: bool = True, seed: int = 0, log=print) -> Dict[str, dict]:
    """Training step of each variant, same initial weights and batch, interleaved; see the module docstring."""
    models = build_variants(spec, variants, seed, device)
    batch = spec.batch(torch.Generator().manual_seed(seed + 1), device=device)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    times = interleaved_times({name: (lambda m=model, o=optimizers[name]: training_step(spec, m, o, batch))
                               for name, model in models.items()}, steps, warmup, device)
    out = {}
    for name, model in models.items():
        report = getattr(model, "medattn_report", None)
        out[name] = {"step_s": statistics.median(times[name]), "kept_bytes": kept_for_backward(spec, model, batch),
                     "patched": len(report) if report is not None else 0, "report": report}
    del models, optimizers
    if isolated_peak:
        for name in out:
            out[name]["peak_bytes"] = isolated_peak_bytes(spec, name, device, seed)
    stock = out["stock"]
    for name, r in out.items():
        r["speedup"] = stock["step_s"] / r["step_s"]
        r["kept_less"] = stock["kept_bytes"] / max(r["kept_bytes"], 1)
        peak = r.get("peak_bytes")
        r["peak_less"] = stock["peak_bytes"] / peak if peak and stock.get("peak_bytes") else float("nan")
        log(f"  {spec.label:<34} {name:<8} step {r['step_s'] * 1e3:8.1f} ms ({r['speedup']:.2f}x)  kept "
            f"{r['kept_bytes'] / 2**20:8.1f} MiB ({r['kept_less']:.2f}x less)"
            + (f"  peak {peak / 2**20:8.1f} MiB ({r['peak_less']:.2f}x less)" if peak else ""))
    return out


def format_network_table(rows: List[tuple]) -> str:
    """rows: (spec, variant, result) -> a Markdown table."""
    header = ["network", "variant", "patched", "step ms", "x faster", "kept MiB", "x less kept", "peak MiB", "x less peak"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for spec, variant, r in rows:
        peak = r.get("peak_bytes")
        cells = [spec.label, variant, str(r["patched"]) if variant == "patched" else "-",
                 f"{r['step_s'] * 1e3:.1f}", f"{r['speedup']:.2f}", f"{r['kept_bytes'] / 2**20:.1f}",
                 f"{r['kept_less']:.2f}", f"{peak / 2**20:.1f}" if peak else "-",
                 f"{r['peak_less']:.2f}" if peak else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- SpatialAttentionBlock cases (the harness)
def cases(device: str, dtype: torch.dtype, quick: bool) -> List[Case]:
    """SpatialAttentionBlock (64 channels, one 64-channel head, as in the attention U-Net's second level)
    on 32x32 and 64x64 maps: stock (MONAI's einsum + softmax), MONAI's use_flash_attention=True and the
    patched block, same weights."""
    from monai.networks.blocks import SpatialAttentionBlock

    sides = [16, 32] if quick else [32, 64]
    out = []
    for side in sides:
        torch.manual_seed(0)
        blocks = {"stock": SpatialAttentionBlock(2, 64, num_head_channels=64, norm_num_groups=8)}
        blocks["flash"] = SpatialAttentionBlock(2, 64, num_head_channels=64, norm_num_groups=8, use_flash_attention=True)
        blocks["flash"].load_state_dict(blocks["stock"].state_dict())
        blocks["patched"] = copy.deepcopy(blocks["stock"])
        patch(blocks["patched"])
        blocks = {k: b.to(device=device, dtype=dtype) for k, b in blocks.items()}
        oracle = copy.deepcopy(blocks["stock"]).double()

        def make(side=side):
            return {"x": torch.randn(2, 64, side, side, device=device, dtype=dtype).requires_grad_()}

        out.append(Case(
            op="SpatialAttentionBlock", shape=f"(2, 64, {side}, {side}), {side * side} tokens", make_inputs=make,
            candidates=[Candidate("MONAI stock", lambda x, b=blocks["stock"]: b(x), "reference"),
                        Candidate("MONAI use_flash_attention", lambda x, b=blocks["flash"]: b(x), "builtin"),
                        Candidate("medattn patch", lambda x, b=blocks["patched"]: b(x))],
            reference64=lambda x, b=oracle: b(x)))
    return out


# ---------------------------------------------------------------- `medattn bench --monai`
def run(quick: bool = False, device: str = "cpu", steps: int = 5, reps: int = 7, isolated_peak: bool = True,
        networks: Optional[List[str]] = None, log=print) -> dict:
    log(f"device: {device_name(device)}  torch {torch.__version__}  fp32; training step = forward + loss + "
        f"backward + Adam, median of {steps} interleaved steps after 1 warm-up")
    rows, results = [], {}
    for spec in network_specs(quick):
        if networks and spec.name not in networks:
            continue
        variants = ("stock", "flash", "patched") if spec.name == "AttentionUNet" else ("stock", "patched")
        res = compare(spec, variants, steps=steps, device=device, isolated_peak=isolated_peak, log=log)
        results[spec.label] = res
        rows += [(spec, v, res[v]) for v in variants]
        log(str(res["patched"]["report"]))
    block_results = []
    for case in cases(device, torch.float32, quick):
        block_results += run_case(case, device, torch.float32, reps=reps)
    log("\n## MONAI networks, training step: stock vs patched (same weights and batch)\n")
    log(format_network_table(rows))
    log("\n## SpatialAttentionBlock: stock, use_flash_attention=True, patched\n")
    log(format_table(block_results))
    return {"networks": results, "blocks": block_results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medattn bench --monai", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--networks", default=None, help=f"comma-separated subset of {NETWORK_NAMES}")
    p.add_argument("--no-isolated-peak", action="store_true", help="skip the fresh-process peak measurement")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, args.device, args.steps, isolated_peak=not args.no_isolated_peak,
        networks=args.networks.split(",") if args.networks else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
