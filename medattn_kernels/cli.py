"""`medattn` command line: `medattn demo` (train a network on real MRI with the fused ops and with the
pure-PyTorch references, compare), `medattn bench` (the op benchmarks), `medattn info` (backends)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from ._entry import quiet_on_closed_pipe

DEFAULT_LR = 3e-3


def _demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="train a network on MNI152 MRI slices, fused ops vs references",
                       description="Trains a network (default DIN) on axial MNI152 T1 slices (labels: background, "
                                   "grey matter, white matter; every 5th brain slice held out) from the same "
                                   "initial weights and batches: with the fused medattn ops, with the pure-PyTorch "
                                   "references using PyTorch's SDPA for attention (networks with attention), and "
                                   "with the references as written. Checks first that the first step's loss and "
                                   "gradients of every variant match a float64 reference (on the variant's own "
                                   "branches at kinked activations; crossings counted); prints per-class Dice on "
                                   "the held-out slices, time per step, memory kept for backward and peak memory "
                                   "per step; saves predictions.png and loss.png.")
    p.add_argument("--network", default="din", help="din, joint-attention-dense-unet, mslkseg, ds2f, cross-modal-sad")
    p.add_argument("--size", type=int, default=96, help="slice side in pixels (default 96)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-reference", action="store_true", help="train only the fused model")
    p.add_argument("--no-sdpa", action="store_true", help="skip the references-with-SDPA-attention variant")
    p.add_argument("--out", default="demo_out", help="output directory for the PNGs (default demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--timing-rounds", type=int, default=10,
                   help="interleaved rounds (one step of every variant each) timed after training (default 10; "
                        "0: report each training loop's median step instead)")
    p.add_argument("--no-isolated-memory", action="store_true",
                   help="skip the peak-memory measurement in a fresh subprocess (CPU peak resident set)")
    return p


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _train_variant(name, model, train, val, args, device, data_seed):
    """Train one copy through medattn_kernels.train.fit; Dice on the held-out slices, step times, memory."""
    from .data.mri import CLASS_NAMES
    from .train import dice_per_class, fit, kept_for_backward, make_batch, predict

    trainer = fit(model, train, args.steps, args.batch_size, lr=args.lr, seed=data_seed, device=device,
                  progress=True, desc=f"{name:>9}")
    pred = predict(model, val, device, args.batch_size)
    dice = dice_per_class(pred, val.label, len(CLASS_NAMES))
    probe = make_batch(train, torch.arange(min(args.batch_size, len(train))), device)
    saved = kept_for_backward(model, probe)
    times = trainer.step_times
    steady = times[min(3, len(times) - 1):]  # skip warm-up steps (allocator, thread pools)
    return {"dice": dice, "pred": pred, "losses": trainer.history, "training_step_s": statistics.median(steady),
            "saved_bytes": saved, "model": model}


TIMING_WARMUP = 2


def _interleaved_step_times(results, batch, args, device):
    """Median step time of each trained variant (a copy of it, with a fresh Adam), the variants taking turns
    within every round on the same batch: on a shared or noisy machine, load that drifts over the minutes
    each variant's training takes would otherwise land on one variant and not the others."""
    import copy

    from .bench.training_step import interleaved_times
    from .train import Trainer

    trainers = {name: Trainer(copy.deepcopy(res["model"]), lr=args.lr, steps=1000) for name, res in results.items()}
    times = interleaved_times({name: (lambda t=t: t.step(batch)) for name, t in trainers.items()},
                              args.timing_rounds, TIMING_WARMUP, str(device))
    return {name: statistics.median(t) for name, t in times.items()}


def _first_step_check(models, batch):
    """The first training step's loss and gradient vector of each float32 variant against the float64
    reference network with the same weights and batch: what is checkable before training diverges (over
    hundreds of steps, float32 rounding differences between any two implementations grow chaotically).
    The float64 network takes each variant's own branches at kinked activations
    (`medattn_kernels.testing.network_float32_errors`). Returns the float64 loss and, per variant,
    (loss error, gradient error, kink crossings)."""
    import copy

    from .testing import float64_batch, loss_and_gradients, network_float32_errors

    reference = [m for name, m in models if name == "reference"]
    oracle_model = copy.deepcopy(reference[0] if reference else models[0][1]).double()
    if not reference:
        for module in oracle_model.modules():  # fused-only run: the oracle runs the references
            if hasattr(module, "fused"):
                module.fused = False
    oracle = loss_and_gradients(oracle_model, float64_batch(batch))
    rows = {name: network_float32_errors(model, batch, oracle_model, oracle) for name, model in models}
    return float(oracle[0]), rows


