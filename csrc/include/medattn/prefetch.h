// Software prefetches: one cache line, or every 64-byte line of a byte range.
//
// GCC 12 deleted whole loops whose body was only __builtin_prefetch (prefetches do not count as side
// effects, and C++ lets it assume such a loop finite, -ffinite-loops): the kernels compiled without a
// single prefetch instruction. An empty volatile asm taking the address as input (no instruction, any
// architecture) keeps every iteration.
#pragma once

#include "medattn/vec_math.h"  // CPU_CAPABILITY namespace

#include <cstdint>

namespace medattn {
inline namespace CPU_CAPABILITY {  // one copy per ISA pass: no cross-pass ODR merging

// One line (the one holding p) into L2 (Locality 2) or L1 (3); kept by the same empty asm when GCC
// inlines it into a loop.
template <int Locality>
inline void prefetch_line(const void* p) {
  __builtin_prefetch(p, 0, Locality);
#if defined(__GNUC__)
  asm volatile("" : : "r"(p));
#endif
}

// Every line holding a byte of [p, p + bytes), p aligned or not.
template <int Locality>
inline void prefetch_range(const void* p, int64_t bytes) {
  if (bytes <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes - 1);
  for (uintptr_t line = first; line <= last; line += 64) prefetch_line<Locality>(reinterpret_cast<const void*>(line));
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
