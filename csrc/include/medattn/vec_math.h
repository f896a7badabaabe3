// Vector math shared by the CPU kernels (softmaxes: cross attention, the boundary loss), compiled per ISA
// pass (medattn/dispatch.h): at::vec::Vectorized<T> is a 16-float zmm register in the AVX512 pass, an
// 8-float ymm register in the AVX2 pass, and a portable array (SSE2 on x86-64, NEON on aarch64) in the
// DEFAULT pass. The same source is every pass's; intrinsics appear only where an ISA has a single
// instruction for what the portable code spells in several (exp2_nonpositive, max_ignoring_nan).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace medattn {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// exp(x) for a softmax's x = z - max z <= 0 (a rounding excess of a few ulps above 0 is fine), branch-free
// so that loops over it vectorise (std::exp is a libm call that GCC does not vectorise without
// -ffast-math): round-to-nearest range reduction x = n ln2 + r (Cody-Waite split of ln2) and the Cephes
// expf polynomial, max relative error 8.4e-8 (about 1 ulp) over [-87.3, 0]. Below -87.3 (where expf
// underflows to denormals) it returns 0; NaN gives NaN. double keeps std::exp.
//
// Why not Vectorized<float>::exp_u20(): its clamping maps NaN to exp(88.7), and NaN must propagate
// (design.md section 6); exp() calls SLEEF, which libtorch does not export.
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

// The same exp on a vector, with fused multiply-adds. x is also clamped to 88 so that 2^n stays finite.
// NaN lanes stay NaN: at::vec::maximum / minimum propagate NaN, and so does the polynomial.
inline Vectorized<float> exp_nonpositive(Vectorized<float> x) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const V lo(-87.3f);
  const V underflow = x < lo;  // all-ones lanes; false for NaN
  const V xc = at::vec::minimum(at::vec::maximum(x, lo), V(88.0f));
  const V magic(12582912.0f);  // 1.5 * 2^23: t's low mantissa bits hold n = round(x / ln2)
  const V t = at::vec::fmadd(xc, V(1.44269504088896341f), magic);
  const V n = t - magic;
  V r = at::vec::fnmadd(n, V(0.693359375f), xc);
  r = at::vec::fnmadd(n, V(-2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + V(1.0f));
  // 2^n from the bits of t: (bits(t) - bits(magic) + 127) << 23
  const I biased = at::vec::cast<int32_t>(t) - I(0x4B400000 - 127);
  const V scale = at::vec::cast<float>(biased << I(23));
  return V::blendv(p * scale, V(0.0f), underflow);
}

// float64 is the test-oracle path: std::exp per lane (Vectorized<double>::exp() calls SLEEF, see above).
inline Vectorized<double> exp_nonpositive(Vectorized<double> x) {
  return x.map([](double v) { return std::exp(v); });
}

// 2^f for f in [-1/2, 1/2]: the degree-6 relative-error fit (1e-7) of exp2_nonpositive, one fused multiply-add
// per coefficient, shared by the scalar and vector versions (so a row's vector body and scalar tail agree).
inline float fused_multiply_add(float a, float b, float c) { return std::fma(a, b, c); }
inline Vectorized<float> fused_multiply_add(const Vectorized<float>& a, const Vectorized<float>& b,
                                            const Vectorized<float>& c) {
  return at::vec::fmadd(a, b, c);
}
template <typename T>
inline T exp2_fraction(const T& f) {
  constexpr float kCoefficients[] = {1.3398875017e-3f, 9.6184369177e-3f, 5.5503323674e-2f, 2.4022647738e-1f,
                                     6.9314718246e-1f, 1.0f};
  T p(1.5353361960e-4f);
  for (const float c : kCoefficients) p = fused_multiply_add(p, f, T(c));
  return p;
}

// 2^x for x <= 0 (a rounding excess of a few ulps above 0 is fine), for softmaxes computed in base 2
// (scores pre-multiplied by log2(e), as in FlashAttention): round-to-nearest split x = n + f with
// f = x - n in [-1/2, 1/2] exact, and a degree-6 polynomial for 2^f (relative-error fit, 1e-7 max relative
// error in float32 arithmetic). Cheaper than exp_nonpositive (no Cody-Waite reduction).
// Underflow without a blend: x is clamped to -127 from below, and n = -127 makes the exponent field of 2^n
// zero, so 2^n = +0 and the product is an exact 0 (-inf included). Between -127 and -126.5 that is 0 for a
// true value under 2^-126.5; from -126.5 to -126 the result is subnormal. NaN gives NaN.
// double uses std::exp2.
inline float exp2_nonpositive(float x) {
  const float xc = x < -127.0f ? -127.0f : x;  // false for NaN
  const float t = xc + 12582912.0f;             // 1.5 * 2^23: round to nearest
  float n = t - 12582912.0f;
  const float f = xc - n;
  n = n == n ? n : 0.0f;  // NaN: any n (the polynomial of NaN is NaN); keeps the int conversion defined
  const float p = exp2_fraction(f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-127, 1]; +0 at -127
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp2_nonpositive(double x) { return std::exp2(x); }

inline Vectorized<float> exp2_nonpositive(Vectorized<float> x) {
  using V = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // AVX-512 has both ends of the split as single instructions: vrndscaleps rounds to nearest (ties to even,
  // as the magic-number add below), vscalefps multiplies by 2^n, and its zeroing mask clears the underflow
  // lanes (those below -126.5: zero where the other passes' 2^-127 = +0 is): 10 operations. On a core with
  // two 512-bit FMA ports (Intel) the exps share those ports with the attention's block products.
  const __m512 xv = x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.5f), _CMP_NLT_UQ);  // x >= -126.5, or NaN
  const __m512 n = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V p = exp2_fraction(V(_mm512_sub_ps(xv, n)));
  return V(_mm512_maskz_scalef_ps(keep, p, n));
