// Activated batch norm on CPU: training-mode batch norm + leaky ReLU that keeps only its output.
//
//   y = leaky((x - mean) * invstd * gamma + beta),  gamma = |weight| + eps,  invstd = 1 / sqrt(var + eps)
//
// The composite (BatchNorm2d + LeakyReLU) keeps two [B,C,H,W] tensors for backward: BN's input x and
// the activation's output y. Here y is the only one (and it is the next layer's input, which that
// layer keeps anyway), because BN's backward can be written in terms of y (InPlace-ABN, Rota Bulo et
// al. 2018): leaky is invertible for slope > 0 and gamma > 0, so
//   z = y > 0 ? y : y / slope,   dz = y > 0 ? g : g * slope,   xhat = (z - beta) / gamma
//   grad_beta = sum dz,  grad_gamma = sum dz * xhat,  grad_weight = grad_gamma * sgn(weight)
//   grad_x = gamma * invstd * (dz - (sum dz + xhat * sum dz * xhat) / M),   M = B * H * W
// The |weight| + eps parameterisation keeps gamma away from 0, where the inversion would break.
//
// Each direction is two passes over memory: per-channel sums (forward: sum (x - x0), sum (x - x0)^2
// around the channel's first value x0, which avoids the cancellation of E[x^2] - E[x]^2 without a third
// pass; backward: sum dz, sum dz * xhat), then an elementwise pass. Both layouts are read as flat,
// unit-stride runs of values whose channel repeats with a period of L lanes:
//  * NCHW: a channel's B rows of H*W values; L = kChains vectors, every lane the same channel, so the
//    channel's constants are broadcast registers and the partial sums stay in registers
//    (block_sums_nchw). A thread takes a range of channels and runs the second pass over one channel
//    interleaved with the first pass over the next (pipelined_channel_passes): the second pass re-reads
//    rows still in L2 (a few hundred KiB per channel at DIN's shapes) while the first reads new ones.
//  * channels_last: pixel blocks of C values each; L = a multiple of lcm(C, vector width), lane k holds
//    channel k % C, so the same vector loops serve any C (12, 24, 96: no per-pixel remainders). Work
//    item = a chunk of pixels; per-chunk channel sums are combined in chunk order after the loop.
// Sums run in explicit at::vec::Vectorized<acc> accumulators (float for float32 / bfloat16: 16 lanes in
// the AVX512 pass, 8 in AVX2, the portable 8-lane array in DEFAULT; double for float64) over blocks of
// about kBlockValues values (at most kBlockValues / L + 1 terms per lane), whose sums accumulate in
// double; the combination order is fixed (no atomics, independent of the thread count). bfloat16
// blocks are converted to float in a per-thread buffer first. When a call's maps are larger than a cache
// keeps, the elementwise pass writes its output with streaming stores (medattn/stream_store.h), which
// spares the read of every output line before it is written.
#include "medattn/acc_run.h"  // load_run, run_target, store_run
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/static_for.h"
#include "medattn/stream_store.h"  // streaming_pays, store_maybe_streaming
#include "medattn/vec_math.h"  // Vectorized, lane_sum

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// Independent accumulator vectors per sum: enough to cover the add latency (4 cycles, 2 per cycle),
// few enough that both sums' chains stay in registers on AVX2 (16 ymm).
constexpr int64_t kChains = 4;
// Values per block of float partial sums; a block's sums are added in double.
constexpr int64_t kBlockValues = 2048;
// channels_last: blocks per parallel work item (a chunk: about 64K values).
constexpr int64_t kBlocksPerChunk = 32;

inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::Tensor in_own_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Lanes of the repeating pattern for C channels per pixel: a multiple of lcm(C, vector width) of at least
// kChains vectors. NCHW rows hold one channel: C = 1 there.
template <typename acc>
int64_t period_lanes(int64_t C) {
  const int64_t V = Vectorized<acc>::size();
  const int64_t l = std::lcm(C, V);
  return l * ((kChains * V + l - 1) / l);
}

// for (k in [0, n)) body(k, count) over vectors of the period: full periods, then the last partial one
// vector at a time (count < V lanes valid in the last vector).
template <typename acc, typename Body>
inline void for_each_vector(int64_t n, int64_t L, const Body& body) {
  constexpr int64_t V = Vectorized<acc>::size();
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int64_t k = 0; k < L; k += V) body(i, k, V);
  for (int64_t k = 0; i + k < n; k += V) body(i, k, std::min(V, n - i - k));
}

