"""The one benchmark harness: every op's cases (medattn_kernels/bench/<op>.py) are timed, measured and
tabulated here, by the CLI (`python -m medattn_kernels.bench`) and by pytest-benchmark (benchmarks/).

Per candidate: forward ms (under no_grad), forward+backward ms, speed-ups against the reference and against
the *best* PyTorch path of the case (the fastest of its "builtin" and "reference" candidates: SDPA on
contiguous inputs, F.conv2d in NCHW and channels_last, torch.compile of the reference, the eager built-ins
and the reference itself), MiB kept for backward (saved_tensors_hooks, inputs' storages excluded), the
relative error against the float64 reference, and the achieved rate against the machine's own peak (sgemm
GFLOP/s for compute-bound cases, copy GB/s for memory-bound ones), measured again around each case: on
these VMs the rates drift between minutes (a 64 MiB copy on one Zen 4: 37.7 GB/s at the start of one ISA
pass of a run, 53.2 at the start of the next), so a peak taken once per run misstated later cases.

Timing: the candidates of a case run interleaved, round-robin (A B C A B C ...), after warm-up, and each
reports its median, so that drifts in machine load hit every candidate alike. On a GPU the times are CUDA
events, each followed by the fraction of the H100/H200 roofline time it achieves (roofline.py).
"""
from __future__ import annotations

import csv
import ctypes
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
    kind: str = "fused"  # "fused" | "reference" | "builtin" (a PyTorch path a user has)


@dataclass
class Case:
    op: str
    shape: str  # human-readable shape label
    make_inputs: Callable[[], Dict[str, Any]]  # fresh inputs; differentiable ones require grad
    candidates: List[Candidate]
    reference64: Optional[Callable[..., Any]] = None  # float64 oracle for the error column
    flops: Optional[float] = None  # forward+backward flop count, for GFLOP/s (compute-bound cases)
    forward_flops: Optional[float] = None
    bytes: Optional[float] = None  # forward+backward minimum bytes moved, for GB/s (memory-bound cases)
    forward_bytes: Optional[float] = None
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
    vs_builtin: float = math.nan  # best builtin fwd+bwd time / this fwd+bwd time
    fwd_vs_reference: float = math.nan
    fwd_vs_builtin: float = math.nan
    best_builtin: str = ""  # label of the fastest builtin candidate (fwd+bwd; forward if no backward)
    gflops: float = math.nan  # forward+backward
    fwd_gflops: float = math.nan
    gbps: float = math.nan  # forward+backward, minimum bytes / time
    fwd_gbps: float = math.nan
    pct_peak: float = math.nan  # fwd+bwd rate as % of `peak`
    fwd_pct_peak: float = math.nan
    peak: float = math.nan  # the machine's sgemm GFLOP/s or copy GB/s, measured around this case
    error: str = ""  # why a candidate could not run (e.g. torch.compile failed)
    extra: Dict[str, Any] = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_call(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: str, warmup: int = 1, reps: int = 7,
                     budget_s: float = 3.0) -> Dict[str, float]:
    """Median ms of each fn, the fns called round-robin after `warmup` calls each. Stops early (at >= 3
    rounds) once the rounds took `budget_s` per fn, so that slow references stay affordable.

    Each round starts one fn further along (a, b, c; then b, c, a; ...), so that no fn always runs right
    after the same one: with a fixed order the fused candidate always followed the naive reference, which
    leaves the caches full of its N x N matrices (dirty lines to write back). On the Intel Xeon the gated
    self-attention measured 1.08-1.09x of SDPA * sigmoid that way and 1.10-1.12x without the reference."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    keys = list(fns)
    start_all = time.perf_counter()
    for i in range(reps):
        for j in range(len(keys)):
            key = keys[(i + j) % len(keys)]
            times[key].append(_timed_call(fns[key], device))
        if i >= 2 and time.perf_counter() - start_all > budget_s * len(fns):
            break
    return {k: statistics.median(v) for k, v in times.items()}


def time_ms(fn: Callable[[], Any], device: str, warmup: int = 1, reps: int = 7, budget_s: float = 3.0) -> float:
    """Median wall time of one fn (time_interleaved of one)."""
    return time_interleaved({"fn": fn}, device, warmup, reps, budget_s)["fn"]


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

    # One backward now, so that a baseline whose backward cannot run (as Inductor's compiled backward of
    # F.pad(mode="replicate") in torch 2.13) fails here, where run_case reports it, and not in the timing
    # loop.
    run()
    return run


def forward_callable(candidate: Candidate, inputs: Dict[str, Any]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            candidate.fn(**inputs)

    return run


def _to64(inputs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile (Inductor) of a baseline, a fresh compiled object per call so that cases do not
    share guards. Compiled at its first (warm-up) call."""
    return torch.compile(fn, dynamic=False)


