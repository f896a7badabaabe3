# The README's commands. Each target does its own set-up on a fresh machine: a virtual environment in
# .venv, the pinned tool chain (the CPU torch wheel when torch is not installed there), the extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# nilearn is needed only for the MRI files its wheel carries; --no-deps keeps scikit-learn & co out.
NILEARN ?= nilearn==0.14.1
export PYTHONUNBUFFERED := 1

.PHONY: demo bench test test-python test-isa test-triton test-cpp test-cpp-standalone test-nvcc test-aarch64 test-gpu-compile build setup clean

demo: build  ## the main job: train DIN on real MRI, fused vs reference
	$(VENV)/bin/medattn demo --out demo_out

bench: build  ## every op's benchmark table on this machine, per SIMD ISA pass, and bench_results/speedup.png
	$(PY) -m medattn_kernels.bench --isa-passes vector --out bench_results

test: build test-python test-isa test-triton test-cpp test-nvcc test-aarch64 test-gpu-compile  ## everything CI runs

# requirements-dev.txt pins the tool chain and the [monai] and demo extras (the MONAI tests run in CI).
$(VENV)/.setup-done: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps $(NILEARN)
	touch $@

setup: $(VENV)/.setup-done

build: setup
	$(PIP) install -q -e . --no-build-isolation

test-python: build
	$(PY) -m pytest tests -m "not triton" -q -p no:cacheprovider

# The C++ kernels are built for every CPU ISA (DEFAULT, AVX2, AVX512) and PyTorch's capability picks one
# (csrc/include/medattn/dispatch.h). test-python runs the pass this CPU prefers; test-isa reruns the CPU
# kernels' parity tests on every lower pass it supports (ATEN_CPU_CAPABILITY switches ATen and us together),
# after checking that no pass of the built extension uses an instruction above its ISA (tools/check_isa_library.py).
ISA_TESTS := tests/test_isa.py tests/test_cross_attention.py tests/test_depthwise_conv2d.py \
	tests/test_global_spatial_attention.py tests/test_sobel_boundary_loss.py tests/test_activated_batch_norm.py
OTHER_ISAS = $(shell $(PY) -W ignore -m medattn_kernels.isa --others)
# The extension that imports (not whichever _C*.so lies in the package folder), for the ISA check and the ctests.
EXTENSION = $(shell $(PY) -W ignore -c "import medattn_kernels._C as c; print(c.__file__)" 2>/dev/null)
REQUIRE_EXTENSION = @test -n "$(EXTENSION)" || { echo "$@: medattn_kernels._C does not import" >&2; exit 1; }

test-isa: build
	$(REQUIRE_EXTENSION)
	$(PY) tools/check_isa_library.py $(EXTENSION)
	@for isa in $(OTHER_ISAS); do \
	  echo "== CPU kernel parity tests on the $$isa pass (ATEN_CPU_CAPABILITY=$$isa)"; \
	  ATEN_CPU_CAPABILITY=$$isa $(PY) -m pytest $(ISA_TESTS) -m "not triton" -q -p no:cacheprovider || exit 1; \
	done

# Triton kernels on CPU tensors: TRITON_INTERPRET must be set before triton is imported, hence a
# separate pytest process.
test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest tests -m triton -q -p no:cacheprovider

# The C++ tests link the extension `build` made (CMake's MEDATTN_KERNELS_LIBRARY), so they test the shipped
# binary on every pass without compiling the kernels a second time; test-cpp-standalone builds CMake's own
# library from csrc/ first (what C++ users build; not in `make test`: it compiles every pass again).
CTEST_EVERY_PASS = ctest --test-dir $(1) --output-on-failure && for isa in $(OTHER_ISAS); do \
	  echo "== ctest on the $$isa pass"; ATEN_CPU_CAPABILITY=$$isa ctest --test-dir $(1) --output-on-failure || exit 1; done

test-cpp: build
	$(REQUIRE_EXTENSION)
	cmake -S . -B cmake-build -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release \
	  -DMEDATTN_KERNELS_LIBRARY=$(EXTENSION) > cmake-build.log
	cmake --build cmake-build -j2 >> cmake-build.log
	$(call CTEST_EVERY_PASS,cmake-build)

test-cpp-standalone: setup
	cmake -S . -B cmake-build-standalone -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release \
	  -DMEDATTN_KERNELS_LIBRARY= > cmake-build-standalone.log
	cmake --build cmake-build-standalone -j2 >> cmake-build-standalone.log
	$(call CTEST_EVERY_PASS,cmake-build-standalone)
	$(PY) tools/check_isa_library.py cmake-build-standalone/libmedattn_kernels.so

# CUDA sources compile-only (no GPU here): a syntax or type error in a .cu file fails.
test-nvcc: setup
	@if command -v nvcc >/dev/null; then PYTHON=$(PY) bash tools/nvcc_check.sh; \
	else echo "test-nvcc: skipped, nvcc not found"; fi

# The portable (DEFAULT) pass must build for aarch64: compile-only with Debian's cross compiler.
test-aarch64: setup
	PYTHON=$(PY) bash tools/aarch64_syntax_check.sh

# GPU kernels verified without a GPU: every Triton specialization the launchers launch for the benchmark,
# sweep and network problems, compiled for sm_90 (triton + ptxas), and the CUDA C++ kernels (nvcc -Xptxas
# -v). Fails on a compile error, shared memory over the per-block limit or an unaccepted register spill.
# `python -m medattn_kernels.gpu_check --arch 80,90,100 --markdown docs/gpu_resources.md` for more targets.
test-gpu-compile: build
	$(PY) -m medattn_kernels.gpu_check

clean:
	rm -rf build cmake-build cmake-build.log cmake-build-standalone cmake-build-standalone.log medattn_kernels/_C*.so *.egg-info
