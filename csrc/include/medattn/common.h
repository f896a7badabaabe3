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

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", layout, ", got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16,
              name, ": expected float32, float64 or bfloat16 on CPU, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_b, ": expected dtype ", a.scalar_type(), " (as ", name_a,
              "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), name_b, ": expected device ", a.device(), " (as ", name_a, "), got ",
              b.device());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

// Float type in which a kernel accumulates: float for float32/bfloat16, double for float64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// An empty [0] tensor marks an unrequested or absent gradient (see csrc/ops.cpp).
inline at::Tensor absent_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

}  // namespace medattn

// float32, float64 and bfloat16: the CPU kernels' dtypes.
#define MEDATTN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
