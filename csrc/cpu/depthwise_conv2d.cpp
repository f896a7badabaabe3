// Depthwise conv2d on CPU (stride 1, zero padding, dilation): tiled direct convolution.
//
// Work items are (batch, channel, row tile). An item copies the input rows it needs into a zero-padded
// "slab" in the accumulation type (float for float32/bfloat16, double for float64): padding, crops and
// the bf16->float conversion happen once there, so the inner loops have no boundary branches. Output
// rows are then computed in register blocks of kRowBlock rows (dh apart) x kBlock SIMD vectors along W:
//     acc[rr][0:kBlock*N] = bias;  for slab row i, kw:  x = slab[i][dw kw : dw kw + kBlock*N]
//                                                      acc[rr] += w[i - rr, kw] * x   (each rr of the block)
// the inner loop is unit-stride along W (N = 16 floats / 8 doubles with AVX-512); each unaligned input
// vector is loaded once and feeds all rows of the block (loads crossing cache lines were the limit).
// The slab is wide enough (a multiple of N plus the kernel's reach) that tail lanes are computed and
// dropped, never read out of bounds.
//
// Backward:
//  * grad input = correlation of grad_out with the flipped kernel: the same row kernel over a slab of
//    grad_out whose origin is (ph - dh (KH-1), pw - dw (KW-1)) (a negative pad crops).
//  * grad weight[kh, kw] = sum_{b,h,w} g[b,h,w] x_pad[h + dh kh, w + dw kw]: per item, register blocks of
//    kKhBlock kernel rows x kKwBlock taps; each shifted x vector is loaded once for the block's kernel
//    rows (x row i meets kernel row kh through g row i - dh kh), reduced over the item's rows; where that g row
//    is outside the item a zero row stands in, so the block runs without tests (items whose x rows are all
//    finite: 0 * Inf would be NaN; other items take a loop that skips those rows). Each item writes its
//    partial [KH*KW] sums (and the grad bias partial) to its own slot; a second pass sums the slots of
//    each channel in item order. No atomics: bit-identical results run to run, whatever the thread count
//    (the row tiling depends on the shape only).
//
// AVX-512, float32, C a multiple of 16, at least 9 x 9 taps (26 x 26 on AMD CPUs): NCHW is computed through
// 16-channel NHWC slabs and the NHWC strip kernel (correlate_planes_blocked), whose loads are whole aligned
// lines.
// AVX-512, float32, AMD CPUs, W = 8 mod 16 (W = 56) below those taps: the planes as flat runs of row pairs
// (correlate_planes_flat), whose vectors hold no dropped lanes.
// AVX-512, C >= one vector, at least 9 x 9 taps: NCHW grad weight runs the NHWC kernel on channels_last
// copies of x and grad_out (weight_grad_via_nhwc).
//
// Layouts: NCHW is used as is; channels_last x with C >= one vector runs the native NHWC kernels below
// (vectorised over C, no layout copy); other strided inputs (and channels_last with fewer channels) are
// copied to NCHW first and the output converted back to channels_last when x was channels_last.
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/prefetch.h"  // prefetch_line, prefetch_range
#include "medattn/static_for.h"  // static_for, MEDATTN_ALWAYS_INLINE
#include "medattn/transpose.h"  // transpose_16x16

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// GCC/Clang vectors of this ISA pass's register width (medattn/dispatch.h): 64 bytes (one zmm) in the
// AVX512 pass, 32 (one ymm) in the AVX2 pass, 16 (SSE2 / NEON) in the DEFAULT pass.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecBytes = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float vec_f32 __attribute__((vector_size(kVecBytes)));
typedef double vec_f64 __attribute__((vector_size(kVecBytes)));
typedef float half_f32 __attribute__((vector_size(kVecBytes / 2)));
typedef double half_f64 __attribute__((vector_size(kVecBytes / 2)));
typedef int32_t mask_f32 __attribute__((vector_size(kVecBytes)));
typedef int64_t mask_f64 __attribute__((vector_size(kVecBytes)));

#define MEDATTN_UNROLL _Pragma("GCC unroll 64")

template <typename acc>
struct Simd;
template <>
struct Simd<float> {
  using vec = vec_f32;
  using half = half_f32;  // half a register (a ymm in the AVX512 pass)
  using mask = mask_f32;
  static constexpr int N = kVecBytes / 4;
};
template <>
struct Simd<double> {
  using vec = vec_f64;
  using half = half_f64;
  using mask = mask_f64;
  static constexpr int N = kVecBytes / 8;
};

template <typename acc>
inline typename Simd<acc>::vec loadu(const acc* p) {
  typename Simd<acc>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc>
inline void storeu(acc* p, typename Simd<acc>::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// Broadcast (a scalar-vector operation broadcasts the scalar): s - 0 is s for every s, -0 and NaN
// included, so it compiles to one vbroadcastss (from memory when s is loaded); 0 + s is not (0 + -0 is
// +0) and costs an add before the broadcast.
template <typename acc>
inline typename Simd<acc>::vec splat(acc s) {
  return s - typename Simd<acc>::vec{};
}

// The low half of a register (a ymm is the low half of its zmm: no instruction).
template <typename acc>
MEDATTN_ALWAYS_INLINE typename Simd<acc>::half low_half(typename Simd<acc>::vec v) {
  typename Simd<acc>::half h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}

template <typename acc>
inline acc hsum(typename Simd<acc>::vec v) {
  acc s = 0;
  for (int i = 0; i < Simd<acc>::N; ++i) s += v[i];
  return s;
}

// Register blocks per ISA pass: every block's accumulators, plus the vectors it loads, fit the register
// file (32 zmm with AVX-512; 16 ymm with AVX2, 16 xmm in the DEFAULT pass, SSE2 or NEON).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBlock = 2;     // forward / grad input: SIMD vectors along W (32 floats) ...
constexpr int kRowBlock = 8;  // ... x output rows: 16 accumulators + 2 inputs + 1 weight
constexpr int kKwBlock = 2;   // grad weight: taps along W ...
constexpr int kKhBlock = 8;   // ... x kernel rows: 16 accumulators + 2 inputs + 1 grad_out
#else
constexpr int kBlock = 2;     // 2 vectors x 6 rows: 12 accumulators + 2 inputs + 1 weight
constexpr int kRowBlock = 6;
constexpr int kKwBlock = 2;   // 2 taps x 6 kernel rows: 12 accumulators + 2 inputs + 1 grad_out
constexpr int kKhBlock = 6;
#endif
// Forward / grad input on full AVX-512 row blocks: kernel rows per weight group (conv_block_grouped),
// 16 accumulators + 2 inputs + up to 7 weights = 25 zmm. 0: the pass has no room (16 registers).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kWeightGroup = 7;
#else
constexpr int kWeightGroup = 0;
#endif
constexpr int64_t kMinItems = 64;  // row tiling: at least this many items per call (shape-only rule)

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// Every unrolled loop of the register blocks forced inline (medattn/static_for.h).
constexpr bool kInlineUnroll = true;

// Runs f(std::integral_constant<int, n>) for a runtime count 1 <= n <= Max (register-block sizes are
// template parameters so that the blocks' arrays live in registers).
template <int Max, typename F>
MEDATTN_ALWAYS_INLINE void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, f);
  }
  TORCH_CHECK(n == Max, "depthwise_conv2d: block size ", n, " out of range");
  f(std::integral_constant<int, Max>{});
}

// Rows of one plane per work item: whole planes when there are enough of them, else split rows so
// that there are about min_items items. Depends on the shape only (determinism of grad weight).
inline int64_t rows_per_tile(int64_t planes, int64_t rows, int64_t min_items = kMinItems) {
  const int64_t tiles = std::min<int64_t>(rows, std::max<int64_t>(1, (min_items + planes - 1) / planes));
  return (rows + tiles - 1) / tiles;
}

struct Geometry {
  int64_t KH, KW, dh, dw;
};

// The rows of the plane window a slab buffer holds. Its zeros (rows and columns outside the plane) depend
// on the window only, and consecutive items of a thread mostly have the same window (whole planes, or the
// same row tile of the next plane), so a refill of the same window copies the in-plane values alone. The
// zeroing was three short memset calls per slab row: ~2% of the K = 7 NCHW forward's samples.
struct SlabWindow {
  int64_t row0 = 0, n_rows = -1;
};

// Copies rows [row0, row0 + n_rows) x columns [col0, col0 + width) of a src_rows x src_cols plane into
// slab (row stride `width`), zeros wherever the window leaves the plane. row0/col0 may be negative;
// col0 and width are the same for every call on one slab (`held` tracks the rest).
template <typename scalar_t, typename acc>
void fill_slab(acc* slab, SlabWindow& held, const scalar_t* src, int64_t src_rows, int64_t src_cols, int64_t row0,
               int64_t n_rows, int64_t col0, int64_t width) {
  const int64_t c_lo = std::clamp<int64_t>(-col0, 0, width);
  const int64_t c_hi = std::clamp<int64_t>(src_cols - col0, c_lo, width);
  const bool zeros_held = held.row0 == row0 && held.n_rows == n_rows;
  held = {row0, n_rows};
  for (int64_t r = 0; r < n_rows; ++r) {
    acc* dst = slab + r * width;
    const int64_t sr = row0 + r;
    if (sr < 0 || sr >= src_rows) {
      if (!zeros_held) std::fill(dst, dst + width, acc(0));
      continue;
    }
    const scalar_t* s = src + sr * src_cols + col0;
    for (int64_t c = c_lo; c < c_hi; ++c) dst[c] = static_cast<acc>(s[c]);
    if (!zeros_held) {
      std::fill(dst, dst + c_lo, acc(0));
      std::fill(dst + c_hi, dst + width, acc(0));
    }
  }
}

// Straight to the output: the whole vector when the types match and all its lanes count, else lane by
// lane (row tail, bf16). V is a full register or a half one (Simd<acc>::half).
template <typename scalar_t, typename acc, typename V>
MEDATTN_ALWAYS_INLINE void store_lanes(const V v, scalar_t* out, int64_t n) {
  constexpr int L = sizeof(V) / sizeof(acc);
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (n == L) {
      std::memcpy(out, &v, sizeof(V));
      return;
    }
  }
  acc lanes[L];
  std::memcpy(lanes, &v, sizeof(V));
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(lanes[k]);
}

// Unrolled: every a[rr][r] is indexed at compile time, so GCC keeps the block's accumulators in registers
// from the FMA loop to the stores. With a run-time loop here the array lived in stack memory: the grouped
// AVX-512 block stored its 16 initial accumulators there and copied the results through it to the output,
// 17% of that function's samples at K = 7 (removing it: K = 7 NCHW forward ~12% faster on the Zen 4). The
// row-major conv_block keeps the loop: fully in registers, its AVX2 instance (12 accumulators of 16 ymm)
// spilled accumulators inside the FMA loop and ran 2x slower.
template <typename scalar_t, typename acc, int RH, int R, bool Unrolled = false>
MEDATTN_ALWAYS_INLINE void store_block(const typename Simd<acc>::vec (&a)[RH][R], scalar_t* out, int64_t out_stride,
                                       int64_t valid) {
  constexpr int N = Simd<acc>::N;
  if constexpr (Unrolled) {
    MEDATTN_UNROLL for (int rr = 0; rr < RH; ++rr)
      MEDATTN_UNROLL for (int r = 0; r < R; ++r)
        store_lanes<scalar_t, acc>(a[rr][r], out + rr * out_stride + r * N, std::min<int64_t>(N, valid - r * N));
  } else {
    for (int rr = 0; rr < RH; ++rr)
      for (int r = 0; r < R; ++r)
        store_lanes<scalar_t, acc>(a[rr][r], out + rr * out_stride + r * N, std::min<int64_t>(N, valid - r * N));
  }
}

