// Fused cross-image attention on CPU, flash-attention style (design.md section 2, "Attention").
//
// Every op works on one [B, H, N, D] problem per (batch, head) pair, blocked over queries (rows) and keys
// (columns). A block's scores S = scale Q_i K_j^T live in a small buffer that stays in L1/L2; the forward
// keeps a running max / sum per row (online softmax) and saves lse = max + log(sum); the backward
// recomputes S from lse block by block. Nothing N x N is ever allocated.
//
// Block products. Each (query block, key block) pair costs 2 products forward (S, P V) and 5 backward (S,
// dP, dV, dK, dQ), with one dimension that is the head dim (16 to 96 in the networks) and two that are
// block sizes. They run on the register-blocked microkernel of medattn/tile_gemm.h, not BLAS: at these
// shapes a BLAS call spends a large share of its time packing operands and scaling C (measured: MKL's
// sgemm at K = 16 reaches ~75% of the microkernel's rate on a Zen 4, ~90% at K = 96). Instead every
// operand is packed ONCE per (batch, head) into the layout the microkernel reads: B operands row-major with
// whole padded vectors (K^T and V^T over keys, V, K, Q and dO over channels), A operands token-major (Q,
// dO, the tied op's r_a, v_a and dO_a: rows with a runtime stride, read in place when dense) or a block
// buffer with a compile-time leading dimension. Packing also reads any strides, so the strided token views
// a U-Net produces ([B, C, H, W] seen as [B, heads, H*W, d]) cost nothing extra, and bfloat16 is converted
// once on entry.
// Leading dimensions are padded off multiples of 128 bytes (padded_ld): a k step reads one vector from
// each of K rows of a block, and power-of-two strides put them in a few L1 sets (measured: -25% on AVX2).
//
// The other cost is one exp per score (two for the tied op): the branch-free Cody-Waite + Cephes polynomial
// of medattn/vec_math.h on this ISA pass's vectors, 1e-7 relative error, NaN-propagating.
//
// Parallelism and determinism (no atomics): the forward is parallel over (problem, batch x head, query
// block) items that own their outputs. The backward and the tied forward accumulate column-indexed
// results (dK, dV; the column softmax state) across query blocks, so their items are (problem, batch x
// head, stripe of query blocks), each stripe accumulating into its own buffer; the stripes are added in
// stripe order afterwards. G = ceil(threads / items without stripes), so G = 1 whenever batch x heads x
// problems already feeds every thread. Results are bit-identical run to run for a given thread count.
//
// float64 runs the same code in double with std::exp (the test oracle path).
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/tile_gemm.h"  // tile_gemm
#include "medattn/transpose.h"  // transpose_8x8
#include "medattn/vec_math.h"   // exp_nonpositive, lane_sum, lane_max

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// Query rows (at most: balanced_rows evens the one-way kernels' blocks out) x keys per block. Forward: a
// 128 x 256 score block (136 KiB, in L2) amortises the per-block row-state updates over 256 keys;
// backward: two 128 x 128 blocks (S / P and dP / dS). A query block streams every key's packs (K^T, V; in
// the backward also K, V^T and the dK / dV accumulators) through L2, megabytes at N = 3136 that come from
// L3: 128 rows per block halve that traffic against 64 (measured on an Intel Xeon with AVX-512, 2 MiB L2:
// bidirectional forward at N = 3136 / 12544 +5% / +8%, tied fwd+bwd +5%, small head dims unchanged). 128
// query rows are also the k dimension of the dK and dV products, which load and store their output tile
// once per 128 steps.
#ifndef TUNE_FR
#define TUNE_FR 128
#define TUNE_FK 256
#define TUNE_BR 128
#define TUNE_BK 128
#endif
constexpr int64_t kFwdRows = TUNE_FR;
constexpr int64_t kFwdKeys = TUNE_FK;
constexpr int64_t kBwdRows = TUNE_BR;
constexpr int64_t kBwdKeys = TUNE_BK;

template <typename T>
constexpr int64_t kVec = Vectorized<T>::size();

// n rounded up to whole vectors.
template <typename T>
constexpr int64_t vec_ceil(int64_t n) {
  return (n + kVec<T> - 1) / kVec<T> * kVec<T>;
}

// A leading dimension for n elements per row: whole vectors, and not a multiple of 128 bytes (see top).
template <typename T>
constexpr int64_t padded_ld(int64_t n) {
  const int64_t ld = vec_ceil<T>(n);
  return (ld * static_cast<int64_t>(sizeof(T))) % 128 == 0 ? ld + kVec<T> : ld;
}

template <typename T>
constexpr int64_t kFwdLd = padded_ld<T>(kFwdKeys);
template <typename T>
constexpr int64_t kBwdLd = padded_ld<T>(kBwdKeys);

// Channel-major packs (k^T and v^T, the B operands of S and dP; the tied op's r^T and v^T) are stored in blocks
// of kTokenBlock tokens, each block [channels, kTokenLd] with its channels' rows kTokenLd apart. With one
// row per channel over all N tokens, a micro tile's k steps read one vector from each of d rows N floats
// apart, a 4 KiB page per k step for the A and for the B operand: 192 pages per tile at d = 96, well
// past the first-level TLB, and a working set of pages past the second level at N = 12544 (9.6 MB of k^T
// and v per head). Blocked, a key block's k^T is one 100 KiB run and a query block's r^T one 25 KiB run.
// Measured on the Zen 4, bidirectional attention at N = 12544, D = 96 (old / new layout, alternating
// processes): forward -6 to -10% in the AVX2 pass (it had fallen to 0.90x of 2x SDPA there), -2% with
// AVX-512; fwd+bwd -2% (AVX-512); N = 3136 fwd+bwd -5% (AVX2), -1% (AVX-512).
// Every row or key block of the kernels lies inside one token block (static_assert below).
constexpr int64_t kTokenBlock = 256;
template <typename T>
constexpr int64_t kTokenLd = padded_ld<T>(kTokenBlock);
static_assert(kTokenBlock % kFwdRows == 0 && kTokenBlock % kFwdKeys == 0 && kTokenBlock % kBwdRows == 0 &&
                  kTokenBlock % kBwdKeys == 0,
              "row and key blocks must not straddle the channel-major packs' token blocks");

// Elements per channel of a channel-major pack of n tokens: its size per head is channels times this.
template <typename T>
constexpr int64_t channel_major_extent(int64_t n) {
  return (n + kTokenBlock - 1) / kTokenBlock * kTokenLd<T>;
}

// Token i of channel 0 in one head's channel-major pack of `channels` channels; channel c of tokens i..
// (up to the end of i's token block) lies c * kTokenLd<T> further.
template <typename T>
T* token_block(T* head, int64_t channels, int64_t i) {
  return head + (i / kTokenBlock) * channels * kTokenLd<T> + i % kTokenBlock;
}

// Scores live in base 2 (S = scale log2(e) q k^T, softmax with exp2): the exp then needs no Cody-Waite
// reduction. The log-sum-exps the ops return are natural-log ones.
template <typename T>
constexpr T kLog2e = T(1.44269504088896340736);
template <typename T>
constexpr T kLn2 = T(0.69314718055994530942);

inline int64_t blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

// Rows per query block: as many blocks as max_rows rows need, their rows evened out (rounded up to whole
// vectors). N = 784 takes 7 blocks of 112 rows, not 6 of 128 and one of 16, whose dK / dV products (k = 16
// rows) load and store their output tiles every 16 steps. With tile_gemm's 2-vector panel split, gated
// self-attention N = 784, D = 64 fwd+bwd ran 2-3% faster (AMD EPYC Zen 3, AVX2 pass, 1 and 2 threads, 4th-fastest
// and 10th percentile of 100 alternating rounds; the host's noise hides it in medians).
template <typename T>
int64_t balanced_rows(int64_t n, int64_t max_rows) {
  if (n <= 0) return max_rows;  // no query rows, no blocks (and no division by a block count of 0)
  return std::min(max_rows, vec_ceil<T>(blocks(n, blocks(n, max_rows))));
}

// ------------------------------------------------------------------------------------------ layouts
// A [B, H, N, C] tensor with any strides (T const for inputs).
template <typename T>
struct Tokens {
  T* data = nullptr;
  int64_t heads = 1, n = 0, c = 0, s_b = 0, s_h = 0, s_n = 0, s_c = 0;
  T* head(int64_t bh) const { return data + (bh / heads) * s_b + (bh % heads) * s_h; }
};

