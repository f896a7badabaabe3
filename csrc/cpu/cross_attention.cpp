// Fused cross-image attention on CPU, flash-attention style (design.md section 2, "Attention").
//
// Every op works on one [B, H, N, D] problem per (batch, head) pair, blocked over queries (rows, kBlockQ)
// and keys (columns, kBlockK). A block's scores S = scale Q_i K_j^T live in a small buffer that stays in
// L2; the forward keeps a running max / sum per row (online softmax) and saves lse = max + log(sum); the
// backward recomputes S from lse block by block. Nothing N x N is ever allocated.
//
// Where the time goes: the block products (S = QK^T, PV, and in the backward dP, dV, dK, dQ) are
// GEMMs with K = D or K = block size; they run through MKL's sgemm/dgemm (exported by libtorch_cpu)
// called directly on raw pointers, which costs nothing per call, unlike at::mm on from_blob views
// (the call falls back to a plain loop where the BLAS symbols are missing). Large key blocks (512)
// keep MKL near its peak and make the online-softmax rescaling negligible. The other cost is one
// exp per score (two for the tied op): the branch-free Cody-Waite + Cephes polynomial exp of
// medattn/vec_math.h on this ISA pass's vectors, 1e-7 relative error, NaN-propagating, exactly 0 below e^-87.3.
//
// Parallelism and determinism (no atomics): the forward is parallel over (problem, batch x head, query
// block) items that own their outputs. Backward and the tied forward accumulate column-indexed results
// (dK, dV; the column softmax state) across query blocks, so their items are (problem, batch x head,
// stripe of query blocks): stripe 0 accumulates into the output and stripes 1..G-1 into private
// buffers that are then added in stripe order. G = ceil(threads / items without stripes), so G = 1 (no
// buffers) whenever batch x heads x problems already feeds every thread. Results are bit-identical run
// to run for a given thread count.
//
// bfloat16 inputs are computed in float32 (converted once on entry); float64 runs in double with
// std::exp (the test oracle path).
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/vec_math.h"  // exp_nonpositive, lane_sum, lane_max

#include <algorithm>
#include <type_traits>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

extern "C" {
// Fortran BLAS (column-major, 32-bit ints): MKL's, exported by libtorch_cpu in the x86 wheels. Weak, so
// the extension still loads against a torch without them (then `gemm` below uses its plain loop).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// Measured on a 2-core AVX-512 machine (N = 3136, D = 96): 256 x 512 forward blocks keep MKL at about
// 80% of its large-GEMM rate; 64-row blocks lose a third.
constexpr int64_t kBlockQ = 256;   // query rows per block (forward items and backward block rows)
constexpr int64_t kBlockK = 512;   // keys per block in the forward
constexpr int64_t kBlockKB = 256;  // keys per block in the backward (four score-sized buffers live at once)

// ------------------------------------------------------------------------------------------ GEMM
// Row-major C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C. A row-major matrix is the column-major
// matrix of its transpose, so the call computes C^T = op(B)^T op(A)^T: same flags, operands swapped.
template <typename T>
void blas_call(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
               int ldc);
template <>
void blas_call<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                      int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
void blas_call<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                       int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  else return dgemm_ != nullptr;
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K > 0 && have_blas<T>()) {
    blas_call<T>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(N), static_cast<int>(M),
                 static_cast<int>(K), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
                 static_cast<int>(ldc));
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < K; ++p)
        acc += (trans_a ? A[p * lda + i] : A[i * lda + p]) * (trans_b ? B[j * ldb + p] : B[p * ldb + j]);
      C[i * ldc + j] = beta == T(0) ? alpha * acc : alpha * acc + beta * C[i * ldc + j];
    }
  }
}

// The softmax loops run on at::vec::Vectorized<T> (this pass's register width; medattn/vec_math.h) over
// whole vectors, and on scalars over the tail of a row.

// x[c] = exp(x[c] - m); returns the sum.
template <typename T>
T exp_sub_sum(T* __restrict x, int64_t n, T m) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V mv(m);
  V sum(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V e = exp_nonpositive(V::loadu(x + c) - mv);
    e.store(x + c);
    sum = sum + e;
  }
  T total = lane_sum(sum);
  for (; c < n; ++c) {
    x[c] = exp_nonpositive(x[c] - m);
    total += x[c];
  }
  return total;
}

// dst[c] = exp(src[c] - sub[c]) (the column softmax of the tied op: one max / lse per column).
template <typename T>
void exp_sub_vec(T* __restrict dst, const T* __restrict src, const T* __restrict sub, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + W <= n; c += W) exp_nonpositive(V::loadu(src + c) - V::loadu(sub + c)).store(dst + c);
  for (; c < n; ++c) dst[c] = exp_nonpositive(src[c] - sub[c]);
}

// x[c] = exp(x[c] - m) (the backward's probabilities from the saved log-sum-exp).
template <typename T>
void exp_sub(T* __restrict x, int64_t n, T m) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V mv(m);
  int64_t c = 0;
  for (; c + W <= n; c += W) exp_nonpositive(V::loadu(x + c) - mv).store(x + c);
  for (; c < n; ++c) x[c] = exp_nonpositive(x[c] - m);
}

