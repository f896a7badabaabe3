"""The check: record every problem's launches, specialize them per target, compile each distinct
specialization once, judge the resources against the target's limits, tabulate."""
from __future__ import annotations

import importlib
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import cuda_cpp
from .problems import Problem, record
from .targets import REGISTER_FILE, TARGETS, Target
from .triton_compile import Resources, Specialization, compile_one, specialize


@dataclass
class Row:
    """One compiled specialization (Triton) or kernel instantiation (CUDA C++) on one target."""

    source: str  # "triton" | "cuda"
    kernel: str
    target: Target
    dtype: str
    constexprs: Dict[str, Any]
    num_warps: Optional[int]
    num_stages: Optional[int]
    res: Resources
    problems: List[str] = field(default_factory=list)
    args_hash: str = "-"  # the JIT's argument specialization (Specialization.args_hash)
    accepted: Optional[str] = None  # the stated reason when its spills are accepted
    failure: Optional[str] = None

    @property
    def constexpr_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.constexprs.items())

    @property
    def spills(self) -> int:
        return (self.res.spill_stores or 0) + (self.res.spill_loads or 0)


def judge(row: Row, accepted_spills: Sequence = ()) -> Optional[str]:
    """Why `row` would fail (or must not ship) on its target; None when it passes. Sets row.accepted."""
    res, target = row.res, row.target
    if res.error:
        return f"compile error: {res.error}"
    if res.shared is not None and res.shared > target.max_shared:
        return f"shared memory {res.shared} B > {target.max_shared} B per block ({target.name})"
    threads = (res.num_warps or row.num_warps or 0) * 32
    if res.registers is not None and res.registers * threads > REGISTER_FILE:
        return f"{res.registers} registers x {threads} threads > {REGISTER_FILE} (register file)"
    if row.spills:
        reason = next((acc.reason for acc in accepted_spills
                       if acc.covers(row.kernel, row.constexprs, row.dtype, row.spills)), None)
        if reason is None:
            return f"spills {res.spill_stores} B stores / {res.spill_loads} B loads per thread"
        row.accepted = reason
    return None


def _accepted_spills(kernel) -> tuple:
    return getattr(importlib.import_module(kernel.fn.__module__), "ACCEPTED_SPILLS", ())


# ------------------------------------------------------------------------------------------ compiling
_JOBS: List[Specialization] = []  # read by forked workers


def _compile_index(i: int) -> Tuple[int, Resources]:
    return i, compile_one(_JOBS[i])


def _compile_all(specs: List[Specialization], jobs: int, log) -> List[Resources]:
    global _JOBS
    _JOBS = specs
    results: List[Optional[Resources]] = [None] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: -specs[i].target.arch)  # slowest (sm_100) first
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 and len(specs) > 1 else None
    try:
        done = pool.imap_unordered(_compile_index, order) if pool else map(_compile_index, order)
        for count, (i, res) in enumerate(done, 1):
            results[i] = res
            if count % 25 == 0 or count == len(specs):
                log(f"  compiled {count}/{len(specs)}")
    finally:
        if pool:
            pool.terminate()
    return results


# ------------------------------------------------------------------------------------------ the check
@dataclass
class Report:
    rows: List[Row]
    problems: int
    launches: int
    seconds: float
    notes: List[str] = field(default_factory=list)

    @property
    def failures(self) -> List[Row]:
        return [r for r in self.rows if r.failure]


def collect(problems: Sequence[Problem],
            targets: Sequence[Target]) -> Tuple[Dict[str, Tuple[Specialization, List[str]]], int]:
    """{specialization key: (specialization, labels of the problems launching it)} and the launch count."""
    found: Dict[str, Tuple[Specialization, List[str]]] = {}
    launches = 0
    for problem in problems:
        recorded = record(problem)
        launches += len(recorded)
        for launch in recorded:
            for target in targets:
                spec = specialize(launch, target)
                entry = found.setdefault(spec.key, (spec, []))
                if problem.label not in entry[1]:
                    entry[1].append(problem.label)
    return found, launches


def run(problems: Sequence[Problem], archs: Sequence[int] = (90,), jobs: Optional[int] = None, cuda: bool = True,
        log=print) -> Report:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("gpu_check: unset TRITON_INTERPRET (the launchers choose interpreter-only "
                           "configurations under it)")
    start = time.perf_counter()
    jobs = default_jobs() if jobs is None else jobs
    targets = [TARGETS[a] for a in archs]
    cache, saved_cache = tempfile.mkdtemp(prefix="medattn-gpu-check-"), os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh per run: nothing cached across runs can hide a failure
    notes, nvcc = [], None
    if cuda:
        why_not = cuda_cpp.available()
        if why_not:
            notes.append(f"CUDA C++ kernels not checked: {why_not}")
        else:
            log("gpu_check: nvcc -Xptxas -v for csrc/cuda/*.cu (in the background)")
            nvcc = cuda_cpp.start(targets)
    try:
        log(f"gpu_check: recording the launches of {len(problems)} problems")
        found, launches = collect(problems, targets)
        specs = [spec for spec, _ in found.values()]
        log(f"gpu_check: {launches} launches -> {len(specs)} distinct specializations on "
            f"{', '.join(t.name for t in targets)}; compiling with {jobs} process(es)")
        results = _compile_all(specs, jobs, log)
    except BaseException:
        if nvcc is not None:
            nvcc.kill()
        raise
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if saved_cache is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache
    rows = []
    for (spec, labels), res in zip(found.values(), results):
        row = Row("triton", spec.name, spec.target, spec.dtype(), spec.named_constexprs(),
                  spec.options["num_warps"], spec.options["num_stages"], res, sorted(labels), spec.args_hash)
        row.failure = judge(row, _accepted_spills(spec.kernel))
        rows.append(row)
    if nvcc is not None:
        rows += _cuda_rows(nvcc, targets)
    report = Report(rows, len(problems), launches, 0.0, notes)
    report.seconds = time.perf_counter() - start
    return report


def _cuda_rows(nvcc, targets: Sequence[Target]) -> List[Row]:
    try:
        kernels = cuda_cpp.finish(nvcc)
    except RuntimeError as exc:  # an nvcc error fails the check like a Triton compile error
        row = Row("cuda", "csrc/cuda/*.cu", targets[0], "-", {}, None, None, Resources(error=str(exc)[-600:]),
                  ["nvcc"])
        row.failure = judge(row)
        return [row]
    by_name, rows = {t.name: t for t in targets}, []
    for k in kernels:
        res = Resources(shared=k.static_shared, registers=k.registers, spill_stores=k.spill_stores,
                        spill_loads=k.spill_loads)
        row = Row("cuda", k.name, by_name[k.arch], k.dtype, {}, None, None, res, ["csrc/cuda (every shape)"])
        row.failure = judge(row)
        rows.append(row)
    return rows


def default_jobs() -> int:
    """Every core: the compiles are independent, CPU-bound processes."""
    return max(1, os.cpu_count() or 1)


def check_exit_code(report: Report) -> int:
    return 1 if report.failures else 0


__all__ = ["Row", "Report", "judge", "collect", "run", "default_jobs", "check_exit_code"]