template <typename T>
Tokens<const T> tokens_in(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
Tokens<T> tokens_out(const at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The zeros after the n values of a packed row up to the end of its last vector (fewer than one vector), as
// one partial vector store: std::fill (and any zeroing loop, which GCC turns into one) called libc's memset
// once per row, 10^4 calls per gated self-attention backward at N = 784, D = 64: 0.5% of its time in
// memset's call and setup. Readers take a pack's rows in whole vectors and drop the lanes past n; the zeros
// keep those lanes' products finite (no NaN or denormals from whatever the buffer held before).
template <typename T>
void zero_padding(T* p, int64_t n) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(n < Vectorized<T>::size());
  if (n > 0) Vectorized<T>(T(0)).store(p, static_cast<int>(n));
}

// Channel-major pack of the tokens of x (one token block, see kTokenBlock) of one head:
// dst[c * ld + i] = x[i, c] * f[i] (f = 1 when null) for i < n, zeros for i in [n, vec_ceil(n)). The rest of
// each row, up to ld, is never read: every product over a pack takes a key block's vec_ceil(nc) columns
// (score_block, the backward's tile_gemm calls), and key blocks do not straddle token blocks. Zeroing up
// to ld wrote 5x the packed values for a 49-token head (one 256-token block): memset took 8% / 7% of the
// samples of DIN's last-stage attention (N = 49, D = 48) forward / backward on the Zen 3 (AVX2).
//
// From a token-major source (channels contiguous: [B, H, N, D] tensors) this is a transpose, done in 8 x 8
// register blocks (medattn/transpose.h): a scalar gather here was 8% of a gated self-attention forward at
// N = 784, D = 64. The row factors then scale the packed rows in place.
template <typename T>
void pack_channel_major(const Tokens<const T>& x, int64_t bh, T* dst, int64_t ld, const T* f) {
  const T* src = x.head(bh);
  constexpr int64_t kBlock = kTransposeBlock;  // tokens x channels per register transpose
  if (x.s_n == 1) {
    for (int64_t c = 0; c < x.c; ++c) std::copy(src + c * x.s_c, src + c * x.s_c + x.n, dst + c * ld);
  } else if (x.s_c == 1 && x.c >= kBlock) {
    for (int64_t i0 = 0; i0 < x.n; i0 += kBlock) {
      const int64_t i1 = std::min(x.n, i0 + kBlock);
      int64_t c0 = 0;
      if (i1 - i0 == kBlock)
        for (; c0 + kBlock <= x.c; c0 += kBlock)
          transpose_8x8(src + i0 * x.s_n + c0, x.s_n, dst + c0 * ld + i0, ld);
      for (int64_t c = c0; c < x.c; ++c)
        for (int64_t i = i0; i < i1; ++i) dst[c * ld + i] = src[i * x.s_n + c];
    }
  } else {
    constexpr int64_t kTile = 32;  // tokens per pass: their rows stay in L1 while the channels are walked
    for (int64_t i0 = 0; i0 < x.n; i0 += kTile) {
      const int64_t i1 = std::min(x.n, i0 + kTile);
      for (int64_t c = 0; c < x.c; ++c)
        for (int64_t i = i0; i < i1; ++i) dst[c * ld + i] = src[i * x.s_n + c * x.s_c];
    }
  }
  if (f != nullptr)
    for (int64_t c = 0; c < x.c; ++c)
      for (int64_t i = 0; i < x.n; ++i) dst[c * ld + i] *= f[i];
  for (int64_t c = 0; c < x.c; ++c) zero_padding(dst + c * ld + x.n, vec_ceil<T>(x.n) - x.n);
}

// Token-major pack of one head: dst[i * ld + c] = x[i, c] * f[i] for c < C, zeros for c in [C, ld).
template <typename T>
void pack_token_major(const Tokens<const T>& x, int64_t bh, T* dst, int64_t ld, const T* f) {
  const T* src = x.head(bh);
  if (x.s_c == 1) {
    for (int64_t i = 0; i < x.n; ++i) {
      const T fi = f != nullptr ? f[i] : T(1);
      for (int64_t c = 0; c < x.c; ++c) dst[i * ld + c] = src[i * x.s_n + c] * fi;
    }
  } else {
    constexpr int64_t kTile = 32;
    for (int64_t i0 = 0; i0 < x.n; i0 += kTile) {
      const int64_t i1 = std::min(x.n, i0 + kTile);
      for (int64_t c = 0; c < x.c; ++c)
        for (int64_t i = i0; i < i1; ++i) dst[i * ld + c] = src[i * x.s_n + c * x.s_c] * (f != nullptr ? f[i] : T(1));
    }
  }
  if (ld > x.c)
    for (int64_t i = 0; i < x.n; ++i) zero_padding(dst + i * ld + x.c, ld - x.c);
}

// One packing of one tensor for every head: per_head elements per (batch, head) at dst + bh * per_head.
template <typename T>
struct Pack {
  const Tokens<const T>* src;
  T* dst;
  int64_t ld;  // token-major: row length; channel-major: channel_major_extent(tokens)
  bool channel_major;
  const T* factor = nullptr;  // [BH, n] row factors, or null
  int64_t per_head() const { return channel_major ? src->c * ld : src->n * ld; }
};

// Runs every pack for every head, in parallel over (head, pack): head-major, so that each thread's
// contiguous share of items holds every kind of pack (transposes, scaled copies) for its heads, rather
// than some packs whole and others not at all.
template <typename T>
void run_packs(const std::vector<Pack<T>>& packs, int64_t bh_count) {
  const int64_t kinds = static_cast<int64_t>(packs.size());
  at::parallel_for(0, kinds * bh_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const Pack<T>& p = packs[item % kinds];
      const int64_t bh = item / kinds;
      T* dst = p.dst + bh * p.per_head();
      const T* f = p.factor != nullptr ? p.factor + bh * p.src->n : nullptr;
      if (p.channel_major) {
        for (int64_t i0 = 0; i0 < p.src->n; i0 += kTokenBlock) {
          Tokens<const T> block = *p.src;
          block.data += i0 * block.s_n;
          block.n = std::min(kTokenBlock, block.n - i0);
          pack_channel_major(block, bh, token_block(dst, block.c, i0), kTokenLd<T>, f != nullptr ? f + i0 : nullptr);
        }
      } else
        pack_token_major(*p.src, bh, dst, p.ld, f);
    }
  });
}

// Whether x (all heads) is one dense [BH, n, ld] array with ld = its channel count: the layout of the packed
// token-major operands and of the kernels' row accumulators, so that they can be read or written in place.
template <typename T>
bool is_dense_rows(const Tokens<T>& x, int64_t bh_count, int64_t ld) {
  const int64_t batches = x.heads > 0 ? bh_count / x.heads : 0;
  return x.c == ld && (x.c <= 1 || x.s_c == 1) && (x.n <= 1 || x.s_n == ld) && (x.heads <= 1 || x.s_h == x.n * ld) &&
         (batches <= 1 || x.s_b == x.heads * x.n * ld);
}

// The operands of one pack_attention / pack_tied call: planned first, then packed into one buffer.
//
// A token-major operand whose source already has the packed layout ([BH, n, ld] dense with ld = its
// channel count, a whole number of vectors, and no row factor: contiguous [B, H, N, D] inputs with D a
// multiple of 16) is read in place: the copy would be a pass over it for nothing, 2% of a gated
// self-attention fwd+bwd at N = 784, D = 64. Channel-major operands are always packed (a transpose).
template <typename T>
class OperandPacks {
 public:
  explicit OperandPacks(int64_t bh_count) : bh_count_(bh_count) {}

  void channel_major(const Tokens<const T>& x, int64_t ld, const T*& operand, const T* factor = nullptr) {
    planned_.push_back({{&x, nullptr, ld, true, factor}, &operand});
  }

  void token_major(const Tokens<const T>& x, int64_t ld, const T*& operand, const T* factor = nullptr) {
    if (factor == nullptr && is_dense_rows(x, bh_count_, ld))
      operand = x.data;
    else
      planned_.push_back({{&x, nullptr, ld, false, factor}, &operand});
  }

  // Allocates the buffer, points every planned operand into it and packs them; the buffer must outlive
  // their use.
  at::Tensor run(const at::TensorOptions& options) {
    int64_t total = 0;
    for (const auto& planned : planned_) total += planned.pack.per_head() * bh_count_;
    at::Tensor buffer = at::empty({total}, options);
    T* next = buffer.mutable_data_ptr<T>();
    std::vector<Pack<T>> packs;
    for (auto& planned : planned_) {
      planned.pack.dst = next;
      *planned.operand = next;
      next += planned.pack.per_head() * bh_count_;
      packs.push_back(planned.pack);
    }
    run_packs(packs, bh_count_);
    return buffer;
  }

 private:
  struct Planned {
    Pack<T> pack;
    const T** operand;
  };

  int64_t bh_count_;
  std::vector<Planned> planned_;
};

// Rows [i0, i0 + nr) of one head of x: x[i0 + r, c] = src[r * ld + c] * f[r] (f = 1 when null), c < C.
template <typename T>
void store_rows(const Tokens<T>& x, int64_t bh, int64_t i0, int64_t nr, const T* src, int64_t ld, const T* f) {
  T* dst = x.head(bh) + i0 * x.s_n;
  if (x.s_c == 1) {
    for (int64_t r = 0; r < nr; ++r) {
      const T fr = f != nullptr ? f[r] : T(1);
      for (int64_t c = 0; c < x.c; ++c) dst[r * x.s_n + c] = src[r * ld + c] * fr;
    }
  } else {
    for (int64_t c = 0; c < x.c; ++c)
      for (int64_t r = 0; r < nr; ++r) dst[r * x.s_n + c * x.s_c] = src[r * ld + c] * (f != nullptr ? f[r] : T(1));
  }
}

