"""The benchmark harness's own logic (medattn_kernels/bench): interleaved timing, the best-PyTorch-path
ratios, the speed-up chart, the training-step variants, the allocator setting. (Speed itself is measured by benchmarks, never
asserted by tests.)"""
import json
import math
import platform
import subprocess
import sys

import pytest
import torch

from medattn_kernels.bench import harness
from medattn_kernels.bench.harness import Candidate, Case, Result


def test_time_interleaved_runs_candidates_round_robin():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = harness.time_interleaved(fns, "cpu", warmup=1, reps=4, budget_s=100.0)
    assert set(medians) == set("abc")
    assert calls[:3] == list("abc")  # warm-up: one call each
    # timed rounds, interleaved, each starting one candidate further along: none always follows the same one
    assert calls[3:] == list("abc") + list("bca") + list("cab") + list("abc")


def _result(backend, kind, fwd, fwd_bwd):
    return Result("op", "shape", backend, kind, "cpu", "float32", fwd, fwd_bwd, 0.0, 0.0)


def test_ratios_are_against_the_fastest_pytorch_path():
    results = [_result("reference", "reference", 40.0, 100.0), _result("builtin slow", "builtin", 10.0, 80.0),
               _result("builtin fast", "builtin", 20.0, 50.0), _result("medattn cpu", "fused", 5.0, 25.0)]
    case = Case("op", "shape", dict, [], flops=1e9, forward_flops=2e8)
    harness._derive(case, results, 100.0)  # the sgemm GFLOP/s measured around the case
    fused = results[-1]
    assert fused.best_builtin == "builtin fast"
    assert fused.vs_builtin == pytest.approx(2.0)  # 50 / 25
    assert fused.fwd_vs_builtin == pytest.approx(2.0)  # fastest forward: 10 / 5
    assert fused.vs_reference == pytest.approx(4.0)
    assert fused.gflops == pytest.approx(40.0) and fused.pct_peak == pytest.approx(40.0)
    assert math.isnan(fused.gbps)


def test_peak_is_measured_around_each_case():
    """A memory-bound case's "% peak" is against the copy rate measured around that case, not the one
    measured at the start of the run (here a made-up 1e-9 GB/s that would give absurd fractions)."""
    case = Case("op", "shape", lambda: {"x": torch.randn(4096, requires_grad=True)},
                [Candidate("double", lambda x: x * 2, "fused")], forward_bytes=2 * 4 * 4096, bytes=4 * 4 * 4096)
    stale = harness.MachinePeak("test machine", gflops=1e-9, copy_gbps=1e-9)
    (r,) = harness.run_case(case, "cpu", torch.float32, reps=3, budget_s=0.1, machine=stale)
    assert 1.0 < r.peak < 1e4  # GB/s of a real copy on any machine
    assert r.pct_peak == pytest.approx(100 * r.gbps / r.peak)
    assert r.fwd_pct_peak == pytest.approx(100 * r.fwd_gbps / r.peak)
    assert " GB/s |" in harness.format_table([r]).splitlines()[-1]


def test_a_failing_baseline_is_reported_not_fatal():
    def broken(x):
        raise RuntimeError("no kernel for this")

    case = Case("op", "shape", lambda: {"x": torch.randn(8, requires_grad=True)},
                [Candidate("broken", broken, "builtin"), Candidate("ok", lambda x: x * 2, "fused")],
                forward_bytes=64, bytes=128)
    results = {r.backend: r for r in harness.run_case(case, "cpu", torch.float32, reps=3, budget_s=0.1)}
    assert "RuntimeError" in results["broken"].error and math.isnan(results["broken"].fwd_ms)
    assert not results["ok"].error and results["ok"].fwd_ms > 0 and results["ok"].fwd_bwd_ms > 0
    assert "not run: RuntimeError" in harness.format_table(list(results.values()))


