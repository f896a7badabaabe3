"""`python -m medattn_kernels.gpu_check [--arch 90,80,100] [--jobs N] [--only bench,sweep,network]
[--markdown docs/gpu_resources.md]`: exit status 1 when any specialization fails."""
from __future__ import annotations

import argparse
import sys

from . import problems as grid
from .check import check_exit_code, default_jobs, run
from .report import headline, markdown_document, summary_table, text_table
from .targets import TARGETS

SOURCES = {"bench": grid.bench_problems, "sweep": lambda: grid.attention_sweep() + grid.map_sweep(),
           "network": grid.network_problems}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medattn_kernels.gpu_check", description=__doc__)
    p.add_argument("--arch", default="90", help=f"comma-separated targets among {sorted(TARGETS)} (default 90)")
    p.add_argument("--jobs", type=int, default=default_jobs(), help="compiler processes")
    p.add_argument("--only", default=",".join(SOURCES), help=f"problem sources among {list(SOURCES)}")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels (nvcc)")
    p.add_argument("--markdown", default=None, help="write the sm_90 table (or the first target's) here")
    p.add_argument("--failures-only", action="store_true", help="print only the failing rows")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in TARGETS]
    sources = [s.strip() for s in args.only.split(",")]
    if unknown or any(s not in SOURCES for s in sources):
        p.error(f"--arch among {sorted(TARGETS)}, --only among {list(SOURCES)}")
    problems = [pr for s in sources for pr in SOURCES[s]()]
    report = run(problems, archs, args.jobs, cuda=not args.no_cuda)
    rows = report.failures if args.failures_only else report.rows
    print()
    print(text_table(rows))
    print()
    print(summary_table(report.rows))
    for note in report.notes:
        print(note)
    print(headline(report))
    if args.markdown:
        target = TARGETS[90 if 90 in archs else archs[0]].name
        command = "python -m medattn_kernels.gpu_check" + (f" --arch {args.arch}" if args.arch != "90" else "")
        with open(args.markdown, "w") as f:
            f.write(markdown_document(report, target, command))
        print(f"written: {args.markdown}")
    return check_exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
