"""Build of medattn_kernels._C (torch.utils.cpp_extension + ninja).

Always builds csrc/ops.cpp and csrc/cpu/*.cpp. CUDA sources (csrc/cuda/*.cu) are added when torch has
CUDA and nvcc is found; MEDATTN_BUILD_CUDA=1/0 forces them on or off.

CPU flags: -O3, OpenMP (at::parallel_for is OpenMP-backed in the PyTorch wheels and its header inlines
the `#pragma omp` region, so without -fopenmp a kernel would run on one thread), and the vector
instructions of the build machine (-march=native). MEDATTN_CPU_ARCH overrides the -march value
(e.g. x86-64-v3 for a portable AVX2 build). No -ffast-math: NaN and Inf must propagate as in PyTorch.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("MEDATTN_BUILD_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "off")
    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _extension():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731  (setuptools wants relative paths)
    sources = [rel(os.path.join(ROOT, "csrc", "ops.cpp"))]
    sources += sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    arch = os.environ.get("MEDATTN_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-march={arch}", "-Wall", "-Wno-unused-function"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _want_cuda():
        sources += sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
        return CUDAExtension("medattn_kernels._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx + ["-DMEDATTN_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("medattn_kernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": [
        "medattn=medattn_kernels.cli:main",
        "medattn-bench=medattn_kernels.bench.cli:main",
    ]},
    zip_safe=False,
)
