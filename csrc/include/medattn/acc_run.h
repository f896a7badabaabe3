// Runs of tensor values in the accumulation type (acc_t: float for float32 / bfloat16, double for float64),
// for kernels whose vector loops are written on at::vec::Vectorized<acc> only: float32 and float64 runs are
// read and written in place, bfloat16 runs go through a float buffer (at::vec::convert, rounding to
// nearest even on the way back, as PyTorch's own bfloat16 kernels do).
//
//   const acc* x = load_run(x_ptr, n, tmp_in);      // x_ptr itself, or tmp_in converted
//   acc* y = run_target(y_ptr, tmp_out);            // y_ptr itself, or tmp_out
//   ... vector loop writing y[0, n) ...
//   store_run(y, y_ptr, n);                         // no-op, or tmp_out converted back
//
// The buffers need n values only for bfloat16 (RunBuffer sizes them so).
#pragma once

#include "medattn/common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

namespace medattn {
inline namespace CPU_CAPABILITY {

// True when scalar_t's runs must be converted (bfloat16).
template <typename scalar_t>
constexpr bool converts_runs = !std::is_same_v<scalar_t, acc_t<scalar_t>>;

template <typename scalar_t, typename acc = acc_t<scalar_t>>
inline const acc* load_run(const scalar_t* p, int64_t n, acc* tmp) {
  if constexpr (converts_runs<scalar_t>) {
    at::vec::convert(p, tmp, n);
    return tmp;
  } else {
    return p;
  }
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
inline acc* run_target(scalar_t* p, acc* tmp) {
  if constexpr (converts_runs<scalar_t>) {
    return tmp;
  } else {
    return p;
  }
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
inline void store_run(const acc* v, scalar_t* p, int64_t n) {
  if constexpr (converts_runs<scalar_t>) at::vec::convert(v, p, n);
}

// A conversion buffer of n values for bfloat16, empty otherwise.
template <typename scalar_t>
inline std::vector<acc_t<scalar_t>> run_buffer(int64_t n) {
  return std::vector<acc_t<scalar_t>>(converts_runs<scalar_t> ? n : 0);
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
