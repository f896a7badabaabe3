"""Build of medattn_kernels._C (torch.utils.cpp_extension + ninja).

Sources: csrc/ops.cpp (schemas), csrc/dispatch.cpp (the ISA registry), csrc/checks.cpp (the kernels' shared
argument checks, compiled once) and the kernels csrc/cpu/*.cpp; CUDA
sources (csrc/cuda/*.cu) are added when torch has CUDA and nvcc is found (MEDATTN_BUILD_CUDA=1/0 forces them).

Runtime ISA dispatch (csrc/include/medattn/dispatch.h): every csrc/cpu/*.cpp is compiled once per CPU
capability of the target architecture (on x86-64: DEFAULT, AVX2, AVX512, with ATen's CPU_CAPABILITY macros
and flags) into the one extension, which runs the variant PyTorch's own capability selects
(torch.backends.cpu.get_cpu_capability(), overridable with ATEN_CPU_CAPABILITY). The DEFAULT objects link
first (see dispatch.h for why the order matters). The build is portable: no -march=native unless asked for
with MEDATTN_CPU_ARCH=native (or any -march value), which then applies to every pass and ties the binary
to CPUs with that ISA. MEDATTN_CPU_ISAS=DEFAULT,AVX2 restricts the passes (DEFAULT is always built).

CPU flags: -O3 and OpenMP (at::parallel_for is OpenMP-backed in the PyTorch wheels and its header inlines
the `#pragma omp` region, so without -fopenmp a kernel would run on one thread), and -fno-math-errno as in
PyTorch's own build (nothing reads errno; without it GCC will not vectorise a loop calling std::sqrt). No
-ffast-math: NaN and Inf must propagate as in PyTorch.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

# ATen's per-capability flags (cmake/Codegen.cmake in PyTorch); the macros select at::vec's implementation.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def isa_defines(isa: str) -> list:
    return [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]


def cpu_isas() -> list:
    """Passes to build, lowest first: the x86 vector ISAs on x86-64, the portable one elsewhere."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("MEDATTN_CPU_ISAS")
    isas = ["DEFAULT", "AVX2", "AVX512"] if x86 else ["DEFAULT"]
    if wanted:
        asked = {w.strip().upper() for w in wanted.split(",") if w.strip()}
        unknown = asked - set(ISA_FLAGS)
        if unknown:
            raise SystemExit(f"MEDATTN_CPU_ISAS: unknown {sorted(unknown)}; expected names from {list(ISA_FLAGS)}")
        isas = [i for i in isas if i == "DEFAULT" or i in asked]
    return isas


def _want_cuda() -> bool:
    forced = os.environ.get("MEDATTN_BUILD_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "off")
    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)  # setuptools wants relative source paths


def kernel_sources() -> list:
    return sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))


def _base_cxx_flags() -> list:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function",
             "-Wno-unknown-pragmas"]  # ATen vec headers carry CUDA-style "#pragma unroll"
    arch = os.environ.get("MEDATTN_CPU_ARCH")
    if arch:
        flags.append(f"-march={arch}")
    return flags


def _extension():
    sources = [_rel(os.path.join(ROOT, "csrc", name)) for name in ("ops.cpp", "dispatch.cpp", "checks.cpp")] + kernel_sources()
    cxx = _base_cxx_flags() + isa_defines("DEFAULT")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _want_cuda():
        sources += sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
        return CUDAExtension("medattn_kernels._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx + ["-DMEDATTN_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("medattn_kernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class BuildWithIsaPasses(BuildExtension):
    """BuildExtension that first compiles the kernels once more per vector ISA (AVX2, AVX512), each pass
    into its own build directory with its own flags, and links those objects after the DEFAULT ones."""

    def build_extension(self, ext):
        default_flags = isa_defines("DEFAULT")
        cxx = [f for f in ext.extra_compile_args["cxx"] if f not in default_flags]
        objects = []
        for isa in cpu_isas()[1:]:
            objects += self.compiler.compile(
                kernel_sources(), output_dir=os.path.join(self.build_temp, "isa_" + isa.lower()),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx + isa_defines(isa) + ISA_FLAGS[isa], "nvcc": []}, depends=ext.depends)
        ext.extra_objects = list(objects)
        super().build_extension(ext)


setup(
    name="medattn-kernels",
    version="0.1.0",
    description="Fused attention, large-kernel depthwise conv and boundary-loss kernels for medical segmentation",
    packages=find_packages(include=["medattn_kernels", "medattn_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark"],
        "demo": ["nibabel", "nilearn", "tqdm", "matplotlib"],
        "monai": ["monai==1.6.1", "einops==0.8.2"],  # the versions integrations/monai.py is written against
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithIsaPasses.with_options(use_ninja=True)},
    entry_points={"console_scripts": [
        "medattn=medattn_kernels.cli:main",
        "medattn-bench=medattn_kernels.bench.cli:main",
    ]},
    zip_safe=False,
)
