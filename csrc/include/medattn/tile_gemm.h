// Register-blocked GEMM for the small block products of the attention kernels, compiled per ISA pass
// (medattn/dispatch.h) on at::vec::Vectorized<T>.
//
//     C[M, N] = alpha * A B  (+ C when Accumulate),   A(i, k) = a[i * kARowStride + k * a_col_stride],
//     B row k at b + k * ldb (its N columns contiguous), C row i at c + i * ldc.
//
// Why not BLAS: the attention blocks have one small dimension (the head dim, 16 to 96, or a block of 64
// queries), where a BLAS call spends much of its time packing its operands and scaling C; here the
// operands already lie in the layouts the microkernel reads (the kernels pack K^T, V, ... once per
// (batch, head)), so the microkernel runs straight on them. A's row stride is a compile-time constant
// (1, or a block buffer's leading dimension) so that the MR broadcasts of a k step are loads at constant
// offsets from one pointer, or with kARowStride = kAnyRowStride the a_row_stride argument (a token-major
// operand, rows of a runtime length: its MR row offsets stay in registers for the k loop); B's rows are
// read as whole vectors.
//
// Requirements: N is a multiple of Vectorized<T>::size() (the callers pad their buffers' columns to whole
// vectors, with zeros in packed operands); every element read or written lies in the callers' buffers.
//
// Register tile: MR rows x NV vectors of accumulators, MR * NV <= kAccumulators (24 of the 32 zmm
// registers on AVX-512, 12 of the 16 ymm on AVX2, leaving room for the NV B vectors and a broadcast).
// The k loop is innermost and runs in order, so results do not depend on threads or on M, N tiling.
//
// RowMax (stores only): the tiles also fold their stored rows into per-row lane maxima, row_max[i * W ..
// (i + 1) * W) (W = Vectorized<T>::size(); the caller fills them with -inf first), NaN-ignoring as
// medattn/vec_math.h's row maxima (a lane takes x only where x > max). The attention forward's softmax needs
// each score row's maximum: taken from the accumulators as they are stored, it saves a pass that reads the
// whole score block back from L2.
//
// Epilogue (stores only): each stored vector is op(row, col, alpha (A B)[row, col .. col + W)), row and col
// C's indices. The default (StoreProduct) stores the product; an op that turns scores into what the next
// step needs (the attention backward's probabilities and score gradients) saves a pass over the block.
#pragma once

#include "medattn/vec_math.h"  // Vectorized

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace medattn {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileAccumulators = 24;
constexpr int kTileMaxVectors = 4;
#elif defined(CPU_CAPABILITY_AVX2)
// 4 x 3 tiles: 7 loads per 12 FMAs. 6 x 2 tiles (kTileMaxVectors = 2: 8 loads per 12 FMAs) ran the gated
// self-attention (N = 784, D = 64) slower on the AVX2 pass of the Intel Xeon: fwd+bwd 28.2-28.6 -> 28.7-29.1 ms.
constexpr int kTileAccumulators = 12;
constexpr int kTileMaxVectors = 3;
#else
// Portable pass (correct, not tuned): Vectorized is an array type there.
constexpr int kTileAccumulators = 4;
constexpr int kTileMaxVectors = 1;
#endif

// The default epilogue: C = alpha A B.
struct StoreProduct {
  template <typename V>
  V operator()(int64_t /*row*/, int64_t /*col*/, const V& x) const {
    return x;
  }
};

// kARowStride value meaning "A's row stride is the a_row_stride argument" (a token-major operand with a
// runtime row length).
constexpr int64_t kAnyRowStride = 0;

// A's row stride: the compile-time one, or the argument under kAnyRowStride.
template <int64_t kARowStride>
constexpr int64_t a_row_step(int64_t a_row_stride) {
  return kARowStride != kAnyRowStride ? kARowStride : a_row_stride;
}

// Rows of the register tile for NV accumulator vectors per row.
template <int NV>
constexpr int tile_rows() {
  return std::min(16, kTileAccumulators / NV);
}

template <typename T, int MR, int NV, int64_t kARowStride, bool Accumulate, bool RowMax, class Op>
inline void gemm_microkernel(int64_t K, T alpha, const T* __restrict a, int64_t a_row_stride, int64_t a_col_stride,
                             const T* __restrict b, int64_t ldb, T* __restrict c, int64_t ldc, T* __restrict row_max,
                             const Op& op, int64_t row0, int64_t col0) {
  static_assert(!(Accumulate && RowMax), "row maxima are of stored products, not of sums onto C");
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = V(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = V::loadu(b + j * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai(a[i * a_row_step<kARowStride>(a_row_stride)]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(ai, bv[j], acc[i][j]);
    }
    a += a_col_stride;
    b += ldb;
  }
  const V alpha_v(alpha);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      T* out = c + i * ldc + j * W;
      if constexpr (Accumulate) {
        at::vec::fmadd(acc[i][j], alpha_v, V::loadu(out)).store(out);
      } else {
        acc[i][j] = op(row0 + i, col0 + j * W, acc[i][j] * alpha_v);
        acc[i][j].store(out);
      }
    }
  if constexpr (RowMax) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      V m = V::loadu(row_max + i * W);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) m = max_ignoring_nan(m, acc[i][j]);
      m.store(row_max + i * W);
    }
  }
}

// The largest power of two below n (n >= 2).
constexpr int power_of_two_below(int n) { return n <= 2 ? 1 : 2 * power_of_two_below((n + 1) / 2); }