// One register block: RH output rows spaced dh apart (rows h + dh rr) x R vectors along W:
//   out[rr][0:R*N] = init + sum_{kh,kw} w[kh, kw] * slab[rr + kh (in units of dh rows)][dw kw + 0:R*N]
// Output row rr reads slab row i = rr + kh, so each slab row i is loaded once per tap column kw and
// feeds every output row of the block with the weight w[i - rr, kw]: one (unaligned, usually cache-
// line-splitting) load per RH FMAs instead of one per FMA. The loads, not the FMAs, were the limit.
// RH * R accumulators (16 with AVX-512, 12 with AVX2: see kBlock) cover the FMA latency (4 cycles x 2
// FMA units) with room to spare.
template <typename scalar_t, typename acc, int RH, int R>
inline void conv_block(const acc* slab, int64_t width, const acc* w, const Geometry& g, acc init, scalar_t* out,
                       int64_t out_stride, int64_t valid) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  V a[RH][R];
  for (int rr = 0; rr < RH; ++rr)
    for (int r = 0; r < R; ++r) a[rr][r] = splat<acc>(init);
  const int64_t row_step = g.dh * width;
  // Slab row i feeds output rows lo <= rr < hi (compile-time bounds: unrolled, branch-free) with the
  // weights of kernel row i - rr.
  auto slab_row = [&](int64_t i, auto lo, auto hi) {
    const acc* row = slab + i * row_step;
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      V x[R];
      MEDATTN_UNROLL for (int r = 0; r < R; ++r) x[r] = loadu<acc>(row + kw * g.dw + r * N);
      static_for<hi - lo, kInlineUnroll>([&](auto k) {
        constexpr int rr = lo + k;
        const V wv = splat<acc>(w[(i - rr) * g.KW + kw]);
        MEDATTN_UNROLL for (int r = 0; r < R; ++r) a[rr][r] += wv * x[r];
      });
    }
  };
  if (g.KH >= RH - 1) {
    // First RH - 1 slab rows: i meets output rows 0..i; last RH - 1 (i = KH + j): rows j + 1..RH - 1.
    // At K = 7 they carry 12 of the 28 (slab row, output row) FMA groups with RH = 4 (AVX-512) and 30 of
    // 42 with RH = 6 (AVX2): a per-row range check there made the AVX2 K = 7 forward ~1.5x slower.
    static_for<RH - 1, kInlineUnroll>([&](auto j) {
      slab_row(j, std::integral_constant<int, 0>{}, std::integral_constant<int, j + 1>{});
    });
    for (int64_t i = RH - 1; i < g.KH; ++i)
      slab_row(i, std::integral_constant<int, 0>{}, std::integral_constant<int, RH>{});
    static_for<RH - 1, kInlineUnroll>([&](auto j) {
      slab_row(g.KH + j, std::integral_constant<int, j + 1>{}, std::integral_constant<int, RH>{});
    });
  } else {  // kernels shorter than the block: each row checks which output rows it reaches
    for (int64_t i = 0; i < g.KH + RH - 1; ++i) {
      const acc* row = slab + i * row_step;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        V x[R];
        for (int r = 0; r < R; ++r) x[r] = loadu<acc>(row + kw * g.dw + r * N);
        for (int rr = 0; rr < RH; ++rr) {
          const int64_t kh = i - rr;
          if (kh < 0 || kh >= g.KH) continue;
          const V wv = splat<acc>(w[kh * g.KW + kw]);
          for (int r = 0; r < R; ++r) a[rr][r] += wv * x[r];
        }
      }
    }
  }
  store_block<scalar_t, acc, RH, R>(a, out, out_stride, valid);
}

// Column-major variant for full AVX-512 blocks (RH = kRowBlock): kernel rows go in groups of G (at most
// kWeightGroup), and for each tap column kw the group's G weights are broadcast once into registers and
// stay there while the group's G + RH - 1 slab rows stream past. Per (group, kw): (G + RH - 1) R input
// loads + G broadcasts per G RH R FMAs; conv_block broadcasts each weight once per output row instead
// (RH G broadcasts, each a load). At K = 7 with 4 rows x 4 vectors (one group, 16 acc + 7 weights + 4
// inputs = 27 zmm) that is 47 loads per 112 FMAs instead of 68: the K = 7 forward ran 11-18% faster on the
// Zen 4 (K = 13: ~5%). With 8 rows x 2 vectors (16 acc + 7 weights + 2 inputs, 25 zmm), each input vector
// feeds up to 8 output rows: 35 loads per 112 FMAs, most of them line-splitting; the K = 7 forward ran
// another 6-8% faster on the Intel Xeon.
// Slab row j of a group meets output rows lo..hi-1 (compile-time bounds: unrolled, branch-free).
// Groups split KH evenly: sizes GMax and GMax - 1 only (e.g. 13 = 7 + 6), both compile-time here; the
// accumulators must never leave registers, so no runtime-size dispatch (with_count) runs inside.
// OneGroup (KH <= kWeightGroup, e.g. K = 7): no run-time group loop around the accumulators (~5% at K = 7).
template <typename scalar_t, typename acc, int RH, int R, int GMax, bool Half, bool OneGroup>
void conv_block_grouped(const acc* slab, int64_t width, const acc* w, const Geometry& g, acc init, scalar_t* out,
                        int64_t out_stride, int64_t valid) {
  using V = typename Simd<acc>::vec;
  using VH = typename Simd<acc>::half;
  constexpr int N = Simd<acc>::N;
  constexpr int RF = Half ? R - 1 : R;  // whole vectors; with Half, one more of N / 2 lanes ends the block
  V a[RH][RF];
  VH ah[RH];
  MEDATTN_UNROLL for (int rr = 0; rr < RH; ++rr) {
    MEDATTN_UNROLL for (int r = 0; r < RF; ++r) a[rr][r] = splat<acc>(init);
    ah[rr] = init - VH{};
  }
  const int64_t row_step = g.dh * width;
  auto group = [&](int64_t kh0, auto G) __attribute__((always_inline)) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      V wv[G];
      static_for<G, kInlineUnroll>([&](auto k) { wv[k] = splat<acc>(w[(kh0 + k) * g.KW + kw]); });
      static_for<G + RH - 1, kInlineUnroll>([&](auto j) __attribute__((always_inline)) {
        const acc* row = slab + (kh0 + j) * row_step + kw * g.dw;
        V x[RF];
        MEDATTN_UNROLL for (int r = 0; r < RF; ++r) x[r] = loadu<acc>(row + r * N);
        VH xh;
        if constexpr (Half) std::memcpy(&xh, row + RF * N, sizeof(xh));
        constexpr int lo = j + 1 > G ? j + 1 - G : 0;
        constexpr int hi = j + 1 < RH ? j + 1 : RH;
        static_for<hi - lo, kInlineUnroll>([&](auto k) {
          constexpr int rr = lo + k;
          MEDATTN_UNROLL for (int r = 0; r < RF; ++r) a[rr][r] += wv[j - rr] * x[r];
          if constexpr (Half) ah[rr] += low_half<acc>(wv[j - rr]) * xh;
        });
      });
    }
  };
  if constexpr (OneGroup) {
    group(0, std::integral_constant<int, GMax>{});
  } else {
    const int64_t groups = (g.KH + GMax - 1) / GMax;
    const int64_t big = g.KH - groups * (GMax - 1);  // groups of GMax rows; the others have GMax - 1
    int64_t kh0 = 0;
    for (int64_t q = 0; q < big; ++q, kh0 += GMax) group(kh0, std::integral_constant<int, GMax>{});
    if constexpr (GMax > 1)
      for (int64_t q = big; q < groups; ++q, kh0 += GMax - 1) group(kh0, std::integral_constant<int, GMax - 1>{});
  }
  store_block<scalar_t, acc, RH, RF, true>(a, out, out_stride, valid);
  if constexpr (Half)
    MEDATTN_UNROLL for (int rr = 0; rr < RH; ++rr)
      store_lanes<scalar_t, acc>(ah[rr], out + rr * out_stride + RF * N, std::min<int64_t>(N / 2, valid - RF * N));
}

// Full AVX-512 row blocks take the grouped kernel; partial ones (and the AVX2 / DEFAULT passes, whose 16
// registers have no room for the weights beside 12 accumulators) the row-major one.
template <typename scalar_t, typename acc, int RH, int R>
MEDATTN_ALWAYS_INLINE void conv_block_best(const acc* slab, int64_t width, const acc* w, const Geometry& g, acc init,
                                           scalar_t* out, int64_t out_stride, int64_t valid) {
  if constexpr (kWeightGroup > 0 && RH == kRowBlock) {
    constexpr int N = Simd<acc>::N;
    constexpr int64_t kGroup = std::max(kWeightGroup, 1);  // (this line is compiled in every pass)
    const int64_t groups = (g.KH + kGroup - 1) / kGroup;
    // A last vector with at most N / 2 lanes to keep (W = 56: 3.5 zmm) is a half register: the 12.5% of
    // the FMAs that a whole one would spend on dropped lanes at W = 56 are not issued.
    const bool half = R > 1 && valid < R * N && valid - (R - 1) * N <= N / 2;
    return with_count<kWeightGroup>((g.KH + groups - 1) / groups, [&](auto GMax) {
      const auto run = [&](auto one_group) {
        if constexpr (R > 1) {
          if (half)
            return conv_block_grouped<scalar_t, acc, RH, R, GMax, true, one_group>(slab, width, w, g, init, out,
                                                                                  out_stride, valid);
        }
        conv_block_grouped<scalar_t, acc, RH, R, GMax, false, one_group>(slab, width, w, g, init, out, out_stride,
                                                                        valid);
      };
      if (groups == 1) return run(std::true_type{});
      run(std::false_type{});
    });
  }
  conv_block<scalar_t, acc, RH, R>(slab, width, w, g, init, out, out_stride, valid);
}

// RH output rows spaced dh apart (output row stride out_stride), all out_cols columns; the block's
// first row's window starts at slab row `slab_row`.
template <typename scalar_t, typename acc, int RH>
void conv_rows(const acc* slab_row, int64_t width, const acc* w, const Geometry& g, acc init, scalar_t* out,
               int64_t out_stride, int64_t out_cols) {
  constexpr int N = Simd<acc>::N;
  int64_t c = 0;
  for (; c + kBlock * N <= out_cols; c += kBlock * N)
    conv_block_best<scalar_t, acc, RH, kBlock>(slab_row + c, width, w, g, init, out + c, out_stride, out_cols - c);
  const int64_t rest = (out_cols - c + N - 1) / N;  // vectors left (rounded up), 0..kBlock
  if (rest > 0)
    with_count<kBlock>(rest, [&](auto R) {
      conv_block_best<scalar_t, acc, RH, R>(slab_row + c, width, w, g, init, out + c, out_stride, out_cols - c);
    });
}

// The source rows of a thread's next item (rows row_origin + its first row .. + slab_rows, those inside
// the plane), prefetched a slice per register block while the current item computes: filled cold, the
// slab stalled on every line (the hardware prefetcher's stream stops during the compute), 20% of the K = 7
// forward; all at once, the requests queued up and did not help. Into L1 rather than L2 (the slice is
// ~12 KiB at 56 x 56, beside a ~20 KiB slab): see the output lines in correlate_planes.
struct NextItemRows {
  const char* rows = nullptr;
  int64_t bytes = 0, done = 0, slice = 0;
  template <typename scalar_t>
  NextItemRows(const scalar_t* src, int64_t item, int64_t end, int64_t tiles, int64_t tile, int64_t row_origin,
               int64_t src_rows, int64_t src_cols, int64_t slab_rows, int64_t blocks) {
    if (item + 1 >= end) return;
    const int64_t pn = (item + 1) / tiles, rn = row_origin + ((item + 1) % tiles) * tile;
    const int64_t lo = std::clamp<int64_t>(rn, 0, src_rows);
    const int64_t hi = std::clamp<int64_t>(rn + slab_rows, lo, src_rows);
    rows = reinterpret_cast<const char*>(src + (pn * src_rows + lo) * src_cols);
    bytes = (hi - lo) * src_cols * int64_t(sizeof(scalar_t));
    slice = round_up((bytes + blocks - 1) / blocks, 64);
  }
  void fetch_slice() {
    for (const int64_t stop = std::min(bytes, done + slice); done < stop; done += 64) prefetch_line<3>(rows + done);
  }
};

