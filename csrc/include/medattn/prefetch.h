// Software prefetch of a byte range into L2, one prefetch per 64-byte cache line from its start.
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

// One line (the one holding p) into L2; kept by the same empty asm when GCC inlines it into a loop.
inline void prefetch_line_l2(const void* p) {
  __builtin_prefetch(p, 0, 2);
#if defined(__GNUC__)
  asm volatile("" : : "r"(p));
#endif
}

inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* line = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    __builtin_prefetch(line + o, 0, 2);
#if defined(__GNUC__)
    asm volatile("" : : "r"(line + o));
#endif
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