// Rows [0, M) of one column panel of NV vectors: full MR-row tiles, then the remaining rows (fewer than MR)
// in tiles of power-of-two heights below MR, so that each is covered by at most one tile per height:
// after 6-row tiles, a 128-row block's last 2 rows take one 2-row tile, not two 1-row tiles (a 1-row tile
// issues a load per FMA; 1.8% of a gated self-attention fwd+bwd at N = 784, D = 64 went there).
template <typename T, int MR, int NV, int64_t kARowStride, bool Accumulate, bool RowMax, class Op>
inline void gemm_panel(int64_t M, int64_t K, T alpha, const T* a, int64_t a_row_stride, int64_t a_col_stride,
                       const T* b, int64_t ldb, T* c, int64_t ldc, T* row_max, const Op& op, int64_t row0,
                       int64_t col0) {
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t rs = a_row_step<kARowStride>(a_row_stride);
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    gemm_microkernel<T, MR, NV, kARowStride, Accumulate, RowMax>(K, alpha, a + i * rs, a_row_stride, a_col_stride, b,
                                                                 ldb, c + i * ldc, ldc, row_max + (RowMax ? i * W : 0),
                                                                 op, row0 + i, col0);
  if constexpr (MR > 1) {
    constexpr int kHalf = power_of_two_below(MR);
    if (i < M)
      gemm_panel<T, kHalf, NV, kARowStride, Accumulate, RowMax>(M - i, K, alpha, a + i * rs, a_row_stride,
                                                                a_col_stride, b, ldb, c + i * ldc, ldc,
                                                                row_max + (RowMax ? i * W : 0), op, row0 + i, col0);
  }
}

template <typename T, int NV, int64_t kARowStride, bool Accumulate, bool RowMax, class Op>
inline void gemm_panel_nv(int64_t M, int64_t K, T alpha, const T* a, int64_t a_row_stride, int64_t a_col_stride,
                          const T* b, int64_t ldb, T* c, int64_t ldc, T* row_max, const Op& op, int64_t col0) {
  gemm_panel<T, tile_rows<NV>(), NV, kARowStride, Accumulate, RowMax>(M, K, alpha, a, a_row_stride, a_col_stride, b,
                                                                      ldb, c, ldc, row_max, op, 0, col0);
}

// C[M, N] = alpha A B (+ C): see the top of the file. N must be a multiple of Vectorized<T>::size(). With
// RowMax, row_max[M * W] (filled with -inf by the caller) takes each row's lane maxima of C.
template <typename T, int64_t kARowStride, bool Accumulate, bool RowMax = false, class Op = StoreProduct>
void tile_gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_col_stride, const T* b, int64_t ldb,
               T* c, int64_t ldc, T* row_max = nullptr, int64_t a_row_stride = kARowStride, const Op& op = Op()) {
  static_assert(std::is_same_v<Op, StoreProduct> || !(Accumulate || RowMax),
                "an epilogue applies to stored products, and row maxima are of plain ones");
  constexpr int64_t W = Vectorized<T>::size();
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum
    if constexpr (!Accumulate) {
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; j += W) op(i, j, Vectorized<T>(T(0))).store(c + i * ldc + j);
      if constexpr (RowMax)
        for (int64_t e = 0; e < M * W; ++e) row_max[e] = row_max[e] < T(0) ? T(0) : row_max[e];
    }
    return;
  }
  for (int64_t n0 = 0, nv = 0; n0 < N; n0 += nv * W) {
    const int64_t rem = (N - n0) / W;
    nv = std::min<int64_t>(kTileMaxVectors, rem);
    // N = (kTileMaxVectors + 1) vectors: panels of (kTileMaxVectors - 1) and 2 vectors, not a full panel and
    // a 1-vector one, whose tiles issue one broadcast load per FMA row (12 x 1 on AVX2: 13 loads per 12 FMAs
    // against 8 for 6 x 2). The attention backward's 128-key blocks are 16 vectors on AVX2 (5 x 3 + 1 before).
    if (rem == kTileMaxVectors + 1 && kTileMaxVectors > 2) nv = kTileMaxVectors - 1;
    const T* bp = b + n0;
    T* cp = c + n0;
    switch (nv) {
      case 1:
        gemm_panel_nv<T, 1, kARowStride, Accumulate, RowMax>(M, K, alpha, a, a_row_stride, a_col_stride, bp, ldb, cp,
                                                               ldc, row_max, op, n0);
        break;
#if !defined(CPU_CAPABILITY_DEFAULT)
      case 2:
        gemm_panel_nv<T, 2, kARowStride, Accumulate, RowMax>(M, K, alpha, a, a_row_stride, a_col_stride, bp, ldb, cp,
                                                               ldc, row_max, op, n0);
        break;
      case 3:
        gemm_panel_nv<T, 3, kARowStride, Accumulate, RowMax>(M, K, alpha, a, a_row_stride, a_col_stride, bp, ldb, cp,
                                                               ldc, row_max, op, n0);
        break;
      case 4:
        gemm_panel_nv<T, 4, kARowStride, Accumulate, RowMax>(M, K, alpha, a, a_row_stride, a_col_stride, bp, ldb, cp,
                                                               ldc, row_max, op, n0);
        break;
#endif
      default: break;
    }
  }
}

// C = alpha A B for the first term of a sum over blocks, C += alpha A B for the others: the first term
// stores instead of adding onto a C cleared beforehand, which saves the clearing pass (1.6% of a gated
// self-attention fwd+bwd at N = 784, D = 64, in memset).
template <typename T, int64_t kARowStride>
void tile_gemm_sum(bool first, int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_col_stride, const T* b,
                   int64_t ldb, T* c, int64_t ldc) {
  if (first)
    tile_gemm<T, kARowStride, false>(M, N, K, alpha, a, a_col_stride, b, ldb, c, ldc);
  else
    tile_gemm<T, kARowStride, true>(M, N, K, alpha, a, a_col_stride, b, ldb, c, ldc);
}

}  // namespace CPU_CAPABILITY
}  // namespace medattn