def _save_figures(out_dir, val, results, show=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    picks = torch.linspace(0, len(val) - 1, show + 2).round().long()[1:-1].tolist()
    cols = ["input", "enhanced (CLAHE)", "ground truth"] + [f"prediction ({n})" for n in results]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.6 * len(cols), 2.6 * len(picks)), squeeze=False)
    for r, i in enumerate(picks):
        panels = [(val.image[i, 0], "gray"), (val.enhanced[i, 0], "gray"), (val.label[i], "viridis")]
        panels += [(res["pred"][i], "viridis") for res in results.values()]
        for c, (img, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.numpy(), cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else 2, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(f"z = {int(val.slice_index[i])}", fontsize=9)
    fig.tight_layout()
    pred_path = os.path.join(out_dir, "predictions.png")
    fig.savefig(pred_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        ax.plot(res["losses"], label=name, alpha=0.8, lw=1)
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log"), ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    loss_path = os.path.join(out_dir, "loss.png")
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)
    return pred_path, loss_path


def demo(args) -> int:
    from .data.mri import CLASS_NAMES, load_mni_splits
    from .models import build_model
    from .train import DEFAULT_MODEL_KWARGS, measure_step_isolated

    if args.timing_rounds < 0:
        print(f"medattn demo: --timing-rounds: expected >= 0 (0: report the training loop's median step), "
              f"got {args.timing_rounds}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("medattn demo: --device cuda requested but no CUDA GPU is available", file=sys.stderr)
        return 2
    network = args.network.lower().replace("_", "-")
    model_kwargs = DEFAULT_MODEL_KWARGS.get(network, {})
    t0 = time.perf_counter()
    train, val = load_mni_splits(args.size)
    print(f"MNI152 2009c T1, axial slices {args.size}x{args.size}: {len(train)} training, {len(val)} held out "
          f"(every 5th); classes {', '.join(CLASS_NAMES)}  [{time.perf_counter() - t0:.1f} s]")

    torch.manual_seed(args.seed)
    fused_model = build_model(network, fused=True, **model_kwargs).to(device)
    initial = {k: v.clone() for k, v in fused_model.state_dict().items()}
    n_params = sum(p.numel() for p in fused_model.parameters())
    print(f"{type(fused_model).__name__} {model_kwargs}: {n_params / 1e6:.2f} M parameters; {args.steps} steps, "
          f"batch {args.batch_size}, Adam lr {args.lr}, device {device} ({torch.get_num_threads()} threads)")

    variants = [("fused", fused_model)]
    variant_kwargs = {"fused": {"fused": True}}
    if not args.no_reference:
        from .bench.training_step import variants as step_variants

        for name, kwargs in step_variants(network).items():
            if name == "fused" or (name == "reference+sdpa" and args.no_sdpa):
                continue
            model = build_model(network, **kwargs, **model_kwargs).to(device)
            model.load_state_dict(initial)  # same initial weights
            variants.append((name, model))
            variant_kwargs[name] = kwargs

    from .testing import NETWORK_FLOAT32_MAX_CROSSINGS, NETWORK_FLOAT32_TOLERANCE
    from .train import draw_batch

    first = draw_batch(torch.Generator().manual_seed(args.seed + 2), train, args.batch_size, device)
    loss64, first_rows = _first_step_check(variants, first)
    print(f"first step, same weights and batch, against the float64 reference network (loss {loss64:.6f}) "
          "taking each variant's own branches at kinked activations: relative error of the loss / of the whole "
          "gradient vector; activation inputs on the other side of zero than in float64")
    for name, (e_loss, e_grad, crossings) in first_rows.items():
        verdict = "agree within" if max(e_loss, e_grad) <= NETWORK_FLOAT32_TOLERANCE else "DISAGREE beyond"
        many = f" (DISAGREE: more than {NETWORK_FLOAT32_MAX_CROSSINGS}, not rounding)" \
            if crossings > NETWORK_FLOAT32_MAX_CROSSINGS else ""
        print(f"  {name:>15}: {e_loss:.1e} / {e_grad:.1e}  ({verdict} the float32 tolerance "
              f"{NETWORK_FLOAT32_TOLERANCE:.0e}); {crossings} crossing(s){many}")

    results = {}
    for name, model in variants:
        torch.manual_seed(args.seed + 1)
        results[name] = _train_variant(name, model, train, val, args, device, data_seed=args.seed + 2)
        res = results[name]
        dice = res["dice"]
        print(f"  {name}: held-out Dice " + ", ".join(f"{n} {d:.4f}" for n, d in zip(CLASS_NAMES, dice.tolist()))
              + f"; mean GM/WM {dice[1:].mean():.4f}; median training step {res['training_step_s'] * 1e3:.0f} ms")

    if args.timing_rounds > 0:
        print(f"time per step: {args.timing_rounds} rounds after {TIMING_WARMUP} warm-up rounds, one step of every "
              "variant per round (same batch), medians")
        for name, step_s in _interleaved_step_times(results, first, args, device).items():
            results[name]["step_s"] = step_s
    else:
        for res in results.values():
            res["step_s"] = res["training_step_s"]

    if not args.no_isolated_memory:
        print("peak memory per step: one step of a fresh model in its own process "
              + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(rise of the peak resident set, VmHWM, over the pre-step RSS)"))
        for name, _ in variants:
            kwargs = variant_kwargs[name]
            m = measure_step_isolated(network, kwargs["fused"], args.size, args.batch_size, str(device),
                                      dict(model_kwargs, **{k: v for k, v in kwargs.items() if k != "fused"}),
                                      seed=args.seed, threads=torch.get_num_threads())
            results[name]["peak_bytes"] = m.get("peak_bytes") if m.get("ok") else None

    pred_path, loss_path = _save_figures(args.out, val, results)

    print()
    names = list(results)
    header = f"{'':<26}" + "".join(f"{n:>22}" for n in names)
    print(header)
    print("-" * len(header))

    def row(label, values, fmt, better=None):
        """better: "lower" adds each value's ratio to the fused one (how many times the fused is better)."""
        cells = []
        for i, v in enumerate(values):
            text = fmt(v)
            if better == "lower" and i > 0 and v and values[0]:
                text += f" ({v / values[0]:.2f}x)"
            cells.append(f"{text:>22}")
        print(f"{label:<26}" + "".join(cells))

    vals = list(results.values())
    for c, cname in enumerate(CLASS_NAMES):
        row(f"Dice {cname}", [r["dice"][c].item() for r in vals], lambda v: f"{v:.4f}")
    row("Dice mean GM/WM", [r["dice"][1:].mean().item() for r in vals], lambda v: f"{v:.4f}")
    row("final loss (mean last 10)", [statistics.mean(r["losses"][-10:]) for r in vals], lambda v: f"{v:.4f}")
    row("first-step error vs f64", [max(first_rows[n][:2]) for n in names], lambda v: f"{v:.1e}")
    row("time per step", [r["step_s"] for r in vals], lambda v: f"{v * 1e3:.0f} ms", "lower")
    row("kept for backward", [r["saved_bytes"] for r in vals], _fmt_bytes, "lower")
    if not args.no_isolated_memory:
        row("peak memory per step", [r.get("peak_bytes") for r in vals], _fmt_bytes, "lower")
    if len(vals) > 1:
        print("(x): the variant's time or memory over the fused one's. Dice after training: float32 rounding "
              "differences between implementations grow chaotically over hundreds of steps, so trained weights "
              "differ; the first-step errors above are the checkable parity.")
    print(f"saved {pred_path} and {loss_path}; total {time.perf_counter() - t0:.0f} s")
    return 0


@quiet_on_closed_pipe
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="medattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    sub.add_parser("bench", help="op benchmarks (same options as medattn-bench)", add_help=False)
    sub.add_parser("info", help="backends available per op, and why")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # pass everything through to the benchmark CLI
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info
        info()
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
