"""The one benchmark harness: every op's cases (medattn_kernels/bench/<op>.py) are timed, measured and
tabulated here, by the CLI (`python -m medattn_kernels.bench`) and by pytest-benchmark (benchmarks/).

Per candidate: forward ms (under no_grad), forward+backward ms, speed-ups against the reference and the
best PyTorch built-in measured in the same run, MiB kept for backward (saved_tensors_hooks, inputs'
storages excluded) and the relative error against the float64 reference. Times are medians after
warm-up; on a GPU they are CUDA-event times, each followed by the fraction of the H100/H200 roofline
time it achieves (roofline.py).
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..testing import rel_error, saved_tensor_bytes
from . import roofline


@dataclass
class Candidate:
    label: str  # shown in the table, e.g. "medattn cpu", "reference", "2x F.sdpa"
    fn: Callable[..., Any]  # fn(**inputs) -> tensor or tuple of tensors
    kind: str = "fused"  # "fused" | "reference" | "builtin"


@dataclass
class Case:
    op: str
    shape: str  # human-readable shape label
    make_inputs: Callable[[], Dict[str, Any]]  # fresh inputs; differentiable ones require grad
    candidates: List[Candidate]
    reference64: Optional[Callable[..., Any]] = None  # float64 oracle for the error column
    flops: Optional[float] = None  # forward+backward flop count, for GFLOP/s
    forward_flops: Optional[float] = None
    backward: bool = True


@dataclass
class Result:
    op: str
    shape: str
    backend: str
    kind: str
    device: str
    dtype: str
    fwd_ms: float
    fwd_bwd_ms: float
    saved_mib: float
    max_rel_err: float
    vs_reference: float = math.nan  # reference fwd+bwd time / this fwd+bwd time
    vs_builtin: float = math.nan
    fwd_vs_reference: float = math.nan
    fwd_vs_builtin: float = math.nan
    gflops: float = math.nan  # forward+backward
    fwd_gflops: float = math.nan
    extra: Dict[str, Any] = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, warmup: int = 1, reps: int = 7, budget_s: float = 3.0) -> float:
    """Median wall time of fn() in ms after `warmup` calls; stops early (at >= 3 reps) once `budget_s`
    is spent so that slow references stay affordable."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for i in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times)


def _as_tuple(out) -> tuple:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _differentiable(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def forward_backward_callable(candidate: Candidate, inputs: Dict[str, Any]) -> Callable[[], Any]:
    """One training-style call: forward, then backward with fixed random output gradients."""
    leaves = _differentiable(inputs)
    outs = [o for o in _as_tuple(candidate.fn(**inputs)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]

    def run():
        o = [t for t in _as_tuple(candidate.fn(**inputs)) if t.requires_grad]
        torch.autograd.grad(o, leaves, grads, allow_unused=True)

    return run


def forward_callable(candidate: Candidate, inputs: Dict[str, Any]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            candidate.fn(**inputs)

    return run


def _to64(inputs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def run_case(case: Case, device: str, dtype: torch.dtype, reps: int = 7, warmup: int = 1,
             budget_s: float = 3.0) -> List[Result]:
    inputs = case.make_inputs()
    ref_out = None
    if case.reference64 is not None:
        with torch.no_grad():
            ref_out = _as_tuple(case.reference64(**_to64(inputs)))
    results = []
    for cand in case.candidates:
        with torch.no_grad():
            out = _as_tuple(cand.fn(**inputs))
        err = math.nan
        if ref_out is not None:
            err = max(rel_error(o, r) for o, r in zip(out, ref_out))
        del out
        fwd = time_ms(forward_callable(cand, inputs), device, warmup, reps, budget_s)
        fwd_bwd, saved = math.nan, math.nan
        if case.backward and _differentiable(inputs):
            fwd_bwd = time_ms(forward_backward_callable(cand, inputs), device, warmup, reps, budget_s)
            saved = saved_tensor_bytes(lambda kw: cand.fn(**kw), inputs) / 2 ** 20
        results.append(Result(case.op, case.shape, cand.label, cand.kind, device, str(dtype).replace("torch.", ""),
                              fwd, fwd_bwd, saved, err))
    by_kind = {r.kind: r for r in results}
    for r in results:
        for kind, attr in (("reference", "vs_reference"), ("builtin", "vs_builtin")):
            base = by_kind.get(kind)
            if base is not None:
                setattr(r, attr, base.fwd_bwd_ms / r.fwd_bwd_ms)
                setattr(r, "fwd_" + attr, base.fwd_ms / r.fwd_ms)
        if case.flops:
            r.gflops = case.flops / (r.fwd_bwd_ms * 1e6)
        if case.forward_flops:
            r.fwd_gflops = case.forward_flops / (r.fwd_ms * 1e6)
    if device.startswith("cuda"):
        roofline.annotate(results, case.op, inputs, device_name(device))
    return results


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: List[Result]) -> str:
    header = ["op", "shape", "backend", "fwd ms", "fwd+bwd ms", "x ref", "x builtin", "fwd x ref",
              "fwd x builtin", "MiB saved", "rel err", "GFLOP/s"]
    rows = [[r.op, r.shape, r.backend, _fmt(r.fwd_ms, ".2f"), _fmt(r.fwd_bwd_ms, ".2f"), _fmt(r.vs_reference, ".2f"),
             _fmt(r.vs_builtin, ".2f"), _fmt(r.fwd_vs_reference, ".2f"), _fmt(r.fwd_vs_builtin, ".2f"),
             _fmt(r.saved_mib, ".2f"), _fmt(r.max_rel_err, ".1e"), _fmt(r.gflops, ".1f")] for r in results]
    if any("roofline_fwd_ms" in r.extra for r in results):  # GPU runs: achieved / roofline after each time
        header[4:4], header[6:6] = ["fwd % roof"], ["fwd+bwd % roof"]
        for r, row in zip(results, rows):
            row[4:4], row[6:6] = [_fmt(100 * roofline.fraction(r, "fwd"), ".0f")], \
                [_fmt(100 * roofline.fraction(r, "fwd_bwd"), ".0f")]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def write_results(results: List[Result], out_dir: str, stem: str, meta: Dict[str, Any]) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".csv")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1, default=str)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        fields = [k for k in asdict(results[0]) if k != "extra"] if results else []
        writer.writerow(fields)
        for r in results:
            d = asdict(r)
            writer.writerow([d[k] for k in fields])
    return [json_path, csv_path]
