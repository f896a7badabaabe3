"""`python -m medattn_kernels.bench` / `medattn-bench` / `medattn bench`: for each op and the current
device, a table of forward and forward+backward times, speed-ups against the reference and the best
PyTorch built-in, MiB kept for backward and error against the float64 reference; also JSON and CSV."""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from . import op_modules
from .harness import device_name, format_table, run_case, write_results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medattn-bench", description=__doc__)
    p.add_argument("--ops", default="all", help="comma-separated op names (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per measurement before stopping early")
    p.add_argument("--out", default="bench_results", help="directory for the JSON/CSV files")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--monai", action="store_true",
                   help="MONAI networks and SpatialAttentionBlock, stock vs medattn_kernels.patch (needs monai; "
                        "honours --quick, --device, --threads; more options: python -m medattn_kernels.bench.monai -h)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("medattn-bench: --device cuda requested but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.monai:
        try:
            from . import monai as monai_bench
        except ImportError as exc:
            print(f"medattn-bench: --monai needs monai (pip install 'medattn-kernels[monai]'): {exc}", file=sys.stderr)
            return 2
        monai_bench.run(args.quick, args.device)
        return 0
    modules = op_modules()
    names = sorted(modules) if args.ops == "all" else [n.strip() for n in args.ops.split(",")]
    unknown = [n for n in names if n not in modules]
    if unknown:
        print(f"medattn-bench: unknown op(s) {unknown}; available: {sorted(modules)}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    dev_name = device_name(args.device)
    print(f"device: {dev_name}  torch {torch.__version__}  dtype {args.dtype}  "
          f"{'quick' if args.quick else 'full'} run, median of up to {args.reps} reps after warm-up")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in names:
        results = []
        for case in modules[name].cases(args.device, dtype, args.quick):
            results += run_case(case, args.device, dtype, reps=args.reps, budget_s=args.budget)
            torch.manual_seed(0)
        print(f"\n## {name}\n")
        print(format_table(results))
        meta = {"device": dev_name, "torch": torch.__version__, "dtype": args.dtype, "quick": args.quick,
                "threads": torch.get_num_threads(), "time": stamp}
        paths = write_results(results, args.out, f"{name}_{args.device.split(':')[0]}_{args.dtype}", meta)
        print(f"\nwritten: {', '.join(paths)}")
        sys.stdout.flush()
    return 0