// Correlation of every plane of `src` [P, src_rows, src_cols] with its kernel `w` [P, KH*KW] (acc type),
// the window's origin at (row_origin, col_origin) of src, into `dst` [P, out_rows, out_cols]:
//   dst[p, i, j] = bias[p] + sum_{kh,kw} w[p, kh, kw] src[p, row_origin + i + dh kh, col_origin + j + dw kw]
// with zeros outside src. Shared by the forward (origin = -padding) and grad input (flipped kernel).
template <typename scalar_t>
void correlate_planes(const scalar_t* src, scalar_t* dst, const acc_t<scalar_t>* w, const acc_t<scalar_t>* bias,
                      int64_t B, int64_t C, int64_t src_rows, int64_t src_cols, int64_t out_rows, int64_t out_cols,
                      int64_t row_origin, int64_t col_origin, const Geometry& g) {
  using acc = acc_t<scalar_t>;
  constexpr int N = Simd<acc>::N;
  const int64_t planes = B * C;
  const int64_t tile = rows_per_tile(planes, out_rows);
  const int64_t tiles = (out_rows + tile - 1) / tile;
  const int64_t cols_padded = round_up(out_cols, N);
  const int64_t width = cols_padded + g.dw * (g.KW - 1);
  at::parallel_for(0, planes * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> slab((tile + g.dh * (g.KH - 1)) * width);
    SlabWindow held;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / tiles, c = p % C;
      const int64_t r0 = (item % tiles) * tile, r1 = std::min(out_rows, r0 + tile);
      const int64_t slab_rows = (r1 - r0) + g.dh * (g.KH - 1);
      fill_slab(slab.data(), held, src + p * src_rows * src_cols, src_rows, src_cols, row_origin + r0, slab_rows,
                col_origin, width);
      NextItemRows next(src, item, end, tiles, tile, row_origin, src_rows, src_cols, slab_rows,
                        (r1 - r0 + kRowBlock - 1) / kRowBlock);
      const acc* wp = w + c * g.KH * g.KW;
      const acc init = bias ? bias[c] : acc(0);
      scalar_t* out = dst + p * out_rows * out_cols;
      // Rows of a register block are dh apart (they share slab rows): walk each residue class mod dh.
      for (int64_t q = r0; q < std::min(r1, r0 + g.dh); ++q) {
        for (int64_t r = q; r < r1; r += kRowBlock * g.dh) {
          const acc* slab_row = slab.data() + (r - r0) * width;
          const int64_t n = std::min<int64_t>(kRowBlock, (r1 - 1 - r) / g.dh + 1);
          scalar_t* o = out + r * out_cols;
          const int64_t stride = g.dh * out_cols;
          // The block's output lines are fetched before its FMAs: its stores (at the end of each column
          // block) otherwise wait on a read for ownership of every line, from memory once other tensors
          // have filled the caches. With the input slices into L1 (they went to L2), (8, 64, 56, 56) forward
          // on the Zen 5, both variants in one process interleaved with F.conv2d: K = 13 1.51 -> 1.42,
          // 1.40 -> 1.35 and 1.37 -> 1.37 ms (three processes), K = 21 3.82 -> 3.57 and 3.55 -> 3.30, K = 7
          // 0.553 -> 0.542; AVX2 pass K = 13 3.02 -> 2.92 (docs/depthwise_conv2d.md).
          for (int64_t k = 0; k < n; ++k) prefetch_range<3>(o + k * stride, out_cols * int64_t(sizeof(scalar_t)));
          with_count<kRowBlock>(n, [&](auto RH) {
            conv_rows<scalar_t, acc, RH>(slab_row, width, wp, g, init, o, stride, out_cols);
          });
          next.fetch_slice();
        }
      }
    }
  });
}

// Whether every value of x[0, n) is finite: sum of x * 0 is 0 then, NaN otherwise.
template <typename acc>
inline bool all_finite(const acc* x, int64_t n) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  const V zero = splat<acc>(acc(0));
  V s = zero;
  int64_t i = 0;
  for (; i + N <= n; i += N) s += loadu<acc>(x + i) * zero;
  acc t = hsum<acc>(s);
  for (; i < n; ++i) t += x[i] * acc(0);
  return t == acc(0);
}

// Pins v to a register at this point, so that GCC loads it once rather than folding a load into each FMA
// that uses it (in weight_grad_block: the grad_out vector, used by every tap of the block).
template <typename V>
MEDATTN_ALWAYS_INLINE void pin_register(V& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// One kernel-row block over all of an item's slab rows with no test per vector: NKH kernel rows x NKW
// taps in registers (NKW = 1 for the last tap of an odd KW, where a 2-tap block would spend half its FMAs
// on a tap past the kernel: grad weight alone, Zen 5, one process, interleaved, 2-tap / 1-tap last block
// AVX512 pass K = 3 1.077, 5 1.036, 7 1.044; AVX2 pass K = 3 1.028, 7 1.007, 13 1.027). Kernel row u meets
// slab row i through grad_out row i - dh u; where that row lies outside the item (the first and last
// dh (NKH - 1) slab rows), the all-zero row gzero stands in. 0 * x is 0 for finite x only, so the caller
// runs this on items whose slab is all finite.
template <typename acc, int NKH, int NKW>
MEDATTN_ALWAYS_INLINE void weight_grad_block(const acc* gbuf, const acc* gzero, int64_t gwidth, const acc* xslab,
                                             int64_t xwidth, int64_t rows, int64_t full, bool tail,
                                             const typename Simd<acc>::mask& tail_mask, int64_t dh, int64_t dw,
                                             typename Simd<acc>::vec (&a)[kKhBlock][kKwBlock]) {
  using V = typename Simd<acc>::vec;
  const V zero = splat<acc>(acc(0));
  // Sums in a local array indexed by compile-time constants only, so that they live in registers (through
  // the caller's array, GCC kept them on the stack: a store per FMA).
  V sums[NKH][NKW];
  static_for<NKH>([&](auto u) { static_for<NKW>([&](auto j) { sums[u][j] = zero; }); });
  const auto step = [&](const acc* const (&grow)[NKH], int64_t c, const V (&xv)[NKW]) MEDATTN_ALWAYS_INLINE_LAMBDA {
    static_for<NKH>([&](auto u) {
      V gv = loadu<acc>(grow[u] + c);
      pin_register(gv);
      static_for<NKW>([&](auto j) { sums[u][j] += gv * xv[j]; });
    });
  };
  // Slab rows [i0, i1), grad_out row of kernel row u = g_row(i, u).
  const auto run_rows = [&](int64_t i0, int64_t i1, const auto& g_row) MEDATTN_ALWAYS_INLINE_LAMBDA {
    for (int64_t i = i0; i < i1; ++i) {
      const acc* xrow = xslab + i * xwidth;
      const acc* grow[NKH];
      static_for<NKH>([&](auto u) { grow[u] = g_row(i, u); });
      for (int64_t c = 0; c < full; c += Simd<acc>::N) {
        V xv[NKW];
        static_for<NKW>([&](auto j) { xv[j] = loadu<acc>(xrow + c + j * dw); });
        step(grow, c, xv);
      }
      if (tail) {
        V xv[NKW];
        static_for<NKW>([&](auto j) { xv[j] = tail_mask ? loadu<acc>(xrow + full + j * dw) : zero; });
        step(grow, full, xv);
      }
    }
  };
  const auto clipped = [&](int64_t i, int64_t u) {
    const int64_t h = i - dh * u;
    return (h >= 0 && h < rows) ? gbuf + h * gwidth : gzero;
  };
  const auto inside = [&](int64_t i, int64_t u) { return gbuf + (i - dh * u) * gwidth; };
  const int64_t reach = dh * (NKH - 1), end = rows + reach;
  if (rows > reach) {  // rows [reach, rows) meet a grad_out row for every kernel row: no clipping there
    run_rows(0, reach, clipped);
    run_rows(reach, rows, inside);
    run_rows(rows, end, clipped);
  } else {
    run_rows(0, end, clipped);
  }
  static_for<NKH>([&](auto u) { static_for<NKW>([&](auto j) { a[u][j] = sums[u][j]; }); });
}

// grad weight partials of one item: rows [0, rows) of the item's grad_out rows (gbuf, zero beyond Wo)
// against the matching padded input rows (xslab). part_w[KH*KW] receives the item's sums.
// Register block: kKhBlock kernel rows x kKwBlock taps (16 accumulators with AVX-512, 12 with AVX2).
// Input row i feeds kernel row kh through grad_out row i - dh kh, so one pass over the input rows of the
// block loads each shifted input vector once for all kKhBlock kernel rows (and each grad_out vector,
// row-aligned, once per tap pair): kKwBlock + kKhBlock loads per kKwBlock kKhBlock FMAs (10 per 16
// with AVX-512, 8 per 12 with AVX2) instead of two per FMA.
// An item whose input rows are all finite (`finite`, nearly every item) runs weight_grad_block: no test
// per vector, sums in registers, each grad_out vector loaded once. Measured on the Zen 5, (8, 64, 56, 56)
// grad weight alone, against this loop for every item, one process, interleaved: AVX512 pass K = 7 1.98
// -> 0.84 ms, 13 6.75 -> 2.75, 31 34.8 -> 13.1; AVX2 pass K = 7 2.74 -> 1.21, 13 9.69 -> 3.76.
template <typename acc>
void weight_grad_item(const acc* gbuf, const acc* gzero, int64_t gwidth, const acc* xslab, int64_t xwidth,
                      int64_t rows, int64_t out_cols, const Geometry& g, bool finite, acc* part_w) {
  using V = typename Simd<acc>::vec;
  using M = typename Simd<acc>::mask;
  constexpr int N = Simd<acc>::N;
  const int64_t full = out_cols / N * N;  // columns covered by whole vectors
  const bool tail = full < out_cols;
  // Lanes past Wo of the last vector: g is zero there, and x is masked too so that an Inf/NaN input
  // outside the valid window cannot leak a NaN (0 * Inf) into the sums.
  M tail_mask;
  for (int i = 0; i < N; ++i) tail_mask[i] = (full + i < out_cols) ? -1 : 0;
  const V zero = splat<acc>(acc(0));
  // Kernel-row blocks of kKhBlock rows, the last one shorter; when it would have kKhBlock / 2 rows or fewer,
  // the KH rows are spread evenly over as many blocks instead (a block of few rows loads a grad_out vector
  // per 2 FMAs). Grad weight alone, Zen 5, one process, interleaved: AVX2 pass (8, 64, 56, 56) K = 9 5 + 4
  // rows 1.68 ms against 6 + 3 1.73, K = 13 5 + 4 + 4 3.56 against 6 + 6 + 1 (and 4-row blocks 4.08); AVX512
  // pass (8, 8, 112, 112) K = 11 6 + 5 0.81 against 8 + 3 0.94, but K = 13 8 + 5 0.93 against 7 + 6 1.00.
  const int64_t blocks = (g.KH + kKhBlock - 1) / kKhBlock;
  const bool even = 2 * (g.KH - (blocks - 1) * kKhBlock) <= kKhBlock;
  for (int64_t kh0 = 0, block = 0; kh0 < g.KH; ++block) {
    const int64_t left = blocks - block;
    const int64_t nkh = even ? (g.KH - kh0 + left - 1) / left : std::min<int64_t>(kKhBlock, g.KH - kh0);
    for (int64_t kw0 = 0; kw0 < g.KW; kw0 += kKwBlock) {
      const int64_t nkw = std::min<int64_t>(kKwBlock, g.KW - kw0);
      V a[kKhBlock][kKwBlock];
      for (int u = 0; u < kKhBlock; ++u)
        for (int j = 0; j < kKwBlock; ++j) a[u][j] = zero;
      if (finite) {
        const acc* block_x = xslab + g.dh * kh0 * xwidth + kw0 * g.dw;
        with_count<kKwBlock>(nkw, [&](auto NKW) {
          with_count<kKhBlock>(nkh, [&](auto NKH) {
            weight_grad_block<acc, NKH, NKW>(gbuf, gzero, gwidth, block_x, xwidth, rows, full, tail, tail_mask, g.dh,
                                             g.dw, a);
          });
        });
      } else {
        // Any input: kernel rows whose grad_out row is outside the item are skipped, not multiplied by zero.
        // slab row dh kh0 + i meets kernel row kh0 + u through grad_out row i - dh u.
        for (int64_t i = 0; i < rows + g.dh * (nkh - 1); ++i) {
          const acc* xrow = xslab + (g.dh * kh0 + i) * xwidth + kw0 * g.dw;
          const acc* grow[kKhBlock];
          bool used[kKhBlock];
          for (int u = 0; u < kKhBlock; ++u) {
            const int64_t h = i - g.dh * u;
            used[u] = u < nkh && h >= 0 && h < rows;
            grow[u] = gbuf + (used[u] ? h : 0) * gwidth;
          }
          for (int64_t c = 0; c < full; c += N) {
            V xv[kKwBlock];
            for (int j = 0; j < kKwBlock; ++j) xv[j] = loadu<acc>(xrow + c + j * g.dw);
            for (int u = 0; u < kKhBlock; ++u) {
              if (!used[u]) continue;
              const V gv = loadu<acc>(grow[u] + c);
              for (int j = 0; j < kKwBlock; ++j) a[u][j] += gv * xv[j];
            }
          }
          if (tail) {
            V xv[kKwBlock];
            for (int j = 0; j < kKwBlock; ++j) xv[j] = tail_mask ? loadu<acc>(xrow + full + j * g.dw) : zero;
            for (int u = 0; u < kKhBlock; ++u) {
              if (!used[u]) continue;
              const V gv = loadu<acc>(grow[u] + full);
              for (int j = 0; j < kKwBlock; ++j) a[u][j] += gv * xv[j];
            }
          }
        }
      }
      for (int u = 0; u < nkh; ++u)
        for (int j = 0; j < nkw; ++j) part_w[(kh0 + u) * g.KW + kw0 + j] = hsum<acc>(a[u][j]);
    }
    kh0 += nkh;
  }
}

template <typename scalar_t>
void weight_bias_grad(const scalar_t* gout, const scalar_t* x, scalar_t* grad_w, scalar_t* grad_b, int64_t B,
                      int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t ph, int64_t pw,
                      const Geometry& g) {
  using acc = acc_t<scalar_t>;
  constexpr int N = Simd<acc>::N;
  const int64_t planes = B * C, taps = g.KH * g.KW;
  const int64_t tile = rows_per_tile(planes, Ho);
  const int64_t tiles = (Ho + tile - 1) / tile;
  const int64_t gwidth = round_up(Wo, N);
  // x columns read: up to gwidth + dw * (round_up(KW, kKwBlock) - 1) (whole tap blocks).
  const int64_t xwidth = gwidth + g.dw * (round_up(g.KW, kKwBlock) - 1);
  // Per item partials [B, tiles, C] x (taps + 1): summed per channel in (b, tile) order afterwards.
  std::vector<acc> partial(planes * tiles * (taps + 1));
  at::parallel_for(0, planes * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> xslab((tile + g.dh * (g.KH - 1)) * xwidth);
    std::vector<acc> gbuf(tile * gwidth), gzero(gwidth, acc(0));
    SlabWindow x_held, g_held;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / tiles, t = item % tiles, b = p / C, c = p % C;
      const int64_t r0 = t * tile, r1 = std::min(Ho, r0 + tile), rows = r1 - r0;
      acc* part = partial.data() + ((b * tiles + t) * C + c) * (taps + 1);
      fill_slab(gbuf.data(), g_held, gout + p * Ho * Wo, Ho, Wo, r0, rows, 0, gwidth);
      if (grad_w) {
        fill_slab(xslab.data(), x_held, x + p * H * W, H, W, r0 - ph, rows + g.dh * (g.KH - 1), -pw, xwidth);
        const bool finite = all_finite(xslab.data(), (rows + g.dh * (g.KH - 1)) * xwidth);
        weight_grad_item<acc>(gbuf.data(), gzero.data(), gwidth, xslab.data(), xwidth, rows, Wo, g, finite, part);
      }
      if (grad_b) {
        // Vector partial sums over the zero-padded rows (a scalar loop would be one add per
        // 4-cycle latency: ~2 ms on (8, 64, 56, 56)), fixed order, then one lane reduction.
        using V = typename Simd<acc>::vec;
        V s = splat<acc>(acc(0));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < gwidth; j += N) s += loadu<acc>(gbuf.data() + r * gwidth + j);
        part[taps] = hsum<acc>(s);
      }
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t k = 0; k <= taps; ++k) {
        if ((k < taps && !grad_w) || (k == taps && !grad_b)) continue;
        acc s = 0;
        for (int64_t bt = 0; bt < B * tiles; ++bt) s += partial[(bt * C + c) * (taps + 1) + k];
        if (k < taps)
          grad_w[c * taps + k] = static_cast<scalar_t>(s);
        else
          grad_b[c] = static_cast<scalar_t>(s);
      }
    }
  });
}