// Max ignoring NaN (a NaN score still reaches the output through exp(NaN - max)): a lane takes x only
// where x > m, which is false for NaN.
template <typename T>
T row_max(const T* __restrict x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V mv(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V v = V::loadu(x + c);
    mv = V::blendv(mv, v, v > mv);
  }
  T m = lane_max(mv);
  for (; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// exp(old - new) for the online softmax; 1 when both are the same infinity (nothing seen yet, or a
// row of -inf scores, whose NaN the exps of the scores themselves produce as softmax does).
template <typename T>
T rescale_factor(T old_max, T new_max) {
  return old_max == new_max ? T(1) : std::exp(old_max - new_max);
}

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// ------------------------------------------------------------------------------------------ online softmax
// Row state of the online softmax of nr query rows over key blocks: running max m[r], running sum l[r]
// and the unnormalised output acc[r, :dv] = sum_j exp(s_rj - m[r]) v_j.
template <typename T>
void online_softmax_start(int64_t nr, int64_t dv, std::vector<T>& m, std::vector<T>& l, std::vector<T>& acc) {
  std::fill(acc.begin(), acc.begin() + nr * dv, T(0));
  std::fill(m.begin(), m.begin() + nr, -std::numeric_limits<T>::infinity());
  std::fill(l.begin(), l.begin() + nr, T(0));
}

// Folds one block of scores [nr, nc] (overwritten by exp(s - new max)) and its values v [nc, dv] into
// the row state: rescale l and acc by exp(old max - new max), then acc += P v.
template <typename T>
void online_softmax_update(T* scores, int64_t nr, int64_t nc, const T* v, int64_t dv, std::vector<T>& m,
                           std::vector<T>& l, std::vector<T>& acc) {
  for (int64_t r = 0; r < nr; ++r) {
    T* row = scores + r * nc;
    const T mx = row_max(row, nc);
    const T m_new = mx > m[r] ? mx : m[r];
    const T alpha = rescale_factor(m[r], m_new);
    // one rounding (fma), as GCC contracted the inline expression: pinned so that results do not depend on inlining
    l[r] = std::fma(l[r], alpha, exp_sub_sum(row, nc, m_new));
    if (alpha != T(1)) {
      T* a = acc.data() + r * dv;
      for (int64_t c = 0; c < dv; ++c) a[c] *= alpha;
    }
    m[r] = m_new;
  }
  gemm<T>(false, false, nr, dv, nc, T(1), scores, nc, v, dv, T(1), acc.data(), dv);
}

// out[r] = acc[r] / l[r] (* sigmoid(gate[r]) where gate is given), lse[r] = m[r] + log l[r].
template <typename T>
void online_softmax_finish(int64_t nr, int64_t dv, const std::vector<T>& m, const std::vector<T>& l,
                           const std::vector<T>& acc, const T* gate, T* out, T* lse) {
  for (int64_t r = 0; r < nr; ++r) {
    // l == 0 only without keys (Nk = 0): softmax over nothing, an empty sum, gives zeros.
    T factor = l[r] == T(0) ? T(0) : T(1) / l[r];
    if (gate != nullptr) factor *= sigmoid(gate[r]);
    for (int64_t c = 0; c < dv; ++c) out[r * dv + c] = acc[r * dv + c] * factor;
    lse[r] = m[r] + std::log(l[r]);
  }
}

// ------------------------------------------------------------------------------------------ problems
// One attention direction over all (batch, head) pairs: out = softmax(scale q k^T) v (* sigmoid(gate)).
// Pointers are to contiguous [BH, N, D] data; stats (lse, delta) are [BH, Nq].
template <typename T>
struct Attention {
  const T* q;
  const T* k;
  const T* v;
  const T* gate;  // [BH, Nq] or null
  int64_t nq, nk, d, dv;
  T scale;
  // forward outputs
  T* out;
  T* lse;  // written by the forward, read by the backward
  // backward inputs / outputs
  const T* grad_out;  // already multiplied by sigmoid(gate) when gated
  const T* delta;     // rowsum(dO * out) per query
  T* grad_q;
  T* grad_k;
  T* grad_v;
  T* grad_k_partial;  // [G - 1, BH, nk, d]
  T* grad_v_partial;  // [G - 1, BH, nk, dv]
  int64_t stripes;
  int64_t bh_count;
};

inline int64_t blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

// The query blocks [first, second) of stripe `stripe` out of `stripes` over n query rows.
inline std::pair<int64_t, int64_t> stripe_blocks(int64_t n, int64_t stripe, int64_t stripes) {
  const int64_t nqb = blocks(n, kBlockQ);
  return {stripe * nqb / stripes, (stripe + 1) * nqb / stripes};
}

// Stripes of query blocks per (problem, bh) so that the backward has about one item per thread.
inline int64_t stripe_count(int64_t items, int64_t query_blocks) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (items >= threads || query_blocks <= 1) return 1;
  return std::min<int64_t>(query_blocks, (threads + items - 1) / items);
}

template <typename T>
void forward_block(const Attention<T>& p, int64_t bh, int64_t i0, std::vector<T>& scores, std::vector<T>& acc,
                   std::vector<T>& m, std::vector<T>& l) {
  const int64_t nr = std::min(kBlockQ, p.nq - i0);
  const T* q = p.q + (bh * p.nq + i0) * p.d;
  const T* k = p.k + bh * p.nk * p.d;
  const T* v = p.v + bh * p.nk * p.dv;
  online_softmax_start(nr, p.dv, m, l, acc);
  for (int64_t j0 = 0; j0 < p.nk; j0 += kBlockK) {
    const int64_t nc = std::min(kBlockK, p.nk - j0);
    T* s = scores.data();
    gemm<T>(false, true, nr, nc, p.d, p.scale, q, p.d, k + j0 * p.d, p.d, T(0), s, nc);
    online_softmax_update(s, nr, nc, v + j0 * p.dv, p.dv, m, l, acc);
  }
  const T* gate = p.gate != nullptr ? p.gate + bh * p.nq + i0 : nullptr;
  online_softmax_finish(nr, p.dv, m, l, acc, gate, p.out + (bh * p.nq + i0) * p.dv, p.lse + bh * p.nq + i0);
}

// Forward of one or two directions in one parallel_for over (problem, bh, query block).
template <typename T>
void forward_all(std::vector<Attention<T>>& problems, int64_t bh_count) {
  std::vector<int64_t> first_item{0};
  for (auto& p : problems) first_item.push_back(first_item.back() + bh_count * blocks(p.nq, kBlockQ));
  at::parallel_for(0, first_item.back(), 1, [&](int64_t begin, int64_t end) {
    int64_t max_dv = 0;
    for (auto& p : problems) max_dv = std::max(max_dv, p.dv);
    std::vector<T> scores(kBlockQ * kBlockK), acc(kBlockQ * max_dv), m(kBlockQ), l(kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      size_t pi = 0;
      while (item >= first_item[pi + 1]) ++pi;
      const Attention<T>& p = problems[pi];
      const int64_t local = item - first_item[pi], nqb = blocks(p.nq, kBlockQ);
      forward_block(p, local / nqb, (local % nqb) * kBlockQ, scores, acc, m, l);
    }
  });
}

// Where stripe `stripe` of (bh) accumulates a column-indexed [n, width] gradient: the output itself for
// stripe 0, else its private slice of `partial` ([G - 1, BH, n, width]).
template <typename T>
T* stripe_target(T* output, T* partial, int64_t stripe, int64_t bh, int64_t bh_count, int64_t n, int64_t width) {
  return stripe == 0 ? output + bh * n * width : partial + ((stripe - 1) * bh_count + bh) * n * width;
}

// Adds the stripes' partial sums into the output, in stripe order (deterministic).
template <typename T>
void reduce_stripes(T* output, const T* partial, int64_t stripes, int64_t total) {
  if (stripes <= 1 || total == 0) return;
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = 1; g < stripes; ++g) {
      const T* src = partial + (g - 1) * total;
      for (int64_t e = begin; e < end; ++e) output[e] += src[e];
    }
  });
}