// Adds the stripes' [BH, n, ld] accumulators ([G, BH, n, ld] at acc) in stripe order and stores the sums
// into x (any strides), in parallel over (head, block of rows).
template <typename T>
void store_stripe_sums(const Tokens<T>& x, const T* acc, int64_t stripes, int64_t bh_count, int64_t ld) {
  constexpr int64_t kRows = 64;
  const int64_t row_blocks = blocks(x.n, kRows), per_stripe = bh_count * x.n * ld;
  at::parallel_for(0, bh_count * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(stripes > 1 ? kRows * ld : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / row_blocks, i0 = (item % row_blocks) * kRows, nr = std::min(kRows, x.n - i0);
      const T* first = acc + (bh * x.n + i0) * ld;
      if (stripes == 1) {
        store_rows(x, bh, i0, nr, first, ld, static_cast<const T*>(nullptr));
        continue;
      }
      std::copy(first, first + nr * ld, sum.begin());
      for (int64_t g = 1; g < stripes; ++g) {
        const T* part = first + g * per_stripe;
        for (int64_t e = 0; e < nr * ld; ++e) sum[e] += part[e];
      }
      store_rows(x, bh, i0, nr, sum.data(), ld, static_cast<const T*>(nullptr));
    }
  });
}

// rowsum(dO * out) per token of every head: [BH, n]. Rows with unit channel stride (token-major tensors) in
// vectors: the strided loop does not vectorise (0.8% of a gated self-attention fwd+bwd at N = 784, D = 64).
template <typename T>
void row_dots(const Tokens<const T>& grad, const Tokens<const T>& out, int64_t bh_count, T* delta) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const bool unit_channels = grad.s_c == 1 && out.s_c == 1;
  at::parallel_for(0, bh_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* g = grad.head(bh);
      const T* o = out.head(bh);
      T* d = delta + bh * grad.n;
      for (int64_t i = 0; i < grad.n; ++i) {
        const T* gi = g + i * grad.s_n;
        const T* oi = o + i * out.s_n;
        int64_t c = 0;
        T acc = 0;
        if (unit_channels) {
          V sum(T(0));
          for (; c + W <= grad.c; c += W) sum = at::vec::fmadd(V::loadu(gi + c), V::loadu(oi + c), sum);
          acc = lane_sum(sum);
        }
        for (; c < grad.c; ++c) acc += gi[c * grad.s_c] * oi[c * out.s_c];
        d[i] = acc;
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ softmax pieces
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
    const V e = exp2_nonpositive(V::loadu(x + c) - mv);
    e.store(x + c);
    sum = sum + e;
  }
  T total = lane_sum(sum);
  for (; c < n; ++c) {
    x[c] = exp2_nonpositive(x[c] - m);
    total += x[c];
  }
  return total;
}

// Max ignoring NaN (a NaN score still reaches the output through exp(NaN - max)): a lane takes x only
// where x > m, which is false for NaN. Four independent maxima: one compare-and-blend chain per vector
// would make a 256-key row latency-bound (~4 cycles per vector instead of ~1).
template <typename T>
T row_max(const T* __restrict x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr int kChains = 4;
  V mv[kChains];
  for (int k = 0; k < kChains; ++k) mv[k] = V(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + kChains * W <= n; c += kChains * W)
    for (int k = 0; k < kChains; ++k) {
      const V v = V::loadu(x + c + k * W);
      mv[k] = max_ignoring_nan(mv[k], v);
    }
  for (; c + W <= n; c += W) {
    const V v = V::loadu(x + c);
    mv[0] = max_ignoring_nan(mv[0], v);
  }
  for (int k = 1; k < kChains; ++k) mv[0] = max_ignoring_nan(mv[0], mv[k]);
  T m = lane_max(mv[0]);
  for (; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// Backward of a row softmax, as epilogues of the two score products of a block (tile_gemm's Op): S's tiles
// are stored as P = exp(S - lse), dP's as dS = P (dP - delta). A pass over the two blocks after the
// products read both back from L2 and wrote both again. Measured (Intel Xeon, 2 threads, fwd+bwd,
// alternating builds): gated self-attention N = 784, D = 64 18.0-18.2 -> 17.4-17.9 ms with AVX-512,
// unchanged on the AVX2 pass (26.7-27.6 before and after: the exp's constants no longer fit beside the
// 12 accumulators in 16 registers and are read from memory); bidirectional N = 3136, D = 96 -1% (AVX-512).
template <typename T>
struct ProbabilitiesFromScores {
  const T* lse;  // per row of the block, in base 2 as the scores
  Vectorized<T> operator()(int64_t row, int64_t /*col*/, const Vectorized<T>& s) const {
    return exp2_nonpositive(s - Vectorized<T>(lse[row]));
  }
};

template <typename T>
struct ScoreGradients {
  const T* probs;  // the block's P, leading dimension ld
  int64_t ld;
  const T* delta;  // per row of the block
  Vectorized<T> operator()(int64_t row, int64_t col, const Vectorized<T>& dp) const {
    return Vectorized<T>::loadu(probs + row * ld + col) * (dp - Vectorized<T>(delta[row]));
  }
};

// exp(old - new) for the online softmax; 1 when both are the same infinity (nothing seen yet, or a
// row of -inf scores, whose NaN the exps of the scores themselves produce as softmax does).
template <typename T>
T rescale_factor(T old_max, T new_max) {
  return old_max == new_max ? T(1) : std::exp2(old_max - new_max);
}

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// ------------------------------------------------------------------------------------------ online softmax
// Row state of the online softmax of nr query rows over key blocks: running max m[r], running sum l[r]
// and the unnormalised output acc[r, :dvp] = sum_j exp(s_rj - m[r]) v_j. The first key block stores acc
// (online_softmax_update's `first`), so acc is cleared here only for a problem without keys.
template <typename T>
struct RowState {
  std::vector<T> m, l, acc;
  RowState(int64_t rows, int64_t dvp) : m(rows), l(rows), acc(rows * dvp) {}
  void start(int64_t nr, int64_t dvp, int64_t keys) {
    if (keys == 0) std::fill(acc.begin(), acc.begin() + nr * dvp, T(0));
    std::fill(m.begin(), m.begin() + nr, -std::numeric_limits<T>::infinity());
    std::fill(l.begin(), l.begin() + nr, T(0));
  }
};

// Folds one block of scores [nr, nc] (row stride kLd; overwritten by exp(s - new max)) and its values
// v [nc, dvp] into the row state: rescale l and acc by exp(old max - new max), then acc += P v. The rows'
// maxima come from lane_maxima ([nr, kVec] per-row lane maxima, tile_gemm's RowMax) when given, else
// from a pass over the row. The first block stores acc = P v: no clearing of acc beforehand and no
// rescaling of its zeros by exp(-inf - max) = 0 (two passes over the 32 KiB accumulator per query block).
template <typename T, int64_t kLd>
void online_softmax_update(T* scores, int64_t nr, int64_t nc, const T* v, int64_t dvp, RowState<T>& st,
                           const T* lane_maxima, bool first) {
  for (int64_t r = 0; r < nr; ++r) {
    T* row = scores + r * kLd;
    const T mx = lane_maxima != nullptr ? lane_max(Vectorized<T>::loadu(lane_maxima + r * kVec<T>)) : row_max(row, nc);
    const T m_new = mx > st.m[r] ? mx : st.m[r];
    const T alpha = rescale_factor(st.m[r], m_new);
    // one rounding (fma), pinned so that results do not depend on inlining
    st.l[r] = std::fma(st.l[r], alpha, exp_sub_sum(row, nc, m_new));
    if (alpha != T(1) && !first) {
      T* a = st.acc.data() + r * dvp;
      for (int64_t c = 0; c < dvp; ++c) a[c] *= alpha;
    }
    st.m[r] = m_new;
  }
  tile_gemm_sum<T, kLd>(first, nr, dvp, nc, T(1), scores, 1, v, dvp, st.acc.data(), dvp);
}

// out rows = acc / l (* sigmoid(gate)), lse = m + log l, for rows [i0, i0 + nr) of head bh.
template <typename T>
void online_softmax_finish(const RowState<T>& st, int64_t nr, int64_t dvp, const T* gate, const Tokens<T>& out,
                           int64_t bh, int64_t i0, T* lse) {
  T factor[kFwdRows];
  for (int64_t r = 0; r < nr; ++r) {
    // l == 0 only without keys (Nk = 0): softmax over nothing, an empty sum, gives zeros.
    factor[r] = st.l[r] == T(0) ? T(0) : T(1) / st.l[r];
    if (gate != nullptr) factor[r] *= sigmoid(gate[r]);
    lse[r] = (st.m[r] + std::log2(st.l[r])) * kLn2<T>;
  }
  store_rows(out, bh, i0, nr, st.acc.data(), dvp, factor);
}

// The query blocks [first, second) of stripe `stripe` out of `stripes` over n query rows.
inline std::pair<int64_t, int64_t> stripe_blocks(int64_t n, int64_t rows, int64_t stripe, int64_t stripes) {
  const int64_t nqb = blocks(n, rows);
  return {stripe * nqb / stripes, (stripe + 1) * nqb / stripes};
}

// Stripes of query blocks per (problem, bh) so that a backward has about one item per thread.
inline int64_t stripe_count(int64_t items, int64_t query_blocks) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (items >= threads || query_blocks <= 1) return 1;
  return std::min<int64_t>(query_blocks, (threads + items - 1) / items);
}

// ------------------------------------------------------------------------------------------ one direction
// out = softmax(scale q k^T) v (* sigmoid(gate)) over all (batch, head) pairs; stats (lse, delta) are
// [BH, Nq] contiguous. Packed operands per head (pack_attention), where [c, ld_k] are the channel-major
// packs in token blocks (kTokenBlock, channel_major_extent) and dp / dvp padded channel counts:
//   qr  q [nq, dp]     (A of S = Q K^T, B of dK += dS^T Q)     kt  k^T [d, ld_k]  (B of S)
//   vr  v [nk, dvp]    (B of P V; forward)                     vt  v^T [dv, ld_k] (B of dP = dO V^T)
//   gr  g [nq, dvp]    (A of dP, B of dV += P^T g)             kr  k [nk, dp]     (B of dQ += dS K)
// with g = dO * sigmoid(gate) (the softmax's output gradient). The A operands of S and dP are read
// token-major, with a runtime row stride (tile_gemm's kAnyRowStride): their rows sit in L1 for a
// microkernel's whole k loop either way, and so q (when dense: in place) and g need no transposed packs.
// Measured against q^T / g^T packs (Intel Xeon, 2 threads, alternating builds, forward alone): gated
// self-attention N = 784, D = 64 5.32-5.37 -> 5.12-5.20 ms (AVX512), 8.43-8.66 -> 8.37-8.46 ms (AVX2 pass);
// bidirectional N = 3136, D = 96 59.7-60.5 -> 57.3-58.8 ms; D = 64 on the AVX2 pass unchanged.
template <typename T>
struct Attention {
  Tokens<const T> q, k, v;
  const T* gate = nullptr;  // [BH, nq] or null
  int64_t bh_count = 0, nq = 0, nk = 0, d = 0, dv = 0;
  T scale = 1, score_scale = 1;  // score_scale = scale log2(e): scores are kept in base 2
  int64_t ld_k = 0, dp = 0, dvp = 0;
  const T *kt = nullptr, *vr = nullptr, *vt = nullptr, *qr = nullptr, *kr = nullptr, *gr = nullptr;
  // forward outputs
  Tokens<T> out;
  T* lse = nullptr;
  // backward
  Tokens<const T> grad_out;
  const T* delta = nullptr;  // rowsum(dO * out)
  Tokens<T> grad_q, grad_k, grad_v;
  T *dk_acc = nullptr, *dv_acc = nullptr;  // [stripes, BH, nk, dp] / [.., dvp]; grad_k / grad_v themselves
                                           // when those are dense [BH, nk, dp] and stripes = 1
  T* dq_rows = nullptr;                    // grad_q when it is dense [BH, nq, dp], else null
  int64_t stripes = 1;
  int64_t rows = 0;  // query rows per block (balanced_rows)
};

template <typename T>
Attention<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  Attention<T> p;
  p.q = tokens_in<T>(q);
  p.k = tokens_in<T>(k);
  p.v = tokens_in<T>(v);
  p.bh_count = q.size(0) * q.size(1);
  p.nq = q.size(2);
  p.nk = k.size(2);
  p.d = q.size(3);
  p.dv = v.size(3);
  p.scale = static_cast<T>(scale);
  p.score_scale = static_cast<T>(scale * kLog2e<double>);
  p.ld_k = channel_major_extent<T>(p.nk);
  p.dp = vec_ceil<T>(p.d);
  p.dvp = vec_ceil<T>(p.dv);
  return p;
}