// s1[k] += sum_j (x[jL + k] - shift[k]), s2[k] += the squares, over the n values of one block.
template <typename acc>
void add_shifted_sums(const acc* x, int64_t n, int64_t L, const acc* shift, acc* s1, acc* s2) {
  using Vec = Vectorized<acc>;
  for_each_vector<acc>(n, L, [&](int64_t i, int64_t k, int64_t count) {
    Vec d = Vec::loadu(x + i + k, count) - Vec::loadu(shift + k);
    if (count < Vec::size()) d = Vec::set(Vec(0), d, count);
    (Vec::loadu(s1 + k) + d).store(s1 + k);
    at::vec::fmadd(d, d, Vec::loadu(s2 + k)).store(s2 + k);
  });
}

// y = leaky(((x - mean_hi) - mean_lo) * scale + beta) per lane's channel. mean_lo = mean - mean_hi carries
// the bits of the (double) mean that acc cannot hold: x - mean_hi is exact for x near the mean, so a large
// common offset of x does not cost y its low bits.
template <typename acc>
struct NormalizeLanes {
  const acc *mean_hi, *mean_lo, *scale, *beta;
  acc slope;
};

template <typename acc>
inline Vectorized<acc> normalize_leaky(const Vectorized<acc>& xv, const Vectorized<acc>& mean_hi,
                                       const Vectorized<acc>& mean_lo, const Vectorized<acc>& scale,
                                       const Vectorized<acc>& beta, const Vectorized<acc>& slope) {
  using Vec = Vectorized<acc>;
  const Vec z = at::vec::fmadd((xv - mean_hi) - mean_lo, scale, beta);
  return Vec::blendv(z * slope, z, z > Vec(0));
}

template <typename acc>
void normalize_leaky(const acc* x, acc* y, int64_t n, int64_t L, const NormalizeLanes<acc>& p, bool stream) {
  using Vec = Vectorized<acc>;
  const Vec slope(p.slope);
  for_each_vector<acc>(n, L, [&](int64_t i, int64_t k, int64_t count) {
    const Vec yv = normalize_leaky(Vec::loadu(x + i + k, count), Vec::loadu(p.mean_hi + k), Vec::loadu(p.mean_lo + k),
                                   Vec::loadu(p.scale + k), Vec::loadu(p.beta + k), slope);
    store_maybe_streaming(y + i + k, yv, count, stream);
  });
}

// Backward per lane: dz and xhat rebuilt from y (see the top of the file); NaN y gives NaN xhat.
template <typename acc>
struct InverseLanes {
  const acc *beta, *inv_gamma;
  acc slope, inv_slope;
};

template <typename acc>
inline void dz_xhat(const Vectorized<acc>& yv, const Vectorized<acc>& gv, const Vectorized<acc>& beta,
                    const Vectorized<acc>& inv_gamma, const Vectorized<acc>& slope, const Vectorized<acc>& inv_slope,
                    Vectorized<acc>& dz, Vectorized<acc>& xhat) {
  using Vec = Vectorized<acc>;
  const Vec pos = yv > Vec(0);
  dz = Vec::blendv(gv * slope, gv, pos);
  xhat = (Vec::blendv(yv * inv_slope, yv, pos) - beta) * inv_gamma;
}

// s1[k] += sum dz, s2[k] += sum dz * xhat over the n values of one block.
template <typename acc>
void add_backward_sums(const acc* y, const acc* g, int64_t n, int64_t L, const InverseLanes<acc>& p, acc* s1,
                       acc* s2) {
  using Vec = Vectorized<acc>;
  const Vec slope(p.slope), inv_slope(p.inv_slope);
  for_each_vector<acc>(n, L, [&](int64_t i, int64_t k, int64_t count) {
    Vec dz, xhat;
    dz_xhat(Vec::loadu(y + i + k, count), Vec::loadu(g + i + k, count), Vec::loadu(p.beta + k),
            Vec::loadu(p.inv_gamma + k), slope, inv_slope, dz, xhat);
    if (count < Vec::size()) {
      dz = Vec::set(Vec(0), dz, count);
      xhat = Vec::set(Vec(0), xhat, count);
    }
    (Vec::loadu(s1 + k) + dz).store(s1 + k);
    at::vec::fmadd(dz, xhat, Vec::loadu(s2 + k)).store(s2 + k);
  });
}

// grad_x = coef * (dz - mean_dz - xhat * mean_dz_xhat)
template <typename acc>
struct GradLanes {
  InverseLanes<acc> inv;
  const acc *coef, *mean_dz, *mean_dz_xhat;
};

template <typename acc>
inline Vectorized<acc> grad_x(const Vectorized<acc>& dz, const Vectorized<acc>& xhat, const Vectorized<acc>& coef,
                              const Vectorized<acc>& mean_dz, const Vectorized<acc>& mean_dz_xhat) {
  return coef * at::vec::fnmadd(xhat, mean_dz_xhat, dz - mean_dz);
}

