// Helpers shared by every CPU kernel: argument checks with messages that name the argument, and
// the dtype dispatch every op uses. Python validates arguments first (medattn_kernels/ops/_checks.py);
// these checks keep direct torch.ops / libtorch callers from reaching a kernel with bad input.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace medattn {

// Defined once, in csrc/checks.cpp, built with the DEFAULT flags only (not once per ISA pass): their
// messages instantiate c10::str's templates, and a copy a vector pass compiled that the linker kept for the
// whole library (when no DEFAULT object emitted one) would be AVX code that the DEFAULT pass may call
// (tools/check_isa_library.py caught an AVX2 copy of check_float's message formatting).
void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout);
// float32, float64 or bfloat16: the CPU kernels' dtypes
void check_float(const at::Tensor& t, const char* name);
// any floating dtype (buffers the kernels read or write as given, e.g. BatchNorm's running statistics)
void check_floating(const at::Tensor& t, const char* name);
void check_same(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b);
void check_cpu(const at::Tensor& t, const char* name);

// Float type in which a kernel accumulates: float for float32/bfloat16, double for float64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// An empty [0] tensor marks an unrequested or absent gradient (see csrc/ops.cpp).
inline at::Tensor absent_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

}  // namespace medattn

// float32, float64 and bfloat16: the CPU kernels' dtypes.
#define MEDATTN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
