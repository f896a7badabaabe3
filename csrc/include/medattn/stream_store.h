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

#include <algorithm>
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

// A non-temporal store of a whole vector at a vector-aligned p (AVX2 / AVX-512 passes; a normal store in
// the DEFAULT pass).
template <typename T>
inline void store_streaming(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  v.store(p);
}

// Stores the first n lanes of v at p; with `stream`, a whole aligned vector bypasses the caches.
template <typename T>
inline void store_maybe_streaming(T* p, const Vectorized<T>& v, int64_t n, bool stream) {
  if (stream && n == Vectorized<T>::size() && reinterpret_cast<uintptr_t>(p) % sizeof(Vectorized<T>) == 0)
    return store_streaming(p, v);
  v.store(p, n);
}

// Writes o[0, n) = value(j, count), the vector of lanes [j, j + count), in the shape an output pass over a
// run wants: whole vectors with a constant count (medattn/vec_math.h, for_vectors), one partial vector at
// the end. With `stream`, the run's whole 64-byte lines take streaming stores and the partial lines at its
// two ends normal ones, so a run at any offset (an NCHW row at an odd pixel offset, a channels_last pixel)
// streams, and no line is ever written in part by streaming stores: a write-combining buffer flushed with
// part of its line costs a partial write to memory (AVX2's 32-byte vectors, two per line, did that to the
// lines a run starts or ends in). Per vector that is the arithmetic, the loads and one store.
template <typename T, typename Value>
inline void write_run(T* o, int64_t n, bool stream, const Value& value) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kLine = 64;
  static_assert(sizeof(Vec) <= kLine, "a vector wider than a cache line");
  constexpr int64_t kVectorsPerLine = kLine / static_cast<int64_t>(sizeof(Vec));  // 1 (AVX-512), 2 (AVX2)
  const auto normal = [&](int64_t from, int64_t to) {
    for_vectors<T>(to - from, [&](int64_t j, int64_t count) { value(from + j, count).store(o + from + j, count); });
  };
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(o) % kLine;
  if (!stream || misaligned % sizeof(T) != 0) return normal(0, n);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((kLine - misaligned) % kLine / sizeof(T)));
  const int64_t lines_end = head + (n - head) / (kVectorsPerLine * V) * (kVectorsPerLine * V);
  normal(0, head);
  for (int64_t j = head; j < lines_end; j += V) store_streaming(o + j, value(j, V));
  normal(lines_end, n);
}

// Orders this thread's streamed stores before whatever follows (the parallel region's join).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