// Packs of the forward (backward = false) or the backward for all problems; returns the buffer that holds
// them. For the backward, p.grad_out and `factors` (per problem: [BH, nq] row factors of dO, or null) are
// read.
template <typename T>
at::Tensor pack_attention(std::vector<Attention<T>>& problems, bool backward, const std::vector<const T*>& factors,
                          const at::TensorOptions& options) {
  OperandPacks<T> packs(problems.empty() ? 0 : problems[0].bh_count);
  for (size_t i = 0; i < problems.size(); ++i) {
    auto& p = problems[i];
    packs.token_major(p.q, p.dp, p.qr);
    packs.channel_major(p.k, p.ld_k, p.kt);
    if (!backward) {
      packs.token_major(p.v, p.dvp, p.vr);
      continue;
    }
    packs.channel_major(p.v, p.ld_k, p.vt);
    packs.token_major(p.k, p.dp, p.kr);
    packs.token_major(p.grad_out, p.dvp, p.gr, factors[i]);
  }
  return packs.run(options);
}

// Scores [nr, ncp] = score_scale A B of one key block (A: nr rows of a channel-major pack, B: nc keys of
// one, d channels). Returns the rows' lane maxima ([nr, kVec], tile_gemm's RowMax, taken as the product
// stores its tiles) when the block has no padding columns (their zero scores must not count), else null:
// online_softmax_update then takes the maxima in a pass over the rows. The fused maxima save that pass over
// the 136 KiB score block, which lives in L2. Measured with the row-max fix of max_ignoring_nan (Intel
// Xeon, AVX-512, 2 threads, forward alone, alternating builds): gated self-attention N = 784, D = 64
// 5.12-5.39 -> 4.85-4.92 ms, bidirectional N = 3136, D = 96 55.6-56.0 -> 54.6-55.2 ms, D = 32 on the AVX2
// pass 35.8-36.0 -> 34.1-34.5 ms.
template <typename T, int64_t kLd, int64_t kARowStride>
const T* score_block(int64_t nr, int64_t nc, int64_t d, T score_scale, const T* a, int64_t a_row_stride,
                     int64_t a_col_stride, const T* b, T* scores, std::vector<T>& lane_maxima) {
  const int64_t ncp = vec_ceil<T>(nc);
  if (nc != ncp) {
    tile_gemm<T, kARowStride, false>(nr, ncp, d, score_scale, a, a_col_stride, b, kTokenLd<T>, scores, kLd, nullptr,
                                     a_row_stride);
    return nullptr;
  }
  std::fill(lane_maxima.begin(), lane_maxima.begin() + nr * kVec<T>, -std::numeric_limits<T>::infinity());
  tile_gemm<T, kARowStride, false, true>(nr, ncp, d, score_scale, a, a_col_stride, b, kTokenLd<T>, scores, kLd,
                                         lane_maxima.data(), a_row_stride);
  return lane_maxima.data();
}

// Forward of query rows [i0, i0 + p.rows) of head bh.
template <typename T>
void forward_rows(const Attention<T>& p, int64_t bh, int64_t i0, std::vector<T>& scores, std::vector<T>& lane_maxima,
                  RowState<T>& st) {
  const int64_t nr = std::min(p.rows, p.nq - i0);
  const T* qr = p.qr + (bh * p.nq + i0) * p.dp;
  const T* kt = p.kt + bh * p.d * p.ld_k;
  const T* vr = p.vr + bh * p.nk * p.dvp;
  st.start(nr, p.dvp, p.nk);
  for (int64_t j0 = 0; j0 < p.nk; j0 += kFwdKeys) {
    const int64_t nc = std::min(kFwdKeys, p.nk - j0);
    const T* maxima = score_block<T, kFwdLd<T>, kAnyRowStride>(nr, nc, p.d, p.score_scale, qr, p.dp, 1,
                                                               token_block(kt, p.d, j0), scores.data(), lane_maxima);
    online_softmax_update<T, kFwdLd<T>>(scores.data(), nr, nc, vr + j0 * p.dvp, p.dvp, st, maxima, j0 == 0);
  }
  const T* gate = p.gate != nullptr ? p.gate + bh * p.nq + i0 : nullptr;
  online_softmax_finish(st, nr, p.dvp, gate, p.out, bh, i0, p.lse + bh * p.nq + i0);
}

// Forward of one or two directions in one parallel_for over (problem, bh, query block).
template <typename T>
void forward_all(std::vector<Attention<T>>& problems, const at::TensorOptions& options) {
  const at::Tensor packed = pack_attention(problems, false, {}, options);
  std::vector<int64_t> first_item{0};
  int64_t max_dvp = 0;
  for (auto& p : problems) {
    p.rows = balanced_rows<T>(p.nq, kFwdRows);
    first_item.push_back(first_item.back() + p.bh_count * blocks(p.nq, p.rows));
    max_dvp = std::max(max_dvp, p.dvp);
  }
  at::parallel_for(0, first_item.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kFwdRows * kFwdLd<T>), lane_maxima(kFwdRows * kVec<T>);
    RowState<T> st(kFwdRows, max_dvp);
    for (int64_t item = begin; item < end; ++item) {
      size_t pi = 0;
      while (item >= first_item[pi + 1]) ++pi;
      const Attention<T>& p = problems[pi];
      const int64_t local = item - first_item[pi], nqb = blocks(p.nq, p.rows);
      forward_rows(p, local / nqb, (local % nqb) * p.rows, scores, lane_maxima, st);
    }
  });
}