def run_case(case: Case, device: str, dtype: torch.dtype, reps: int = 7, warmup: int = 1,
             budget_s: float = 3.0, machine: Optional["MachinePeak"] = None) -> List[Result]:
    # Dynamo caches compiled code per Python code object, across torch.compile wrappers: the cases of one
    # op share their reference's code, and past 8 entries (shapes x grad mode) Dynamo silently ran the
    # rest eagerly, so a "torch.compile(reference)" baseline was eager in later cases. Each case starts
    # from an empty cache, and hitting the limit anyway is an error, reported as the baseline's failure.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        return _run_case(case, device, dtype, reps, warmup, budget_s, machine)


def _run_case(case: Case, device: str, dtype: torch.dtype, reps: int, warmup: int, budget_s: float,
              machine: Optional["MachinePeak"]) -> List[Result]:
    peak_samples = _peak_samples(case, device, machine)
    inputs = case.make_inputs()
    ref_out = None
    if case.reference64 is not None:
        with torch.no_grad():
            ref_out = _as_tuple(case.reference64(**_to64(inputs)))
    results: Dict[str, Result] = {}
    runnable: List[Candidate] = []
    for cand in case.candidates:
        r = Result(case.op, case.shape, cand.label, cand.kind, device, str(dtype).replace("torch.", ""),
                   math.nan, math.nan, math.nan, math.nan)
        results[cand.label] = r
        try:  # first call: compiles torch.compile candidates, checks the others can run at all
            with torch.no_grad():
                out = _as_tuple(cand.fn(**inputs))
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
            r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if ref_out is not None:
            r.max_rel_err = max(rel_error(o, ref) for o, ref in zip(out, ref_out))
        del out
        runnable.append(cand)
    fwd = time_interleaved({c.label: forward_callable(c, inputs) for c in runnable}, device, warmup, reps, budget_s)
    for label, ms in fwd.items():
        results[label].fwd_ms = ms
    if case.backward and _differentiable(inputs):
        fwd_bwd_fns = {}
        for c in runnable:
            try:
                fwd_bwd_fns[c.label] = forward_backward_callable(c, inputs)
            except Exception as exc:  # noqa: BLE001
                results[c.label].error = f"backward: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        for label, ms in time_interleaved(fwd_bwd_fns, device, warmup, reps, budget_s).items():
            results[label].fwd_bwd_ms = ms
        for c in runnable:
            if c.label in fwd_bwd_fns:
                results[c.label].saved_mib = saved_tensor_bytes(lambda kw: c.fn(**kw), inputs) / 2 ** 20
    peak_samples += _peak_samples(case, device, machine)
    _derive(case, list(results.values()), statistics.median(peak_samples) if peak_samples else None)
    if device.startswith("cuda"):
        roofline.annotate(list(results.values()), case.op, inputs, device_name(device))
    return list(results.values())


def _ratio(base: float, this: float) -> float:
    return base / this if base == base and this == this and this > 0 else math.nan


def _backward_failed(r: Result) -> bool:
    return r.error.startswith("backward:")


def _peak_samples(case: Case, device: str, machine: Optional["MachinePeak"]) -> List[float]:
    """A few samples of the machine rate the case's "% peak" is relative to (none without a machine
    peak, i.e. when the caller asked for no rates): sgemm GFLOP/s for cases with a flop count, copy GB/s
    for those with a byte count. Taken before and after the case's rounds, not between candidates,
    whose caches a 64 MiB copy would flush for the next one only."""
    if machine is None:
        return []
    if case.flops or case.forward_flops:
        return [gemm_gflops(device, reps=3)]
    if case.bytes or case.forward_bytes:
        return [copy_gbps(device, reps=3)]
    return []


