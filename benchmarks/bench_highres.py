"""Largest DIN input that trains (one step) under a memory cap, fused ops vs references; each
(variant, size) in its own process. `python benchmarks/bench_highres.py --help`.
Not collected by pytest-benchmark (it is a one-off, minutes-long measurement)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medattn_kernels.bench.highres import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
