// The machine's vector multiply-add rate on this ISA pass, for the benchmark's compute roofline.
//
// MKL's sgemm (the benchmark's other compute peak) is far from the FMA units' rate on some CPUs: on the
// AMD EPYC Zen 5 of the results files it reached 211-224 GFLOP/s on 2 threads, where 16 independent zmm
// FMA chains run at 485-535, and the attention and depthwise kernels exceed the sgemm figure. This probe
// gives the rate a register-blocked kernel can at best reach on the pass it runs: every thread of torch's
// pool (at::parallel_for, the pool the kernels use) runs kChains independent chains a = a * m + c on the
// pass's vectors (one zmm per Vectorized<float> in AVX512, one ymm in AVX2, two xmm-sized halves in the
// portable DEFAULT pass, where a * m + c stays a multiply and an add), enough chains to cover the FMA
// latency of two pipes (4-5 cycles) with registers to spare. The time includes the pool's wake-up, as a
// kernel's does; callers size the work to a millisecond or more.

#include "medattn/dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <chrono>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {

double vector_fma_gflops(int64_t fmas_per_thread) {
  TORCH_CHECK(fmas_per_thread > 0, "fmas_per_thread: expected a positive count, got ", fmas_per_thread);
  using Vec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int kChains = 16;  // of 32 zmm
#elif defined(CPU_CAPABILITY_AVX2)
  constexpr int kChains = 12;  // of 16 ymm (two hold m and c)
#else
  constexpr int kChains = 6;  // DEFAULT: a Vectorized<float> is two 16-byte registers
#endif
  const int64_t steps = (fmas_per_thread + kChains - 1) / kChains;
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // a converges to c / (1 - m) = 0.1: no overflow, no denormals, whatever the step count.
      const Vec m(0.999999f), c(1e-7f);
      Vec a[kChains];
      for (int i = 0; i < kChains; ++i) a[i] = Vec(static_cast<float>(i));
      for (int64_t s = 0; s < steps; ++s)
#pragma GCC unroll 16
        for (int i = 0; i < kChains; ++i) a[i] = at::vec::fmadd(a[i], m, c);
      Vec total = a[0];
      for (int i = 1; i < kChains; ++i) total = total + a[i];
      float lanes[Vec::size()];
      total.store(lanes);
      sink[t] = lanes[0];  // kept: the chains are not dead code
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = sink[0];
  (void)keep;
  return 2.0 * Vec::size() * kChains * steps * threads / seconds / 1e9;
}

}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(vector_fma_gflops);

#if defined(CPU_CAPABILITY_DEFAULT)
// No tensor argument to dispatch on: bound once, for every backend key, like _cpu_isa.
TORCH_LIBRARY_IMPL(medattn, CompositeExplicitAutograd, m) {
  m.impl("_cpu_vector_fma_gflops", MEDATTN_CPU_DISPATCH(vector_fma_gflops));
}
#endif

}  // namespace medattn