def _derive(case: Case, results: List[Result], peak: Optional[float]) -> None:
    """Speed-ups against the reference and the best builtin, rates and % of the machine's peak rate."""
    reference = next((r for r in results if r.kind == "reference"), None)
    # the PyTorch paths a user has: the built-ins and the pure-PyTorch reference itself
    builtins = [r for r in results if r.kind in ("builtin", "reference") and not r.error]
    timed_key = "fwd_bwd_ms" if any(r.fwd_bwd_ms == r.fwd_bwd_ms for r in builtins) else "fwd_ms"
    best = min((r for r in builtins if getattr(r, timed_key) == getattr(r, timed_key)),
               key=lambda r: getattr(r, timed_key), default=None)
    # a baseline whose backward failed still ran (and was timed) forward: it competes there
    forward_builtins = builtins + [r for r in results if r.kind in ("builtin", "reference") and _backward_failed(r)]
    best_fwd = min((r for r in forward_builtins if r.fwd_ms == r.fwd_ms), key=lambda r: r.fwd_ms, default=None)
    for r in results:
        if reference is not None:
            r.vs_reference = _ratio(reference.fwd_bwd_ms, r.fwd_bwd_ms)
            r.fwd_vs_reference = _ratio(reference.fwd_ms, r.fwd_ms)
        if best is not None:
            r.vs_builtin = _ratio(best.fwd_bwd_ms, r.fwd_bwd_ms)
            r.best_builtin = best.backend
        if best_fwd is not None:
            r.fwd_vs_builtin = _ratio(best_fwd.fwd_ms, r.fwd_ms)
        if case.flops:
            r.gflops = case.flops / (r.fwd_bwd_ms * 1e6)
        if case.forward_flops:
            r.fwd_gflops = case.forward_flops / (r.fwd_ms * 1e6)
        if case.bytes:
            r.gbps = case.bytes / (r.fwd_bwd_ms * 1e6)
        if case.forward_bytes:
            r.fwd_gbps = case.forward_bytes / (r.fwd_ms * 1e6)
        if peak is not None:
            r.peak = peak
            if case.flops or case.forward_flops:
                r.pct_peak = 100 * r.gflops / peak
                r.fwd_pct_peak = 100 * r.fwd_gflops / peak
            elif case.bytes or case.forward_bytes:
                r.pct_peak = 100 * r.gbps / peak
                r.fwd_pct_peak = 100 * r.fwd_gbps / peak


# --------------------------------------------------------------------------------------------- allocator
# PyTorch's CPU tensors come straight from malloc. glibc serves a request above its mmap threshold
# (dynamic, at most 32 MiB) with fresh pages and returns them on free, and trims the heap top once more
# than twice that is free: so a call whose outputs are tens of MiB (a [8, 64, 112, 112] map is 25 MiB)
# page-faults every output page again on every call. Measured on this project's VMs: ~1.5 us per 4 KiB page,
# e.g. 19 of the 25 ms of GSA's two-map backward (5.4 ms in warm memory), and it comes or goes with the
# heap's state, run to run. That cost is the OS's, the same absolute time for every candidate that writes
# the same bytes; a PyTorch CPU user who tunes for speed removes it with a caching allocator (jemalloc or
# tcmalloc, as PyTorch's CPU performance guide advises). The benchmark does the same within glibc. (glibc
# still grows the heap now and then, about one 64 MiB call in four in a small test, when it has split a
# kept block for a small request: the medians of the timed rounds pass over those calls.)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_FREED_MEMORY = "glibc malloc keeps freed memory (mallopt: no mmap, no trim below 1 GiB)"


