"""`python -m medattn_kernels.bench` / `medattn-bench` / `medattn bench`: for each op and the current
device, a table of forward and forward+backward times, speed-ups against the reference and the best
PyTorch path, MiB kept for backward, error against the float64 reference and the achieved rate against
the machine's peak measured in the same run; also JSON and CSV.

`--isa-passes all` (or `vector`: AVX2 and AVX512 only) reruns the CPU benchmark once per ISA pass this CPU
supports, each in its own process
(ATEN_CPU_CAPABILITY=<pass>, with MKL and oneDNN capped to the same ISA so that the PyTorch baselines run
their code for that ISA too), into <out>/<pass>/, and draws <out>/speedup.png: each op's speed-up against
the best PyTorch path, per ISA pass.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch

from .._entry import quiet_on_closed_pipe
from . import op_modules
from .harness import format_table, keep_freed_memory, measure_machine, run_case, write_results

# Environment that makes one process behave as a CPU whose best ISA is the given pass: ATen (and so our
# kernels and Inductor's code) via ATEN_CPU_CAPABILITY, MKL's GEMMs and oneDNN's convolutions via theirs.
ISA_ENVIRONMENT = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medattn-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="all", help="comma-separated op names (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per candidate before stopping early")
    p.add_argument("--out", default="bench_results", help="directory for the JSON/CSV files")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--isa-passes", default=None,
                   help="CPU only: 'all' (every ISA pass this CPU supports), 'vector' (its AVX2 / AVX512 passes) "
                        "or a comma-separated list (default, avx2, avx512), each in its own process, plus a "
                        "speed-up chart")
    p.add_argument("--monai", action="store_true",
                   help="MONAI networks and SpatialAttentionBlock, stock vs medattn_kernels.patch (needs monai; "
                        "honours --quick, --device, --threads; more options: python -m medattn_kernels.bench.monai -h)")
    return p


def _run_isa_passes(args, argv) -> int:
    from .. import isa
    from .chart import speedup_chart

    supported = [p.lower() for p in isa.supported_isas()]
    if args.isa_passes == "all":
        passes = supported
    elif args.isa_passes == "vector":  # the SIMD passes (AVX2, AVX512) this CPU has, else the portable one
        passes = [p for p in supported if p != "default"] or supported
    else:
        passes = [p.strip().lower() for p in args.isa_passes.split(",")]
    bad = [p for p in passes if p not in supported]
    if bad:
        print(f"medattn-bench: --isa-passes {bad} not supported by this CPU (supported: {supported})",
              file=sys.stderr)
        return 2
    forwarded, skip = [], False
    for a in argv:  # the child runs the same command without --isa-passes and with its own --out
        if skip:
            skip = False
            continue
        if a in ("--isa-passes", "--out"):
            skip = True
            continue
        if a.startswith("--isa-passes=") or a.startswith("--out="):
            continue
        forwarded.append(a)
    dirs = {}
    for p in reversed(passes):  # best first: the machine's native path
        out = os.path.join(args.out, p)
        env = dict(os.environ, **ISA_ENVIRONMENT[p])
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", isa.inductor_cache_dir(p))
        print(f"\n# ISA pass {p}: {' '.join(f'{k}={v}' for k, v in ISA_ENVIRONMENT[p].items())}\n", flush=True)
        rc = subprocess.call([sys.executable, "-m", "medattn_kernels.bench", *forwarded, "--out", out], env=env)
        if rc != 0:
            return rc
        dirs[p] = out
    path = speedup_chart(dirs, os.path.join(args.out, "speedup.png"))
    print(f"\nchart: {path}")
    return 0


@quiet_on_closed_pipe
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("medattn-bench: --device cuda requested but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.isa_passes:
        if not args.device.startswith("cpu"):
            print("medattn-bench: --isa-passes applies to --device cpu only", file=sys.stderr)
            return 2
        return _run_isa_passes(args, argv)
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
    allocator = keep_freed_memory() if args.device.startswith("cpu") else None
    machine = measure_machine(args.device)
    print(machine.line())
    if allocator:
        print(f"allocator: {allocator}")
    print(f"torch {torch.__version__}  dtype {args.dtype}  {'quick' if args.quick else 'full'} run, candidates "
          f"interleaved, median of up to {args.reps} rounds after warm-up")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in names:
        results = []
        for case in modules[name].cases(args.device, dtype, args.quick):
            results += run_case(case, args.device, dtype, reps=args.reps, budget_s=args.budget, machine=machine)
            torch.manual_seed(0)
        print(f"\n## {name}  ({machine.description})\n")
        print(format_table(results))
        meta = {"device": machine.description, "torch": torch.__version__, "dtype": args.dtype, "quick": args.quick,
                "threads": torch.get_num_threads(), "time": stamp, "peak_sgemm_gflops": machine.gflops,
                "peak_vector_fma_gflops": machine.vector_fma_gflops, "peak_copy_gbps": machine.copy_gbps,
                "allocator": allocator,
                "environment": {k: os.environ[k] for k in ISA_ENVIRONMENT["avx2"] if k in os.environ}}
        paths = write_results(results, args.out, f"{name}_{args.device.split(':')[0]}_{args.dtype}", meta)
        print(f"\nwritten: {', '.join(paths)}")
        sys.stdout.flush()
    return 0
