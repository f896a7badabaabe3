"""The CUDA C++ kernels (csrc/cuda/*.cu) in the resource table: tools/nvcc_check.sh compiles every source
for the targets with `-Xptxas -v`, and each template instantiation's registers, spills and static shared
memory become a row. Their dynamic shared memory is set by the launcher (csrc/cuda/depthwise_conv2d.cu
stages at most kSmemBytes = 48 KB per block, no opt-in needed), so the static part is what ptxas knows."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .targets import Target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "nvcc_check.sh")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)a?'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DTYPES = {"float": "fp32", "double": "fp64", "Half": "fp16", "BFloat16": "bf16"}
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class CudaKernel:
    name: str  # demangled, namespaces and the anonymous namespace dropped
    arch: str
    dtype: str  # the first template argument's element type
    registers: int
    spill_stores: int
    spill_loads: int
    static_shared: int


def available() -> Optional[str]:
    """None when the CUDA C++ part can run, else why not."""
    if not os.path.exists(SCRIPT):
        return f"{SCRIPT} not found (not a source checkout)"
    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        return "nvcc not found"
    return None


def _demangle(names: Sequence[str]) -> List[str]:
    if shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = []
    for name in out:
        name = re.sub(r"\(anonymous namespace\)::|medattn::", "", name)
        short.append(re.sub(r"^void ", "", name.split("(")[0]).replace("c10::", ""))
    return short


def parse(log: str) -> List[CudaKernel]:
    """One CudaKernel per 'Compiling entry function' block of a ptxas -v log."""
    found, current = [], None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = {"name": entry.group(1), "arch": entry.group(2)}
            continue
        if current is None:
            continue
        spills = _SPILLS.search(line)
        if spills:
            current["spill_stores"], current["spill_loads"] = int(spills.group(2)), int(spills.group(3))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            current["static_shared"] = int(used.group(2) or 0)
            found.append(current)
            current = None
    names = _demangle([k["name"] for k in found])
    return [CudaKernel(name=n, arch=k["arch"], dtype=_DTYPES.get(n.partition("<")[2].split(",")[0].strip(">"), "-"),
                       registers=k["registers"], spill_stores=k.get("spill_stores", 0),
                       spill_loads=k.get("spill_loads", 0), static_shared=k["static_shared"])
            for n, k in zip(names, found)]


def start(targets: Sequence[Target]) -> subprocess.Popen:
    """Start compiling csrc/cuda/*.cu for the targets (it runs beside the Triton compiles); `finish` it."""
    env = dict(os.environ, PYTHON=sys.executable, NVCC_ARCH=" ".join(t.name for t in targets),
               NVCC_FLAGS="-Xptxas -v")
    return subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> List[CudaKernel]:
    """The kernels of a `start`ed compile; raises RuntimeError with nvcc's output when it failed."""
    log, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{log[-4000:]}")
    return parse(log)
