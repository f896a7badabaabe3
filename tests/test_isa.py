"""Runtime ISA dispatch of the C++ kernels (csrc/include/medattn/dispatch.h, medattn_kernels/isa.py).

The parity tests of every op run once per ISA pass this CPU supports (`make test-isa` reruns them with
ATEN_CPU_CAPABILITY=default / avx2); these tests check that the switch selects what it says."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import medattn_kernels as mk
from medattn_kernels import isa

pytestmark = pytest.mark.skipif(mk._extension._C is None, reason="needs the compiled extension medattn_kernels._C")

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_pass_in_use_is_pytorchs_capability():
    torch_cap = torch.backends.cpu.get_cpu_capability()
    expected = torch_cap if torch_cap in isa.ISAS else "DEFAULT"
    assert isa.cpu_isa() == expected
    requested = os.environ.get(isa.CAPABILITY_ENV)
    if requested:  # a per-pass rerun: make sure the pass under test is the one asked for
        assert isa.cpu_isa() == requested.upper()


def test_every_pass_is_built():
    assert isa.compiled_isas() == (list(isa.ISAS) if X86 else ["DEFAULT"])


def _isa_in_subprocess(capability: str) -> str:
    env = dict(os.environ, **{isa.CAPABILITY_ENV: capability})
    out = subprocess.run([sys.executable, "-W", "ignore", "-c",
                          "import medattn_kernels as mk; print(mk.isa.cpu_isa())"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}: the import failed:\n{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def test_environment_variable_lowers_the_pass():
    for capability in isa.supported_isas():
        assert _isa_in_subprocess(capability.lower()) == capability


def test_info_names_the_pass(capsys):
    mk.info()
    assert f"ISA pass {isa.cpu_isa()}" in capsys.readouterr().out


def test_kernel_runs_on_this_pass():
    # A kernel that reaches the ISA-specific code (vector body and scalar tail): depthwise conv 7x7.
    x = torch.randn(2, 5, 13, 37, dtype=torch.float64)
    w = torch.randn(5, 1, 7, 7, dtype=torch.float64)
    out = mk.depthwise_conv2d(x, w, backend="cpu")
    ref = torch.nn.functional.conv2d(x, w, padding=3, groups=5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_vector_fma_probe_runs_on_this_pass():
    # The benchmark's compute roofline (csrc/cpu/fma_peak.cpp): a finite, positive rate, whatever the pass.
    rate = torch.ops.medattn._cpu_vector_fma_gflops(200_000)
    assert 0.0 < rate < float("inf")
    with pytest.raises(RuntimeError, match="fmas_per_thread: expected a positive count, got 0"):
        torch.ops.medattn._cpu_vector_fma_gflops(0)


# tools/check_isa_library.py on a library made to break the rule: an inline function that a vector pass
# and the DEFAULT pass both instantiate, with the vector pass linked first, so the linker keeps the copy
# compiled with -mavx2 -mfma and DEFAULT code calls it. Two such functions: a loop the compiler vectorises
# (ymm registers) and a scalar multiply-add, which -mfma turns into a VEX `vfmadd...ss` on xmm registers
# only: as fatal on a CPU without AVX, and invisible to a check of register names.
_INLINE_FUNCTIONS = {
    "vector_loop": """
__attribute__((noinline)) inline void product(float* out, const float* a, const float* b, int n) {
  for (int i = 0; i < n; ++i) out[i] = a[i] * b[i]; }
""",
    "scalar_fma": """
__attribute__((noinline)) inline void product(float* out, const float* a, const float* b, int n) {
  for (int i = 0; i < n; ++i) { out[i] = a[i] * b[i] + out[i]; asm volatile("" ::: "memory"); } }
""",
}
_PASS_SOURCE = """
namespace medattn { namespace %s {
void kernel(float* out, const float* a, const float* b, int n) {
  product(out, a, b, n);
  for (int i = 0; i < n; ++i) out[i] += a[i]; }
} }
"""


def _library(tmp_path, inline_function, order):
    objects = {}
    for name, flags in (("DEFAULT", []), ("AVX2", ["-mavx2", "-mfma"])):
        src = tmp_path / f"{name}.cpp"
        src.write_text(_INLINE_FUNCTIONS[inline_function] + _PASS_SOURCE % name)
        objects[name] = tmp_path / f"{name}.o"
        subprocess.run(["g++", "-O3", "-fPIC", *flags, "-c",
                        str(src), "-o", str(objects[name])], check=True)
    lib = tmp_path / f"lib_{'_'.join(order)}.so"
    subprocess.run(["g++", "-shared", *[str(objects[n]) for n in order], "-o", str(lib)], check=True)
    return lib


@pytest.mark.skipif(not X86 or shutil.which("g++") is None or shutil.which("objdump") is None,
                    reason="toolchain missing: needs x86-64 g++ and objdump")
@pytest.mark.parametrize("inline_function", sorted(_INLINE_FUNCTIONS))
def test_isa_library_check_catches_a_kept_vector_copy(tmp_path, inline_function):
    check = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools", "check_isa_library.py")]
    good = subprocess.run(check + [str(_library(tmp_path, inline_function, ["DEFAULT", "AVX2"]))],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run(check + [str(_library(tmp_path, inline_function, ["AVX2", "DEFAULT"]))],
                         capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"DEFAULT code uses (v\w+|%ymm\d+): product\(", bad.stderr), bad.stderr
    if inline_function == "scalar_fma":  # caught on an xmm-only VEX instruction
        assert "%xmm" in bad.stderr and "%ymm" not in bad.stderr, bad.stderr
