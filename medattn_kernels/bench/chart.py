"""The speed-up chart of `make bench`: for every case, the fused op's forward+backward speed-up against
the best PyTorch path of that case (the fastest built-in or reference measured in the same run), one bar
per ISA pass, on a log scale with the break-even line at 1."""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Tuple


def _speedups(result_dir: str) -> Tuple[Dict[str, float], str]:
    """{"op: shape [backend]": fwd+bwd speed-up of each fused candidate vs the best PyTorch path} and the
    machine line of the run."""
    out, device = {}, ""
    for path in sorted(glob.glob(os.path.join(result_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        device = data.get("meta", {}).get("device", device)
        for r in data.get("results", []):
            if r.get("kind") != "fused" or r.get("error"):
                continue
            ratio = r.get("vs_builtin")
            if ratio is None or ratio != ratio:  # forward-only case: its forward speed-up
                ratio = r.get("fwd_vs_builtin")
            if ratio is not None and ratio == ratio:
                label = f"{r['op']}: {r['shape']}"
                if r["backend"] not in ("medattn cpu", "medattn triton"):
                    label += f" [{r['backend'].replace('medattn ', '')}]"
                out[label] = ratio
    return out, device


def speedup_chart(result_dirs: Dict[str, str], path: str) -> str:
    """Draws result_dirs {ISA pass: directory of JSON results} into a PNG at path; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_pass = {isa: _speedups(d) for isa, d in result_dirs.items()}
    labels: List[str] = []
    for speedups, _ in per_pass.values():
        labels += [k for k in speedups if k not in labels]
    height = max(4.0, 0.32 * len(labels) * max(1, len(per_pass)) / 1.6)
    fig, ax = plt.subplots(figsize=(11, height))
    bar = 0.8 / max(1, len(per_pass))
    for i, (isa, (speedups, _)) in enumerate(per_pass.items()):
        ys = [j + i * bar for j in range(len(labels))]
        vals = [speedups.get(k, float("nan")) for k in labels]
        ax.barh(ys, vals, height=bar, label=f"{isa.upper()} pass", left=0)
        for y, v in zip(ys, vals):
            if v == v:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_yticks([j + bar * (len(per_pass) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("forward+backward speed-up vs the best PyTorch path (same run; > 1: medattn faster)")
    device = next((d for _, d in per_pass.values() if d), "")
    ax.set_title(f"medattn CPU kernels vs the best PyTorch path\n{device.split(', ISA pass')[0]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