// Backward over the query blocks of one stripe of one (problem, bh). With P = exp(S - lse),
// dP = dO V^T, dS = P (dP - delta): dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K.
template <typename T>
void backward_stripe(const Attention<T>& p, int64_t bh, int64_t stripe, std::vector<T>& probs,
                     std::vector<T>& dprobs) {
  const auto [b0, b1] = stripe_blocks(p.nq, stripe, p.stripes);
  T* dk = stripe_target(p.grad_k, p.grad_k_partial, stripe, bh, p.bh_count, p.nk, p.d);
  T* dv = stripe_target(p.grad_v, p.grad_v_partial, stripe, bh, p.bh_count, p.nk, p.dv);
  const T* k = p.k + bh * p.nk * p.d;
  const T* v = p.v + bh * p.nk * p.dv;
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * kBlockQ, nr = std::min(kBlockQ, p.nq - i0);
    const T* q = p.q + (bh * p.nq + i0) * p.d;
    const T* dout = p.grad_out + (bh * p.nq + i0) * p.dv;
    const T* lse = p.lse + bh * p.nq + i0;
    const T* delta = p.delta + bh * p.nq + i0;
    T* dq = p.grad_q + (bh * p.nq + i0) * p.d;
    for (int64_t j0 = 0; j0 < p.nk; j0 += kBlockKB) {
      const int64_t nc = std::min(kBlockKB, p.nk - j0);
      T* pr = probs.data();
      T* ds = dprobs.data();
      gemm<T>(false, true, nr, nc, p.d, p.scale, q, p.d, k + j0 * p.d, p.d, T(0), pr, nc);
      gemm<T>(false, true, nr, nc, p.dv, T(1), dout, p.dv, v + j0 * p.dv, p.dv, T(0), ds, nc);
      for (int64_t r = 0; r < nr; ++r) {
        T* prow = pr + r * nc;
        T* drow = ds + r * nc;
        const T lr = lse[r], dr = delta[r];
        exp_sub(prow, nc, lr);
        for (int64_t c = 0; c < nc; ++c) drow[c] = prow[c] * (drow[c] - dr);
      }
      gemm<T>(true, false, nc, p.dv, nr, T(1), pr, nc, dout, p.dv, T(1), dv + j0 * p.dv, p.dv);
      gemm<T>(true, false, nc, p.d, nr, p.scale, ds, nc, q, p.d, T(1), dk + j0 * p.d, p.d);
      gemm<T>(false, false, nr, p.d, nc, p.scale, ds, nc, k + j0 * p.d, p.d, T(1), dq, p.d);
    }
  }
}

template <typename T>
void backward_all(std::vector<Attention<T>>& problems, int64_t bh_count) {
  std::vector<int64_t> first_item{0};
  for (auto& p : problems) first_item.push_back(first_item.back() + bh_count * p.stripes);
  at::parallel_for(0, first_item.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBlockQ * kBlockKB), dprobs(kBlockQ * kBlockKB);
    for (int64_t item = begin; item < end; ++item) {
      size_t pi = 0;
      while (item >= first_item[pi + 1]) ++pi;
      const Attention<T>& p = problems[pi];
      const int64_t local = item - first_item[pi];
      backward_stripe(p, local / p.stripes, local % p.stripes, probs, dprobs);
    }
  });
  for (auto& p : problems) {
    reduce_stripes(p.grad_k, p.grad_k_partial, p.stripes, bh_count * p.nk * p.d);
    reduce_stripes(p.grad_v, p.grad_v_partial, p.stripes, bh_count * p.nk * p.dv);
  }
}

// ------------------------------------------------------------------------------------------ tied
// S = scale r_a r_b^T [Na, Nb]; o_a = softmax_row(S) v_b, o_b = softmax_col(S)^T v_a. Each score block
// feeds both: the row state (max, sum, o_a accumulator) of the current query block and the column state
// of every key block, which lives for the whole stripe (stripe 0: in the outputs' places; others in
// partial buffers merged afterwards with the log-sum-exp rule).
template <typename T>
struct Tied {
  const T *ra, *va, *rb, *vb;
  int64_t na, nb, d, dva, dvb, bh_count, stripes;
  T scale;
  T *oa, *ob, *lse_row, *lse_col;
  // forward column state per stripe: [G, BH, nb] maxima and sums, [G, BH, nb, dva] accumulators
  T *col_max, *col_sum, *col_acc;
  // backward
  const T *goa, *gob, *delta_row, *delta_col;
  T *grad_ra, *grad_va, *grad_rb, *grad_vb, *grad_rb_partial, *grad_vb_partial;  // partials: [G - 1, BH, nb, .]
};

