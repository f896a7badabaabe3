// Vectorisable math shared by the CPU kernels (softmaxes: cross attention, the boundary loss).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace medattn {

// exp(x) for a softmax's x = z - max z <= 0 (a rounding excess of a few ulps above 0 is fine), branch-free
// so that loops over it vectorise (std::exp is a libm call that GCC does not vectorise without
// -ffast-math): round-to-nearest range reduction x = n ln2 + r (Cody-Waite split of ln2) and the Cephes
// expf polynomial, max relative error 8.4e-8 (about 1 ulp) over [-87.3, 0]. Below -87.3 (where expf
// underflows to denormals) it returns 0; NaN gives NaN. double keeps std::exp.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: round to nearest
  n = n == n ? n : 0.0f;  // NaN: any n (the polynomial of NaN is NaN); keeps the int conversion defined
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

#if defined(__AVX512F__)
// The same exp on 16 floats, with fused multiply-adds (GCC's auto-vectoriser stops at 256-bit vectors, so
// hot loops call this directly). Also clamps x to 88 so that 2^n stays finite. A NaN lane gives a
// finite value: exp16_nan restores it.
inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);  // max(x, lo) returns lo for NaN x
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: n sits in the low mantissa bits of t
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000)), _mm512_set1_epi32(127)),
      23);
  const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_mask_blend_ps(underflow, result, _mm512_setzero_ps());
}

inline __m512 exp16_nan(__m512 x) {  // NaN in, NaN out
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(nan, exp16_nonpositive(x), x);
}
#endif

}  // namespace medattn