template <typename acc>
void grad_x_run(const acc* y, const acc* g, acc* out, int64_t n, int64_t L, const GradLanes<acc>& p, bool stream) {
  using Vec = Vectorized<acc>;
  const Vec slope(p.inv.slope), inv_slope(p.inv.inv_slope);
  for_each_vector<acc>(n, L, [&](int64_t i, int64_t k, int64_t count) {
    Vec dz, xhat;
    dz_xhat(Vec::loadu(y + i + k, count), Vec::loadu(g + i + k, count), Vec::loadu(p.inv.beta + k),
            Vec::loadu(p.inv.inv_gamma + k), slope, inv_slope, dz, xhat);
    const Vec gx = grad_x(dz, xhat, Vec::loadu(p.coef + k), Vec::loadu(p.mean_dz + k), Vec::loadu(p.mean_dz_xhat + k));
    store_maybe_streaming(out + i + k, gx, count, stream);
  });
}

// NCHW runs hold one channel: its constants are broadcasts, and a block's kChains partial sums of each kind
// stay in registers. (The period-lane loops above, which channels_last needs, load every constant and load
// and store every partial sum per vector; on NCHW maps in L3, on a Zen 5, their sums pass took 3.7x the time
// of ATen's per-channel sum.) terms(j, count, addend, lhs, rhs) gives the vector at j: s1 += addend,
// s2 += lhs * rhs, with lanes past count zeroed here. The block's partial sums are then added as vectors,
// their lanes summed, and the result added in double.
template <typename acc, typename Terms>
inline void block_sums_nchw(int64_t n, const Terms& terms, double& total1, double& total2) {
  using Vec = Vectorized<acc>;
  constexpr int64_t V = Vec::size();
  Vec s1[kChains], s2[kChains];
  static_for<kChains>([&](auto u) { s1[u] = s2[u] = Vec(0); });
  const auto add = [&](auto u, int64_t j, int64_t count) {
    Vec addend, lhs, rhs;
    terms(j, count, addend, lhs, rhs);
    if (count < V) {
      addend = Vec::set(Vec(0), addend, count);
      lhs = Vec::set(Vec(0), lhs, count);
      rhs = Vec::set(Vec(0), rhs, count);
    }
    s1[u] = s1[u] + addend;
    s2[u] = at::vec::fmadd(lhs, rhs, s2[u]);
  };
  int64_t i = 0;
  for (; i + kChains * V <= n; i += kChains * V) static_for<kChains>([&](auto u) { add(u, i + u * V, V); });
  static_for<kChains>([&](auto u) {
    if (i + u * V < n) add(u, i + u * V, std::min<int64_t>(V, n - i - u * V));
  });
  Vec v1 = s1[0], v2 = s2[0];
  static_for<kChains - 1>([&](auto u) {
    v1 = v1 + s1[u + 1];
    v2 = v2 + s2[u + 1];
  });
  total1 += static_cast<double>(lane_sum(v1));
  total2 += static_cast<double>(lane_sum(v2));
}

// The L lanes' partial sums folded into double per-channel totals (lane k -> channel k % C) and reset.
template <typename acc>
inline void fold_lanes(acc* s, int64_t L, int64_t C, double* total) {
  for (int64_t base = 0; base < L; base += C)
    for (int64_t c = 0; c < C; ++c) total[c] += static_cast<double>(s[base + c]);
  std::fill(s, s + L, acc(0));
}

// Per-thread buffers of one pass: period lanes of up to five per-channel constants, two sums, and the
// bfloat16 conversion runs (medattn/acc_run.h).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
struct Scratch {
  std::vector<acc> lanes, s1, s2, in0, in1, out;
  Scratch(int64_t L, int64_t params, int64_t block)
      : lanes(L * params), s1(L, acc(0)), s2(L, acc(0)), in0(run_buffer<scalar_t>(block)),
        in1(run_buffer<scalar_t>(block)), out(run_buffer<scalar_t>(block)) {}
  acc* param(int64_t i, int64_t L) { return lanes.data() + i * L; }
};

// Lane k of a channels_last period gets value[k % C].
template <typename acc, typename Value>
inline void fill_periodic(acc* lanes, int64_t L, int64_t C, const Value& value) {
  for (int64_t k = 0; k < L; ++k) lanes[k] = static_cast<acc>(value(k % C));
}

// Forward constants of one channel from its shifted sums.
struct ChannelStats {
  double mean, var, scale;
};

inline ChannelStats channel_stats(double shift, double s1, double s2, int64_t M, double weight, double eps) {
  const double m1 = s1 / static_cast<double>(M);
  const double var = std::max(s2 / static_cast<double>(M) - m1 * m1, 0.0);
  return {shift + m1, var, (std::abs(weight) + eps) / std::sqrt(var + eps)};
}