// Backward over the query blocks of one stripe of one (problem, bh). With P = exp(S - lse),
// dP = g V^T, dS = P (dP - delta): dV += P^T g, dK += scale dS^T Q, dQ += scale dS K.
template <typename T>
void backward_stripe(const Attention<T>& p, int64_t bh, int64_t stripe, std::vector<T>& probs,
                     std::vector<T>& dprobs, std::vector<T>& dq) {
  constexpr int64_t kLd = kBwdLd<T>;
  const auto [b0, b1] = stripe_blocks(p.nq, p.rows, stripe, p.stripes);
  T* dk = p.dk_acc + (stripe * p.bh_count + bh) * p.nk * p.dp;
  T* dv = p.dv_acc + (stripe * p.bh_count + bh) * p.nk * p.dvp;
  if (b0 == b1) {  // no query rows: the sums below have no terms
    std::fill(dk, dk + p.nk * p.dp, T(0));
    std::fill(dv, dv + p.nk * p.dvp, T(0));
  }
  const T* kt = p.kt + bh * p.d * p.ld_k;
  const T* kr = p.kr + bh * p.nk * p.dp;
  const T* vt = p.vt + bh * p.dv * p.ld_k;
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * p.rows, nr = std::min(p.rows, p.nq - i0);
    const T* qr = p.qr + (bh * p.nq + i0) * p.dp;
    const T* gr = p.gr + (bh * p.nq + i0) * p.dvp;
    const T* lse = p.lse + bh * p.nq + i0;
    const T* delta = p.delta + bh * p.nq + i0;
    T* dq_block = p.dq_rows != nullptr ? p.dq_rows + (bh * p.nq + i0) * p.dp : dq.data();
    if (p.nk == 0) std::fill(dq_block, dq_block + nr * p.dp, T(0));
    T lse2[kBwdRows];
    for (int64_t r = 0; r < nr; ++r) lse2[r] = lse[r] * kLog2e<T>;
    for (int64_t j0 = 0; j0 < p.nk; j0 += kBwdKeys) {
      const int64_t nc = std::min(kBwdKeys, p.nk - j0), ncp = vec_ceil<T>(nc);
      T* pr = probs.data();
      T* ds = dprobs.data();
      // P and dS over the block's ncp columns; the padding columns (past nc) are never read
      tile_gemm<T, kAnyRowStride, false>(nr, ncp, p.d, p.score_scale, qr, 1, token_block(kt, p.d, j0), kTokenLd<T>,
                                         pr, kLd, nullptr, p.dp, ProbabilitiesFromScores<T>{lse2});
      tile_gemm<T, kAnyRowStride, false>(nr, ncp, p.dv, T(1), gr, 1, token_block(vt, p.dv, j0), kTokenLd<T>, ds,
                                         kLd, nullptr, p.dvp, ScoreGradients<T>{pr, kLd, delta});
      tile_gemm_sum<T, 1>(qb == b0, nc, p.dvp, nr, T(1), pr, kLd, gr, p.dvp, dv + j0 * p.dvp, p.dvp);
      tile_gemm_sum<T, 1>(qb == b0, nc, p.dp, nr, p.scale, ds, kLd, qr, p.dp, dk + j0 * p.dp, p.dp);
      tile_gemm_sum<T, kLd>(j0 == 0, nr, p.dp, nc, p.scale, ds, 1, kr + j0 * p.dp, p.dp, dq_block, p.dp);
    }
    if (p.dq_rows == nullptr) store_rows(p.grad_q, bh, i0, nr, dq.data(), p.dp, static_cast<const T*>(nullptr));
  }
}

// Gradients are accumulated straight into grad_q, and with one stripe into grad_k and grad_v, where those
// have the accumulators' dense layout (contiguous [B, H, N, D] with D a whole number of vectors): no
// buffers and no pass copying them out (store_rows and store_stripe_sums were 2% of a gated self-attention
// fwd+bwd at N = 784, D = 64).
template <typename T>
void backward_all(std::vector<Attention<T>>& problems, const std::vector<const T*>& factors,
                  const at::TensorOptions& options) {
  const at::Tensor packed = pack_attention(problems, true, factors, options);
  std::vector<at::Tensor> accumulators;
  std::vector<int64_t> first_item{0};
  int64_t max_dp = 0;
  for (auto& p : problems) {
    p.rows = balanced_rows<T>(p.nq, kBwdRows);
    p.stripes = stripe_count(static_cast<int64_t>(problems.size()) * p.bh_count, blocks(p.nq, p.rows));
    p.dq_rows = is_dense_rows(p.grad_q, p.bh_count, p.dp) ? p.grad_q.data : nullptr;
    const bool dk_direct = p.stripes == 1 && is_dense_rows(p.grad_k, p.bh_count, p.dp);
    const bool dv_direct = p.stripes == 1 && is_dense_rows(p.grad_v, p.bh_count, p.dvp);
    const int64_t dk_size = dk_direct ? 0 : p.stripes * p.bh_count * p.nk * p.dp;
    const int64_t dv_size = dv_direct ? 0 : p.stripes * p.bh_count * p.nk * p.dvp;
    accumulators.push_back(at::empty({dk_size + dv_size}, options));
    T* buffer = accumulators.back().template mutable_data_ptr<T>();
    p.dk_acc = dk_direct ? p.grad_k.data : buffer;
    p.dv_acc = dv_direct ? p.grad_v.data : buffer + dk_size;
    first_item.push_back(first_item.back() + p.bh_count * p.stripes);
    max_dp = std::max(max_dp, p.dp);
  }
  at::parallel_for(0, first_item.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kBwdRows * kBwdLd<T>), dprobs(kBwdRows * kBwdLd<T>), dq(kBwdRows * max_dp);
    for (int64_t item = begin; item < end; ++item) {
      size_t pi = 0;
      while (item >= first_item[pi + 1]) ++pi;
      const Attention<T>& p = problems[pi];
      const int64_t local = item - first_item[pi];
      backward_stripe(p, local / p.stripes, local % p.stripes, probs, dprobs, dq);
    }
  });
  for (auto& p : problems) {
    if (p.dk_acc != p.grad_k.data) store_stripe_sums(p.grad_k, p.dk_acc, p.stripes, p.bh_count, p.dp);
    if (p.dv_acc != p.grad_v.data) store_stripe_sums(p.grad_v, p.dv_acc, p.stripes, p.bh_count, p.dvp);
  }
}

// ------------------------------------------------------------------------------------------ tied
// S = scale r_a r_b^T [Na, Nb]; o_a = softmax_row(S) v_b, o_b = softmax_col(S)^T v_a. Each score block
// feeds both: the row state (max, sum, o_a accumulator) of the current query block and the column state
// of every key block, which lives for the whole stripe in the stripe's own buffers, merged afterwards
// with the log-sum-exp rule. Packed operands per head ([c, ld_b]: channel-major in token blocks as above;
// dp / dvap / dvbp padded channel counts):
//   rar r_a [na, dp]  rbt r_b^T [d, ld_b]  var v_a [na, dvap]  vbr v_b [nb, dvbp]      (forward)
//   rar, rbt, var, rbr r_b [nb, dp], vbt v_b^T [dvb, ld_b], gar dO_a [na, dvbp], gbt dO_b^T [dva, ld_b],
//   gbr dO_b [nb, dvap]                                                              (backward)
// The A operands of the three [query block, key block] products (S = r_a r_b^T, dP_row = dO_a v_b^T,
// dP_col = v_a dO_b^T) are read token-major, as the plain op's (Attention): no r_a^T, v_a^T, dO_a^T packs.
// Measured against those packs (Intel Xeon, 2 threads, alternating builds, B2 H1 N3136 D96): fwd+bwd
// 145.8-147.5 -> 141.1-144.2 ms (AVX512), 220.6-231.6 -> 218.1-228.6 ms (AVX2 pass); forward unchanged.
template <typename T>
struct Tied {
  Tokens<const T> ra, va, rb, vb, goa, gob;
  int64_t bh_count = 0, na = 0, nb = 0, d = 0, dva = 0, dvb = 0, stripes = 1;
  T scale = 1, score_scale = 1;  // as Attention
  int64_t ld_b = 0, dp = 0, dvap = 0, dvbp = 0;
  const T *rar = nullptr, *rbt = nullptr, *var = nullptr, *vbr = nullptr, *rbr = nullptr, *vbt = nullptr,
          *gar = nullptr, *gbt = nullptr, *gbr = nullptr;
  Tokens<T> oa, ob;
  T *lse_row = nullptr, *lse_col = nullptr;
  // forward column state per stripe: [G, BH, nb] maxima and sums, [G, BH, nb, dvap] accumulators
  T *col_max = nullptr, *col_sum = nullptr, *col_acc = nullptr;
  // backward
  const T *delta_row = nullptr, *delta_col = nullptr;
  Tokens<T> grad_ra, grad_va, grad_rb, grad_vb;
  T *drb_acc = nullptr, *dvb_acc = nullptr;  // [G, BH, nb, dp] / [.., dvbp]
};

