"""One network's training step, fused ops vs references, same weights and batch, in one process:
median step time (forward + loss + backward + Adam; the variants' steps interleaved), activations kept
for backward, and (optionally) the peak RSS of a step in a fresh process. Variants: fused; the references
with PyTorch's SDPA attention (networks with attention); the references as written.
`python benchmarks/bench_training_step.py --help`."""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from ..models import NETWORKS, build_model
from ..train import DEFAULT_MODEL_KWARGS, Trainer, kept_for_backward, measure_step_isolated


def variants(network: str) -> Dict[str, dict]:
    """{name: build_model kwargs} of the variants compared: the fused ops; the references with the
    attention through PyTorch's F.scaled_dot_product_attention on contiguous q/k/v (the best a PyTorch
    user has; networks with attention only); the references as written (naive attention)."""
    out = {"fused": {"fused": True}}
    key = network.lower().replace("_", "-")
    if "sdpa_attention" in inspect.signature(NETWORKS[key]).parameters:
        out["reference+sdpa"] = {"fused": False, "sdpa_attention": True}
    out["reference"] = {"fused": False}
    return out


def interleaved_times(steps_by_name: Dict[str, Callable[[], object]], steps: int, warmup: int = 1,
                      device: str = "cpu") -> Dict[str, List[float]]:
    """Seconds of each call, `warmup` untimed rounds then `steps` timed ones, the variants taking turns
    within every round so that machine load drifts hit them alike."""
    times: Dict[str, List[float]] = {name: [] for name in steps_by_name}
    for i in range(warmup + steps):
        for name, step in steps_by_name.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def compare(network: str = "din", size: int = 224, batch_size: int = 8, model_kwargs: Optional[dict] = None,
            steps: int = 4, warmup: int = 1, device: str = "cpu", isolated_peak: bool = True,
            seed: int = 0, log=print) -> Dict[str, Dict[str, float]]:
    kwargs = dict(DEFAULT_MODEL_KWARGS.get(network, {}), **(model_kwargs or {}))
    gen = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(batch_size, 1, size, size, generator=gen),
             "enhanced": torch.rand(batch_size, 1, size, size, generator=gen),
             "label": torch.randint(0, 3, (batch_size, size, size), generator=gen)}
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(seed)
    models = {name: build_model(network, **variant, **kwargs).to(device) for name, variant in variants(network).items()}
    for name, model in models.items():  # same weights everywhere
        if name != "fused":
            model.load_state_dict(models["fused"].state_dict())
    trainers = {name: Trainer(m, steps=1000) for name, m in models.items()}
    times = interleaved_times({name: (lambda t=t: t.step(batch)) for name, t in trainers.items()}, steps, warmup,
                              device)
    out = {}
    for name, model in models.items():
        out[name] = {"step_s": statistics.median(times[name]), "step_times": times[name],
                     "saved_bytes": kept_for_backward(model, batch)}
        log(f"{name:>15}: step {out[name]['step_s'] * 1e3:.0f} ms (all: "
            f"{', '.join(f'{t * 1e3:.0f}' for t in times[name])}), kept for backward "
            f"{out[name]['saved_bytes'] / 2**20:.1f} MiB")
    names = list(models)
    del models, trainers
    if isolated_peak:
        for name, variant in variants(network).items():
            r = measure_step_isolated(network, variant["fused"], size, batch_size, device,
                                      dict(kwargs, **{k: v for k, v in variant.items() if k != "fused"}), seed)
            out[name]["peak_total_bytes"] = r.get("peak_total_bytes")
            out[name]["peak_step_bytes"] = r.get("peak_bytes")
            log(f"{name:>15}: fresh-process step peak RSS {r.get('peak_total_bytes', 0) / 2**20:.0f} MiB "
                f"(rise over the pre-step RSS {r.get('peak_bytes', 0) / 2**20:.0f} MiB)")
    f = out["fused"]
    out["ratios"] = {}
    for name in names[1:]:
        r = out[name]
        ratios = {"speedup": r["step_s"] / f["step_s"], "saved": r["saved_bytes"] / max(f["saved_bytes"], 1)}
        if isolated_peak and f.get("peak_step_bytes") and r.get("peak_step_bytes"):
            ratios["peak_step"] = r["peak_step_bytes"] / f["peak_step_bytes"]
        out["ratios"][name] = ratios
        log(f"{name} / fused: step time {ratios['speedup']:.2f}x, kept for backward {ratios['saved']:.2f}x"
            + (f", step peak {ratios['peak_step']:.2f}x" if "peak_step" in ratios else ""))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_training_step", description=__doc__)
    p.add_argument("--network", default="din")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (median reported)")
    p.add_argument("--model-kwargs", default="{}", help="JSON overriding the demo's model configuration")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-isolated-peak", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    kwargs = json.loads(args.model_kwargs)
    print(f"{args.network} {dict(DEFAULT_MODEL_KWARGS.get(args.network, {}), **kwargs)}, {args.size}px, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads")
    out = compare(args.network, args.size, args.batch_size, kwargs, args.steps, device=args.device,
                  isolated_peak=not args.no_isolated_peak)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0
