"""A network's training step with fused ops vs references (time, memory kept for backward, peak).
`python benchmarks/bench_training_step.py --help`; not collected by pytest-benchmark."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medattn_kernels.bench.training_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