// ---- channels_last (NHWC) kernels: vectorised over C
//
// One SIMD vector holds N consecutive channels of one pixel, so every tap is a unit-stride vector FMA
// with that tap's per-channel weight vector (taps packed per C-vector as wt[k][kh][kw][N]). Register
// block ("strip"): P output pixels of one row, dw apart, for one C-vector. A kernel row's taps go in
// groups of up to kTapBlock whose weight vectors stay in registers; input pixel j of a group (column
// col + dw j, j < P + T - 1) is loaded once and feeds every pixel p of the strip that meets it, through
// tap t = j - p:
//     P + T - 1 input loads + T weight loads per P T FMAs (about 0.25 per FMA with AVX-512).
// Input columns and rows outside the map are skipped: zero padding without a padded copy. Loads are
// whole vectors; when N does not divide C the last C-vector is moved back to end at C (it overlaps
// the one before, whose lanes it recomputes bit-identically), so C >= N is required (smaller C: the
// NCHW kernel, see use_nhwc).
#if defined(CPU_CAPABILITY_AVX512)
// 16 accumulators + 13 weights + 1 input: 30 of the 32 zmm. Up to 13 taps per group, so that a 13-wide
// kernel row is one band (not 7 + 6): each band pays its column range, its weight loads and a pipeline
// ramp (its first and last input pixels feed few accumulators). Measured against groups of up to 8 on the
// Intel Xeon ((8, 64, 56, 56) forward, 2 threads, caches flushed between calls, alternating builds):
// K = 13 NCHW 2.46-2.49 -> 2.16-2.24 ms, channels_last 2.49-2.60 -> 1.95-2.12; K = 9 / 11 NCHW -12% /
// -13%; K = 21 (11 + 10 instead of 7 + 7 + 7) -6%; K = 31 (11 + 10 + 10 instead of 8 + 8 + 8 + 7)
// channels_last -5%, NCHW +2%.
constexpr int kPixBlock = 16;
constexpr int kTapBlock = 13;
#else
// 8 accumulators + 7 weights + 1 input: all 16 ymm (AVX2) / xmm (SSE2); GCC keeps one weight on the stack
// and reads it as the FMAs' memory operand, which costs no more loads per FMA than 6-tap groups did
// (K = 7: 14 + 6 + 8 against 11 + 10 + 7 loads per kernel row and 56 FMAs) and runs a 7-wide kernel row
// as one band instead of 4 + 3. Measured on an AMD EPYC Zen 3 (AVX2, 2 threads, (8, 64, 56, 56)
// channels_last, the ratio to the best `F.conv2d` in one process, 6-tap / 7-tap builds in alternating
// processes, three pairs): forward K = 7 0.93-1.13 -> 1.18-1.32, K = 13 1.56-1.67 -> 1.64-2.16; fwd+bwd
// (the grad weight kernel shares the band product) K = 7 2.19-2.92 -> 3.41-3.66, K = 13 2.62-3.13 ->
// 3.51-3.94; K = 21 / 31 (two pairs) fwd+bwd 10.9 -> 12.3-14.8 / 11.2-11.8 -> 10.0-11.5.
constexpr int kPixBlock = 8;
constexpr int kTapBlock = 7;
#endif
static_assert((kPixBlock & (kPixBlock - 1)) == 0, "strips() decomposes a row into power-of-two strips");

// Channel offset of C-vector k (see above: the last one ends at C).
inline int64_t cvec_offset(int64_t k, int64_t C, int64_t N) { return std::min<int64_t>(k * N, C - N); }

// Kernel taps w [C][taps] (taps_of) as [C-vectors][taps][N] (the NHWC kernels' weight layout): one vector
// per tap, the C-vector's taps contiguous, so a strip's weight loads sit at compile-time offsets from one
// pointer (with a [taps][C] layout their offsets k C took general registers that the input loads needed).
template <typename acc>
std::vector<acc> pack_taps_by_channel(const acc* w, int64_t C, int64_t taps) {
  constexpr int N = Simd<acc>::N;
  const int64_t cvecs = (C + N - 1) / N;
  std::vector<acc> out(cvecs * taps * N);
  for (int64_t k = 0; k < cvecs; ++k) {
    const int64_t c0 = cvec_offset(k, C, N);
    for (int64_t t = 0; t < taps; ++t)
      for (int l = 0; l < N; ++l) out[(k * taps + t) * N + l] = w[(c0 + l) * taps + t];
  }
  return out;
}

// A kernel row's KW taps in `count` groups: the first `big` of T taps, the others of T - 1.
struct TapGroups {
  int64_t T, big, count;
};
inline TapGroups tap_groups(int64_t KW) {
  const int64_t n = (KW + kTapBlock - 1) / kTapBlock;
  const int64_t T = (KW + n - 1) / n;
  return {T, KW - n * (T - 1), n};
}

// Indices j in [lo, hi) (within [0, n)) for which the column col + dw j lies in [0, cols).
inline void column_range(int64_t col, int64_t dw, int64_t cols, int64_t n, int64_t& lo, int64_t& hi) {
  if (dw == 1) {  // the common case, without the two integer divisions (~15 cycles each per band)
    lo = std::clamp<int64_t>(-col, 0, n);
    hi = std::clamp<int64_t>(cols - col, 0, n);
    return;
  }
  lo = std::min(n, col >= 0 ? int64_t(0) : (-col + dw - 1) / dw);
  hi = std::min(n, col >= cols ? int64_t(0) : (cols - col + dw - 1) / dw);
}

// Calls f(std::integral_constant<int, P>, s) for strips covering pixels [s, n): kPixBlock wide, then the
// remainder as a binary decomposition (at most one strip each of kPixBlock / 2, / 4, ..., 1 pixels).
template <int P = kPixBlock, typename F>
MEDATTN_ALWAYS_INLINE void strips(int64_t n, int64_t s, F&& f) {
  if constexpr (P == kPixBlock) {
    for (; n - s >= P; s += P) f(std::integral_constant<int, P>{}, s);
  } else if (n - s >= P) {
    f(std::integral_constant<int, P>{}, s);
    s += P;
  }
  if constexpr (P > 1) strips<P / 2>(n, s, f);
}