def test_speedup_chart_draws_every_pass(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (demo extra) draws the chart")
    from medattn_kernels.bench.chart import _speedups, speedup_chart
    dirs = {}
    for isa, ratio in (("avx512", 2.0), ("avx2", 1.5)):
        d = tmp_path / isa
        d.mkdir()
        rows = [{"op": "depthwise_conv2d", "shape": "k7", "backend": "medattn cpu NCHW", "kind": "fused",
                 "vs_builtin": ratio, "fwd_vs_builtin": 1.0, "error": ""},
                {"op": "depthwise_conv2d", "shape": "k7", "backend": "F.conv2d NCHW", "kind": "builtin",
                 "vs_builtin": 1.0, "fwd_vs_builtin": 1.0, "error": ""}]
        (d / "depthwise_conv2d_cpu_float32.json").write_text(json.dumps({"meta": {"device": "cpu"}, "results": rows}))
        dirs[isa] = str(d)
    assert _speedups(dirs["avx2"])[0] == {"depthwise_conv2d: k7 [cpu NCHW]": 1.5}
    path = speedup_chart(dirs, str(tmp_path / "speedup.png"))
    assert (tmp_path / "speedup.png").stat().st_size > 1000 and path.endswith("speedup.png")


def test_training_step_variants():
    from medattn_kernels.bench.training_step import variants
    assert list(variants("din")) == ["fused", "reference+sdpa", "reference"]
    assert list(variants("mslkseg")) == ["fused", "reference"]  # no attention: no SDPA variant


def test_small_maps_benchmark_writes_every_layer(tmp_path, capsys):
    from medattn_kernels.bench.small_maps import ABN_SHAPES, main
    out = tmp_path / "small.json"
    assert main(["--calls", "1", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    layers = [row["layer"] for row in data["rows"]]
    assert len(layers) == len(ABN_SHAPES) + 4 and "ISA pass" in data["machine"]
    assert all(row["ours_us"] > 0 and row["counterpart_us"] > 0 for row in data["rows"])
    for bad in (["--calls", "0"], ["--rounds", "-1"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
        assert f"{bad[0]}: expected >= 1, got {bad[1]}" in capsys.readouterr().err


_REFAULT_SCRIPT = """
import resource, sys, torch
from medattn_kernels.bench.harness import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults_of_a_fresh_64_mib_output():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2 ** 20).fill_(1.0)  # allocated, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_64_mib_output()
# The fewest over a few calls: glibc may still split a kept block for a small request now and then, and
# the next big one then grows the heap (fresh pages) once.
print(min(faults_of_a_fresh_64_mib_output() for _ in range(5)), kept is not None)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc; this C library is not glibc")
def test_keep_freed_memory_stops_refaulting_outputs():
    # glibc returns a 64 MiB block to the OS on free, so every call's output faults its 16384 pages in
    # again; with keep_freed_memory later calls reuse the first one's pages.
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _REFAULT_SCRIPT, mode], capture_output=True, text=True, check=True)
        faults, kept = out.stdout.split()
        return int(faults), kept == "True"

    faults_kept, kept = run("keep")
    assert kept
    faults_default, _ = run("default")
    assert faults_default > 8000, faults_default  # the control: glibc's default does refault
    assert faults_kept < 1000, faults_kept


def test_compiled_baselines_compile_in_every_case():
    # Dynamo's cache is per code object: without a reset per case, the ninth (shape, grad mode) entry of a
    # shared reference would run eagerly while labelled torch.compile.
    def reference(x):
        return x * torch.sigmoid(x.mean(1, keepdim=True))

    cases = [Case(op="toy", shape=str(n), make_inputs=lambda n=n: {"x": torch.randn(2, 3, n, requires_grad=True)},
                  candidates=[Candidate("torch.compile(reference)", harness.compiled(reference), "builtin")])
             for n in range(5, 11)]  # 6 shapes x 2 grad modes: past the limit of 8 in one cache
    counts = []
    for case in cases:
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        (result,) = harness.run_case(case, "cpu", torch.float32, reps=3, budget_s=0.1)
        assert not result.error and result.fwd_bwd_ms == result.fwd_bwd_ms
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert all(c >= 1 for c in counts), counts  # every case compiled its own graphs