#elif defined(CPU_CAPABILITY_AVX2)
  // 13 operations, all on the vector ALU ports that the polynomial's FMAs need too (the attention's exp
  // passes are bound by those ports). vmaxps returns its second operand when either is NaN, so one
  // instruction clamps and keeps NaN, where a compare and two blends (clamp, then zero the underflow lanes)
  // took five uops. Measured (Intel Xeon, AVX2 pass, 2 threads, gated self-attention N = 784, D = 64,
  // alternating builds): forward 8.21-8.42 -> 7.91-8.06 ms, fwd+bwd 28.3-29.1 -> 27.4-28.0 ms.
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_add_ps(xc, magic);
  const V p = exp2_fraction(V(_mm256_sub_ps(xc, _mm256_sub_ps(t, magic))));
  // n + 127 from the bits of t, then 2^n by a shift into the exponent field
  const __m256i biased = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127));
  return V(_mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23))));
#else
  using I = Vectorized<int32_t>;
  const V lo(-127.0f);
  const V xc = V::blendv(x, lo, x < lo);  // x < lo is false for NaN
  const V magic(12582912.0f);
  const V t = xc + magic;
  const V p = exp2_fraction(xc - (t - magic));
  const I biased = at::vec::cast<int32_t>(t) - I(0x4B400000 - 127);  // n + 127 from the bits of t
  return p * at::vec::cast<float>(biased << I(23));
#endif
}

inline Vectorized<double> exp2_nonpositive(Vectorized<double> x) {
  return x.map([](double v) { return std::exp2(v); });
}

// Lane-wise max(m, x) ignoring a NaN x: x where x > m, else m (m itself must not be NaN: the callers' maxima
// start at -inf and only ever take such x). One vmaxps / vmaxpd on AVX2 and AVX-512, which return their
// second operand unless the first is greater (so also when either is NaN, and m for a pair of zeros, as
// the compare does); the portable compare-and-blend compiles to four instructions on AVX-512 (the
// compare's mask is widened to a vector and narrowed back), which made a score row's max pass 4 ops per
// vector.
template <typename T>
inline Vectorized<T> max_ignoring_nan(const Vectorized<T>& m, const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>)
    return _mm512_max_ps(x, m);
  else if constexpr (std::is_same_v<T, double>)
    return _mm512_max_pd(x, m);
  else
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>)
    return _mm256_max_ps(x, m);
  else if constexpr (std::is_same_v<T, double>)
    return _mm256_max_pd(x, m);
  else
#endif
    return Vectorized<T>::blendv(m, x, x > m);
}

// body(j, count) over [0, n) in vectors: every whole vector with count = Vectorized<T>::size(), a constant once
// inlined (so `Vectorized::loadu(p, count)` folds to one unaligned load: no per-vector count test), then one
// partial vector for the last n % size values.
template <typename T, typename Body>
inline void for_vectors(int64_t n, const Body& body) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + V <= n; j += V) body(j, V);
  if (j < n) body(j, n - j);
}

// Horizontal sum / max of a vector's lanes as a pairwise tree (lane i with lane i + W/2, then W/4, ...): a fixed
// order, so results are the same run to run, and log2(W) dependent steps instead of W - 1 (the serial chain of
// 15 adds, ~45 cycles with AVX-512, ran once per score row and key block in the attention forward).
// float on the AVX2 / AVX-512 passes: ATen's in-register shuffle tree (vec_reduce_all), the same pairs in the
// same order, without the store and scalar reloads (a channels_last GSA pass sums one short vector per pixel).
template <typename T>
inline T lane_sum(const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>)
    return at::vec::vec_reduce_all<float>([](const Vectorized<float>& a, const Vectorized<float>& b) { return a + b; },
                                          v);
#endif
  constexpr int W = Vectorized<T>::size();
  T lanes[W];
  v.store(lanes);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

// NaN lanes are skipped unless lane 0 is NaN (callers reduce vectors that never hold NaN: see row_max).
template <typename T>
inline T lane_max(const Vectorized<T>& v) {
  constexpr int W = Vectorized<T>::size();
  T lanes[W];
  v.store(lanes);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] = lanes[i + w] > lanes[i] ? lanes[i + w] : lanes[i];
  return lanes[0];
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