def keep_freed_memory() -> Optional[str]:
    """Makes glibc's malloc serve allocations below 1 GiB from its heap and keep freed memory there, so
    that repeated calls reuse warm pages (see above). Returns what it set, or None where the C library
    is not glibc (the allocator is then left as it is)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return KEPT_FREED_MEMORY if ok else None


# --------------------------------------------------------------------------------------------- machine
@dataclass
class MachinePeak:
    """What this machine does at best, measured in the benchmark's own process at the start of the run
    (the header line). Each case measures the rate it is compared with again (Result.peak, the table's
    "peak" column)."""
    description: str  # CPU model / GPU name, ISA pass, threads
    gflops: float  # fp32 GEMM (MKL sgemm on CPU, cuBLAS on GPU), 2048^3
    copy_gbps: float  # bytes read + written per second by a 64 MiB tensor copy
    vector_fma_gflops: Optional[float] = None  # CPU: the ISA pass's multiply-add rate (vector_fma_gflops)

    def line(self) -> str:
        fma = "" if self.vector_fma_gflops is None else f"vector FMA {self.vector_fma_gflops:.0f} GFLOP/s, "
        return (f"machine: {self.description}; measured peaks: sgemm {self.gflops:.0f} GFLOP/s, {fma}"
                f"copy {self.copy_gbps:.1f} GB/s (read + write)")


def gemm_gflops(device: str, reps: int = 7) -> float:
    """fp32 GEMM rate (MKL sgemm on CPU, cuBLAS on GPU), 2048^3, median of `reps` after warm-up."""
    n = 2048
    a = torch.randn(n, n, device=device, dtype=torch.float32)
    b = torch.randn(n, n, device=device, dtype=torch.float32)
    return 2.0 * n ** 3 / (time_ms(lambda: torch.mm(a, b), device, warmup=2, reps=reps, budget_s=2.0) * 1e6)


def copy_gbps(device: str, reps: int = 11) -> float:
    """Bytes read + written per second by a 64 MiB (well past the last-level cache) tensor copy."""
    src = torch.randn(16 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (time_ms(lambda: dst.copy_(src), device, warmup=2, reps=reps, budget_s=2.0) * 1e6)


def vector_fma_gflops(device: str, reps: int = 5) -> Optional[float]:
    """CPU: fp32 GFLOP/s of independent vector multiply-add chains on every thread of torch's pool, on the
    ISA pass in use (csrc/cpu/fma_peak.cpp), median of `reps`: the compute roofline of a register-blocked
    kernel. MKL's sgemm is well below it on some CPUs (211-224 against 485-535 GFLOP/s on the AMD EPYC Zen 5
    of benchmarks/results, 2 threads). None on other devices or without the compiled extension."""
    if not device.startswith("cpu") or not hasattr(torch.ops.medattn, "_cpu_vector_fma_gflops"):
        return None
    probe = torch.ops.medattn._cpu_vector_fma_gflops
    probe(2_000_000)  # wakes the pool
    return statistics.median(probe(20_000_000) for _ in range(reps))


def measure_machine(device: str, dtype: torch.dtype = torch.float32) -> MachinePeak:
    return MachinePeak(device_name(device), gemm_gflops(device), copy_gbps(device), vector_fma_gflops(device))


def device_name(device: str) -> str:
    """The machine in words: GPU name, or CPU model, the ISA pass of the C++ kernels and the thread count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from .. import isa
    return f"{cpu_model()}, ISA pass {isa.cpu_isa() or 'n/a (no _C)'}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers: cloud VMs often name only the vendor's line
    ("AMD EPYC"), and the numbers tell a Zen 4 (family 25) from a Zen 5 (family 26), which differ in what
    our kernels and MKL's reach."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "CPU"
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model


# --------------------------------------------------------------------------------------------- output
def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _rate(r: Result) -> str:
    if r.gflops == r.gflops:
        return f"{r.gflops:.1f} GFLOP/s"
    if r.gbps == r.gbps:
        return f"{r.gbps:.1f} GB/s"
    if r.fwd_gflops == r.fwd_gflops:
        return f"fwd {r.fwd_gflops:.1f} GFLOP/s"
    if r.fwd_gbps == r.fwd_gbps:
        return f"fwd {r.fwd_gbps:.1f} GB/s"
    return "-"


def _peak(r: Result) -> str:
    if r.peak != r.peak:
        return "-"
    unit = "GFLOP/s" if r.gflops == r.gflops or r.fwd_gflops == r.fwd_gflops else "GB/s"
    return f"{r.peak:.{0 if unit == 'GFLOP/s' else 1}f} {unit}"


def format_table(results: List[Result]) -> str:
    header = ["op", "shape", "backend", "fwd ms", "fwd+bwd ms", "x ref", "x best builtin", "fwd x ref",
              "fwd x best builtin", "MiB kept", "rel err", "rate", "% peak", "peak"]
    rows = []
    for r in results:
        if _backward_failed(r):
            rows.append([r.op, r.shape, r.backend, _fmt(r.fwd_ms, ".2f"), "-", "-", "-",
                         _fmt(r.fwd_vs_reference, ".2f"), _fmt(r.fwd_vs_builtin, ".2f"), "-",
                         _fmt(r.max_rel_err, ".1e"), "-", f"forward only: {r.error}", "-"])
            continue
        if r.error:
            rows.append([r.op, r.shape, r.backend] + ["-"] * 9 + [f"not run: {r.error}", "-"])
            continue
        pct = r.pct_peak if r.pct_peak == r.pct_peak else r.fwd_pct_peak
        rows.append([r.op, r.shape, r.backend, _fmt(r.fwd_ms, ".2f"), _fmt(r.fwd_bwd_ms, ".2f"),
                     _fmt(r.vs_reference, ".2f"), _fmt(r.vs_builtin, ".2f"), _fmt(r.fwd_vs_reference, ".2f"),
                     _fmt(r.fwd_vs_builtin, ".2f"), _fmt(r.saved_mib, ".2f"), _fmt(r.max_rel_err, ".1e"),
                     _rate(r), _fmt(pct, ".0f"), _peak(r)])
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
