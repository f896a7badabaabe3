"""pytest-benchmark view of the activated_batch_norm cases (quick shapes): `pytest benchmarks/`."""
import pytest

from medattn_kernels.bench import activated_batch_norm as cases_module
from benchmarks._params import case_params, run_benchmark


@pytest.mark.parametrize("case, candidate, mode", case_params(cases_module))
def test_bench(benchmark, case, candidate, mode):
    run_benchmark(benchmark, case, candidate, mode)
