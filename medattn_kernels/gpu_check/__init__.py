"""GPU kernels verified without a GPU: `python -m medattn_kernels.gpu_check` (`make test-gpu-compile`).

For a grid of realistic problems per op (problems.py) the Triton launchers run on meta tensors with their
launches recorded instead of run (triton/_common.record_launches), so the check sees exactly the kernels,
constexprs, num_warps and num_stages they would launch. Each distinct specialization is compiled with
triton for sm_90 (and sm_80 / sm_100 on request) and judged (check.py): a compile error, shared memory
over the target's per-block limit, more registers than the register file holds for the block, or a
register spill not listed in the kernel module's ACCEPTED_SPILLS fails the check. The CUDA C++ kernels
join the table through `nvcc -Xptxas -v` (cuda_cpp.py). Nothing is cached across runs.
"""
from .check import Report, Row, judge, run
from .problems import Problem, all_problems, record
from .targets import TARGETS, Target

__all__ = ["Report", "Row", "judge", "run", "Problem", "all_problems", "record", "TARGETS", "Target"]
