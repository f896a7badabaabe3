"""What the Triton launchers share with each other and with the ops' glue (medattn_kernels/ops): output
layouts and statistic dtypes, strides of feature maps, and the one way a launcher launches.

Every launcher builds its launches through `launch()`: the kernel, grid, runtime arguments, constexprs,
num_warps and num_stages are then one value (a `Launch`) that is either run or, inside
`record_launches()`, recorded instead. Recording lets `medattn_kernels.gpu_check` see exactly what the
launchers would launch for a problem, with meta tensors (shapes, strides and dtypes only), and compile
those specializations for a GPU target without one.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch


def output_layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a feature-map op's outputs, in every backend: channels_last inputs stay
    channels_last, everything else becomes NCHW-contiguous (csrc/cpu/global_spatial_attention.cpp's
    layout_of is the same rule)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exp statistics are float64 for float64 inputs and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def map_strides(x: torch.Tensor):
    """(stride_b, stride_c, stride_p) of a [B, C, H, W] tensor that is NCHW- or channels_last-
    contiguous, with p = h * W + w the flattened pixel index (mergeable in both layouts).

    PyTorch leaves the stride of a size-1 dim arbitrary: a [B, C, H, 1] map counts as channels_last
    whatever W's stride is (1 after unsqueeze(-1) of a channels-innermost [B, C, L]), so with W = 1 the
    pixel stride is H's. Taking W's there read every pixel of such a map C times too close together (and
    past its end)."""
    return x.stride(0), x.stride(1), x.stride(3) if x.size(3) > 1 else x.stride(2)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel (a triton JITFunction), grid, runtime arguments in the kernel's order
    (tensors, ints, floats), constexprs, and the compile options num_warps / num_stages."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class AcceptedSpill:
    """Specializations of a kernel allowed to spill registers, and why. A Triton module lists these in
    ACCEPTED_SPILLS; gpu_check fails on any other spill, and on an accepted one that grows past max_bytes
    (spill stores + loads per thread). `when`: constexprs the specialization must have; `dtype`: its element
    type ("fp32", "fp16", "bf16"; None: any)."""

    kernel: str
    when: Dict[str, Any]
    reason: str
    dtype: Optional[str] = None
    max_bytes: Optional[int] = None

    def covers(self, kernel: str, constexprs: Dict[str, Any], dtype: str, spill_bytes: int) -> bool:
        return (kernel == self.kernel and all(constexprs.get(k) == v for k, v in self.when.items())
                and self.dtype in (None, dtype) and (self.max_bytes is None or spill_bytes <= self.max_bytes))


_RECORDED: contextvars.ContextVar[Optional[List[Launch]]] = contextvars.ContextVar("medattn_recorded_launches",
                                                                                   default=None)


def launch(kernel, grid, args, constexprs: Dict[str, Any], num_warps: int, num_stages: int) -> None:
    """Run the launch, or record it inside `record_launches()`. An empty grid launches nothing."""
    grid = tuple(int(g) for g in grid)
    if min(grid) <= 0:
        return
    planned = Launch(kernel, grid, tuple(args), dict(constexprs), int(num_warps), int(num_stages))
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append(planned)
    else:
        planned.run()


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Inside: launches are appended to the yielded list instead of running."""
    recorded: List[Launch] = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)
