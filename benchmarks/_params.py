"""Glue between the op case modules and pytest-benchmark, shared by every benchmarks/bench_<op>.py."""
import pytest
import torch

from medattn_kernels.bench.harness import forward_backward_callable, forward_callable, keep_freed_memory


def case_params(cases_module, device=None, dtype=torch.float32, quick=True):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = []
    for case in cases_module.cases(device, dtype, quick):
        for cand in case.candidates:
            for mode in ("fwd", "fwd+bwd") if case.backward else ("fwd",):
                params.append(pytest.param(case, cand, mode, id=f"{case.shape}-{cand.label}-{mode}"))
    return params


def run_benchmark(benchmark, case, candidate, mode):
    keep_freed_memory()  # as the CLI does: time kernels in warm memory, not page faults
    inputs = case.make_inputs()
    fn = forward_callable(candidate, inputs) if mode == "fwd" else forward_backward_callable(candidate, inputs)
    benchmark.extra_info.update(op=case.op, shape=case.shape, backend=candidate.label, mode=mode)
    benchmark.pedantic(fn, warmup_rounds=1, rounds=5, iterations=1)