// The band product both NHWC directions share: a[i] += sum_k v[k] x[col + dw (i + k)] for A accumulators
// and K operand vectors v[k] (ops, ostep apart) held in registers; x: one input row at the C-vector's
// channel offset. Input pixel j (j < A + K - 1) is loaded once and feeds every a[i] with k = j - i in
// range; pixels outside [0, cols) are skipped (zero padding).
//   forward / grad input: a = P output pixels, v = T tap weights   (taps_to_pixels; ostep: the
//                         compile-time N of the packed taps, an std::integral_constant)
//   grad weight:          a = T tap sums,      v = P grad_out pixels (pixels_to_taps; ostep: dw C)
// band_in_range: the same with the in-map pixel range [lo, hi) of column_range already known.
// Runtime strides advance a pointer by one step per vector, hidden from the optimiser (empty asm):
// otherwise GCC gives each of the unrolled loads its own precomputed offset j * step, kept in general
// registers, in zmm registers (vmovq) and on the stack, and reloaded around the FMAs (the K = 7 NHWC
// forward ran 1.2x slower so).
template <typename acc, int A, int K, typename Step>
MEDATTN_ALWAYS_INLINE void band_in_range(typename Simd<acc>::vec (&a)[A], const acc* ops, Step ostep,
                                         const acc* xrow, int64_t col, int64_t dw, int64_t C, int64_t lo, int64_t hi) {
  using V = typename Simd<acc>::vec;
  V v[K];
  if constexpr (std::is_integral_v<Step>) {
    MEDATTN_UNROLL for (int k = 0; k < K; ++k, ops += ostep) {
      asm("" : "+r"(ops));
      v[k] = loadu<acc>(ops);
    }
  } else {
    MEDATTN_UNROLL for (int k = 0; k < K; ++k) v[k] = loadu<acc>(ops + k * Step::value);
  }
  const acc* xp = xrow + col * C;
  const int64_t step = dw * C;
  if (lo == 0 && hi == A + K - 1) {
    // Interior band (every strip but those at the map's left and right edges): no per-pixel range checks,
    // which as 22 compares and branches per band at K = 7 took a third of the forward's cycles.
    MEDATTN_UNROLL for (int j = 0; j < A + K - 1; ++j) {
      const V x = loadu<acc>(xp);
      xp += step;
      asm("" : "+r"(xp));
      MEDATTN_UNROLL for (int i = 0; i < A; ++i) {
        if (j - i >= 0 && j - i < K) a[i] += v[j - i] * x;
      }
    }
    return;
  }
  MEDATTN_UNROLL for (int j = 0; j < A + K - 1; ++j, xp += step) {
    asm("" : "+r"(xp));
    if (j < lo || j >= hi) continue;
    const V x = loadu<acc>(xp);
    MEDATTN_UNROLL for (int i = 0; i < A; ++i) {
      if (j - i >= 0 && j - i < K) a[i] += v[j - i] * x;
    }
  }
}

template <typename acc, int A, int K, typename Step>
MEDATTN_ALWAYS_INLINE void band_fma(typename Simd<acc>::vec (&a)[A], const acc* ops, Step ostep, const acc* xrow,
                                    int64_t col, int64_t dw, int64_t cols, int64_t C) {
  int64_t lo, hi;
  column_range(col, dw, cols, A + K - 1, lo, hi);
  band_in_range<acc, A, K>(a, ops, ostep, xrow, col, dw, C, lo, hi);
}

// The packed taps' stride (taps_by_channel: one N-vector per tap), known at compile time.
template <typename acc>
using TapStride = std::integral_constant<int64_t, Simd<acc>::N>;

// a[p] += sum_t w[t] x[col + dw (t + p)] over the T taps of one group (w: T packed weight vectors).
template <typename acc, int P, int T>
MEDATTN_ALWAYS_INLINE void taps_to_pixels(typename Simd<acc>::vec (&a)[P], const acc* xrow, int64_t col, int64_t dw,
                                          int64_t cols, int64_t C, const acc* w) {
  band_fma<acc, P, T>(a, w, TapStride<acc>{}, xrow, col, dw, cols, C);
}

// One strip of P output pixels (dw apart) for one C-vector: every kernel row, every tap group.
// src: the input map [rows, cols, C] at the channel offset; row0/col0: input row/column of tap (0, 0)
// for the strip's first pixel; wt: the C-vector's taps [KH][KW][N] (taps_by_channel).
template <typename acc, int P, int T>
void correlate_strip(const acc* src, int64_t rows, int64_t cols, int64_t C, int64_t row0, int64_t col0,
                     const acc* wt, const Geometry& g, const TapGroups& tg, typename Simd<acc>::vec init, acc* out,
                     int64_t out_step) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  V a[P];
  MEDATTN_UNROLL for (int p = 0; p < P; ++p) a[p] = init;
  const int64_t kh_lo = row0 >= 0 ? 0 : (-row0 + g.dh - 1) / g.dh;
  const int64_t kh_hi = std::min(g.KH, row0 >= rows ? int64_t(0) : (rows - row0 + g.dh - 1) / g.dh);
  if (tg.count == 1) {  // KW <= kTapBlock: one tap group, whose column range holds for every kernel row
    int64_t lo, hi;
    column_range(col0, g.dw, cols, P + T - 1, lo, hi);
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh)
      band_in_range<acc, P, T>(a, wt + kh * g.KW * N, TapStride<acc>{}, src + (row0 + kh * g.dh) * cols * C, col0,
                               g.dw, C, lo, hi);
    MEDATTN_UNROLL for (int p = 0; p < P; ++p) storeu<acc>(out + p * out_step, a[p]);
    return;
  }
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const acc* xrow = src + (row0 + kh * g.dh) * cols * C;
    const acc* wrow = wt + kh * g.KW * N;
    int64_t kw = 0;
    for (int64_t i = 0; i < tg.count; ++i) {
      if (i < tg.big) {
        taps_to_pixels<acc, P, T>(a, xrow, col0 + kw * g.dw, g.dw, cols, C, wrow + kw * N);
        kw += T;
      } else if constexpr (T > 1) {
        taps_to_pixels<acc, P, T - 1>(a, xrow, col0 + kw * g.dw, g.dw, cols, C, wrow + kw * N);
        kw += T - 1;
      }
    }
  }
  MEDATTN_UNROLL for (int p = 0; p < P; ++p) storeu<acc>(out + p * out_step, a[p]);
}

// NHWC counterpart of correlate_planes:
//   dst[b, i, j, c] = bias[c] + sum_{kh,kw} wt[kh, kw, c] src[b, row_origin + i + dh kh, col_origin + j + dw kw, c]
// Work items: output rows (b, i), all channels.
template <typename acc, int T>
void correlate_nhwc(const acc* src, acc* dst, const acc* wt, const acc* bias, int64_t B, int64_t C,
                      int64_t src_rows, int64_t src_cols, int64_t out_rows, int64_t out_cols, int64_t row_origin,
                      int64_t col_origin, const Geometry& g) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  const int64_t cvecs = (C + N - 1) / N;
  const TapGroups tg = tap_groups(g.KW);
  at::parallel_for(0, B * out_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / out_rows, i = item % out_rows;
      const acc* src_b = src + b * src_rows * src_cols * C;
      acc* out_row = dst + item * out_cols * C;
      for (int64_t k = 0; k < cvecs; ++k) {
        const int64_t c = cvec_offset(k, C, N);
        const V init = bias ? loadu<acc>(bias + c) : splat<acc>(acc(0));
        const acc* wt_k = wt + k * g.KH * g.KW * N;
        for (int64_t q = 0; q < std::min(g.dw, out_cols); ++q) {  // pixels q, q + dw, ...
          strips((out_cols - q + g.dw - 1) / g.dw, 0, [&](auto P, int64_t s) {
            const int64_t j = q + s * g.dw;
            // The strip's output vectors are fetched before its FMAs, so that its P stores (P lines, C
            // values apart) do not each wait on a read for ownership. Zen 5, (8, 64, 56, 56) channels_last
            // forward, both variants in one process interleaved with F.conv2d, two runs of 4 rounds:
            // K = 13 1.36 -> 1.25 and 1.43 -> 1.26 ms, K = 7 1.02 -> 0.89 and 1.03 -> 0.95. (The whole
            // output row at the item's start, or the next item's, into L2: as fast at K = 13, 1-8% slower at K = 7.)
            MEDATTN_UNROLL for (int p = 0; p < P; ++p)
              prefetch_range<3>(out_row + (j + p * g.dw) * C + c, N * int64_t(sizeof(acc)));
            correlate_strip<acc, P, T>(src_b + c, src_rows, src_cols, C, row_origin + i, col_origin + j, wt_k, g,
                                       tg, init, out_row + j * C + c, g.dw * C);
          });
        }
      }
    }
  });
}

// Runs f(std::integral_constant<int, T>) for the tap group size T of tap_groups(KW).
template <typename F>
void with_tap_block(int64_t KW, F&& f) {
  with_count<kTapBlock>(tap_groups(KW).T, f);
}

// MEDATTN_DEPTHWISE_NCHW=slabs / rows / flat forces one NCHW path of the AVX-512 pass (float32; slabs need C
// a multiple of 16, flat W = 8 mod 16 and an output as wide as the input: see blocked_nchw_pays and
// flat_nchw_pays; where the forced path does not apply, the row kernel runs): the tests run each on every
// AVX-512 machine, and one can time one against the other on a new CPU. Read on each call, checked in every
// pass.
enum class NchwPath { kAuto, kSlabs, kRows, kFlat };

inline NchwPath forced_nchw_path() {
  const char* forced = std::getenv("MEDATTN_DEPTHWISE_NCHW");
  if (forced == nullptr || *forced == '\0') return NchwPath::kAuto;
  if (std::strcmp(forced, "slabs") == 0) return NchwPath::kSlabs;
  if (std::strcmp(forced, "rows") == 0) return NchwPath::kRows;
  if (std::strcmp(forced, "flat") == 0) return NchwPath::kFlat;
  TORCH_CHECK(false, "MEDATTN_DEPTHWISE_NCHW: expected 'slabs', 'rows' or 'flat', got '", forced, "'");
}

#if defined(CPU_CAPABILITY_AVX512)
// ---- NCHW through the NHWC strip kernel (AVX-512, float, C a multiple of 16)
//
// The NCHW row kernel loads its inputs at every tap offset along W, and 15 of 16 such zmm loads split a
// cache line: in a steady loop on the Intel Xeon it ran the (8, 64, 56, 56) forward at 2.61 ms for K = 13
// and 14.1 ms for K = 31, where the NHWC strip kernel (each load one whole, aligned line) ran the same
// convolution on channels_last input in 2.01 and 9.1 ms. So for 16 channels at a time, a work item
// (batch, 16 channels, row tile) transposes its input rows into a zero-padded NHWC slab (one zmm per
// pixel; the padding is in the slab, so every band is an interior one), runs correlate_strip over the
// slab row by row into a one-row NHWC buffer, and transposes that row back into the 16 output planes.
// Each 16 x 16 transpose costs 64 shuffles per 256 values (on Intel they share port 5 with the FMAs), and
// the slab's rows are transposed once per row tile that reads them. Measured with a 64 MB copy between
// calls (as the benchmark's interleaving leaves the caches), (8, 64, 56, 56) forward, 2 threads: K = 7
// 0.96-0.99 -> 1.01 ms (slower), K = 9 1.64-1.77 -> 1.62-1.69, K = 11 2.17-2.25 -> 1.94-2.04, K = 13
// 2.72-2.78 -> 2.49-2.51 ms; steady loop K = 31 14.1 -> 10.7 ms. Hence from 9 x 9 taps up
// (kBlockedMinTaps). Prefetching the next item's input rows during the compute (as correlate_planes does)
// made it slower (K = 13: 2.64-2.69 ms).
constexpr int64_t kBlockedMinTaps = 81;
// Fewer, taller row tiles than the row kernel's (kMinItems): a tile transposes its K - 1 halo rows again,
// and these items sum nothing across tiles (no determinism constraint). (8, 64, 56, 56), K = 13: whole
// planes, 68 slab rows per 56 output rows instead of 2 x 40 per 56; with the all-padding column blocks no
// longer transposed (fill_slab_nhwc16), forward K = 13 2.16-2.27 -> 2.11-2.17 ms, K = 9 -7%, K = 21 / 31
// -1 to -2% (Intel Xeon, alternating builds, caches flushed).
constexpr int64_t kMinBlockedItems = 16;

// On AMD (measured on a Zen 5, family 26) the row kernel's line-splitting loads cost less and the
// transposes more: (8, 64, 56, 56) per 64 channels, the row kernel against the slabs, same process,
// two rounds: forward K = 9 0.94-0.95 vs 1.12-1.17 ms, K = 11 1.13-1.14 vs 1.32-1.33, K = 13 1.42-1.47 vs
// 1.58-1.60, K = 21 3.30-3.39 vs 3.45-3.51, K = 31 6.91-7.08 vs 6.79-6.90; fwd+bwd (grad input takes the
// same path) 0.89-0.98x of the slabs' time up to K = 21, 1.00-1.06x at K = 31. So on AMD the slabs start
// between 21 x 21 and 31 x 31 taps. (A Zen 4 was not timed on either path: it takes the Zen 5's threshold.)
constexpr int64_t kBlockedMinTapsAmd = 26 * 26;

inline bool amd_cpu() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
}

