"""Shared test set-up.

* Every test draws fresh random inputs: the seed comes from the OS and is printed in the report of a
  failing test so the failure can be replayed with MEDATTN_TEST_SEED=<seed>.
* `@pytest.mark.triton` tests run Triton kernels: on a GPU, or on CPU tensors under the interpreter
  (TRITON_INTERPRET=1 must be set before triton is imported, so CI runs them in a separate pytest
  process). Without either they skip, saying which toolchain is missing.
* `@pytest.mark.cuda` tests need a CUDA GPU and skip, saying so, without one.
* torch.compile (Inductor) caches its kernels per CPU capability (medattn_kernels.isa.inductor_cache_dir).
"""
import os

import pytest
import torch

from medattn_kernels.isa import inductor_cache_dir

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# One Inductor code cache per CPU capability: `make test-isa` reruns the tests under ATEN_CPU_CAPABILITY,
# and Inductor would otherwise reuse the kernels it compiled for another one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())


def triton_device() -> str:
    """Device on which Triton tests run: the GPU when there is one, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() and not TRITON_INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("MEDATTN_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with MEDATTN_TEST_SEED={seeds[0]}"))


NO_TRITON_DEVICE = "triton: needs a CUDA GPU or TRITON_INTERPRET=1 (CI runs these in a separate interpreter pass)"


def pytest_collection_modifyitems(config, items):
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
    for item in items:
        if "triton" in item.keywords:
            if not have_triton:
                item.add_marker(pytest.mark.skip(reason="triton is not installed"))
            elif not (torch.cuda.is_available() or TRITON_INTERPRET):
                item.add_marker(pytest.mark.skip(reason=NO_TRITON_DEVICE))  # toolchain/GPU skip
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))