template <typename T>
void tied_forward_stripe(const Tied<T>& p, int64_t bh, int64_t stripe, std::vector<T>& scores,
                         std::vector<T>& col_probs, std::vector<T>& acc, std::vector<T>& m, std::vector<T>& l,
                         std::vector<T>& col_block_max) {
  const auto [b0, b1] = stripe_blocks(p.na, stripe, p.stripes);
  const int64_t state = stripe * p.bh_count + bh;
  T* cmax = p.col_max + state * p.nb;
  T* csum = p.col_sum + state * p.nb;
  T* cacc = p.col_acc + state * p.nb * p.dva;
  std::fill(cmax, cmax + p.nb, -std::numeric_limits<T>::infinity());
  std::fill(csum, csum + p.nb, T(0));
  std::fill(cacc, cacc + p.nb * p.dva, T(0));
  const T* rb = p.rb + bh * p.nb * p.d;
  const T* vb = p.vb + bh * p.nb * p.dvb;
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * kBlockQ, nr = std::min(kBlockQ, p.na - i0);
    const T* ra = p.ra + (bh * p.na + i0) * p.d;
    const T* va = p.va + (bh * p.na + i0) * p.dva;
    online_softmax_start(nr, p.dvb, m, l, acc);
    for (int64_t j0 = 0; j0 < p.nb; j0 += kBlockK) {
      const int64_t nc = std::min(kBlockK, p.nb - j0);
      T* s = scores.data();
      T* pc = col_probs.data();
      gemm<T>(false, true, nr, nc, p.d, p.scale, ra, p.d, rb + j0 * p.d, p.d, T(0), s, nc);
      // column direction: new maxima, rescale the columns' state, exp against the column maxima
      T* bm = col_block_max.data();
      std::copy(cmax + j0, cmax + j0 + nc, bm);
      for (int64_t r = 0; r < nr; ++r) {
        const T* row = s + r * nc;
        for (int64_t c = 0; c < nc; ++c) bm[c] = row[c] > bm[c] ? row[c] : bm[c];
      }
      for (int64_t c = 0; c < nc; ++c) {
        const T alpha = rescale_factor(cmax[j0 + c], bm[c]);
        cmax[j0 + c] = bm[c];
        if (alpha != T(1)) {
          csum[j0 + c] *= alpha;
          T* a = cacc + (j0 + c) * p.dva;
          for (int64_t e = 0; e < p.dva; ++e) a[e] *= alpha;
        }
      }
      for (int64_t r = 0; r < nr; ++r) exp_sub_vec(pc + r * nc, s + r * nc, bm, nc);
      for (int64_t r = 0; r < nr; ++r) {
        const T* prow = pc + r * nc;
        for (int64_t c = 0; c < nc; ++c) csum[j0 + c] += prow[c];
      }
      gemm<T>(true, false, nc, p.dva, nr, T(1), pc, nc, va, p.dva, T(1), cacc + j0 * p.dva, p.dva);
      // row direction: the ordinary online softmax
      online_softmax_update(s, nr, nc, vb + j0 * p.dvb, p.dvb, m, l, acc);
    }
    online_softmax_finish(nr, p.dvb, m, l, acc, static_cast<const T*>(nullptr), p.oa + (bh * p.na + i0) * p.dvb,
                          p.lse_row + bh * p.na + i0);
  }
}

// Merges the stripes' column states of columns [c0, c1) of one bh into o_b and lse_col.
template <typename T>
void tied_merge_columns(const Tied<T>& p, int64_t bh, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t g = 0; g < p.stripes; ++g) {
      const T mg = p.col_max[(g * p.bh_count + bh) * p.nb + c];
      mx = mg > mx ? mg : mx;
    }
    T sum = 0;
    T* ob = p.ob + (bh * p.nb + c) * p.dva;
    std::fill(ob, ob + p.dva, T(0));
    for (int64_t g = 0; g < p.stripes; ++g) {
      const int64_t state = (g * p.bh_count + bh) * p.nb + c;
      const T w = rescale_factor(p.col_max[state], mx);
      sum += p.col_sum[state] * w;
      const T* a = p.col_acc + state * p.dva;
      for (int64_t e = 0; e < p.dva; ++e) ob[e] += a[e] * w;
    }
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    for (int64_t e = 0; e < p.dva; ++e) ob[e] *= inv;
    p.lse_col[bh * p.nb + c] = mx + std::log(sum);
  }
}

// With P_row = exp(S - lse_row), P_col = exp(S - lse_col):
//   dS = P_row (dO_a v_b^T - delta_row) + P_col (v_a dO_b^T - delta_col)
//   dv_b += P_row^T dO_a, dv_a += P_col dO_b, dr_a += scale dS r_b, dr_b += scale dS^T r_a.
template <typename T>
void tied_backward_stripe(const Tied<T>& p, int64_t bh, int64_t stripe, std::vector<T>* buf) {
  const auto [b0, b1] = stripe_blocks(p.na, stripe, p.stripes);
  T* drb = stripe_target(p.grad_rb, p.grad_rb_partial, stripe, bh, p.bh_count, p.nb, p.d);
  T* dvb = stripe_target(p.grad_vb, p.grad_vb_partial, stripe, bh, p.bh_count, p.nb, p.dvb);
  const T* rb = p.rb + bh * p.nb * p.d;
  const T* vb = p.vb + bh * p.nb * p.dvb;
  const T* gob = p.gob + bh * p.nb * p.dva;
  const T* lse_col = p.lse_col + bh * p.nb;
  const T* delta_col = p.delta_col + bh * p.nb;
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * kBlockQ, nr = std::min(kBlockQ, p.na - i0);
    const T* ra = p.ra + (bh * p.na + i0) * p.d;
    const T* va = p.va + (bh * p.na + i0) * p.dva;
    const T* goa = p.goa + (bh * p.na + i0) * p.dvb;
    const T* lse_row = p.lse_row + bh * p.na + i0;
    const T* delta_row = p.delta_row + bh * p.na + i0;
    T* dra = p.grad_ra + (bh * p.na + i0) * p.d;
    T* dva = p.grad_va + (bh * p.na + i0) * p.dva;
    for (int64_t j0 = 0; j0 < p.nb; j0 += kBlockKB) {
      const int64_t nc = std::min(kBlockKB, p.nb - j0);
      T* prow = buf[0].data();
      T* pcol = buf[1].data();
      T* ds = buf[2].data();
      T* dpcol = buf[3].data();
      gemm<T>(false, true, nr, nc, p.d, p.scale, ra, p.d, rb + j0 * p.d, p.d, T(0), prow, nc);
      gemm<T>(false, true, nr, nc, p.dvb, T(1), goa, p.dvb, vb + j0 * p.dvb, p.dvb, T(0), ds, nc);
      gemm<T>(false, true, nr, nc, p.dva, T(1), va, p.dva, gob + j0 * p.dva, p.dva, T(0), dpcol, nc);
      for (int64_t r = 0; r < nr; ++r) {
        T* s = prow + r * nc;
        T* pc = pcol + r * nc;
        T* d = ds + r * nc;
        const T* dc = dpcol + r * nc;
        const T* lc = lse_col + j0;
        const T* deltac = delta_col + j0;
        const T lr = lse_row[r], deltar = delta_row[r];
        exp_sub_vec(pc, s, lc, nc);
        exp_sub(s, nc, lr);
        for (int64_t c = 0; c < nc; ++c) d[c] = s[c] * (d[c] - deltar) + pc[c] * (dc[c] - deltac[c]);
      }
      gemm<T>(true, false, nc, p.dvb, nr, T(1), prow, nc, goa, p.dvb, T(1), dvb + j0 * p.dvb, p.dvb);
      gemm<T>(false, false, nr, p.dva, nc, T(1), pcol, nc, gob + j0 * p.dva, p.dva, T(1), dva, p.dva);
      gemm<T>(false, false, nr, p.d, nc, p.scale, ds, nc, rb + j0 * p.d, p.d, T(1), dra, p.d);
      gemm<T>(true, false, nc, p.d, nr, p.scale, ds, nc, ra, p.d, T(1), drb + j0 * p.d, p.d);
    }
  }
}