template <typename acc>
inline void split_mean(double mean, acc& hi, acc& lo) {
  hi = static_cast<acc>(mean);
  lo = static_cast<acc>(mean - static_cast<double>(hi));
}

// The problem as the kernels see it: B images of C channels of HW pixels, NCHW or channels_last.
struct Geometry {
  int64_t B, C, HW;
  bool channels_last;
  int64_t M() const { return B * HW; }
  // Whether a pass over `maps` maps of the tensor's size (read or written) streams its output.
  template <typename scalar_t>
  bool streams(int maps) const {
    return streaming_pays<scalar_t>(maps * B * C * HW * static_cast<int64_t>(sizeof(scalar_t)));
  }
};

inline Geometry geometry_of(const at::Tensor& x, bool channels_last) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), channels_last};
}

// channels_last blocks: whole periods of pixels, about kBlockValues values.
template <typename acc>
inline int64_t pixels_per_block(int64_t C, int64_t L) {
  const int64_t period_pixels = L / C;
  const int64_t want = std::max<int64_t>(1, kBlockValues / C);
  return (want + period_pixels - 1) / period_pixels * period_pixels;
}

template <typename acc>
inline int64_t block_capacity(const Geometry& g, int64_t L) {
  return g.channels_last ? pixels_per_block<acc>(g.C, L) * g.C : kBlockValues;
}

// NCHW, one thread's channels [c0, c1), each a sums pass then an elementwise pass over its B rows of H*W
// values in blocks of at most kBlockValues: the sums pass over channel c + 1 runs block by block beside
// the elementwise pass over channel c. Alone, the sums pass only reads from memory and the elementwise
// pass reads from L2 and only writes to memory: the bus carries one direction at a time and each core
// has a few dozen lines in flight for it. Interleaved, the reads of one channel overlap the writes of
// the other, as in a tensor copy. Measured on an Intel Xeon (AVX-512, 2 threads, caches flushed before
// each call, alternating builds): fwd+bwd at DIN's shapes -3 to -14%, the forward alone unchanged.
// The elementwise pass walks its channel backwards: the blocks the sums pass read last are the ones still
// in L2 when a channel's working set (B * H * W values per input) exceeds it, where a forward re-walk
// would miss on every line under LRU replacement.
//   sums(c, j, offset, n): block j of channel c (j = 0 first); finish(c): after c's last block;
//   apply(c, offset, n): a block of channel c, after finish(c).
template <typename Sums, typename Finish, typename Apply>
inline void pipelined_channel_passes(const Geometry& g, int64_t c0, int64_t c1, const Sums& sums,
                                     const Finish& finish, const Apply& apply) {
  if (c0 >= c1) return;
  const int64_t per_row = (g.HW + kBlockValues - 1) / kBlockValues, blocks = g.B * per_row;
  const auto offset = [&](int64_t c, int64_t j) { return (j / per_row * g.C + c) * g.HW + j % per_row * kBlockValues; };
  const auto size = [&](int64_t j) { return std::min(kBlockValues, g.HW - j % per_row * kBlockValues); };
  for (int64_t j = 0; j < blocks; ++j) sums(c0, j, offset(c0, j), size(j));
  finish(c0);
  for (int64_t c = c0; c < c1; ++c) {
    const bool next = c + 1 < c1;
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t back = blocks - 1 - j;
      apply(c, offset(c, back), size(back));
      if (next) sums(c + 1, j, offset(c + 1, j), size(j));
    }
    if (next) finish(c + 1);
  }
}

// channels_last: chunks of kBlocksPerChunk pixel blocks, in parallel, with per-thread scratch = make();
// run(scratch, chunk, offset, n) per block. Returns the number of chunks (fixed by C and the ISA only).
template <typename acc, typename Make, typename Run>
inline int64_t parallel_pixel_blocks(const Geometry& g, int64_t L, const Make& make, const Run& run) {
  const int64_t ppb = pixels_per_block<acc>(g.C, L), chunk = ppb * kBlocksPerChunk;
  const int64_t chunks = (g.M() + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    auto scratch = make();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t p1 = std::min(g.M(), (k + 1) * chunk);
      for (int64_t p = k * chunk; p < p1; p += ppb) run(scratch, k, p * g.C, (std::min(p1, p + ppb) - p) * g.C);
    }
  });
  return chunks;
}

template <typename acc>
inline int64_t pixel_chunks(const Geometry& g, int64_t L) {
  const int64_t chunk = pixels_per_block<acc>(g.C, L) * kBlocksPerChunk;
  return (g.M() + chunk - 1) / chunk;
}

