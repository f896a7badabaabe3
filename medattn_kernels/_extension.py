"""Loads the compiled extension medattn_kernels._C, which registers the medattn op schemas and the
C++ CPU (and, when built, CUDA) kernels. The package works without it: the reference and Triton
backends remain, and medattn_kernels.info() says why the compiled backends are off."""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_PACKAGE_DIR = Path(__file__).resolve().parent
LOAD_ERROR: str | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.medattn.*)
except ImportError as exc:  # missing, or built against another torch
    _C = None
    LOAD_ERROR = f"medattn_kernels._C could not be imported ({exc}); build it with " \
                 "`pip install -e . --no-build-isolation`"
    warnings.warn(f"{LOAD_ERROR}. Only the reference and Triton backends are available.", stacklevel=2)


def _stale_sources() -> list[str]:
    """Sources in a source checkout that are newer than the built extension (an editable install
    whose C++ changed after the last build)."""
    if _C is None or not getattr(_C, "__file__", None):
        return []
    built = os.path.getmtime(_C.__file__)
    csrc = _PACKAGE_DIR.parent / "csrc"
    if not (csrc / "ops.cpp").is_file():  # an installed wheel (or a copy of the package): no sources beside it
        return []
    # What _C is built from on a CPU build (csrc/tests belongs to the CMake build only).
    sources = glob.glob(str(csrc / "*.cpp")) + glob.glob(str(csrc / "cpu" / "*.cpp")) + \
        glob.glob(str(csrc / "include" / "**" / "*.h"), recursive=True)
    newer = [p for p in sources if os.path.getmtime(p) > built]
    return sorted(os.path.relpath(p, csrc.parent) for p in newer)


STALE = _stale_sources()
if STALE:
    warnings.warn(f"medattn_kernels._C is older than {', '.join(STALE[:3])}"
                  f"{' ...' if len(STALE) > 3 else ''}; rebuild with `pip install -e . --no-build-isolation` "
                  "(ops missing from the old build fall back to the other backends)", stacklevel=2)