// ------------------------------------------------------------------------------------------ checks
void check_tokens(const at::Tensor& t, const char* name) {
  check_rank(t, 4, name, "[B, H, N, D]");
  check_cpu(t, name);
  check_float(t, name);
}

void check_pair(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_tokens(t, name);
  check_same(ref, t, ref_name, name);
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == ref.size(1), name, ": expected batch and heads [",
              ref.size(0), ", ", ref.size(1), "] (as ", ref_name, "), got shape ", t.sizes());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.size(dim) == ref.size(dim), name, ": expected size ", ref.size(dim), " at dim ", dim, " (as ",
              ref_name, "), got shape ", t.sizes());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tokens(q, "q");
  check_pair(k, "k", q, "q");
  check_pair(v, "v", q, "q");
  check_dim(k, 3, "k", q, "q");
  check_dim(v, 2, "v", k, "k");
}

// The saved outputs, their gradients and log-sum-exps of a two-direction op: x_a [B, H, Na, .] and
// x_b [.., Nb, .] are the token inputs of each side, v_a / v_b their values.
void check_two_way_saved(const at::Tensor& x_a, const at::Tensor& v_a, const at::Tensor& x_b, const at::Tensor& v_b,
                         const at::Tensor& o_a, const at::Tensor& o_b, const at::Tensor& grad_o_a,
                         const at::Tensor& grad_o_b, const at::Tensor& lse_a, const char* lse_a_name,
                         const at::Tensor& lse_b, const char* lse_b_name) {
  const int64_t B = x_a.size(0), H = x_a.size(1), Na = x_a.size(2), Nb = x_b.size(2);
  TORCH_CHECK(o_a.sizes() == at::IntArrayRef({B, H, Na, v_b.size(3)}), "o_a: expected shape [B, H, Na, Dvb]",
              ", got ", o_a.sizes());
  TORCH_CHECK(o_b.sizes() == at::IntArrayRef({B, H, Nb, v_a.size(3)}), "o_b: expected shape [B, H, Nb, Dva]",
              ", got ", o_b.sizes());
  TORCH_CHECK(grad_o_a.sizes() == o_a.sizes(), "grad_o_a: expected shape ", o_a.sizes(), ", got ", grad_o_a.sizes());
  TORCH_CHECK(grad_o_b.sizes() == o_b.sizes(), "grad_o_b: expected shape ", o_b.sizes(), ", got ", grad_o_b.sizes());
  TORCH_CHECK(lse_a.sizes() == at::IntArrayRef({B, H, Na}), lse_a_name, ": expected shape [B, H, Na], got ",
              lse_a.sizes());
  TORCH_CHECK(lse_b.sizes() == at::IntArrayRef({B, H, Nb}), lse_b_name, ": expected shape [B, H, Nb], got ",
              lse_b.sizes());
}

// Kernels compute in float (float32, bfloat16) or double (float64) on contiguous data.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::Tensor prep(const at::Tensor& t) { return t.to(compute_type(t)).contiguous(); }
inline at::Tensor like_input(const at::Tensor& t, const at::Tensor& input) { return t.to(input.scalar_type()); }

inline double default_scale(std::optional<double> scale, int64_t d) {
  return scale.has_value() ? *scale : (d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);
}

template <typename T>
Attention<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  Attention<T> p{};
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.v = v.const_data_ptr<T>();
  p.nq = q.size(2);
  p.nk = k.size(2);
  p.d = q.size(3);
  p.dv = v.size(3);
  p.scale = static_cast<T>(scale);
  p.bh_count = q.size(0) * q.size(1);
  p.stripes = 1;
  return p;
}

// rowsum(dO * out) per query, in the compute type.
at::Tensor row_delta(const at::Tensor& grad_out, const at::Tensor& out) {
  return (grad_out * out).sum(-1);
}