// Per-chunk partial sums [chunks][2][C] combined in chunk order: totals [2][C].
inline std::vector<double> combine_chunks(const std::vector<double>& partial, int64_t chunks, int64_t C) {
  std::vector<double> total(2 * C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t i = 0; i < 2 * C; ++i) total[i] += partial[k * 2 * C + i];
  return total;
}

template <typename scalar_t>
void forward_nchw(const Geometry& g, const scalar_t* xp, scalar_t* yp, const scalar_t* wp, const scalar_t* bp,
                  double eps, double slope, acc_t<scalar_t>* mp, acc_t<scalar_t>* vp) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const bool stream = g.streams<scalar_t>(2);  // x read, y written
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    Scratch<scalar_t> s(0, 0, kBlockValues);
    acc shift = 0;  // the summed channel's first value
    double t1 = 0, t2 = 0;
    acc mean_hi = 0, mean_lo = 0, scale = 0, beta = 0;  // the normalised channel's constants
    const auto sums = [&](int64_t c, int64_t j, int64_t off, int64_t n) {
      if (j == 0) {
        shift = static_cast<acc>(xp[c * g.HW]);
        t1 = t2 = 0;
      }
      const acc* x = load_run(xp + off, n, s.in0.data());
      const Vec shift_v(shift);
      // sum (x - x0) and sum (x - x0)^2
      block_sums_nchw<acc>(n, [&](int64_t i, int64_t count, Vec& addend, Vec& lhs, Vec& rhs) {
        addend = lhs = rhs = Vec::loadu(x + i, count) - shift_v;
      }, t1, t2);
    };
    const auto finish = [&](int64_t c) {
      const ChannelStats st = channel_stats(static_cast<double>(shift), t1, t2, g.M(), static_cast<double>(wp[c]), eps);
      mp[c] = static_cast<acc>(st.mean);
      vp[c] = static_cast<acc>(st.var);
      split_mean(st.mean, mean_hi, mean_lo);
      scale = static_cast<acc>(st.scale);
      beta = static_cast<acc>(bp[c]);
    };
    const auto apply = [&](int64_t, int64_t off, int64_t n) {
      const acc* x = load_run(xp + off, n, s.in0.data());
      acc* out = run_target(yp + off, s.out.data());
      const Vec mh(mean_hi), ml(mean_lo), sc(scale), be(beta), sl(static_cast<acc>(slope));
      write_run(out, n, stream, [&](int64_t i, int64_t count) {
        return normalize_leaky(Vec::loadu(x + i, count), mh, ml, sc, be, sl);
      });
      store_run(out, yp + off, n);
    };
    pipelined_channel_passes(g, c0, c1, sums, finish, apply);
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
void forward_channels_last(const Geometry& g, const scalar_t* xp, scalar_t* yp, const scalar_t* wp,
                           const scalar_t* bp, double eps, double slope, acc_t<scalar_t>* mp, acc_t<scalar_t>* vp) {
  using acc = acc_t<scalar_t>;
  const int64_t C = g.C, L = period_lanes<acc>(C), block = block_capacity<acc>(g, L);
  const auto make = [&] { return Scratch<scalar_t>(L, 0, block); };
  std::vector<acc> lanes(4 * L);
  fill_periodic(lanes.data(), L, C, [&](int64_t c) { return xp[c]; });  // shift: pixel 0's values
  std::vector<double> partial(pixel_chunks<acc>(g, L) * 2 * C, 0.0);
  const int64_t chunks = parallel_pixel_blocks<acc>(g, L, make, [&](Scratch<scalar_t>& s, int64_t k, int64_t off, int64_t n) {
    add_shifted_sums(load_run(xp + off, n, s.in0.data()), n, L, lanes.data(), s.s1.data(), s.s2.data());
    fold_lanes(s.s1.data(), L, C, partial.data() + k * 2 * C);
    fold_lanes(s.s2.data(), L, C, partial.data() + k * 2 * C + C);
  });
  const std::vector<double> total = combine_chunks(partial, chunks, C);
  std::vector<acc> per_channel(4 * C);  // mean_hi, mean_lo, scale, beta
  for (int64_t c = 0; c < C; ++c) {
    const ChannelStats st = channel_stats(static_cast<double>(xp[c]), total[c], total[C + c], g.M(),
                                          static_cast<double>(wp[c]), eps);
    mp[c] = static_cast<acc>(st.mean);
    vp[c] = static_cast<acc>(st.var);
    split_mean(st.mean, per_channel[c], per_channel[C + c]);
    per_channel[2 * C + c] = static_cast<acc>(st.scale);
    per_channel[3 * C + c] = static_cast<acc>(bp[c]);
  }
  for (int64_t i = 0; i < 4; ++i)
    fill_periodic(lanes.data() + i * L, L, C, [&](int64_t c) { return per_channel[i * C + c]; });
  const NormalizeLanes<acc> p{lanes.data(), lanes.data() + L, lanes.data() + 2 * L, lanes.data() + 3 * L,
                              static_cast<acc>(slope)};
  const bool stream = g.streams<scalar_t>(2);
  parallel_pixel_blocks<acc>(g, L, make, [&](Scratch<scalar_t>& s, int64_t, int64_t off, int64_t n) {
    acc* out = run_target(yp + off, s.out.data());
    normalize_leaky(load_run(xp + off, n, s.in0.data()), out, n, L, p, stream);
    store_run(out, yp + off, n);
    if (stream) stream_fence();
  });
}

