"""The GPU targets the check compiles for, with the per-block limits a launch must respect."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80, sm_90, sm_100


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability x 10
    gpu: str  # the GPUs it stands for
    max_shared: int  # bytes of shared memory one block may use (the opt-in maximum)

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


# CUDA C Programming Guide, "Technical Specifications per Compute Capability": maximum shared memory
# per thread block 163 KB (8.0), 227 KB (9.0, 10.0).
TARGETS: Dict[int, Target] = {
    80: Target(80, "A100", 163 * 1024),
    90: Target(90, "H100/H200", 227 * 1024),
    100: Target(100, "B200", 227 * 1024),
}