// ------------------------------------------------------------------------------------------ ops
std::tuple<at::Tensor, at::Tensor> cross_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, std::optional<double> scale,
                                                           const std::optional<at::Tensor>& gate_in) {
  check_qkv(q_in, k_in, v_in);
  at::Tensor gate;
  if (gate_in.has_value()) {
    check_rank(*gate_in, 3, "gate", "[B, H, Nq]");
    check_same(q_in, *gate_in, "q", "gate");
    TORCH_CHECK(gate_in->sizes() == q_in.sizes().slice(0, 3), "gate: expected shape [B, H, Nq] = ",
                q_in.sizes().slice(0, 3), ", got ", gate_in->sizes());
    gate = prep(*gate_in);
  }
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, H, Nq, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options());
  if (B * H * Nq > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_attention", [&] {
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q, k, v, default_scale(scale, q.size(3)))};
      problems[0].gate = gate.defined() ? gate.const_data_ptr<scalar_t>() : nullptr;
      problems[0].out = out.mutable_data_ptr<scalar_t>();
      problems[0].lse = lse.mutable_data_ptr<scalar_t>();
      forward_all(problems, B * H);
    });
  }
  return {like_input(out, q_in), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, std::optional<double> scale,
    const std::optional<at::Tensor>& gate_in) {
  check_qkv(q_in, k_in, v_in);
  check_pair(out_in, "out", q_in, "q");
  check_pair(grad_in, "grad_out", q_in, "q");
  TORCH_CHECK(out_in.size(2) == q_in.size(2) && out_in.size(3) == v_in.size(3), "out: expected shape [B, H, Nq, Dv]",
              ", got ", out_in.sizes());
  TORCH_CHECK(grad_in.sizes() == out_in.sizes(), "grad_out: expected shape ", out_in.sizes(), ", got ",
              grad_in.sizes());
  TORCH_CHECK(lse_in.sizes() == q_in.sizes().slice(0, 3), "lse: expected shape [B, H, Nq], got ", lse_in.sizes());
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in), out = prep(out_in);
  const at::ScalarType ct = q.scalar_type();
  at::Tensor grad = grad_in.to(ct);
  const at::Tensor lse = lse_in.to(ct).contiguous();
  at::Tensor delta = row_delta(grad, out).contiguous();
  at::Tensor dgate;
  if (gate_in.has_value()) {
    // out = sigmoid(g) A: the softmax backward sees dO sigmoid(g); delta = rowsum(dO out) is the same
    // for both views, and d gate = delta (1 - sigmoid(g)).
    check_same(q_in, *gate_in, "q", "gate");
    TORCH_CHECK(gate_in->sizes() == q_in.sizes().slice(0, 3), "gate: expected shape [B, H, Nq], got ",
                gate_in->sizes());
    const at::Tensor sig = at::sigmoid(gate_in->to(ct));
    grad = grad * sig.unsqueeze(-1);
    dgate = like_input(delta * (1 - sig), *gate_in);
  }
  grad = grad.contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t B = q.size(0), H = q.size(1);
  if (B * H * q.size(2) > 0 && k.size(2) > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "cross_attention_backward", [&] {
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q, k, v, default_scale(scale, q.size(3)))};
      auto& p = problems[0];
      p.stripes = stripe_count(B * H, blocks(p.nq, kBlockQ));
      at::Tensor dk_partial = at::empty({(p.stripes - 1) * B * H * p.nk * p.d}, q.options());
      at::Tensor dv_partial = at::empty({(p.stripes - 1) * B * H * p.nk * p.dv}, q.options());
      if (p.stripes > 1) {
        dk_partial.zero_();
        dv_partial.zero_();
      }
      p.lse = const_cast<scalar_t*>(lse.const_data_ptr<scalar_t>());
      p.grad_out = grad.const_data_ptr<scalar_t>();
      p.delta = delta.const_data_ptr<scalar_t>();
      p.grad_q = dq.mutable_data_ptr<scalar_t>();
      p.grad_k = dk.mutable_data_ptr<scalar_t>();
      p.grad_v = dv.mutable_data_ptr<scalar_t>();
      p.grad_k_partial = dk_partial.mutable_data_ptr<scalar_t>();
      p.grad_v_partial = dv_partial.mutable_data_ptr<scalar_t>();
      backward_all(problems, B * H);
    });
  }
  return {like_input(dq, q_in), like_input(dk, k_in), like_input(dv, v_in),
          dgate.defined() ? dgate : absent_like(q_in)};
}

void check_bidirectional(const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a, const at::Tensor& q_b,
                         const at::Tensor& k_b, const at::Tensor& v_b) {
  check_tokens(q_a, "q_a");
  check_pair(k_a, "k_a", q_a, "q_a");
  check_pair(v_a, "v_a", q_a, "q_a");
  check_pair(q_b, "q_b", q_a, "q_a");
  check_pair(k_b, "k_b", q_a, "q_a");
  check_pair(v_b, "v_b", q_a, "q_a");
  check_dim(k_a, 3, "k_a", q_a, "q_a");
  check_dim(q_b, 3, "q_b", q_a, "q_a");
  check_dim(k_b, 3, "k_b", q_a, "q_a");
  check_dim(k_a, 2, "k_a", q_a, "q_a");
  check_dim(v_a, 2, "v_a", q_a, "q_a");
  check_dim(k_b, 2, "k_b", q_b, "q_b");
  check_dim(v_b, 2, "v_b", q_b, "q_b");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bidirectional_forward(
    const at::Tensor& q_a_in, const at::Tensor& k_a_in, const at::Tensor& v_a_in, const at::Tensor& q_b_in,
    const at::Tensor& k_b_in, const at::Tensor& v_b_in, std::optional<double> scale) {
  check_bidirectional(q_a_in, k_a_in, v_a_in, q_b_in, k_b_in, v_b_in);
  const at::Tensor q_a = prep(q_a_in), k_a = prep(k_a_in), v_a = prep(v_a_in);
  const at::Tensor q_b = prep(q_b_in), k_b = prep(k_b_in), v_b = prep(v_b_in);
  const int64_t B = q_a.size(0), H = q_a.size(1), Na = q_a.size(2), Nb = q_b.size(2);
  at::Tensor o_a = at::empty({B, H, Na, v_b.size(3)}, q_a.options());
  at::Tensor o_b = at::empty({B, H, Nb, v_a.size(3)}, q_a.options());
  at::Tensor lse_a = at::empty({B, H, Na}, q_a.options()), lse_b = at::empty({B, H, Nb}, q_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(q_a.scalar_type(), "bidirectional_cross_attention", [&] {
      const double s = default_scale(scale, q_a.size(3));
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q_a, k_b, v_b, s),
                                                make_problem<scalar_t>(q_b, k_a, v_a, s)};
      problems[0].out = o_a.mutable_data_ptr<scalar_t>();
      problems[0].lse = lse_a.mutable_data_ptr<scalar_t>();
      problems[1].out = o_b.mutable_data_ptr<scalar_t>();
      problems[1].lse = lse_b.mutable_data_ptr<scalar_t>();
      forward_all(problems, B * H);
    });
  }
  return {like_input(o_a, q_a_in), like_input(o_b, q_a_in), lse_a, lse_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bidirectional_backward(
    const at::Tensor& grad_o_a_in, const at::Tensor& grad_o_b_in, const at::Tensor& q_a_in, const at::Tensor& k_a_in,
    const at::Tensor& v_a_in, const at::Tensor& q_b_in, const at::Tensor& k_b_in, const at::Tensor& v_b_in,
    const at::Tensor& o_a_in, const at::Tensor& o_b_in, const at::Tensor& lse_a_in, const at::Tensor& lse_b_in,
    std::optional<double> scale) {
  check_bidirectional(q_a_in, k_a_in, v_a_in, q_b_in, k_b_in, v_b_in);
  const int64_t B = q_a_in.size(0), H = q_a_in.size(1), Na = q_a_in.size(2), Nb = q_b_in.size(2);
  check_two_way_saved(q_a_in, v_a_in, q_b_in, v_b_in, o_a_in, o_b_in, grad_o_a_in, grad_o_b_in, lse_a_in, "lse_a",
                      lse_b_in, "lse_b");
  const at::Tensor q_a = prep(q_a_in), k_a = prep(k_a_in), v_a = prep(v_a_in);
  const at::Tensor q_b = prep(q_b_in), k_b = prep(k_b_in), v_b = prep(v_b_in);
  const at::ScalarType ct = q_a.scalar_type();
  const at::Tensor g_a = grad_o_a_in.to(ct).contiguous(), g_b = grad_o_b_in.to(ct).contiguous();
  const at::Tensor lse_a = lse_a_in.to(ct).contiguous(), lse_b = lse_b_in.to(ct).contiguous();
  const at::Tensor delta_a = row_delta(g_a, o_a_in.to(ct)).contiguous();
  const at::Tensor delta_b = row_delta(g_b, o_b_in.to(ct)).contiguous();
  at::Tensor dq_a = at::zeros_like(q_a), dk_a = at::zeros_like(k_a), dv_a = at::zeros_like(v_a);
  at::Tensor dq_b = at::zeros_like(q_b), dk_b = at::zeros_like(k_b), dv_b = at::zeros_like(v_b);
  if (B * H > 0 && Na > 0 && Nb > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "bidirectional_cross_attention_backward", [&] {
      const double s = default_scale(scale, q_a.size(3));
      // direction a: queries q_a against (k_b, v_b); direction b: q_b against (k_a, v_a)
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q_a, k_b, v_b, s),
                                                make_problem<scalar_t>(q_b, k_a, v_a, s)};
      const scalar_t* lses[2] = {lse_a.const_data_ptr<scalar_t>(), lse_b.const_data_ptr<scalar_t>()};
      const scalar_t* grads[2] = {g_a.const_data_ptr<scalar_t>(), g_b.const_data_ptr<scalar_t>()};
      const scalar_t* deltas[2] = {delta_a.const_data_ptr<scalar_t>(), delta_b.const_data_ptr<scalar_t>()};
      at::Tensor* dqs[2] = {&dq_a, &dq_b};
      at::Tensor* dks[2] = {&dk_b, &dk_a};
      at::Tensor* dvs[2] = {&dv_b, &dv_a};
      std::vector<at::Tensor> partials;
      for (int i = 0; i < 2; ++i) {
        auto& p = problems[i];
        p.stripes = stripe_count(2 * B * H, blocks(p.nq, kBlockQ));
        p.lse = const_cast<scalar_t*>(lses[i]);
        p.grad_out = grads[i];
        p.delta = deltas[i];
        p.grad_q = dqs[i]->mutable_data_ptr<scalar_t>();
        p.grad_k = dks[i]->mutable_data_ptr<scalar_t>();
        p.grad_v = dvs[i]->mutable_data_ptr<scalar_t>();
        partials.push_back(at::zeros({(p.stripes - 1) * B * H * p.nk * p.d}, q_a.options()));
        partials.push_back(at::zeros({(p.stripes - 1) * B * H * p.nk * p.dv}, q_a.options()));
        p.grad_k_partial = partials[2 * i].mutable_data_ptr<scalar_t>();
        p.grad_v_partial = partials[2 * i + 1].mutable_data_ptr<scalar_t>();
      }
      backward_all(problems, B * H);
    });
  }
  return {like_input(dq_a, q_a_in), like_input(dk_a, k_a_in), like_input(dv_a, v_a_in),
          like_input(dq_b, q_b_in), like_input(dk_b, k_b_in), like_input(dv_b, v_b_in)};
}