inline bool blocked_nchw_pays(int64_t C, const Geometry& g, NchwPath forced) {
  if (C % 16 != 0 || forced == NchwPath::kRows || forced == NchwPath::kFlat) return false;
  if (forced == NchwPath::kSlabs) return true;
  return g.KH * g.KW >= (amd_cpu() ? kBlockedMinTapsAmd : kBlockedMinTaps);
}

inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Rows [row0, row0 + n_rows) x columns [col0, col0 + width) of 16 planes (plane stride src_rows src_cols)
// into slab [n_rows][width][16], zeros outside the planes. Masked loads: lanes outside the plane's columns
// are never read (AVX-512 suppresses their faults).
inline void fill_slab_nhwc16(float* slab, const float* planes, int64_t src_rows, int64_t src_cols, int64_t row0,
                             int64_t n_rows, int64_t col0, int64_t width) {
  const int64_t plane = src_rows * src_cols;
  for (int64_t r = 0; r < n_rows; ++r) {
    float* dst = slab + r * width * 16;
    const int64_t sr = row0 + r;
    if (sr < 0 || sr >= src_rows) {
      std::fill(dst, dst + width * 16, 0.f);
      continue;
    }
    for (int64_t jb = 0; jb < width; jb += 16) {
      const int64_t n = std::min<int64_t>(16, width - jb), c = col0 + jb;
      const int64_t lo = std::clamp<int64_t>(-c, 0, n), hi = std::clamp<int64_t>(src_cols - c, lo, n);
      if (hi == lo) {  // all padding (the kernel's reach past the plane: at W = 56, K = 13, 1 block in 5)
        std::fill(dst + jb * 16, dst + (jb + n) * 16, 0.f);
        continue;
      }
      const __mmask16 m = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
      __m512 v[16];
      const float* p = planes + sr * src_cols + c;
      for (int ch = 0; ch < 16; ++ch) v[ch] = _mm512_maskz_loadu_ps(m, p + ch * plane);
      transpose_16x16(v);
      for (int64_t q = 0; q < n; ++q) _mm512_store_ps(dst + (jb + q) * 16, v[q]);
    }
  }
}

// One NHWC row of 16 channels (orow [cols][16]) back into row `row` of 16 planes.
inline void store_row_nchw16(const float* orow, float* planes, int64_t plane, int64_t cols) {
  for (int64_t jb = 0; jb < cols; jb += 16) {
    const int64_t n = std::min<int64_t>(16, cols - jb);
    __m512 v[16];
    for (int64_t q = 0; q < 16; ++q) v[q] = q < n ? _mm512_load_ps(orow + (jb + q) * 16) : _mm512_setzero_ps();
    transpose_16x16(v);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    for (int ch = 0; ch < 16; ++ch) _mm512_mask_storeu_ps(planes + ch * plane + jb, m, v[ch]);
  }
}

// correlate_planes (same arguments and result) for float with C % 16 == 0, see above.
template <int T>
void correlate_planes_blocked(const float* src, float* dst, const float* w, const float* bias, int64_t B, int64_t C,
                              int64_t src_rows, int64_t src_cols, int64_t out_rows, int64_t out_cols,
                              int64_t row_origin, int64_t col_origin, const Geometry& g) {
  constexpr int N = 16;
  static_assert(Simd<float>::N == N, "AVX-512 pass only");
  const int64_t groups = C / N, taps = g.KH * g.KW;
  const int64_t tile = rows_per_tile(B * groups, out_rows, kMinBlockedItems), tiles = (out_rows + tile - 1) / tile;
  const int64_t width = out_cols + g.dw * (g.KW - 1);  // the output's columns plus the kernel's reach
  const int64_t max_slab_rows = tile + g.dh * (g.KH - 1);
  const std::vector<float> wt = pack_taps_by_channel(w, C, taps);  // [groups][taps][16]
  const TapGroups tg = tap_groups(g.KW);
  at::parallel_for(0, B * groups * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf((max_slab_rows * width + out_cols + 1) * N);
    float* slab = align64(buf.data());
    float* orow = slab + max_slab_rows * width * N;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bk = item / tiles, k = bk % groups;
      const int64_t r0 = (item % tiles) * tile, r1 = std::min(out_rows, r0 + tile);
      const int64_t slab_rows = (r1 - r0) + g.dh * (g.KH - 1);
      fill_slab_nhwc16(slab, src + bk * N * src_rows * src_cols, src_rows, src_cols, row_origin + r0, slab_rows,
                       col_origin, width);
      // Slab rows [lo, hi) hold the plane: the strips see only those (their kernel-row range stops at the
      // plane's edges), so the zero rows above and below cost no FMAs (with "same" padding about KH / (4 H)
      // of them; 56 rows, K = 31: 14%). (8, 64, 56, 56) forward on the Zen 5 against the whole slab, in one
      // process: K = 31 10.7% faster; K = 21 and 13 within noise (+0.6%, -0.6%), not understood yet.
      const int64_t lo = std::clamp<int64_t>(-(row_origin + r0), 0, slab_rows);
      const int64_t hi = std::clamp<int64_t>(src_rows - (row_origin + r0), lo, slab_rows);
      const float* plane_rows = slab + lo * width * N;
      const Simd<float>::vec init = bias ? loadu<float>(bias + k * N) : splat<float>(0.f);
      const float* wt_k = wt.data() + k * taps * N;
      float* out_planes = dst + bk * N * out_rows * out_cols;
      for (int64_t i = r0; i < r1; ++i) {
        // The 16 planes' output rows are fetched while the strips compute, as in correlate_planes: their
        // masked stores would otherwise wait on reads for ownership. Zen 5, (8, 64, 56, 56) forward,
        // both variants in one process interleaved with F.conv2d, three runs of 4-5 rounds: K = 13 3-12%
        // faster (1.38 -> 1.34, 1.54 -> 1.45, 1.71 -> 1.50 ms), K = 31 7.01 -> 6.76 ms.
        // (The next item's input, prefetched into L2 a slice per row on top of this: another 0.5-1%;
        // on the Intel Xeon that prefetch alone cost 6%, see above. Not kept.)
        for (int ch = 0; ch < N; ++ch)
          prefetch_range<3>(out_planes + ch * out_rows * out_cols + i * out_cols, out_cols * int64_t(sizeof(float)));
        for (int64_t q = 0; q < std::min(g.dw, out_cols); ++q) {  // pixels q, q + dw, ...
          strips((out_cols - q + g.dw - 1) / g.dw, 0, [&](auto P, int64_t s) {
            const int64_t j = q + s * g.dw;
            correlate_strip<float, P, T>(plane_rows, hi - lo, width, N, i - r0 - lo, j, wt_k, g, tg, init,
                                         orow + j * N, g.dw * N);
          });
        }
        store_row_nchw16(orow, out_planes + i * out_cols, out_rows * out_cols, out_cols);
      }
    }
  });
}

// ---- NCHW planes as flat runs of row pairs (AVX-512, float, W = 8 mod 16, output as wide as the input, dh = 1)
//
// The row kernel covers a row of W = 56 floats with 3 zmm and a ymm (conv_block_best's half register). On a
// core whose ymm FMA takes a zmm FMA's slot (Zen 5) that is 4 zmm FMAs per 3.5 zmm of output: 12.5% of the
// issued FMAs fall on dropped lanes, and the K = 13 forward ran at 75-80% of its issued-FMA floor, FMA-bound.
// Two rows, 2 W floats, are a whole number of zmm (7 at W = 56, W / 8 in general). So here a plane is one
// flat array with row stride W and no column padding: output position o = y W + x, and tap (kh, kw) reads
// input position o + kh W + dw kw + col_origin, the same offset for every lane of a vector. A lane whose
// column x + dw kw + col_origin falls outside [0, W) would read the row before or after: its load lane is
// masked off (a zero-masking load, on the load ports, no FP-pipe work). 2 W is a multiple of 16, so a
// vector's lane columns depend only on its index v within its row pair, and the masks are one table
// [KW][W / 8] per call.
// Register block: RH row pairs x R vectors, accumulator (rr, r) at o0 + 2 W rr + 16 r. Input row j of the
// block feeds pair rr through kernel row j - 2 rr: each load feeds half as many accumulators as in the row
// kernel (odd rows' vectors sit 8 columns off the even rows'), so the kernel rows are kept in registers in
// one group of up to 13 (16 accumulators + 13 weights + 2 inputs = 31 zmm): (KH + 14) R loads per 8 KH R
// FMAs per tap column. With the row kernel's groups of at most 7 ((7 + 14) R loads per 56 R FMAs) it ran no faster
// than the row kernel. Taller kernels go in groups of at most 8: with two group sizes of 9 or more in one
// function GCC spilled the accumulators.
// (8, 64, 56, 56) forward on the Zen 5, in one process against the row kernel: see docs/depthwise_conv2d.md.
constexpr int kFlatPairBlock = 8;    // row pairs per register block ...
constexpr int kFlatBlock = 2;        // ... x zmm along the pair (16 accumulators)
constexpr int kFlatOneGroup = 13;    // KH up to this: all kernel rows' weights in registers
constexpr int kFlatGroup = 8;        // taller kernels: groups of at most this many rows
static_assert(kFlatPairBlock == 8, "correlate_planes_flat runs the rest of a plane in blocks of 4, 2 and 1 pairs");

// One register block (see above). in: the block's first input position (o0 + col_origin in the slab);
// masks: [KW][VS] from the block's first vector's column; remaining: output values from out to the item's end.
template <int RH, int R, int GMax, bool OneGroup>
void flat_block(const float* in, int64_t W, const __mmask16* masks, int64_t VS, const float* w, const Geometry& g,
                float init, float* out, int64_t remaining) {
  __m512 a[RH][R];
  static_for<RH, kInlineUnroll>([&](auto rr) {
    static_for<R, kInlineUnroll>([&](auto r) { a[rr][r] = _mm512_set1_ps(init); });
  });
  auto group = [&](int64_t kh0, auto G) __attribute__((always_inline)) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      __m512 wv[G];
      static_for<G, kInlineUnroll>([&](auto k) { wv[k] = _mm512_set1_ps(w[(kh0 + k) * g.KW + kw]); });
      __mmask16 m[R];
      static_for<R, kInlineUnroll>([&](auto r) { m[r] = masks[kw * VS + r]; });
      const float* rows = in + kh0 * W + kw * g.dw;
      static_for<G + 2 * (RH - 1), kInlineUnroll>([&](auto j) __attribute__((always_inline)) {
        __m512 x[R];
        static_for<R, kInlineUnroll>([&](auto r) {
          x[r] = _mm512_maskz_loadu_ps(m[r], rows + j * W + 16 * r);
        });
        static_for<RH, kInlineUnroll>([&](auto rr) {
          constexpr int kh = int(j) - 2 * int(rr);
          if constexpr (kh >= 0 && kh < G)
            static_for<R, kInlineUnroll>([&](auto r) {
              a[rr][r] = _mm512_fmadd_ps(wv[kh], x[r], a[rr][r]);
            });
        });
      });
    }
  };
  if constexpr (OneGroup) {
    group(0, std::integral_constant<int, GMax>{});
  } else {  // as conv_block_grouped: sizes GMax and GMax - 1
    const int64_t groups = (g.KH + GMax - 1) / GMax;
    const int64_t big = g.KH - groups * (GMax - 1);
    int64_t kh0 = 0;
    for (int64_t q = 0; q < big; ++q, kh0 += GMax) group(kh0, std::integral_constant<int, GMax>{});
    if constexpr (GMax > 1)
      for (int64_t q = big; q < groups; ++q, kh0 += GMax - 1) group(kh0, std::integral_constant<int, GMax - 1>{});
  }
  // An item with an odd number of rows ends on half a pair: the lanes past its last row are not stored.
  static_for<RH, kInlineUnroll>([&](auto rr) {
    static_for<R, kInlineUnroll>([&](auto r) {
      const int64_t n = remaining - rr * 2 * W - 16 * r;
      float* o = out + rr * 2 * W + 16 * r;
      if (n >= 16)
        _mm512_storeu_ps(o, a[rr][r]);
      else if (n > 0)
        _mm512_mask_storeu_ps(o, static_cast<__mmask16>((1u << n) - 1), a[rr][r]);
    });
  });
}

