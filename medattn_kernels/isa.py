"""Which CPU ISA pass of the C++ kernels this process runs (csrc/include/medattn/dispatch.h).

The extension holds every kernel compiled for DEFAULT (portable), AVX2 and AVX512 (on x86-64; DEFAULT
only elsewhere) and runs the pass matching PyTorch's own CPU capability,
``torch.backends.cpu.get_cpu_capability()``, which the ``ATEN_CPU_CAPABILITY`` environment variable
(``default``, ``avx2``, ``avx512``) lowers for a whole process: ATen's kernels and ours switch together.

``python -m medattn_kernels.isa`` prints the pass in use; ``--others`` prints the lower passes this CPU
can also run, one per line (the test targets run the parity tests once per pass).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from typing import List, Optional

import torch

from . import _extension

# Ours, lowest first, in PyTorch's spelling (torch.backends.cpu.get_cpu_capability()).
ISAS = ("DEFAULT", "AVX2", "AVX512")
CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"


def cpu_isa() -> Optional[str]:
    """The pass whose kernels run in this process ("DEFAULT", "AVX2" or "AVX512"); None without _C."""
    if _extension._C is None or not hasattr(torch.ops.medattn, "_cpu_isa"):
        return None
    return torch.ops.medattn._cpu_isa()


def compiled_isas() -> List[str]:
    """The passes linked into the built extension, lowest first."""
    if _extension._C is None or not hasattr(torch.ops.medattn, "_cpu_isas_compiled"):
        return []
    return list(torch.ops.medattn._cpu_isas_compiled())


def supported_isas() -> List[str]:
    """The passes this CPU can run, lowest first: every one up to the best PyTorch detects. (With
    ATEN_CPU_CAPABILITY set, PyTorch reports the requested one, so call this in a process without it.)"""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["DEFAULT"]
    best = torch.backends.cpu.get_cpu_capability()
    top = ISAS.index(best) if best in ISAS else 0
    return list(ISAS[: top + 1])


def inductor_cache_dir(capability: Optional[str] = None) -> str:
    """A TorchInductor code cache of its own for one CPU capability (default: the one in use). Inductor's
    cache key leaves ATEN_CPU_CAPABILITY out (torch 2.13): a process forced to AVX2 reused kernels compiled
    under AVX-512 and aborted (benchmark) or returned NaN (the compiled Sobel reference, tests)."""
    cap = (capability or torch.backends.cpu.get_cpu_capability()).lower()
    return os.path.join(tempfile.gettempdir(), f"medattn_inductor_{cap}")


def describe() -> str:
    """One line for tables and logs: the pass in use and how it was chosen."""
    isa = cpu_isa()
    if isa is None:
        return "C++ kernels not built"
    return f"{isa} (torch capability {torch.backends.cpu.get_cpu_capability()}; built: {', '.join(compiled_isas())})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medattn_kernels.isa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--others", action="store_true",
                        help="print the supported and built passes other than the one in use, lowercase, one per line")
    args = parser.parse_args(argv)
    if args.others:
        built = set(compiled_isas())
        for isa in supported_isas():
            if isa != cpu_isa() and isa in built:
                print(isa.lower())
        return 0
    print(describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
