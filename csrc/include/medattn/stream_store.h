// Non-temporal ("streaming") stores for the output passes of the memory-bound kernels (global spatial
// attention, activated batch norm).
//
// A normal store to a line that is not in cache first reads the line from memory (write-allocate), so a
// pass that reads R bytes and writes W costs R + 2W of DRAM traffic. A non-temporal store writes whole
// lines without reading them: R + W, the trick glibc's memcpy uses above a size threshold and the reason a
// large tensor copy reaches the machine's full bandwidth. It pays only when the call's data does not fit
// in the last-level cache anyway; below that, a normal store leaves the output in cache for its consumer.
//
// Streaming needs a vector-aligned address and a whole vector; anything else takes the normal store (a
// run's unaligned head and tail). The stores are weakly ordered: every thread that streamed calls
// stream_fence() before its results are handed on (at the end of its at::parallel_for chunk). The DEFAULT
// pass (also the aarch64 build) stores normally.
#pragma once

#include "medattn/acc_run.h"   // converts_runs
#include "medattn/vec_math.h"  // Vectorized

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace medattn {
inline namespace CPU_CAPABILITY {

// Calls touching at least this many bytes (inputs read + outputs written) stream their outputs: half the
// 32 MiB L3 of a Zen 3 / Zen 4 CCD, which a cloud VM's few vCPUs share with their neighbours; a Xeon's L3
// per core is smaller still. Measured on Zen 4 (AVX-512, 2 threads), global spatial attention at
// (8, 96, 56, 56) (28.8 MB per backward call): backward 1.02 -> 0.82 ms, forward (19.2 MB) unchanged.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// Whether a call of scalar_t touching `bytes` streams its outputs. bfloat16 runs are written through a
// float buffer (medattn/acc_run.h) that must stay in cache: never.
template <typename scalar_t>
inline bool streaming_pays(int64_t bytes) {
  return !converts_runs<scalar_t> && bytes >= kStreamingBytes;
}

// Stores the first n lanes of v at p; with `stream`, a whole aligned vector bypasses the caches.
template <typename T>
inline void store_maybe_streaming(T* p, const Vectorized<T>& v, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream && n == Vectorized<T>::size() && reinterpret_cast<uintptr_t>(p) % sizeof(Vectorized<T>) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#else
    if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  }
#endif
  (void)stream;
  v.store(p, n);
}

// Orders this thread's streamed stores before whatever follows (the parallel region's join).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