// Backward constants of channel c.
template <typename acc>
struct ChannelInverse {
  acc gamma, inv_gamma, beta;
};

template <typename scalar_t>
inline ChannelInverse<acc_t<scalar_t>> channel_inverse(const scalar_t* wp, const scalar_t* bp, int64_t c, double eps) {
  using acc = acc_t<scalar_t>;
  const acc gamma = std::abs(static_cast<acc>(wp[c])) + static_cast<acc>(eps);
  return {gamma, acc(1) / gamma, static_cast<acc>(bp[c])};
}

// The outputs of one channel from its two sums; returns grad_x's lane constants coef, mean_dz, mean_dz_xhat.
template <typename scalar_t>
struct BackwardOutputs {
  scalar_t *grad_w, *grad_b;  // null when not requested
  const acc_t<scalar_t>* var;
  double eps;
  int64_t M;

  std::array<acc_t<scalar_t>, 3> finish(int64_t c, acc_t<scalar_t> w, acc_t<scalar_t> gamma, double sum_dz,
                                        double sum_dz_xhat) const {
    using acc = acc_t<scalar_t>;
    if (grad_w) {
      const double sgn = w > 0 ? 1.0 : (w < 0 ? -1.0 : 0.0);  // d|w|/dw as torch.abs's backward
      grad_w[c] = static_cast<scalar_t>(sum_dz_xhat * sgn);
    }
    if (grad_b) grad_b[c] = static_cast<scalar_t>(sum_dz);
    return {gamma / std::sqrt(var[c] + static_cast<acc>(eps)), static_cast<acc>(sum_dz / static_cast<double>(M)),
            static_cast<acc>(sum_dz_xhat / static_cast<double>(M))};
  }
};