template <int RH, int R>
void flat_block_any(const float* in, int64_t W, const __mmask16* masks, int64_t VS, const float* w, const Geometry& g,
                    float init, float* out, int64_t remaining) {
  if (g.KH <= kFlatOneGroup)
    return with_count<kFlatOneGroup>(g.KH, [&](auto G) {
      flat_block<RH, R, G, true>(in, W, masks, VS, w, g, init, out, remaining);
    });
  const int64_t groups = (g.KH + kFlatGroup - 1) / kFlatGroup;
  with_count<kFlatGroup>((g.KH + groups - 1) / groups, [&](auto GMax) {
    flat_block<RH, R, GMax, false>(in, W, masks, VS, w, g, init, out, remaining);
  });
}

// Where it fits, the flat form replaces the row kernel on AMD CPUs (measured on the Zen 5; where the slabs
// do not run, below 26 x 26 taps). On Intel CPUs the row kernel and the slabs stay: the flat form issues 1.5x
// the row kernel's loads, nearly all line-splitting, and such loads are what made the slabs pay from 9 x 9
// taps on the Intel Xeon (kBlockedMinTaps); no Intel CPU has timed the flat form yet (forcing it does).
inline bool flat_nchw_pays(int64_t src_cols, int64_t out_cols, const Geometry& g, NchwPath forced) {
  const bool fits = out_cols == src_cols && out_cols % 16 == 8 && g.dh == 1;
  return fits && (forced == NchwPath::kFlat || (forced == NchwPath::kAuto && amd_cpu()));
}

// correlate_planes (same arguments and result) for float where the flat form fits (flat_nchw_pays), see above.
void correlate_planes_flat(const float* src, float* dst, const float* w, const float* bias, int64_t B, int64_t C,
                           int64_t src_rows, int64_t src_cols, int64_t out_rows, int64_t out_cols,
                           int64_t row_origin, int64_t col_origin, const Geometry& g) {
  const int64_t W = out_cols, VS = W / 8;  // zmm per row pair
  const int64_t planes = B * C;
  const int64_t tile = rows_per_tile(planes, out_rows);
  const int64_t tiles = (out_rows + tile - 1) / tile;
  std::vector<__mmask16> masks(g.KW * VS);
  for (int64_t kw = 0; kw < g.KW; ++kw)
    for (int64_t v = 0; v < VS; ++v) {
      unsigned m = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t col = (16 * v + l) % W + kw * g.dw + col_origin;
        if (col >= 0 && col < W) m |= 1u << l;
      }
      masks[kw * VS + v] = static_cast<__mmask16>(m);
    }
  // Masked-off lanes are never read; the margins keep the blocks' base addresses inside the buffer.
  const int64_t front = std::max<int64_t>(0, -col_origin) + 16;
  const int64_t back = std::max<int64_t>(0, col_origin + g.dw * (g.KW - 1)) + 16;
  at::parallel_for(0, planes * tiles, 1, [&](int64_t begin, int64_t end) {
    // The item's rows with the kernel's reach above and below, and one more row for half a last pair.
    std::vector<float> buf(front + (tile + g.KH) * W + back);
    float* slab = buf.data() + front;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / tiles, c = p % C;
      const int64_t r0 = (item % tiles) * tile, r1 = std::min(out_rows, r0 + tile);
      const int64_t n = r1 - r0, slab_rows = n + g.KH, pairs = (n + 1) / 2;
      // Whole rows: the in-plane ones are one contiguous copy, the others zeros.
      const int64_t sr0 = row_origin + r0;
      const int64_t lo = std::clamp<int64_t>(-sr0, 0, slab_rows);
      const int64_t hi = std::clamp<int64_t>(src_rows - sr0, lo, slab_rows);
      std::fill(slab, slab + lo * W, 0.f);
      std::memcpy(slab + lo * W, src + (p * src_rows + sr0 + lo) * W, (hi - lo) * W * sizeof(float));
      std::fill(slab + hi * W, slab + slab_rows * W, 0.f);
      NextItemRows next(src, item, end, tiles, tile, row_origin, src_rows, src_cols, slab_rows,
                        (pairs + kFlatPairBlock - 1) / kFlatPairBlock);
      const float* wp = w + c * g.KH * g.KW;
      const float init = bias ? bias[c] : 0.f;
      float* out = dst + (p * out_rows + r0) * W;
      const int64_t total = n * W;
      // Blocks of 8 pairs, the rest in blocks of 4, 2, 1 (56 rows: 8 + 8 + 8 + 4 pairs); across the pair,
      // blocks of 2 vectors and a last one of 1 when W / 8 is odd.
      for (int64_t s = 0; s < pairs;) {
        const int64_t left = pairs - s;
        const int64_t rh = left >= kFlatPairBlock ? kFlatPairBlock : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const int64_t o0 = s * 2 * W;
        // The block's output lines before its FMAs, as in correlate_planes.
        prefetch_range<3>(out + o0, std::min<int64_t>(rh * 2 * W, total - o0) * int64_t(sizeof(float)));
        const auto run = [&](auto RH) {
          int64_t v = 0;
          for (; v + kFlatBlock <= VS; v += kFlatBlock)
            flat_block_any<RH, kFlatBlock>(slab + col_origin + o0 + 16 * v, W, masks.data() + v, VS, wp, g, init,
                                           out + o0 + 16 * v, total - o0 - 16 * v);
          if (v < VS)
            flat_block_any<RH, 1>(slab + col_origin + o0 + 16 * v, W, masks.data() + v, VS, wp, g, init,
                                  out + o0 + 16 * v, total - o0 - 16 * v);
        };
        if (rh == kFlatPairBlock)
          run(std::integral_constant<int, kFlatPairBlock>{});
        else if (rh == 4)
          run(std::integral_constant<int, 4>{});
        else if (rh == 2)
          run(std::integral_constant<int, 2>{});
        else
          run(std::integral_constant<int, 1>{});
        next.fetch_slice();
        s += rh;
      }
    }
  });
}

#endif  // CPU_CAPABILITY_AVX512

// NCHW correlation: correlate_planes, or its blocked or flat form where that runs faster (AVX-512, float).
template <typename scalar_t>
void correlate_nchw(const scalar_t* src, scalar_t* dst, const acc_t<scalar_t>* w, const acc_t<scalar_t>* bias,
                    int64_t B, int64_t C, int64_t src_rows, int64_t src_cols, int64_t out_rows, int64_t out_cols,
                    int64_t row_origin, int64_t col_origin, const Geometry& g) {
  const NchwPath forced = forced_nchw_path();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (blocked_nchw_pays(C, g, forced)) {
      with_tap_block(g.KW, [&](auto T) {
        correlate_planes_blocked<T>(src, dst, w, bias, B, C, src_rows, src_cols, out_rows, out_cols, row_origin,
                                    col_origin, g);
      });
      return;
    }
    if (flat_nchw_pays(src_cols, out_cols, g, forced)) {
      correlate_planes_flat(src, dst, w, bias, B, C, src_rows, src_cols, out_rows, out_cols, row_origin, col_origin,
                            g);
      return;
    }
  }
#endif
  (void)forced;
  correlate_planes<scalar_t>(src, dst, w, bias, B, C, src_rows, src_cols, out_rows, out_cols, row_origin,
                             col_origin, g);
}

// grad weight, NHWC: a[t] += sum_p g[p] x[col + dw (p + t)] for one strip of P grad_out pixels (g, in
// registers) and one tap group of T (the accumulators); input pixel j = p + t loaded once.
template <typename acc, int P, int T>
MEDATTN_ALWAYS_INLINE void pixels_to_taps(typename Simd<acc>::vec (&a)[T], const acc* grow, int64_t gstep,
                                          const acc* xrow, int64_t col, int64_t dw, int64_t cols, int64_t C) {
  band_fma<acc, T, P>(a, grow, gstep, xrow, col, dw, cols, C);
}

// Sums of one tap group (kernel row kh, taps kw0 .. kw0 + T - 1) over grad_out rows [r0, r1) of one map
// and C-vector, written to part[t * C] (lanes from `first_lane` on: the others belong to the C-vector
// before, see cvec_offset).
template <typename acc, int T>
void tap_group_sums(const acc* gout, const acc* x, int64_t r0, int64_t r1, int64_t Wo, int64_t H, int64_t W,
                    int64_t C, int64_t kh, int64_t kw0, int64_t ph, int64_t pw, const Geometry& g, acc* part,
                    int64_t first_lane) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  V a[T];
  MEDATTN_UNROLL for (int t = 0; t < T; ++t) a[t] = splat<acc>(acc(0));
  for (int64_t h = r0; h < r1; ++h) {
    const int64_t xr = h + g.dh * kh - ph;
    if (xr < 0 || xr >= H) continue;
    const acc* grow = gout + h * Wo * C;
    const acc* xrow = x + xr * W * C;
    for (int64_t q = 0; q < std::min(g.dw, Wo); ++q) {
      strips((Wo - q + g.dw - 1) / g.dw, 0, [&](auto P, int64_t s) {
        const int64_t j = q + s * g.dw;
        pixels_to_taps<acc, P, T>(a, grow + j * C, g.dw * C, xrow, j - pw + g.dw * kw0, g.dw, W, C);
      });
    }
  }
  MEDATTN_UNROLL for (int t = 0; t < T; ++t) {
    acc lanes[N];
    storeu<acc>(lanes, a[t]);
    for (int64_t l = first_lane; l < N; ++l) part[t * C + l] = lanes[l];
  }
}

template <typename acc, int T>
void weight_bias_grad_nhwc(const acc* gout, const acc* x, acc* grad_w, acc* grad_b, int64_t B, int64_t C,
                             int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t ph, int64_t pw,
                             const Geometry& g) {
  using V = typename Simd<acc>::vec;
  constexpr int N = Simd<acc>::N;
  const int64_t taps = g.KH * g.KW, cvecs = (C + N - 1) / N;
  const TapGroups tg = tap_groups(g.KW);
  const int64_t tile = rows_per_tile(B * cvecs, Ho);
  const int64_t tiles = (Ho + tile - 1) / tile;
  // Partial sums per (b, row tile) slot: [B * tiles][taps + 1][C], summed over slots in order below.
  std::vector<acc> partial(B * tiles * (taps + 1) * C);
  at::parallel_for(0, B * tiles * cvecs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slot = item / cvecs, k = item % cvecs, b = slot / tiles;
      const int64_t r0 = (slot % tiles) * tile, r1 = std::min(Ho, r0 + tile);
      const int64_t c = cvec_offset(k, C, N), first_lane = k * N - c;
      const acc* g_b = gout + b * Ho * Wo * C + c;
      acc* part = partial.data() + slot * (taps + 1) * C + c;
      if (grad_w) {
        const acc* x_b = x + b * H * W * C + c;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          int64_t kw = 0;
          for (int64_t i = 0; i < tg.count; ++i) {
            acc* p = part + (kh * g.KW + kw) * C;
            if (i < tg.big) {
              tap_group_sums<acc, T>(g_b, x_b, r0, r1, Wo, H, W, C, kh, kw, ph, pw, g, p, first_lane);
              kw += T;
            } else if constexpr (T > 1) {
              tap_group_sums<acc, T - 1>(g_b, x_b, r0, r1, Wo, H, W, C, kh, kw, ph, pw, g, p, first_lane);
              kw += T - 1;
            }
          }
        }
      }
      if (grad_b) {  // four interleaved sums in a fixed order (one add chain would be latency-bound)
        V s[4] = {};
        const int64_t n = (r1 - r0) * Wo;
        const acc* g0 = g_b + r0 * Wo * C;
        int64_t i = 0;
        for (; i + 4 <= n; i += 4)
          for (int u = 0; u < 4; ++u) s[u] += loadu<acc>(g0 + (i + u) * C);
        for (; i < n; ++i) s[0] += loadu<acc>(g0 + i * C);
        acc lanes[N];
        storeu<acc>(lanes, (s[0] + s[1]) + (s[2] + s[3]));
        for (int64_t l = first_lane; l < N; ++l) part[taps * C + l] = lanes[l];
      }
    }
  });
  const int64_t slots = B * tiles;
  at::parallel_for(0, taps + 1, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc> sum(C);
    for (int64_t k = k0; k < k1; ++k) {
      acc* dst = k < taps ? grad_w : grad_b;
      if (!dst) continue;
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t sl = 0; sl < slots; ++sl) {
        const acc* p = partial.data() + (sl * (taps + 1) + k) * C;
        for (int64_t c = 0; c < C; ++c) sum[c] += p[c];
      }
      if (k < taps)
        for (int64_t c = 0; c < C; ++c) grad_w[c * taps + k] = sum[c];
      else
        std::copy(sum.begin(), sum.end(), grad_b);
    }
  });
}
// ---- argument checks and layout handling