template <typename T>
at::Tensor pack_tied(Tied<T>& p, bool backward, const at::TensorOptions& options) {
  OperandPacks<T> packs(p.bh_count);
  packs.token_major(p.ra, p.dp, p.rar);
  packs.channel_major(p.rb, p.ld_b, p.rbt);
  packs.token_major(p.va, p.dvap, p.var);
  if (!backward) {
    packs.token_major(p.vb, p.dvbp, p.vbr);
    return packs.run(options);
  }
  packs.token_major(p.rb, p.dp, p.rbr);
  packs.channel_major(p.vb, p.ld_b, p.vbt);
  packs.token_major(p.goa, p.dvbp, p.gar);
  packs.channel_major(p.gob, p.ld_b, p.gbt);
  packs.token_major(p.gob, p.dvap, p.gbr);
  return packs.run(options);
}

// bm[c] = max(bm[c], row[c]) ignoring NaN (as row_max).
template <typename T>
void column_max(T* __restrict bm, const T* __restrict row, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V v = V::loadu(row + c), m = V::loadu(bm + c);
    max_ignoring_nan(m, v).store(bm + c);
  }
  for (; c < n; ++c) bm[c] = row[c] > bm[c] ? row[c] : bm[c];
}

// dst[c] = exp(src[c] - sub[c]) (the column softmax: one max / lse per column).
template <typename T>
void exp_sub_vec(T* __restrict dst, const T* __restrict src, const T* __restrict sub, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + W <= n; c += W) exp2_nonpositive(V::loadu(src + c) - V::loadu(sub + c)).store(dst + c);
  for (; c < n; ++c) dst[c] = exp2_nonpositive(src[c] - sub[c]);
}

// One block row of the tied backward: p_row = exp(s - lse_row) in place of s, p_col = exp(s - lse_col[c])
// into pc, dS = p_row (dp_row - delta_row) + p_col (dp_col - delta_col[c]) in place of dp_row.
template <typename T>
void tied_grad_row(T* __restrict s, T* __restrict pc, T* __restrict dpr, const T* __restrict dpc,
                   const T* __restrict lse_col, const T* __restrict delta_col, int64_t n, T lse_row, T delta_row) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V lr(lse_row), dr(delta_row);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V sv = V::loadu(s + c);
    const V pcol = exp2_nonpositive(sv - V::loadu(lse_col + c));
    const V prow = exp2_nonpositive(sv - lr);
    pcol.store(pc + c);
    prow.store(s + c);
    const V grad_col = pcol * (V::loadu(dpc + c) - V::loadu(delta_col + c));
    at::vec::fmadd(prow, V::loadu(dpr + c) - dr, grad_col).store(dpr + c);
  }
  for (; c < n; ++c) {
    pc[c] = exp2_nonpositive(s[c] - lse_col[c]);
    s[c] = exp2_nonpositive(s[c] - lse_row);
    dpr[c] = std::fma(s[c], dpr[c] - delta_row, pc[c] * (dpc[c] - delta_col[c]));
  }
}

template <typename T>
void tied_forward_stripe(const Tied<T>& p, int64_t bh, int64_t stripe, std::vector<T>& scores,
                         std::vector<T>& col_probs, RowState<T>& st, std::vector<T>& col_block_max,
                         std::vector<T>& lane_maxima) {
  constexpr int64_t kLd = kFwdLd<T>;
  const auto [b0, b1] = stripe_blocks(p.na, kFwdRows, stripe, p.stripes);
  const int64_t state = stripe * p.bh_count + bh;
  T* cmax = p.col_max + state * p.nb;
  T* csum = p.col_sum + state * p.nb;
  T* cacc = p.col_acc + state * p.nb * p.dvap;
  std::fill(cmax, cmax + p.nb, -std::numeric_limits<T>::infinity());
  std::fill(csum, csum + p.nb, T(0));
  std::fill(cacc, cacc + p.nb * p.dvap, T(0));
  const T* rbt = p.rbt + bh * p.d * p.ld_b;
  const T* vbr = p.vbr + bh * p.nb * p.dvbp;
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * kFwdRows, nr = std::min(kFwdRows, p.na - i0);
    const T* rar = p.rar + (bh * p.na + i0) * p.dp;
    const T* var = p.var + (bh * p.na + i0) * p.dvap;
    st.start(nr, p.dvbp, p.nb);
    for (int64_t j0 = 0; j0 < p.nb; j0 += kFwdKeys) {
      const int64_t nc = std::min(kFwdKeys, p.nb - j0);
      T* s = scores.data();
      T* pc = col_probs.data();
      const T* row_maxima = score_block<T, kLd, kAnyRowStride>(nr, nc, p.d, p.score_scale, rar, p.dp, 1,
                                                               token_block(rbt, p.d, j0), s, lane_maxima);
      // column direction: new maxima, rescale the columns' state, exp against the column maxima
      T* bm = col_block_max.data();
      std::copy(cmax + j0, cmax + j0 + nc, bm);
      for (int64_t r = 0; r < nr; ++r) column_max(bm, s + r * kLd, nc);
      for (int64_t c = 0; c < nc; ++c) {
        const T alpha = rescale_factor(cmax[j0 + c], bm[c]);
        cmax[j0 + c] = bm[c];
        if (alpha != T(1)) {
          csum[j0 + c] *= alpha;
          T* a = cacc + (j0 + c) * p.dvap;
          for (int64_t e = 0; e < p.dvap; ++e) a[e] *= alpha;
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        exp_sub_vec(pc + r * kLd, s + r * kLd, bm, nc);
        const T* prow = pc + r * kLd;
        for (int64_t c = 0; c < nc; ++c) csum[j0 + c] += prow[c];
      }
      tile_gemm<T, 1, true>(nc, p.dvap, nr, T(1), pc, kLd, var, p.dvap, cacc + j0 * p.dvap, p.dvap);
      // row direction: the ordinary online softmax
      online_softmax_update<T, kLd>(s, nr, nc, vbr + j0 * p.dvbp, p.dvbp, st, row_maxima, j0 == 0);
    }
    online_softmax_finish(st, nr, p.dvbp, static_cast<const T*>(nullptr), p.oa, bh, i0, p.lse_row + bh * p.na + i0);
  }
}

// Merges the stripes' column states of columns [c0, c0 + n) of one bh into o_b and lse_col.
template <typename T>
void tied_merge_columns(const Tied<T>& p, int64_t bh, int64_t c0, int64_t n, std::vector<T>& rows,
                        std::vector<T>& factor) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = c0 + i;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t g = 0; g < p.stripes; ++g) {
      const T mg = p.col_max[(g * p.bh_count + bh) * p.nb + c];
      mx = mg > mx ? mg : mx;
    }
    T sum = 0;
    T* ob = rows.data() + i * p.dvap;
    std::fill(ob, ob + p.dvap, T(0));
    for (int64_t g = 0; g < p.stripes; ++g) {
      const int64_t state = (g * p.bh_count + bh) * p.nb + c;
      const T w = rescale_factor(p.col_max[state], mx);
      sum += p.col_sum[state] * w;
      const T* a = p.col_acc + state * p.dvap;
      for (int64_t e = 0; e < p.dvap; ++e) ob[e] += a[e] * w;
    }
    factor[i] = sum == T(0) ? T(0) : T(1) / sum;
    p.lse_col[bh * p.nb + c] = (mx + std::log2(sum)) * kLn2<T>;
  }
  store_rows(p.ob, bh, c0, n, rows.data(), p.dvap, factor.data());
}

template <typename T>
void tied_forward_all(Tied<T>& p, const at::TensorOptions& options) {
  const at::Tensor packed = pack_tied(p, false, options);
  const int64_t states = p.stripes * p.bh_count;
  at::Tensor column_state = at::empty({states * p.nb * (2 + p.dvap)}, options);
  p.col_max = column_state.mutable_data_ptr<T>();
  p.col_sum = p.col_max + states * p.nb;
  p.col_acc = p.col_sum + states * p.nb;
  at::parallel_for(0, states, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kFwdRows * kFwdLd<T>), col_probs(kFwdRows * kFwdLd<T>), col_block_max(kFwdKeys),
        lane_maxima(kFwdRows * kVec<T>);
    RowState<T> st(kFwdRows, p.dvbp);
    for (int64_t item = begin; item < end; ++item)
      tied_forward_stripe(p, item / p.stripes, item % p.stripes, scores, col_probs, st, col_block_max, lane_maxima);
  });
  constexpr int64_t kCols = 64;
  const int64_t col_tiles = blocks(p.nb, kCols);
  at::parallel_for(0, p.bh_count * col_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(kCols * p.dvap), factor(kCols);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / col_tiles, c0 = (item % col_tiles) * kCols;
      tied_merge_columns(p, bh, c0, std::min(kCols, p.nb - c0), rows, factor);
    }
  });
}