template <typename scalar_t>
void backward_nchw(const Geometry& g, const scalar_t* yp, const scalar_t* gp, scalar_t* gxp, const scalar_t* wp,
                   const scalar_t* bp, double eps, double slope, const BackwardOutputs<scalar_t>& outs) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  const acc slope_a = static_cast<acc>(slope), inv_slope = acc(1) / slope_a;
  const bool stream = g.streams<scalar_t>(3);  // y and grad_out read, grad_x written
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    Scratch<scalar_t> s(0, 0, kBlockValues);
    ChannelInverse<acc> summed{}, written{};  // the summed channel's and the written channel's
    double sum_dz = 0, sum_dz_xhat = 0;
    std::array<acc, 3> consts{};  // the written channel's coef, mean_dz, mean_dz_xhat
    const auto sums = [&](int64_t c, int64_t j, int64_t off, int64_t n) {
      if (j == 0) {
        summed = channel_inverse(wp, bp, c, eps);
        sum_dz = sum_dz_xhat = 0;
      }
      const acc* y = load_run(yp + off, n, s.in0.data());
      const acc* gr = load_run(gp + off, n, s.in1.data());
      const Vec beta(summed.beta), inv_gamma(summed.inv_gamma), sl(slope_a), isl(inv_slope);
      // sum dz and sum dz * xhat
      block_sums_nchw<acc>(n, [&](int64_t i, int64_t count, Vec& addend, Vec& lhs, Vec& rhs) {
        dz_xhat(Vec::loadu(y + i, count), Vec::loadu(gr + i, count), beta, inv_gamma, sl, isl, addend, rhs);
        lhs = addend;
      }, sum_dz, sum_dz_xhat);
    };
    const auto finish = [&](int64_t c) {
      consts = outs.finish(c, static_cast<acc>(wp[c]), summed.gamma, sum_dz, sum_dz_xhat);
      written = summed;
    };
    const auto apply = [&](int64_t, int64_t off, int64_t n) {
      if (gxp == nullptr) return;
      const acc* y = load_run(yp + off, n, s.in0.data());
      const acc* gr = load_run(gp + off, n, s.in1.data());
      acc* out = run_target(gxp + off, s.out.data());
      const Vec beta(written.beta), inv_gamma(written.inv_gamma), sl(slope_a), isl(inv_slope);
      const Vec coef(consts[0]), mean_dz(consts[1]), mean_dz_xhat(consts[2]);
      write_run(out, n, stream, [&](int64_t i, int64_t count) {
        Vec dz, xhat;
        dz_xhat(Vec::loadu(y + i, count), Vec::loadu(gr + i, count), beta, inv_gamma, sl, isl, dz, xhat);
        return grad_x(dz, xhat, coef, mean_dz, mean_dz_xhat);
      });
      store_run(out, gxp + off, n);
    };
    pipelined_channel_passes(g, c0, c1, sums, finish, apply);
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
void backward_channels_last(const Geometry& g, const scalar_t* yp, const scalar_t* gp, scalar_t* gxp,
                            const scalar_t* wp, const scalar_t* bp, double eps, double slope,
                            const BackwardOutputs<scalar_t>& outs) {
  using acc = acc_t<scalar_t>;
  const int64_t C = g.C, L = period_lanes<acc>(C), block = block_capacity<acc>(g, L);
  const auto make = [&] { return Scratch<scalar_t>(L, 0, block); };
  std::vector<ChannelInverse<acc>> inverse(C);
  for (int64_t c = 0; c < C; ++c) inverse[c] = channel_inverse(wp, bp, c, eps);
  std::vector<acc> lanes(5 * L);  // beta, inv_gamma, coef, mean_dz, mean_dz_xhat
  fill_periodic(lanes.data(), L, C, [&](int64_t c) { return inverse[c].beta; });
  fill_periodic(lanes.data() + L, L, C, [&](int64_t c) { return inverse[c].inv_gamma; });
  const acc slope_a = static_cast<acc>(slope), inv_slope = acc(1) / slope_a;
  const InverseLanes<acc> inv{lanes.data(), lanes.data() + L, slope_a, inv_slope};
  std::vector<double> partial(pixel_chunks<acc>(g, L) * 2 * C, 0.0);
  const int64_t chunks = parallel_pixel_blocks<acc>(g, L, make, [&](Scratch<scalar_t>& s, int64_t k, int64_t off, int64_t n) {
    add_backward_sums(load_run(yp + off, n, s.in0.data()), load_run(gp + off, n, s.in1.data()), n, L, inv,
                      s.s1.data(), s.s2.data());
    fold_lanes(s.s1.data(), L, C, partial.data() + k * 2 * C);
    fold_lanes(s.s2.data(), L, C, partial.data() + k * 2 * C + C);
  });
  const std::vector<double> total = combine_chunks(partial, chunks, C);
  std::vector<acc> per_channel(3 * C);
  for (int64_t c = 0; c < C; ++c) {
    const auto consts = outs.finish(c, static_cast<acc>(wp[c]), inverse[c].gamma, total[c], total[C + c]);
    for (int64_t i = 0; i < 3; ++i) per_channel[i * C + c] = consts[i];
  }
  if (gxp == nullptr) return;
  for (int64_t i = 0; i < 3; ++i)
    fill_periodic(lanes.data() + (2 + i) * L, L, C, [&](int64_t c) { return per_channel[i * C + c]; });
  const GradLanes<acc> p{inv, lanes.data() + 2 * L, lanes.data() + 3 * L, lanes.data() + 4 * L};
  const bool stream = g.streams<scalar_t>(3);
  parallel_pixel_blocks<acc>(g, L, make, [&](Scratch<scalar_t>& s, int64_t, int64_t off, int64_t n) {
    acc* out = run_target(gxp + off, s.out.data());
    grad_x_run(load_run(yp + off, n, s.in0.data()), load_run(gp + off, n, s.in1.data()), out, n, L, p, stream);
    store_run(out, gxp + off, n);
    if (stream) stream_fence();
  });
}

void check_params(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_same(x, t, "x", name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, ": expected shape [C] = [", x.size(1), "], got ",
              t.sizes());
}

void check_slope(double negative_slope) {
  TORCH_CHECK(negative_slope > 0, "negative_slope: expected > 0 (the activation must be invertible), got ",
              negative_slope);
}

void check_running_stats(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean, running_var: expected both or neither, got only ",
              running_mean.has_value() ? "running_mean" : "running_var");
  if (!running_mean.has_value()) return;
  for (const auto& [t, name] : {std::pair{&*running_mean, "running_mean"}, std::pair{&*running_var, "running_var"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), name, ": expected shape [C] = [", x.size(1), "], got ",
                t->sizes());
    check_floating(*t, name);
  }
  check_same(*running_mean, *running_var, "running_mean", "running_var");
}

