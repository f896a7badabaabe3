"""High-resolution training: the largest input a network trains at (one step) under a memory cap, with
the fused ops and with the pure-PyTorch references.

Every (variant, size) runs in its own spawned process (medattn_kernels.train.measure_step_isolated):
a fresh model, a random batch, the step measured once under saved_tensors_hooks (memory kept for
backward, activations only) and once timed. Peak memory is the child's peak resident set (VmHWM, whole process) on
CPU, torch.cuda.max_memory_allocated on CUDA. A size fails when the child's resident set exceeds the
cap (the parent polls it every 20 ms and kills the child), when the child dies (the OOM killer), or
when it raises an out-of-memory error. Once a variant fails at a size, its larger sizes are skipped.

`python benchmarks/bench_highres.py --cap 16` (see --help) prints the table and the largest sizes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch

from ..train import DEFAULT_MODEL_KWARGS, measure_step_isolated

DEFAULT_SIZES = (224, 320, 448, 512)
GROWTH = 1.25  # beyond the listed sizes, grow by this factor (rounded to a multiple of 32)


def _next_size(size: int) -> int:
    return int(math.ceil(size * GROWTH / 32) * 32)


def run(network: str = "din", sizes: Sequence[int] = DEFAULT_SIZES, cap_gib: float = 16.0, batch_size: int = 1,
        variants: Sequence[str] = ("fused", "reference"), max_size: int = 0, device: str = "cpu",
        model_kwargs: Optional[dict] = None, seed: int = 0, timeout_s: float = 1200.0,
        log=print) -> List[Dict[str, object]]:
    """One row per (variant, size) tried. With max_size > max(sizes), a variant that fits every listed
    size keeps growing (x1.25) up to max_size while it fits."""
    cap = int(cap_gib * 2**30)
    kwargs = dict(DEFAULT_MODEL_KWARGS.get(network, {}), **(model_kwargs or {}))
    rows = []
    for variant in variants:
        todo = list(sizes)
        while todo:
            size = todo.pop(0)
            r = measure_step_isolated(network, variant == "fused", size, batch_size, device, kwargs, seed,
                                      cap_bytes=cap, timeout_s=timeout_s)
            row = {"network": network, "variant": variant, "size": size, "batch": batch_size, **r}
            rows.append(row)
            log(format_row(row))
            if not r.get("ok"):
                break
            if not todo and max_size and size < max_size:
                todo.append(min(_next_size(size), max_size))
    return rows


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def format_row(row) -> str:
    if row.get("ok"):
        return (f"{row['variant']:>9} {row['size']:>5}px  ok    kept for backward {_gib(row['saved_bytes']):>6} GiB  "
                f"peak RSS {_gib(row['peak_total_bytes']):>6} GiB (step +{_gib(row['peak_bytes'])})  "
                f"step {row['step_s']:.1f} s")
    return (f"{row['variant']:>9} {row['size']:>5}px  FAIL  {row.get('error', '')}  "
            f"(RSS seen {_gib(row.get('rss_seen_bytes'))} GiB)")


def summary(rows: List[Dict[str, object]], cap_gib: float, compare_size: int = 512) -> Dict[str, object]:
    """Largest size per variant under the cap, and the fused/reference ratios at compare_size."""
    out: Dict[str, object] = {"cap_gib": cap_gib}
    for variant in {r["variant"] for r in rows}:
        ok = [r["size"] for r in rows if r["variant"] == variant and r.get("ok")]
        out[f"largest_{variant}"] = max(ok) if ok else None
    at = {r["variant"]: r for r in rows if r["size"] == compare_size and r.get("ok")}
    if "fused" in at and "reference" in at:
        out[f"saved_ratio_at_{compare_size}"] = at["reference"]["saved_bytes"] / max(at["fused"]["saved_bytes"], 1)
        out[f"peak_ratio_at_{compare_size}"] = at["reference"]["peak_total_bytes"] / max(at["fused"]["peak_total_bytes"], 1)
        out[f"time_ratio_at_{compare_size}"] = at["reference"]["step_s"] / max(at["fused"]["step_s"], 1e-9)
    if out.get("largest_fused") and out.get("largest_reference"):
        out["side_ratio"] = out["largest_fused"] / out["largest_reference"]
    return out


def format_table(rows: List[Dict[str, object]]) -> str:
    header = "| variant | size | ok | kept for backward GiB | peak RSS GiB | step rise GiB | step s |"
    lines = [header, "|---|---:|:-:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("ok"):
            lines.append(f"| {r['variant']} | {r['size']} | yes | {_gib(r['saved_bytes'])} | {_gib(r['peak_total_bytes'])} "
                         f"| {_gib(r['peak_bytes'])} | {r['step_s']:.1f} |")
        else:
            lines.append(f"| {r['variant']} | {r['size']} | no: {r.get('error', '')[:60]} | - | "
                         f"{_gib(r.get('rss_seen_bytes'))} (seen) | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_highres", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="din")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated sides")
    p.add_argument("--max-size", type=int, default=0,
                   help="keep growing (x1.25) past the listed sizes up to this side while it fits (0: no)")
    p.add_argument("--cap", type=float, default=16.0, help="memory cap in GiB (default 16)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--variants", default="fused,reference")
    p.add_argument("--heads", type=int, default=None, help="override the network's attention heads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per size before giving up")
    p.add_argument("--json", default=None, help="write rows and summary to this file")
    args = p.parse_args(argv)
    extra = {} if args.heads is None else {"heads": args.heads}
    print(f"{args.network}, batch {args.batch_size}, cap {args.cap} GiB, model "
          f"{dict(DEFAULT_MODEL_KWARGS.get(args.network, {}), **extra)}, {torch.get_num_threads()} threads")
    rows = run(args.network, [int(s) for s in args.sizes.split(",")], args.cap, args.batch_size,
               args.variants.split(","), args.max_size, args.device, extra, timeout_s=args.timeout)
    print()
    print(format_table(rows))
    summ = summary(rows, args.cap)
    print(json.dumps(summ, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summ}, f, indent=1)
    return 0