struct Conv {
  int64_t B, C, H, W, KH, KW, ph, pw, dh, dw, Ho, Wo;
  bool channels_last;
};

Conv check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_rank(x, 4, "x", "[B, C, H, W]");
  check_cpu(x, "x");
  check_float(x, "x");
  check_rank(weight, 4, "weight", "[C, 1, KH, KW]");
  check_same(x, weight, "x", "weight");
  TORCH_CHECK(weight.size(0) == x.size(1) && weight.size(1) == 1, "weight: expected shape [C, 1, KH, KW] with C = ",
              x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, "weight: expected a non-empty kernel, got ", weight.sizes());
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "padding: expected two non-negative ints, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, "dilation: expected two ints >= 1, got ",
              dilation);
  Conv s;
  s.B = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.KH = weight.size(2);
  s.KW = weight.size(3);
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.Ho = s.H + 2 * s.ph - s.dh * (s.KH - 1);
  s.Wo = s.W + 2 * s.pw - s.dw * (s.KW - 1);
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, "x: output size ", s.Ho, "x", s.Wo, " is below 1 for input ", s.H, "x", s.W,
              ", kernel ", s.KH, "x", s.KW, ", padding ", padding, ", dilation ", dilation);
  s.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return s;
}

inline at::Tensor to_layout(const at::Tensor& nchw, bool channels_last) {
  return channels_last ? nchw.contiguous(at::MemoryFormat::ChannelsLast) : nchw;
}

// The kernel taps in the accumulation type, optionally flipped in both directions (grad input).
template <typename scalar_t>
std::vector<acc_t<scalar_t>> taps_of(const at::Tensor& weight, bool flip) {
  const at::Tensor w = weight.contiguous();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const int64_t C = w.size(0), KH = w.size(2), KW = w.size(3);
  std::vector<acc_t<scalar_t>> out(C * KH * KW);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < KH; ++i)
      for (int64_t j = 0; j < KW; ++j) {
        const int64_t src = flip ? (KH - 1 - i) * KW + (KW - 1 - j) : i * KW + j;
        out[(c * KH + i) * KW + j] = static_cast<acc_t<scalar_t>>(wp[c * KH * KW + src]);
      }
  return out;
}

template <typename acc>
std::vector<acc> taps_by_channel(const at::Tensor& weight, bool flip) {
  const std::vector<acc> w = taps_of<acc>(weight.to(c10::CppTypeToScalarType<acc>::value), flip);
  return pack_taps_by_channel(w.data(), weight.size(0), weight.size(2) * weight.size(3));
}

// channels_last x runs the NHWC kernels when C fills at least one vector (C >= N); with fewer channels
// most lanes would idle, and the NCHW kernel (vectorised along W) runs on an NCHW copy instead.
// bfloat16 is computed in float (converted once, layout kept), as the NCHW kernel does in its slabs.
bool use_nhwc(const Conv& s, at::ScalarType dtype) {
  const int64_t lanes = dtype == at::kDouble ? Simd<double>::N : Simd<float>::N;
  return s.channels_last && s.C >= lanes;
}

// NCHW grad weight through channels_last copies of x and grad_out and the NHWC kernel (weight_bias_grad_nhwc),
// in the AVX-512 pass from 9 x 9 taps on, where the NHWC kernel's whole-line loads beat the NCHW one
// (weight_grad_item) by more than the two copies cost. (8, 64, 56, 56) float on the Zen 5, grad weight alone,
// NCHW kernel / copies + NHWC kernel, one process, interleaved: K = 9 1.75 / 1.69 ms, 11 2.50 / 1.81, 13
// 2.79 / 1.87, 21 6.67 / 3.45, 31 13.1 / 6.0 (Intel CPUs: untimed). Below 9 x 9 the copies cost more than the
// route saves (fwd + bwd with the earlier, slower NCHW kernel: K = 3 0.75x, 5 0.84x, 7 0.95x). In the AVX2
// pass copies + NHWC kernel were slower even against that earlier NCHW kernel (K = 9 0.90x, 13 0.92x): it
// keeps the NCHW kernel. The copies are transient (two tensors of x's size during this backward); nothing
// more is kept for backward.
constexpr int64_t kWeightGradNhwcTaps = 81;
inline bool weight_grad_via_nhwc(const Conv& s, at::ScalarType dtype) {
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t lanes = dtype == at::kDouble ? Simd<double>::N : Simd<float>::N;
  return s.C >= lanes && s.KH * s.KW >= kWeightGradNhwcTaps;
#else
  (void)s, (void)dtype;
  return false;
#endif
}

inline at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline at::Tensor channels_last_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor forward_nhwc(const Conv& s, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor x = channels_last_as(x_in, acc_type(x_in.scalar_type()));
  at::Tensor out = at::empty({s.B, s.C, s.Ho, s.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const Geometry g{s.KH, s.KW, s.dh, s.dw};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_nhwc", [&] {
    const std::vector<scalar_t> wt = taps_by_channel<scalar_t>(weight, false);
    const at::Tensor b = bias.defined() ? bias.to(x.scalar_type()) : bias;
    with_tap_block(s.KW, [&](auto T) {
      correlate_nhwc<scalar_t, T>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wt.data(),
                                  b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, s.B, s.C, s.H, s.W, s.Ho,
                                  s.Wo, -s.ph, -s.pw, g);
    });
  });
  return out.to(x_in.scalar_type());
}

at::Tensor dw_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Conv s = check_conv(x_in, weight, padding, dilation);
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    check_same(x_in, bias, "x", "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == s.C, "bias: expected shape [", s.C, "], got ", bias.sizes());
  }
  if (use_nhwc(s, x_in.scalar_type())) return forward_nhwc(s, x_in, weight, bias);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({s.B, s.C, s.Ho, s.Wo}, x.options());
  if (out.numel() == 0) return to_layout(out, s.channels_last);
  const Geometry g{s.KH, s.KW, s.dh, s.dw};
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "depthwise_conv2d", [&] {
    using acc = acc_t<scalar_t>;
    const std::vector<acc> w = taps_of<scalar_t>(weight, false);
    std::vector<acc> b;
    if (bias.defined()) {
      const scalar_t* bp = bias.const_data_ptr<scalar_t>();
      b.assign(bp, bp + s.C);
    }
    correlate_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), w.data(),
                             bias.defined() ? b.data() : nullptr, s.B, s.C, s.H, s.W, s.Ho, s.Wo, -s.ph, -s.pw, g);
  });
  return to_layout(out, s.channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_nhwc(const Conv& s, const at::Tensor& grad_in,
                                                             const at::Tensor& x_in, const at::Tensor& weight,
                                                             std::array<bool, 3> mask) {
  const at::ScalarType dtype = x_in.scalar_type(), acc_dtype = acc_type(dtype);
  const at::Tensor gout = channels_last_as(grad_in, acc_dtype);
  const at::Tensor x = mask[1] ? channels_last_as(x_in, acc_dtype) : x_in;
  at::Tensor grad_x = absent_like(x_in), grad_w = absent_like(x_in), grad_b = absent_like(x_in);
  const Geometry g{s.KH, s.KW, s.dh, s.dw};
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "depthwise_conv2d_backward_nhwc", [&] {
    const at::TensorOptions opts = gout.options();
    if (mask[0]) {
      at::Tensor gx = at::empty({s.B, s.C, s.H, s.W}, opts.memory_format(at::MemoryFormat::ChannelsLast));
      const std::vector<scalar_t> wf = taps_by_channel<scalar_t>(weight, true);
      with_tap_block(s.KW, [&](auto T) {
        correlate_nhwc<scalar_t, T>(gout.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), wf.data(),
                                    nullptr, s.B, s.C, s.Ho, s.Wo, s.H, s.W, s.ph - s.dh * (s.KH - 1),
                                    s.pw - s.dw * (s.KW - 1), g);
      });
      grad_x = gx.to(dtype);
    }
    if (mask[1] || mask[2]) {
      at::Tensor gw = at::empty({s.C, 1, s.KH, s.KW}, opts), gb = at::empty({s.C}, opts);
      with_tap_block(s.KW, [&](auto T) {
        weight_bias_grad_nhwc<scalar_t, T>(gout.const_data_ptr<scalar_t>(),
                                           mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
                                           mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
                                           mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr, s.B, s.C, s.H, s.W,
                                           s.Ho, s.Wo, s.ph, s.pw, g);
      });
      if (mask[1]) grad_w = gw.to(dtype);
      if (mask[2]) grad_b = gb.to(dtype);
    }
  });
  return {grad_x, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& weight, at::IntArrayRef padding,
                                                           at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const Conv s = check_conv(x_in, weight, padding, dilation);
  check_rank(grad_in, 4, "grad_out", "[B, C, Ho, Wo]");
  check_same(x_in, grad_in, "x", "grad_out");
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({s.B, s.C, s.Ho, s.Wo}), "grad_out: expected shape [", s.B, ", ",
              s.C, ", ", s.Ho, ", ", s.Wo, "], got ", grad_in.sizes());
  if (use_nhwc(s, x_in.scalar_type()) && s.B > 0) return backward_nhwc(s, grad_in, x_in, weight, mask);
  const at::Tensor gout = grad_in.contiguous();
  at::Tensor grad_x = absent_like(x_in), grad_w = absent_like(x_in), grad_b = absent_like(x_in);
  const Geometry g{s.KH, s.KW, s.dh, s.dw};
  if (mask[0]) {
    at::Tensor gx = at::empty({s.B, s.C, s.H, s.W}, x_in.options());
    if (gx.numel() > 0) {
      MEDATTN_DISPATCH_FLOATING(x_in.scalar_type(), "depthwise_conv2d_backward_input", [&] {
        const std::vector<acc_t<scalar_t>> wf = taps_of<scalar_t>(weight, true);
        correlate_nchw<scalar_t>(gout.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), wf.data(),
                                 nullptr, s.B, s.C, s.Ho, s.Wo, s.H, s.W, s.ph - s.dh * (s.KH - 1),
                                 s.pw - s.dw * (s.KW - 1), g);
      });
    }
    grad_x = to_layout(gx, s.channels_last);
  }
  if (mask[1] && weight_grad_via_nhwc(s, x_in.scalar_type()) && s.B > 0) {
    std::tie(std::ignore, grad_w, grad_b) = backward_nhwc(s, grad_in, x_in, weight, {false, true, mask[2]});
  } else if (mask[1] || mask[2]) {
    if (mask[1]) grad_w = at::empty({s.C, 1, s.KH, s.KW}, x_in.options());
    if (mask[2]) grad_b = at::empty({s.C}, x_in.options());
    if (s.B == 0) {
      if (mask[1]) grad_w.zero_();
      if (mask[2]) grad_b.zero_();
    } else {
      const at::Tensor x = mask[1] ? x_in.contiguous() : x_in;
      MEDATTN_DISPATCH_FLOATING(x_in.scalar_type(), "depthwise_conv2d_backward_weight", [&] {
        weight_bias_grad<scalar_t>(gout.const_data_ptr<scalar_t>(), mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
                                   mask[1] ? grad_w.mutable_data_ptr<scalar_t>() : nullptr,
                                   mask[2] ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, s.B, s.C, s.H, s.W, s.Ho,
                                   s.Wo, s.ph, s.pw, g);
      });
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(dw_forward);
MEDATTN_REGISTER_CPU_KERNEL(dw_backward);

MEDATTN_CPU_OPS(m) {
  m.impl("depthwise_conv2d", MEDATTN_CPU_DISPATCH(dw_forward));
  m.impl("depthwise_conv2d_backward", MEDATTN_CPU_DISPATCH(dw_backward));
}

}  // namespace medattn