// A BatchNorm layer's running estimates, moved as ATen's batch_norm moves them (the variance unbiased by
// M / (M - 1)), in double and rounded once to the buffers' dtype. [C] values: nothing beside the map's passes,
// and the layer then needs no op of its own for them (five small ops cost a fifth of its call at 12 x 12).
template <typename acc>
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const acc* mean, const acc* var,
                          int64_t M, double momentum) {
  const double unbias = static_cast<double>(M) / static_cast<double>(M - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "running statistics", [&] {
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    const int64_t sm = running_mean.stride(0), sv = running_var.stride(0);
    for (int64_t c = 0; c < running_mean.size(0); ++c) {
      rm[c * sm] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rm[c * sm]) +
                                         momentum * static_cast<double>(mean[c]));
      rv[c * sv] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rv[c * sv]) +
                                         momentum * unbias * static_cast<double>(var[c]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                           const at::Tensor& bias_in, double eps,
                                                           double negative_slope,
                                                           const std::optional<at::Tensor>& running_mean_in,
                                                           const std::optional<at::Tensor>& running_var_in,
                                                           double momentum) {
  check_rank(x_in, 4, "x", "[B, C, H, W]");
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  check_params(x_in, weight_in, "weight");
  check_params(x_in, bias_in, "bias");
  check_slope(negative_slope);
  TORCH_CHECK(eps > 0, "eps: expected > 0, got ", eps);
  check_running_stats(x_in, running_mean_in, running_var_in);
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_own_layout(x_in, cl);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const Geometry g = geometry_of(x, cl);
  TORCH_CHECK(g.M() > 1, "x: expected more than 1 value per channel (B * H * W > 1) for batch statistics, got shape ",
              x.sizes());
  at::Tensor y = at::empty_like(x);
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({g.C}, x.options().dtype(stat_dtype));
  at::Tensor var = at::empty({g.C}, x.options().dtype(stat_dtype));
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "activated_batch_norm", [&] {
    using acc = acc_t<scalar_t>;
    const auto run = cl ? forward_channels_last<scalar_t> : forward_nchw<scalar_t>;
    run(g, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), eps, negative_slope, mean.mutable_data_ptr<acc>(),
        var.mutable_data_ptr<acc>());
    if (running_mean_in.has_value()) {
      at::Tensor running_mean = *running_mean_in, running_var = *running_var_in;
      update_running_stats(running_mean, running_var, mean.const_data_ptr<acc>(), var.const_data_ptr<acc>(), g.M(),
                           momentum);
    }
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_backward(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                            const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                            const at::Tensor& var_in, double eps,
                                                            double negative_slope, std::array<bool, 3> output_mask) {
  check_rank(y_in, 4, "y", "[B, C, H, W]");
  check_cpu(y_in, "y");
  check_float(y_in, "y");
  check_same(y_in, grad_in, "y", "grad_y");
  TORCH_CHECK(grad_in.sizes() == y_in.sizes(), "grad_y: expected shape ", y_in.sizes(), ", got ", grad_in.sizes());
  check_params(y_in, weight_in, "weight");
  check_params(y_in, bias_in, "bias");
  check_slope(negative_slope);
  const auto stat_dtype = y_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(var_in.dim() == 1 && var_in.size(0) == y_in.size(1) && var_in.scalar_type() == stat_dtype,
              "var: expected a [C] tensor of dtype ", stat_dtype, ", got ", var_in.sizes(), " ", var_in.scalar_type());
  const bool cl = is_channels_last(y_in);
  const at::Tensor y = in_own_layout(y_in, cl), g = in_own_layout(grad_in, cl);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous(), var = var_in.contiguous();
  const Geometry geo = geometry_of(y, cl);
  at::Tensor grad_x = output_mask[0] ? at::empty_like(y) : absent_like(y);
  at::Tensor grad_w = output_mask[1] ? at::empty_like(weight) : absent_like(y);
  at::Tensor grad_b = output_mask[2] ? at::empty_like(bias) : absent_like(y);
  if (y.numel() == 0) {
    if (output_mask[1]) grad_w.zero_();
    if (output_mask[2]) grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  MEDATTN_DISPATCH_FLOATING(y.scalar_type(), "activated_batch_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    const BackwardOutputs<scalar_t> outs{output_mask[1] ? grad_w.mutable_data_ptr<scalar_t>() : nullptr,
                                         output_mask[2] ? grad_b.mutable_data_ptr<scalar_t>() : nullptr,
                                         var.const_data_ptr<acc>(), eps, geo.M()};
    const auto run = cl ? backward_channels_last<scalar_t> : backward_nchw<scalar_t>;
    run(geo, y.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, weight.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), eps, negative_slope, outs);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(abn_forward);
MEDATTN_REGISTER_CPU_KERNEL(abn_backward);

MEDATTN_CPU_OPS(m) {
  m.impl("activated_batch_norm", MEDATTN_CPU_DISPATCH(abn_forward));
  m.impl("activated_batch_norm_backward", MEDATTN_CPU_DISPATCH(abn_backward));
}

}  // namespace medattn