void check_tied(const at::Tensor& r_a, const at::Tensor& v_a, const at::Tensor& r_b, const at::Tensor& v_b) {
  check_tokens(r_a, "r_a");
  check_pair(v_a, "v_a", r_a, "r_a");
  check_pair(r_b, "r_b", r_a, "r_a");
  check_pair(v_b, "v_b", r_a, "r_a");
  check_dim(r_b, 3, "r_b", r_a, "r_a");
  check_dim(v_a, 2, "v_a", r_a, "r_a");
  check_dim(v_b, 2, "v_b", r_b, "r_b");
}

template <typename T>
Tied<T> make_tied(const at::Tensor& r_a, const at::Tensor& v_a, const at::Tensor& r_b, const at::Tensor& v_b,
                  double scale) {
  Tied<T> p{};
  p.ra = r_a.const_data_ptr<T>();
  p.va = v_a.const_data_ptr<T>();
  p.rb = r_b.const_data_ptr<T>();
  p.vb = v_b.const_data_ptr<T>();
  p.na = r_a.size(2);
  p.nb = r_b.size(2);
  p.d = r_a.size(3);
  p.dva = v_a.size(3);
  p.dvb = v_b.size(3);
  p.bh_count = r_a.size(0) * r_a.size(1);
  p.scale = static_cast<T>(scale);
  p.stripes = stripe_count(p.bh_count, blocks(p.na, kBlockQ));
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tied_forward(const at::Tensor& r_a_in,
                                                                         const at::Tensor& v_a_in,
                                                                         const at::Tensor& r_b_in,
                                                                         const at::Tensor& v_b_in,
                                                                         std::optional<double> scale) {
  check_tied(r_a_in, v_a_in, r_b_in, v_b_in);
  const at::Tensor r_a = prep(r_a_in), v_a = prep(v_a_in), r_b = prep(r_b_in), v_b = prep(v_b_in);
  const int64_t B = r_a.size(0), H = r_a.size(1), Na = r_a.size(2), Nb = r_b.size(2);
  at::Tensor o_a = at::empty({B, H, Na, v_b.size(3)}, r_a.options());
  at::Tensor o_b = at::empty({B, H, Nb, v_a.size(3)}, r_a.options());
  at::Tensor lse_row = at::empty({B, H, Na}, r_a.options()), lse_col = at::empty({B, H, Nb}, r_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(r_a.scalar_type(), "tied_cross_attention", [&] {
      Tied<scalar_t> p = make_tied<scalar_t>(r_a, v_a, r_b, v_b, default_scale(scale, r_a.size(3)));
      p.oa = o_a.mutable_data_ptr<scalar_t>();
      p.ob = o_b.mutable_data_ptr<scalar_t>();
      p.lse_row = lse_row.mutable_data_ptr<scalar_t>();
      p.lse_col = lse_col.mutable_data_ptr<scalar_t>();
      const int64_t states = p.stripes * p.bh_count;
      at::Tensor col_max = at::empty({states * Nb}, r_a.options()), col_sum = at::empty({states * Nb}, r_a.options());
      at::Tensor col_acc = at::empty({states * Nb * p.dva}, r_a.options());
      p.col_max = col_max.mutable_data_ptr<scalar_t>();
      p.col_sum = col_sum.mutable_data_ptr<scalar_t>();
      p.col_acc = col_acc.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, states, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scores(kBlockQ * kBlockK), col_probs(kBlockQ * kBlockK), acc(kBlockQ * p.dvb),
            m(kBlockQ), l(kBlockQ), col_block_max(kBlockK);
        for (int64_t item = begin; item < end; ++item)
          tied_forward_stripe(p, item / p.stripes, item % p.stripes, scores, col_probs, acc, m, l, col_block_max);
      });
      const int64_t col_tiles = blocks(Nb, 256);
      at::parallel_for(0, p.bh_count * col_tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t bh = item / col_tiles, c0 = (item % col_tiles) * 256;
          tied_merge_columns(p, bh, c0, std::min(Nb, c0 + 256));
        }
      });
    });
  }
  return {like_input(o_a, r_a_in), like_input(o_b, r_a_in), lse_row, lse_col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tied_backward(
    const at::Tensor& grad_o_a_in, const at::Tensor& grad_o_b_in, const at::Tensor& r_a_in, const at::Tensor& v_a_in,
    const at::Tensor& r_b_in, const at::Tensor& v_b_in, const at::Tensor& o_a_in, const at::Tensor& o_b_in,
    const at::Tensor& lse_row_in, const at::Tensor& lse_col_in, std::optional<double> scale) {
  check_tied(r_a_in, v_a_in, r_b_in, v_b_in);
  const int64_t B = r_a_in.size(0), H = r_a_in.size(1), Na = r_a_in.size(2), Nb = r_b_in.size(2);
  check_two_way_saved(r_a_in, v_a_in, r_b_in, v_b_in, o_a_in, o_b_in, grad_o_a_in, grad_o_b_in, lse_row_in,
                      "lse_row", lse_col_in, "lse_col");
  const at::Tensor r_a = prep(r_a_in), v_a = prep(v_a_in), r_b = prep(r_b_in), v_b = prep(v_b_in);
  const at::ScalarType ct = r_a.scalar_type();
  const at::Tensor g_a = grad_o_a_in.to(ct).contiguous(), g_b = grad_o_b_in.to(ct).contiguous();
  const at::Tensor lse_row = lse_row_in.to(ct).contiguous(), lse_col = lse_col_in.to(ct).contiguous();
  const at::Tensor delta_row = row_delta(g_a, o_a_in.to(ct)).contiguous();
  const at::Tensor delta_col = row_delta(g_b, o_b_in.to(ct)).contiguous();
  at::Tensor dr_a = at::zeros_like(r_a), dv_a = at::zeros_like(v_a), dr_b = at::zeros_like(r_b),
             dv_b = at::zeros_like(v_b);
  if (B * H > 0 && Na > 0 && Nb > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "tied_cross_attention_backward", [&] {
      Tied<scalar_t> p = make_tied<scalar_t>(r_a, v_a, r_b, v_b, default_scale(scale, r_a.size(3)));
      p.goa = g_a.const_data_ptr<scalar_t>();
      p.gob = g_b.const_data_ptr<scalar_t>();
      p.lse_row = const_cast<scalar_t*>(lse_row.const_data_ptr<scalar_t>());
      p.lse_col = const_cast<scalar_t*>(lse_col.const_data_ptr<scalar_t>());
      p.delta_row = delta_row.const_data_ptr<scalar_t>();
      p.delta_col = delta_col.const_data_ptr<scalar_t>();
      p.grad_ra = dr_a.mutable_data_ptr<scalar_t>();
      p.grad_va = dv_a.mutable_data_ptr<scalar_t>();
      p.grad_rb = dr_b.mutable_data_ptr<scalar_t>();
      p.grad_vb = dv_b.mutable_data_ptr<scalar_t>();
      at::Tensor drb_partial = at::zeros({(p.stripes - 1) * p.bh_count * Nb * p.d}, r_a.options());
      at::Tensor dvb_partial = at::zeros({(p.stripes - 1) * p.bh_count * Nb * p.dvb}, r_a.options());
      p.grad_rb_partial = drb_partial.mutable_data_ptr<scalar_t>();
      p.grad_vb_partial = dvb_partial.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, p.bh_count * p.stripes, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buf[4];
        for (auto& b : buf) b.resize(kBlockQ * kBlockKB);
        for (int64_t item = begin; item < end; ++item) tied_backward_stripe(p, item / p.stripes, item % p.stripes, buf);
      });
      reduce_stripes(p.grad_rb, p.grad_rb_partial, p.stripes, p.bh_count * Nb * p.d);
      reduce_stripes(p.grad_vb, p.grad_vb_partial, p.stripes, p.bh_count * Nb * p.dvb);
    });
  }
  return {like_input(dr_a, r_a_in), like_input(dv_a, v_a_in), like_input(dr_b, r_b_in), like_input(dv_b, v_b_in)};
}

}  // namespace
}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(cross_attention_forward);
MEDATTN_REGISTER_CPU_KERNEL(cross_attention_backward);
MEDATTN_REGISTER_CPU_KERNEL(bidirectional_forward);
MEDATTN_REGISTER_CPU_KERNEL(bidirectional_backward);
MEDATTN_REGISTER_CPU_KERNEL(tied_forward);
MEDATTN_REGISTER_CPU_KERNEL(tied_backward);

MEDATTN_CPU_OPS(m) {
  m.impl("cross_attention", MEDATTN_CPU_DISPATCH(cross_attention_forward));
  m.impl("cross_attention_backward", MEDATTN_CPU_DISPATCH(cross_attention_backward));
  m.impl("bidirectional_cross_attention", MEDATTN_CPU_DISPATCH(bidirectional_forward));
  m.impl("bidirectional_cross_attention_backward", MEDATTN_CPU_DISPATCH(bidirectional_backward));
  m.impl("tied_cross_attention", MEDATTN_CPU_DISPATCH(tied_forward));
  m.impl("tied_cross_attention_backward", MEDATTN_CPU_DISPATCH(tied_backward));
}

}  // namespace medattn
