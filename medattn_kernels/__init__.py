"""medattn-kernels: fused attention, global spatial attention, large-kernel depthwise convolution and
multi-scale Sobel boundary loss for medical image segmentation, plus an activated batch norm (BatchNorm +
leaky ReLU keeping only its output for backward), as autograd-compatible
torch.ops.medattn.* ops with C++ CPU, Triton and CUDA kernels and a pure-PyTorch reference each."""
from . import _extension  # noqa: F401  (loads torch.ops.medattn before the op modules register on it)
from . import isa, nn, reference, testing  # noqa: F401
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _op_names
from .ops._registry import BACKENDS, FORCE_REFERENCE_ENV, info_rows
from .patch import PatchReport, patch, unpatch

__version__ = "0.1.0"


def info(print_table: bool = True):
    """Per op and backend: available or not, and why. Returns the rows (op, backend, ok, detail)."""
    rows = info_rows()
    if print_table:
        import torch

        print(f"medattn_kernels {__version__}  torch {torch.__version__}  "
              f"extension: {'loaded' if _extension._C is not None else 'missing'}"
              f"{' (stale: rebuild)' if _extension.STALE else ''}")
        print(f"  CPU kernels: ISA pass {isa.describe()}")
        width = max(len(r[0]) for r in rows) if rows else 10
        for op, backend, ok, detail in rows:
            print(f"  {op:<{width}}  {backend:<9}  {'yes' if ok else 'no ':<3}  {detail}")
    return rows


__all__ = list(_op_names) + ["info", "patch", "unpatch", "PatchReport", "BACKENDS", "FORCE_REFERENCE_ENV"]
