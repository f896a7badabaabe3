// Compile-time unrolling for register blocks: an array of vectors indexed only by compile-time constants
// stays in registers (GCC kept a run-time-indexed one in stack memory, see csrc/cpu/depthwise_conv2d.cpp).
#pragma once

#include <utility>

#define MEDATTN_ALWAYS_INLINE __attribute__((always_inline)) inline
#define MEDATTN_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace medattn {

// Calls f(std::integral_constant<int, i>) for i = 0 .. n - 1 (unrolled at compile time). Inline = true also
// forces the unrolled sequence itself inline: left to GCC, large bodies (a register block's whole row
// loop) became out-of-line calls with the accumulators passed through memory (24 such functions in the
// AVX-512 depthwise object; the flat row-pair kernel ran 2-3x slower). The depthwise kernels use it; the
// activated BN kernels keep GCC's choice, which is what their benchmarks measured.
template <int n, bool Inline = false, typename F>
MEDATTN_ALWAYS_INLINE void static_for(F&& f) {
  if constexpr (Inline) {
    [&]<int... i>(std::integer_sequence<int, i...>) MEDATTN_ALWAYS_INLINE_LAMBDA {
      (f(std::integral_constant<int, i>{}), ...);
    }(std::make_integer_sequence<int, n>{});
  } else {
    [&]<int... i>(std::integer_sequence<int, i...>) { (f(std::integral_constant<int, i>{}), ...); }(
        std::make_integer_sequence<int, n>{});
  }
}

}  // namespace medattn
