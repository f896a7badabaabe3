"""Layer calls at a U-Net's small maps: the Python around each kernel, against PyTorch's layers.
`python benchmarks/bench_small_maps.py --help`; not collected by pytest-benchmark."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medattn_kernels.bench.small_maps import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
