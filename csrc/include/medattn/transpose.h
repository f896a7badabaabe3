// Block transposes: 8 x 8 for the packing passes of the attention kernels (K^T, Q^T, dO^T from
// token-major [B, H, N, D] tensors), and a 16 x 16 register transpose (AVX-512) for the depthwise
// convolution's 16-channel NHWC slabs of NCHW input:
//
//     dst[j * ld_dst + i] = src[i * ld_src + j],  i, j < 8.
//
// float on the AVX2 and AVX-512 passes: eight 256-bit rows through the unpack / shuffle / lane-permute
// network (24 shuffles per 64 values) instead of one scalar gather per value. The AVX-512 pass uses the
// same 256-bit code (the 16 x 16 zmm network below was not tried there), and ATen's transpose_mxn<float>
// there (a runtime-shaped version) draws -Wmaybe-uninitialized from its partial-block paths. Everything else
// (double, the DEFAULT pass, aarch64) runs the scalar loop.
#pragma once

#include "medattn/vec_math.h"  // CPU_CAPABILITY namespace

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace medattn {
inline namespace CPU_CAPABILITY {

constexpr int64_t kTransposeBlock = 8;

template <typename T>
inline void transpose_8x8(const T* __restrict src, int64_t ld_src, T* __restrict dst, int64_t ld_dst) {
  for (int64_t j = 0; j < kTransposeBlock; ++j)
    for (int64_t i = 0; i < kTransposeBlock; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
inline void transpose_8x8<float>(const float* __restrict src, int64_t ld_src, float* __restrict dst,
                                 int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  // pairs of rows interleaved: t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t1 = a2 b2 a3 b3 | a6 b6 a7 b7, ...
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // quads: r0 = a0 b0 c0 d0 | a4 b4 c4 d4, r1 = a1 b1 c1 d1 | a5 .., r2 = a2 .. | a6 .., r3 = a3 .. | a7 ..
  for (int h = 0; h < 2; ++h) {
    const __m256 *lo = t + 4 * h, *hi = t + 4 * h + 2;
    r[4 * h + 0] = _mm256_shuffle_ps(lo[0], hi[0], 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(lo[0], hi[0], 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(lo[1], hi[1], 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(lo[1], hi[1], 0xEE);
  }
  // 128-bit halves of rows 0-3 and 4-7 joined: column j = low halves (j < 4) or high halves (j >= 4)
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld_dst, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ld_dst, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// 16 x 16 floats in registers: r[i] lane j -> r[j] lane i. Unpacks pair rows (2 x 8 shuffles), 64-bit unpacks
// make quads (16), and two rounds of 128-bit lane shuffles gather each column's four quads (2 x 16): 64
// shuffles per 256 values.
inline void transpose_16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);  // per 128-bit lane L: a(4L) b(4L) a(4L+1) b(4L+1)
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + k], lane L: rows 4i .. 4i + 3 of column 4L + k
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // column 4L + k = lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
  for (int k = 0; k < 4; ++k) {
    const __m512 u_even = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);  // lanes 0, 2 of each
    const __m512 v_even = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 u_odd = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);  // lanes 1, 3 of each
    const __m512 v_odd = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(u_even, v_even, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(u_even, v_even, 0xDD);
    t[4 + k] = _mm512_shuffle_f32x4(u_odd, v_odd, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(u_odd, v_odd, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace medattn