// With P_row = exp(S - lse_row), P_col = exp(S - lse_col) (in base 2; p.lse_col holds lse_col log2(e) here):
//   dS = P_row (dO_a v_b^T - delta_row) + P_col (v_a dO_b^T - delta_col)
//   dv_b += P_row^T dO_a, dv_a += P_col dO_b, dr_a += scale dS r_b, dr_b += scale dS^T r_a.
template <typename T>
void tied_backward_stripe(const Tied<T>& p, int64_t bh, int64_t stripe, std::vector<T>* buf) {
  constexpr int64_t kLd = kBwdLd<T>;
  const auto [b0, b1] = stripe_blocks(p.na, kBwdRows, stripe, p.stripes);
  T* drb = p.drb_acc + (stripe * p.bh_count + bh) * p.nb * p.dp;
  T* dvb = p.dvb_acc + (stripe * p.bh_count + bh) * p.nb * p.dvbp;
  if (b0 == b1) {  // no query rows: the sums below have no terms
    std::fill(drb, drb + p.nb * p.dp, T(0));
    std::fill(dvb, dvb + p.nb * p.dvbp, T(0));
  }
  const T* rbt = p.rbt + bh * p.d * p.ld_b;
  const T* rbr = p.rbr + bh * p.nb * p.dp;
  const T* vbt = p.vbt + bh * p.dvb * p.ld_b;
  const T* gbt = p.gbt + bh * p.dva * p.ld_b;
  const T* gbr = p.gbr + bh * p.nb * p.dvap;
  const T* lse_col = p.lse_col + bh * p.nb;
  const T* delta_col = p.delta_col + bh * p.nb;
  T* prow = buf[0].data();
  T* pcol = buf[1].data();
  T* ds = buf[2].data();
  T* dpcol = buf[3].data();
  T* dra = buf[4].data();
  T* dva = buf[5].data();
  for (int64_t qb = b0; qb < b1; ++qb) {
    const int64_t i0 = qb * kBwdRows, nr = std::min(kBwdRows, p.na - i0);
    const T* rar = p.rar + (bh * p.na + i0) * p.dp;
    const T* var = p.var + (bh * p.na + i0) * p.dvap;
    const T* gar = p.gar + (bh * p.na + i0) * p.dvbp;
    const T* lse_row = p.lse_row + bh * p.na + i0;
    const T* delta_row = p.delta_row + bh * p.na + i0;
    if (p.nb == 0) {
      std::fill(dra, dra + nr * p.dp, T(0));
      std::fill(dva, dva + nr * p.dvap, T(0));
    }
    for (int64_t j0 = 0; j0 < p.nb; j0 += kBwdKeys) {
      const int64_t nc = std::min(kBwdKeys, p.nb - j0), ncp = vec_ceil<T>(nc);
      tile_gemm<T, kAnyRowStride, false>(nr, ncp, p.d, p.score_scale, rar, 1, token_block(rbt, p.d, j0),
                                         kTokenLd<T>, prow, kLd, nullptr, p.dp);
      tile_gemm<T, kAnyRowStride, false>(nr, ncp, p.dvb, T(1), gar, 1, token_block(vbt, p.dvb, j0), kTokenLd<T>, ds,
                                         kLd, nullptr, p.dvbp);
      tile_gemm<T, kAnyRowStride, false>(nr, ncp, p.dva, T(1), var, 1, token_block(gbt, p.dva, j0), kTokenLd<T>,
                                         dpcol, kLd, nullptr, p.dvap);
      for (int64_t r = 0; r < nr; ++r)
        tied_grad_row(prow + r * kLd, pcol + r * kLd, ds + r * kLd, dpcol + r * kLd, lse_col + j0, delta_col + j0, nc,
                      lse_row[r] * kLog2e<T>, delta_row[r]);
      tile_gemm_sum<T, 1>(qb == b0, nc, p.dvbp, nr, T(1), prow, kLd, gar, p.dvbp, dvb + j0 * p.dvbp, p.dvbp);
      tile_gemm_sum<T, kLd>(j0 == 0, nr, p.dvap, nc, T(1), pcol, 1, gbr + j0 * p.dvap, p.dvap, dva, p.dvap);
      tile_gemm_sum<T, kLd>(j0 == 0, nr, p.dp, nc, p.scale, ds, 1, rbr + j0 * p.dp, p.dp, dra, p.dp);
      tile_gemm_sum<T, 1>(qb == b0, nc, p.dp, nr, p.scale, ds, kLd, rar, p.dp, drb + j0 * p.dp, p.dp);
    }
    store_rows(p.grad_ra, bh, i0, nr, dra, p.dp, static_cast<const T*>(nullptr));
    store_rows(p.grad_va, bh, i0, nr, dva, p.dvap, static_cast<const T*>(nullptr));
  }
}

template <typename T>
void tied_backward_all(Tied<T>& p, const at::TensorOptions& options) {
  const at::Tensor packed = pack_tied(p, true, options);
  at::Tensor accumulators = at::empty({p.stripes * p.bh_count * p.nb * (p.dp + p.dvbp)}, options);
  p.drb_acc = accumulators.mutable_data_ptr<T>();
  p.dvb_acc = p.drb_acc + p.stripes * p.bh_count * p.nb * p.dp;
  at::parallel_for(0, p.bh_count * p.stripes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf[6];
    for (int i = 0; i < 4; ++i) buf[i].resize(kBwdRows * kBwdLd<T>);
    buf[4].resize(kBwdRows * p.dp);
    buf[5].resize(kBwdRows * p.dvap);
    for (int64_t item = begin; item < end; ++item) tied_backward_stripe(p, item / p.stripes, item % p.stripes, buf);
  });
  store_stripe_sums(p.grad_rb, p.drb_acc, p.stripes, p.bh_count, p.dp);
  store_stripe_sums(p.grad_vb, p.dvb_acc, p.stripes, p.bh_count, p.dvbp);
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

// Kernels compute in float (float32, bfloat16) or double (float64), on inputs with any strides.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::Tensor prep(const at::Tensor& t) { return t.to(compute_type(t)); }
inline at::Tensor like_input(const at::Tensor& t, const at::Tensor& input) { return t.to(input.scalar_type()); }

// A [B, H, n, c] output in the compute type with the token / channel order of `like`: the strided token
// views of a [B, C, H, W] map (channels outer) get outputs of that layout, which turn back into a map
// without a copy.
at::Tensor tokens_like(const at::Tensor& like, int64_t n, int64_t c) {
  const at::TensorOptions options = like.options().dtype(compute_type(like));
  if (like.stride(2) == 1 && like.stride(3) != 1 && like.size(3) > 1)
    return at::empty({like.size(0), like.size(1), c, n}, options).transpose(2, 3);
  return at::empty({like.size(0), like.size(1), n, c}, options);
}

// A gradient for the compute-type input x, in x's layout.
inline at::Tensor grad_like(const at::Tensor& x) { return at::empty_like(x); }

inline double default_scale(std::optional<double> scale, int64_t d) {
  return scale.has_value() ? *scale : (d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);
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
    gate = prep(*gate_in).contiguous();
  }
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  at::Tensor out = tokens_like(q_in, Nq, v.size(3));
  at::Tensor lse = at::empty({B, H, Nq}, q.options());
  if (B * H * Nq > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_attention", [&] {
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q, k, v, default_scale(scale, q.size(3)))};
      problems[0].gate = gate.defined() ? gate.const_data_ptr<scalar_t>() : nullptr;
      problems[0].out = tokens_out<scalar_t>(out);
      problems[0].lse = lse.mutable_data_ptr<scalar_t>();
      forward_all(problems, q.options());
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
  if (gate_in.has_value()) {
    check_same(q_in, *gate_in, "q", "gate");
    TORCH_CHECK(gate_in->sizes() == q_in.sizes().slice(0, 3), "gate: expected shape [B, H, Nq], got ",
                gate_in->sizes());
  }
  const at::Tensor q = prep(q_in), k = prep(k_in), v = prep(v_in), out = prep(out_in), grad = prep(grad_in);
  const at::ScalarType ct = q.scalar_type();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  at::Tensor dq = grad_like(q), dk = grad_like(k), dv = grad_like(v);
  at::Tensor delta = at::empty({B, H, Nq}, q.options());
  at::Tensor dgate;
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "cross_attention_backward", [&] {
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q, k, v, default_scale(scale, q.size(3)))};
      auto& p = problems[0];
      p.grad_out = tokens_in<scalar_t>(grad);
      row_dots(p.grad_out, tokens_in<scalar_t>(out), p.bh_count, delta.mutable_data_ptr<scalar_t>());
      at::Tensor sig;
      if (gate_in.has_value()) {
        // out = sigmoid(g) A: the softmax backward sees dO sigmoid(g); delta = rowsum(dO out) is the same
        // for both views, and d gate = delta (1 - sigmoid(g)).
        sig = at::sigmoid(gate_in->to(ct)).contiguous();
        dgate = like_input(delta * (1 - sig), *gate_in);
      }
      p.lse = const_cast<scalar_t*>(lse.const_data_ptr<scalar_t>());
      p.delta = delta.const_data_ptr<scalar_t>();
      p.grad_q = tokens_out<scalar_t>(dq);
      p.grad_k = tokens_out<scalar_t>(dk);
      p.grad_v = tokens_out<scalar_t>(dv);
      backward_all(problems, {sig.defined() ? sig.const_data_ptr<scalar_t>() : nullptr}, q.options());
    });
  }
  return {like_input(dq, q_in), like_input(dk, k_in), like_input(dv, v_in),
          dgate.defined() ? dgate : (gate_in.has_value() ? at::zeros_like(*gate_in) : absent_like(q_in))};
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
  at::Tensor o_a = tokens_like(q_a_in, Na, v_b.size(3)), o_b = tokens_like(q_b_in, Nb, v_a.size(3));
  at::Tensor lse_a = at::empty({B, H, Na}, q_a.options()), lse_b = at::empty({B, H, Nb}, q_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(q_a.scalar_type(), "bidirectional_cross_attention", [&] {
      const double s = default_scale(scale, q_a.size(3));
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q_a, k_b, v_b, s),
                                                make_problem<scalar_t>(q_b, k_a, v_a, s)};
      problems[0].out = tokens_out<scalar_t>(o_a);
      problems[0].lse = lse_a.mutable_data_ptr<scalar_t>();
      problems[1].out = tokens_out<scalar_t>(o_b);
      problems[1].lse = lse_b.mutable_data_ptr<scalar_t>();
      forward_all(problems, q_a.options());
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
  check_two_way_saved(q_a_in, v_a_in, q_b_in, v_b_in, o_a_in, o_b_in, grad_o_a_in, grad_o_b_in, lse_a_in, "lse_a",
                      lse_b_in, "lse_b");
  const at::Tensor q_a = prep(q_a_in), k_a = prep(k_a_in), v_a = prep(v_a_in);
  const at::Tensor q_b = prep(q_b_in), k_b = prep(k_b_in), v_b = prep(v_b_in);
  const at::ScalarType ct = q_a.scalar_type();
  const at::Tensor g_a = prep(grad_o_a_in), g_b = prep(grad_o_b_in), o_a = prep(o_a_in), o_b = prep(o_b_in);
  const at::Tensor lse_a = lse_a_in.to(ct).contiguous(), lse_b = lse_b_in.to(ct).contiguous();
  const int64_t B = q_a.size(0), H = q_a.size(1);
  at::Tensor dq_a = grad_like(q_a), dk_a = grad_like(k_a), dv_a = grad_like(v_a);
  at::Tensor dq_b = grad_like(q_b), dk_b = grad_like(k_b), dv_b = grad_like(v_b);
  at::Tensor delta_a = at::empty({B, H, q_a.size(2)}, q_a.options()), delta_b = at::empty({B, H, q_b.size(2)}, q_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "bidirectional_cross_attention_backward", [&] {
      const double s = default_scale(scale, q_a.size(3));
      // direction a: queries q_a against (k_b, v_b); direction b: q_b against (k_a, v_a)
      std::vector<Attention<scalar_t>> problems{make_problem<scalar_t>(q_a, k_b, v_b, s),
                                                make_problem<scalar_t>(q_b, k_a, v_a, s)};
      const at::Tensor* lses[2] = {&lse_a, &lse_b};
      const at::Tensor* grads[2] = {&g_a, &g_b};
      const at::Tensor* outs[2] = {&o_a, &o_b};
      at::Tensor* deltas[2] = {&delta_a, &delta_b};
      at::Tensor* dqs[2] = {&dq_a, &dq_b};
      at::Tensor* dks[2] = {&dk_b, &dk_a};
      at::Tensor* dvs[2] = {&dv_b, &dv_a};
      for (int i = 0; i < 2; ++i) {
        auto& p = problems[i];
        p.grad_out = tokens_in<scalar_t>(*grads[i]);
        row_dots(p.grad_out, tokens_in<scalar_t>(*outs[i]), p.bh_count, deltas[i]->mutable_data_ptr<scalar_t>());
        p.lse = const_cast<scalar_t*>(lses[i]->const_data_ptr<scalar_t>());
        p.delta = deltas[i]->const_data_ptr<scalar_t>();
        p.grad_q = tokens_out<scalar_t>(*dqs[i]);
        p.grad_k = tokens_out<scalar_t>(*dks[i]);
        p.grad_v = tokens_out<scalar_t>(*dvs[i]);
      }
      backward_all(problems, {nullptr, nullptr}, q_a.options());
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
                  double scale, int64_t rows) {
  Tied<T> p;
  p.ra = tokens_in<T>(r_a);
  p.va = tokens_in<T>(v_a);
  p.rb = tokens_in<T>(r_b);
  p.vb = tokens_in<T>(v_b);
  p.na = r_a.size(2);
  p.nb = r_b.size(2);
  p.d = r_a.size(3);
  p.dva = v_a.size(3);
  p.dvb = v_b.size(3);
  p.bh_count = r_a.size(0) * r_a.size(1);
  p.scale = static_cast<T>(scale);
  p.score_scale = static_cast<T>(scale * kLog2e<double>);
  p.ld_b = channel_major_extent<T>(p.nb);
  p.dp = vec_ceil<T>(p.d);
  p.dvap = vec_ceil<T>(p.dva);
  p.dvbp = vec_ceil<T>(p.dvb);
  p.stripes = stripe_count(p.bh_count, blocks(p.na, rows));
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
  at::Tensor o_a = tokens_like(r_a_in, Na, v_b.size(3)), o_b = tokens_like(r_b_in, Nb, v_a.size(3));
  at::Tensor lse_row = at::empty({B, H, Na}, r_a.options()), lse_col = at::empty({B, H, Nb}, r_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(r_a.scalar_type(), "tied_cross_attention", [&] {
      Tied<scalar_t> p = make_tied<scalar_t>(r_a, v_a, r_b, v_b, default_scale(scale, r_a.size(3)), kFwdRows);
      p.oa = tokens_out<scalar_t>(o_a);
      p.ob = tokens_out<scalar_t>(o_b);
      p.lse_row = lse_row.mutable_data_ptr<scalar_t>();
      p.lse_col = lse_col.mutable_data_ptr<scalar_t>();
      tied_forward_all(p, r_a.options());
    });
  }
  return {like_input(o_a, r_a_in), like_input(o_b, r_a_in), lse_row, lse_col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tied_backward(
    const at::Tensor& grad_o_a_in, const at::Tensor& grad_o_b_in, const at::Tensor& r_a_in, const at::Tensor& v_a_in,
    const at::Tensor& r_b_in, const at::Tensor& v_b_in, const at::Tensor& o_a_in, const at::Tensor& o_b_in,
    const at::Tensor& lse_row_in, const at::Tensor& lse_col_in, std::optional<double> scale) {
  check_tied(r_a_in, v_a_in, r_b_in, v_b_in);
  check_two_way_saved(r_a_in, v_a_in, r_b_in, v_b_in, o_a_in, o_b_in, grad_o_a_in, grad_o_b_in, lse_row_in,
                      "lse_row", lse_col_in, "lse_col");
  const at::Tensor r_a = prep(r_a_in), v_a = prep(v_a_in), r_b = prep(r_b_in), v_b = prep(v_b_in);
  const at::ScalarType ct = r_a.scalar_type();
  const at::Tensor g_a = prep(grad_o_a_in), g_b = prep(grad_o_b_in), o_a = prep(o_a_in), o_b = prep(o_b_in);
  // the column lse in base 2, as the kernel reads it per score (the row one is converted per row)
  const at::Tensor lse_row = lse_row_in.to(ct).contiguous(), lse_col2 = lse_col_in.to(ct) * kLog2e<double>;
  const int64_t B = r_a.size(0), H = r_a.size(1);
  at::Tensor dr_a = grad_like(r_a), dv_a = grad_like(v_a), dr_b = grad_like(r_b), dv_b = grad_like(v_b);
  at::Tensor delta_row = at::empty({B, H, r_a.size(2)}, r_a.options());
  at::Tensor delta_col = at::empty({B, H, r_b.size(2)}, r_a.options());
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "tied_cross_attention_backward", [&] {
      Tied<scalar_t> p = make_tied<scalar_t>(r_a, v_a, r_b, v_b, default_scale(scale, r_a.size(3)), kBwdRows);
      p.goa = tokens_in<scalar_t>(g_a);
      p.gob = tokens_in<scalar_t>(g_b);
      row_dots(p.goa, tokens_in<scalar_t>(o_a), p.bh_count, delta_row.mutable_data_ptr<scalar_t>());
      row_dots(p.gob, tokens_in<scalar_t>(o_b), p.bh_count, delta_col.mutable_data_ptr<scalar_t>());
      p.lse_row = const_cast<scalar_t*>(lse_row.const_data_ptr<scalar_t>());
      p.lse_col = const_cast<scalar_t*>(lse_col2.const_data_ptr<scalar_t>());
      p.delta_row = delta_row.const_data_ptr<scalar_t>();
      p.delta_col = delta_col.const_data_ptr<scalar_t>();
      p.grad_ra = tokens_out<scalar_t>(dr_a);
      p.grad_va = tokens_out<scalar_t>(dv_a);
      p.grad_rb = tokens_out<scalar_t>(dr_b);
      p.grad_vb = tokens_out<scalar_t>(dv_b);
      tied_backward_all(p, r_a.options());
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
