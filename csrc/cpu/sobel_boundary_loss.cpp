// Multi-scale Sobel boundary loss on CPU, loss and d loss / d pred in one fused forward.
//
//   G(u) = sqrt(gx^2 + gy^2 + eps), gx = u (*) [[-1,0,1],[-2,0,2],[-1,0,1]] / 8, gy = u (*) its transpose,
//   replicate padding; loss = sum_s w_s * norm_s * sum | G(P_s(p)) - G(P_s(y)) |, P_s = avg_pool(s, s).
//
// Work item = one (b, c) plane. A thread loads the plane's probabilities p and target y once, straight
// into padded full-resolution buffers ((H+2) x (W+2), replicate ring: softmax, one-hot and ignore mask
// applied on the way; labels are never one-hot encoded in memory), then for every scale:
//  * pools p and y into padded (Hs+2) x (Ws+2) buffers (scale 1 uses the full-resolution ones), so that
//    the stencils run without clamps;
//  * per output row, on vectors of the pass (Vectorized<acc>: 16 floats in AVX512, 8 in AVX2 and in the
//    portable DEFAULT pass): gx, gy of both maps from the three padded rows, d = G(P) - G(Q),
//    loss += |d| (lane partials), and the adjoint coefficients ax = c sgn(d) gx / G(P), ay = c sgn(d) gy / G(P)
//    (c = w_s norm_s) pushed back through the transposed stencils into a padded adjoint buffer: the row
//    two below is written (its first contribution), the two above accumulated, so no buffer is cleared;
//    the padding ring is then folded onto the edge pixels (the adjoint of replicate padding);
//  * the average-pool adjoint spreads dP / s^2 over each s x s block of the full-resolution adjoint,
//    whose interior is the plane's gradient: the first scale 1 writes it directly.
// The plane's gradient then gets the ignore mask and, with from_logits, the softmax adjoint
// dz_c = p_c (dp_c - sum_c' p_c' dp_c'), which needs every channel of a pixel: a second, pixel-parallel
// pass over a full-size dp buffer (the probabilities of the first, pixel-parallel softmax pass are
// kept in a temporary buffer, so exp runs once per element).
// Working set per thread: three full-resolution padded planes (600 KiB at 224 x 224) and the coarse scales'
// buffers, so that every pass over a plane after its load hits L2.
//
// Determinism: per-plane loss partials in double, combined in plane order after the parallel loop.
// Memory: only grad_pred (pred's size) outlives the call; buffers are per thread or temporary.

#include "medattn/acc_run.h"  // load_run
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/vec_math.h"  // exp_nonpositive, lane_sum, Vectorized

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// "No ignore_index" in the schema's int (see medattn_kernels/ops/sobel_boundary_loss.py): int64 min,
// which is never a class and never a conventional ignore value such as -100 or 255.
constexpr int64_t kNoIgnore = std::numeric_limits<int64_t>::min();

struct Scale {
  int64_t s, Hs, Ws;
  double coef;  // w_s * (1 / number of terms of the reduction)
};

// A padded (rows + 2) x (cols + 2) map: element (i, j) of the interior is at data[(i + 1) * stride + j + 1].
template <typename acc>
struct Padded {
  acc* data;
  int64_t rows, cols;
  int64_t stride() const { return cols + 2; }
  acc* row(int64_t padded_row) const { return data + padded_row * stride(); }
  acc* interior_row(int64_t i) const { return data + (i + 1) * stride() + 1; }
};

template <typename acc>
inline void resize_padded(std::vector<acc>& buf, int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>((rows + 2) * (cols + 2));
  if (buf.size() < n) buf.resize(n);
}

// Replicates the interior's edges into the padding ring (the corners from the edge rows).
template <typename acc>
void replicate_ring(const Padded<acc>& m) {
  for (int64_t i = 0; i < m.rows; ++i) {
    acc* r = m.interior_row(i);
    r[-1] = r[0];
    r[m.cols] = r[m.cols - 1];
  }
  std::copy(m.row(1), m.row(1) + m.stride(), m.row(0));
  std::copy(m.row(m.rows), m.row(m.rows) + m.stride(), m.row(m.rows + 1));
}

// The adjoint of replicate_ring: the ring's values are added onto the edge pixels they were read from.
template <typename acc>
void fold_ring(const Padded<acc>& a) {
  using Vec = Vectorized<acc>;
  const int64_t Wp = a.stride();
  for (int64_t k = 0; k < Wp; k += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), Wp - k);
    (Vec::loadu(a.row(1) + k, n) + Vec::loadu(a.row(0) + k, n)).store(a.row(1) + k, n);
    (Vec::loadu(a.row(a.rows) + k, n) + Vec::loadu(a.row(a.rows + 1) + k, n)).store(a.row(a.rows) + k, n);
  }
  for (int64_t i = 0; i < a.rows; ++i) {
    acc* r = a.interior_row(i);
    r[0] += r[-1];
    r[a.cols - 1] += r[a.cols];
  }
}

// v[j] = sum_{k < s} v[j s + k] for j < n, in place (pairwise halvings on vectors when s is a power of two).
template <typename acc>
void block_sums_inplace(acc* v, int64_t n, int64_t s) {
  using Vec = Vectorized<acc>;
  if ((s & (s - 1)) != 0) {
    for (int64_t j = 0; j < n; ++j) {
      acc sum = v[j * s];
      for (int64_t k = 1; k < s; ++k) sum += v[j * s + k];
      v[j] = sum;
    }
    return;
  }
  for (int64_t width = s; width > 1; width /= 2) {  // n * width values -> n * width / 2 pair sums
    const int64_t pairs = n * width / 2;
    int64_t j = 0;
    for (; j + Vec::size() <= pairs; j += Vec::size()) {
      const auto [even, odd] = at::vec::deinterleave2(Vec::loadu(v + 2 * j), Vec::loadu(v + 2 * j + Vec::size()));
      (even + odd).store(v + j);
    }
    for (; j < pairs; ++j) v[j] = v[2 * j] + v[2 * j + 1];
  }
}

// v[x] = v[x / s] for x < n s, in place (repeated duplication on vectors when s is a power of two).
template <typename acc>
void expand_inplace(acc* v, int64_t n, int64_t s) {
  using Vec = Vectorized<acc>;
  if ((s & (s - 1)) != 0) {
    for (int64_t x = n * s - 1; x >= 0; --x) v[x] = v[x / s];
    return;
  }
  for (int64_t width = 1; width < s; width *= 2) {  // n * width values -> each one twice
    const int64_t m = n * width;
    int64_t j = m;
    // From the back, so that writes (2j, 2j+1) never overwrite unread values (index >= j).
    for (; j >= Vec::size(); j -= Vec::size()) {
      const Vec x = Vec::loadu(v + j - Vec::size());
      const auto [lo, hi] = at::vec::interleave2(x, x);
      hi.store(v + 2 * j - Vec::size());
      lo.store(v + 2 * j - 2 * Vec::size());
    }
    for (--j; j >= 0; --j) v[2 * j] = v[2 * j + 1] = v[j];
  }
}

// The s x s average pool of the full-resolution interior `u` into the interior of `out`, then its ring.
// `row` holds Ws * s values.
template <typename acc>
void pool_padded(const Padded<acc>& u, int64_t s, const Padded<acc>& out, acc* row) {
  using Vec = Vectorized<acc>;
  const int64_t n = out.cols * s;
  const Vec inv_area(acc(1) / static_cast<acc>(s * s));
  for (int64_t i = 0; i < out.rows; ++i) {
    std::copy(u.interior_row(i * s), u.interior_row(i * s) + n, row);
    for (int64_t a = 1; a < s; ++a) {
      const acc* in = u.interior_row(i * s + a);
      for (int64_t x = 0; x < n; x += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), n - x);
        (Vec::loadu(row + x, cnt) + Vec::loadu(in + x, cnt)).store(row + x, cnt);
      }
    }
    block_sums_inplace(row, out.cols, s);
    acc* o = out.interior_row(i);
    for (int64_t j = 0; j < out.cols; j += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), out.cols - j);
      (Vec::loadu(row + j, cnt) * inv_area).store(o + j, cnt);
    }
  }
  replicate_ring(out);
}

// The adjoint of pool_padded's pooling: full-resolution interior `grad` += a / s^2 over each s x s block.
template <typename acc>
void spread_pool_adjoint(const Padded<acc>& a, int64_t s, const Padded<acc>& grad, acc* row) {
  using Vec = Vectorized<acc>;
  const int64_t n = a.cols * s;
  const Vec inv_area(acc(1) / static_cast<acc>(s * s));
  for (int64_t i = 0; i < a.rows; ++i) {
    const acc* in = a.interior_row(i);
    for (int64_t j = 0; j < a.cols; j += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), a.cols - j);
      (Vec::loadu(in + j, cnt) * inv_area).store(row + j, cnt);
    }
    expand_inplace(row, a.cols, s);
    for (int64_t r = 0; r < s; ++r) {
      acc* out = grad.interior_row(i * s + r);
      for (int64_t x = 0; x < n; x += Vec::size()) {
        const int64_t cnt = std::min<int64_t>(Vec::size(), n - x);
        (Vec::loadu(out + x, cnt) + Vec::loadu(row + x, cnt)).store(out + x, cnt);
      }
    }
  }
}

// Sobel pair / 8 of padded rows r0, r1, r2 at the vector of outputs j (its cnt first lanes valid).
template <typename acc>
inline void sobel_at(const acc* r0, const acc* r1, const acc* r2, int64_t j, int64_t cnt, Vectorized<acc>& gx,
                     Vectorized<acc>& gy) {
  using Vec = Vectorized<acc>;
  const Vec a0 = Vec::loadu(r0 + j, cnt), a1 = Vec::loadu(r0 + j + 1, cnt), a2 = Vec::loadu(r0 + j + 2, cnt);
  const Vec c0 = Vec::loadu(r2 + j, cnt), c1 = Vec::loadu(r2 + j + 1, cnt), c2 = Vec::loadu(r2 + j + 2, cnt);
  const Vec b0 = Vec::loadu(r1 + j, cnt), b2 = Vec::loadu(r1 + j + 2, cnt);
  const Vec two(2), eighth(0.125);
  gx = ((a2 - a0) + two * (b2 - b0) + (c2 - c0)) * eighth;
  gy = ((c0 - a0) + two * (c1 - a1) + (c2 - a2)) * eighth;
}

// sgn(d) as torch's abs backward: 0 at 0 and at NaN (torch.sign(nan) == 0 there).
template <typename acc>
inline Vectorized<acc> sgn(const Vectorized<acc>& d) {
  using Vec = Vectorized<acc>;
  return Vec::blendv(Vec(0), Vec(1), d > Vec(0)) - Vec::blendv(Vec(0), Vec(1), d < Vec(0));
}

// inv ~ 1 / sqrt(x) for x >= eps > 0 (the squared magnitudes): the hardware estimate (14 bits in AVX512,
// 12 in AVX2) and one Newton step, r (1.5 - 0.5 x r^2), which leaves 1-2 ulp of float; sqrt(x) is then
// x * inv. Both replace a sqrt and a division per lane (the two longest-latency, lowest-throughput
// instructions of the loop). x = +inf keeps sqrt = inf, inv = 0; NaN stays NaN. float64 and the DEFAULT
// pass: the correctly rounded sqrt and a division.
template <typename acc>
inline void sqrt_and_inverse(const Vectorized<acc>& x, Vectorized<acc>& root, Vectorized<acc>& inv) {
  using Vec = Vectorized<acc>;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    Vec r(_mm512_rsqrt14_ps(x));
#else
    Vec r(_mm256_rsqrt_ps(x));
#endif
    r = r * at::vec::fnmadd(Vec(0.5f) * x, r * r, Vec(1.5f));
    const Vec is_inf = x == Vec(std::numeric_limits<float>::infinity());
    root = Vec::blendv(x * r, x, is_inf);
    inv = Vec::blendv(r, Vec(0), is_inf);
    return;
  }
#endif
  root = x.sqrt();
  inv = Vec(1) / root;
}

// One scale of one plane: returns sum |G(P) - G(Q)|; with `a` (grad), writes the scale's adjoint w.r.t. P
// into a's padded buffer, ring folded. ax, ay: Ws + 4 values each (two zero lanes either side).
template <typename acc>
double sobel_scale(const Padded<acc>& P, const Padded<acc>& Q, const Padded<acc>* a, acc coef, acc eps, acc* ax_buf,
                   acc* ay_buf) {
  using Vec = Vectorized<acc>;
  const int64_t Hs = P.rows, Ws = P.cols, Wp = P.stride();
  acc* ax = ax_buf + 2;
  acc* ay = ay_buf + 2;
  ax[-2] = ax[-1] = ax[Ws] = ax[Ws + 1] = acc(0);
  ay[-2] = ay[-1] = ay[Ws] = ay[Ws + 1] = acc(0);
  if (a) std::fill(a->row(0), a->row(2), acc(0));  // rows 0 and 1 start accumulating; the others are written
  const Vec veps(eps), vcoef(coef), two(2), eighth(0.125);
  double total = 0;
  for (int64_t i = 0; i < Hs; ++i) {
    Vec row_sum(0);
    for (int64_t j = 0; j < Ws; j += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), Ws - j);
      Vec gxp, gyp, gxq, gyq;
      sobel_at(P.row(i), P.row(i + 1), P.row(i + 2), j, cnt, gxp, gyp);
      sobel_at(Q.row(i), Q.row(i + 1), Q.row(i + 2), j, cnt, gxq, gyq);
      Vec mp, inv_mp, mq, inv_mq;
      sqrt_and_inverse(gxp * gxp + gyp * gyp + veps, mp, inv_mp);
      sqrt_and_inverse(gxq * gxq + gyq * gyq + veps, mq, inv_mq);
      const Vec d = mp - mq;
      row_sum = row_sum + Vec::set(Vec(0), d.abs(), cnt);
      if (a) {
        const Vec k = vcoef * sgn(d) * inv_mp;
        (gxp * k).store(ax + j, cnt);
        (gyp * k).store(ay + j, cnt);
      }
    }
    total += static_cast<double>(lane_sum(row_sum));
    if (!a) continue;
    // Transposed stencils, in padded coordinates: gx[j] = (vs[j+2] - vs[j]) / 8 gives
    // tx[k] = (ax[k-2] - ax[k]) / 8; gy[j] = (vd[j] + 2 vd[j+1] + vd[j+2]) / 8 gives
    // ty[k] = (ay[k] + 2 ay[k-1] + ay[k-2]) / 8; then vs = r0 + 2 r1 + r2 and vd = r2 - r0 spread
    // tx, ty over the three padded rows i, i+1, i+2.
    acc* a0 = a->row(i);
    acc* a1 = a->row(i + 1);
    acc* a2 = a->row(i + 2);
    for (int64_t k = 0; k < Wp; k += Vec::size()) {
      const int64_t cnt = std::min<int64_t>(Vec::size(), Wp - k);
      const Vec tx = (Vec::loadu(ax + k - 2, cnt) - Vec::loadu(ax + k, cnt)) * eighth;
      const Vec ty = (Vec::loadu(ay + k, cnt) + two * Vec::loadu(ay + k - 1, cnt) + Vec::loadu(ay + k - 2, cnt)) * eighth;
      (Vec::loadu(a0 + k, cnt) + (tx - ty)).store(a0 + k, cnt);
      at::vec::fmadd(two, tx, Vec::loadu(a1 + k, cnt)).store(a1 + k, cnt);
      (tx + ty).store(a2 + k, cnt);
    }
  }
  if (a) fold_ring(*a);
  return total;
}

struct Problem {
  int64_t B, C, H, W;
  bool labels, from_logits, grad;
  int64_t ignore_index;
  double eps;
  std::vector<Scale> scales;
};

// Per-thread buffers: the full-resolution padded planes of p, y and the adjoint (whose interior is the
// plane's gradient), one scale's pooled maps and adjoint, and rows.
template <typename acc>
struct PlaneBuffers {
  std::vector<acc> base_p, base_y, base_a, pool_p, pool_y, pool_a, ax, ay, row;

  explicit PlaneBuffers(const Problem& pb) {
    resize_padded(base_p, pb.H, pb.W);
    resize_padded(base_y, pb.H, pb.W);
    if (pb.grad) resize_padded(base_a, pb.H, pb.W);
    int64_t max_ws = 0;
    for (const Scale& sc : pb.scales) max_ws = std::max(max_ws, sc.Ws);
    ax.resize(max_ws + 4);
    ay.resize(max_ws + 4);
    row.resize(pb.W);
  }
  Padded<acc> map(std::vector<acc>& buf, int64_t rows, int64_t cols) {
    resize_padded(buf, rows, cols);
    return {buf.data(), rows, cols};
  }
};

// Loads plane (b, c) into the padded full-resolution p and y: probabilities (pred, or the softmax pass's
// probs) and the target, with int64 labels one-hot encoded and ignored pixels zeroed in both. Each image's
// labels are checked once, by its first plane: the first out-of-range label goes to bad_label.
template <typename scalar_t>
void load_plane(const Problem& pb, int64_t b, int64_t c, const scalar_t* pred, const scalar_t* target_f,
                const int64_t* labels, const acc_t<scalar_t>* probs, const Padded<acc_t<scalar_t>>& p,
                const Padded<acc_t<scalar_t>>& y, int64_t& bad_label) {
  using acc = acc_t<scalar_t>;
  const int64_t W = pb.W, HW = pb.H * pb.W, off = (b * pb.C + c) * HW;
  for (int64_t i = 0; i < pb.H; ++i) {
    acc* pr = p.interior_row(i);
    acc* yr = y.interior_row(i);
    const int64_t row = off + i * W;
    if (probs) {
      std::copy(probs + row, probs + row + W, pr);
    } else if constexpr (converts_runs<scalar_t>) {
      at::vec::convert(pred + row, pr, W);
    } else {
      std::copy(pred + row, pred + row + W, pr);
    }
    if (!pb.labels) {
      if constexpr (converts_runs<scalar_t>) {
        at::vec::convert(target_f + row, yr, W);
      } else {
        std::copy(target_f + row, target_f + row + W, yr);
      }
      continue;
    }
    const int64_t* lab = labels + b * HW + i * W;
    const int64_t ignore = pb.ignore_index;
    for (int64_t j = 0; j < W; ++j) {
      const int64_t l = lab[j];
      const acc valid = l != ignore ? acc(1) : acc(0);
      yr[j] = l == c ? valid : acc(0);
      pr[j] *= valid;  // a multiply, not a select: NaN in pred still propagates as in the reference
    }
    if (c == 0) {  // each image's labels are checked once, by its first plane
      bool bad = false;
      for (int64_t j = 0; j < W; ++j) bad |= (lab[j] < 0 || lab[j] >= pb.C) && lab[j] != ignore;
      if (bad && bad_label == kNoIgnore)
        for (int64_t j = 0; j < W; ++j)
          if ((lab[j] < 0 || lab[j] >= pb.C) && lab[j] != ignore) {
            bad_label = lab[j];
            break;
          }
    }
  }
  replicate_ring(p);
  replicate_ring(y);
}

template <typename scalar_t>
void run(const Problem& pb, const scalar_t* pred, const scalar_t* target_f, const int64_t* labels,
         acc_t<scalar_t>* probs /* from_logits: softmax of pred, [B,C,H,W] */,
         acc_t<scalar_t>* dp_full /* from_logits: plane gradients before the softmax adjoint */,
         scalar_t* grad_out, std::vector<double>& plane_loss, std::vector<int64_t>& bad_label) {
  using acc = acc_t<scalar_t>;
  const int64_t C = pb.C, H = pb.H, W = pb.W, HW = H * W;
  // The first scale-1 entry writes the full-resolution adjoint directly; the others spread into it.
  int64_t direct = -1;
  for (size_t k = 0; k < pb.scales.size() && direct < 0; ++k)
    if (pb.scales[k].s == 1 && pb.scales[k].Hs > 0 && pb.scales[k].Ws > 0) direct = static_cast<int64_t>(k);
  at::parallel_for(0, pb.B * C, 1, [&](int64_t begin, int64_t end) {
    PlaneBuffers<acc> buf(pb);
    const Padded<acc> p = buf.map(buf.base_p, H, W), y = buf.map(buf.base_y, H, W);
    const Padded<acc> a = pb.grad ? buf.map(buf.base_a, H, W) : Padded<acc>{nullptr, H, W};
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      load_plane<scalar_t>(pb, b, c, pred, target_f, labels, probs, p, y, bad_label[b]);
      if (pb.grad && direct < 0) std::fill(buf.base_a.begin(), buf.base_a.end(), acc(0));
      double loss = 0;
      if (direct >= 0) {
        const Scale& sc = pb.scales[direct];
        loss += sc.coef * sobel_scale<acc>(p, y, pb.grad ? &a : nullptr, static_cast<acc>(sc.coef),
                                           static_cast<acc>(pb.eps), buf.ax.data(), buf.ay.data());
      }
      for (size_t k = 0; k < pb.scales.size(); ++k) {
        const Scale& sc = pb.scales[k];
        if (static_cast<int64_t>(k) == direct || sc.Hs == 0 || sc.Ws == 0) continue;
        const Padded<acc> ps = sc.s == 1 ? p : buf.map(buf.pool_p, sc.Hs, sc.Ws);
        const Padded<acc> ys = sc.s == 1 ? y : buf.map(buf.pool_y, sc.Hs, sc.Ws);
        if (sc.s > 1) {
          pool_padded(p, sc.s, ps, buf.row.data());
          pool_padded(y, sc.s, ys, buf.row.data());
        }
        const Padded<acc> as = buf.map(buf.pool_a, sc.Hs, sc.Ws);
        loss += sc.coef * sobel_scale<acc>(ps, ys, pb.grad ? &as : nullptr, static_cast<acc>(sc.coef),
                                           static_cast<acc>(pb.eps), buf.ax.data(), buf.ay.data());
        if (pb.grad) spread_pool_adjoint(as, sc.s, a, buf.row.data());
      }
      plane_loss[plane] = loss;
      if (!pb.grad) continue;
      // d loss / d p: the adjoint's interior, masked where labels are ignored.
      const int64_t off = plane * HW;
      for (int64_t i = 0; i < H; ++i) {
        acc* g = a.interior_row(i);
        if (pb.labels) {
          const int64_t* lab = labels + b * HW + i * W;
          for (int64_t j = 0; j < W; ++j) g[j] *= lab[j] != pb.ignore_index ? acc(1) : acc(0);
        }
        if (pb.from_logits) {
          std::copy(g, g + W, dp_full + off + i * W);
        } else if constexpr (converts_runs<scalar_t>) {
          at::vec::convert(g, grad_out + off + i * W, W);
        } else {
          std::copy(g, g + W, grad_out + off + i * W);
        }
      }
    }
  });
}

// Pixel tiles of one image for the two channel-wise passes (softmax and its adjoint).
constexpr int64_t kPixelTile = 512;

template <typename Fn>
void for_each_pixel_tile(int64_t B, int64_t HW, const Fn& fn) {
  const int64_t tiles = (HW + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, t = item % tiles;
      fn(b, t * kPixelTile, std::min(HW, (t + 1) * kPixelTile));
    }
  });
}

// probs = softmax_c(pred), in the accumulation type. NaN propagates (at::vec::maximum keeps NaN, and
// exp_nonpositive(NaN) is NaN).
template <typename scalar_t>
void softmax_pass(const scalar_t* pred, acc_t<scalar_t>* probs, int64_t B, int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  for_each_pixel_tile(B, HW, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t P = p1 - p0;
    acc inv_sum[kPixelTile];
    const scalar_t* z = pred + b * C * HW + p0;
    acc* out = probs + b * C * HW + p0;
    // The tile's logits, as acc, into the output rows first (they are overwritten by the exps).
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (converts_runs<scalar_t>) {
        at::vec::convert(z + c * HW, out + c * HW, P);
      } else {
        std::copy(z + c * HW, z + c * HW + P, out + c * HW);
      }
    }
    for (int64_t i = 0; i < P; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), P - i);
      Vec m = Vec::loadu(out + i, n);
      for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(out + c * HW + i, n));
      Vec s(0);
      for (int64_t c = 0; c < C; ++c) {
        const Vec e = exp_nonpositive(Vec::loadu(out + c * HW + i, n) - m);
        e.store(out + c * HW + i, n);
        s = s + e;
      }
      (Vec(1) / s).store(inv_sum + i, n);
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), P - i);
        (Vec::loadu(out + c * HW + i, n) * Vec::loadu(inv_sum + i, n)).store(out + c * HW + i, n);
      }
  });
}

// grad_z_c = p_c (dp_c - sum_c' p_c' dp_c').
template <typename scalar_t>
void softmax_adjoint_pass(const acc_t<scalar_t>* probs, const acc_t<scalar_t>* dp, scalar_t* grad, int64_t B,
                          int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  for_each_pixel_tile(B, HW, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t P = p1 - p0, base = b * C * HW + p0;
    acc out[kPixelTile];
    for (int64_t i = 0; i < P; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), P - i);
      Vec dot(0);
      for (int64_t c = 0; c < C; ++c)
        dot = at::vec::fmadd(Vec::loadu(probs + base + c * HW + i, n), Vec::loadu(dp + base + c * HW + i, n), dot);
      dot.store(out + i, n);
    }
    for (int64_t c = 0; c < C; ++c) {
      const acc* pc = probs + base + c * HW;
      const acc* dc = dp + base + c * HW;
      for (int64_t i = 0; i < P; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), P - i);
        const Vec g = Vec::loadu(pc + i, n) * (Vec::loadu(dc + i, n) - Vec::loadu(out + i, n));
        if constexpr (converts_runs<scalar_t>) {
          acc tmp[Vec::size()];
          g.store(tmp, n);
          at::vec::convert(tmp, grad + base + c * HW + i, n);
        } else {
          g.store(grad + base + c * HW + i, n);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sobel_forward(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                 at::IntArrayRef scales, at::ArrayRef<double> weights, double eps,
                                                 bool from_logits, int64_t ignore_index, int64_t reduction,
                                                 bool compute_grad) {
  check_rank(pred_in, 4, "pred", "[B, C, H, W]");
  check_cpu(pred_in, "pred");
  check_float(pred_in, "pred");
  check_cpu(target_in, "target");
  const int64_t B = pred_in.size(0), C = pred_in.size(1), H = pred_in.size(2), W = pred_in.size(3);
  TORCH_CHECK(B > 0 && C > 0, "pred: expected at least one image and one class, got shape ", pred_in.sizes());
  const bool labels = target_in.scalar_type() == at::kLong;
  if (labels) {
    TORCH_CHECK(target_in.dim() == 3 && target_in.size(0) == B && target_in.size(1) == H && target_in.size(2) == W,
                "target: expected int64 labels of shape [B, H, W] = [", B, ", ", H, ", ", W, "], got ",
                target_in.sizes());
  } else {
    check_same(pred_in, target_in, "pred", "target");
    TORCH_CHECK(target_in.sizes() == pred_in.sizes(), "target: expected shape ", pred_in.sizes(),
                " (as pred) or int64 labels [B, H, W], got ", target_in.sizes());
  }
  TORCH_CHECK(!scales.empty(), "scales: expected at least one scale");
  TORCH_CHECK(weights.size() == scales.size(), "weights: expected ", scales.size(), " values (one per scale), got ",
              weights.size());
  TORCH_CHECK(eps > 0, "eps: expected a value > 0, got ", eps);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);

  Problem pb{B, C, H, W, labels, from_logits, compute_grad, labels ? ignore_index : kNoIgnore, eps, {}};
  for (size_t k = 0; k < scales.size(); ++k) {
    const int64_t s = scales[k];
    TORCH_CHECK(s >= 1, "scales: expected positive pooling factors, got ", s);
    const int64_t Hs = H / s, Ws = W / s;
    const double terms = reduction == 1 ? double(B) * C * Hs * Ws : reduction == 0 ? double(C) * Hs * Ws : 1.0;
    pb.scales.push_back({s, Hs, Ws, Hs * Ws > 0 ? weights[k] / terms : 0.0});
  }

  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  at::Tensor grad = compute_grad ? at::empty_like(pred, at::MemoryFormat::Contiguous) : absent_like(pred);
  at::Tensor loss = at::empty(reduction == 0 ? at::IntArrayRef({B}) : at::IntArrayRef({}), pred.options());
  std::vector<double> plane_loss(B * C, 0.0);
  std::vector<int64_t> bad_label(B, kNoIgnore);
  const int64_t HW = H * W;
  const at::ScalarType acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  MEDATTN_DISPATCH_FLOATING(pred.scalar_type(), "sobel_boundary_loss", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor probs, dp_full;
    if (from_logits) {
      probs = at::empty(pred.sizes(), pred.options().dtype(acc_type));
      softmax_pass<scalar_t>(pred.const_data_ptr<scalar_t>(), probs.mutable_data_ptr<acc>(), B, C, HW);
      if (compute_grad) dp_full = at::empty(pred.sizes(), pred.options().dtype(acc_type));
    }
    run<scalar_t>(pb, pred.const_data_ptr<scalar_t>(), labels ? nullptr : target.const_data_ptr<scalar_t>(),
                  labels ? target.const_data_ptr<int64_t>() : nullptr,
                  from_logits ? probs.mutable_data_ptr<acc>() : nullptr,
                  dp_full.defined() ? dp_full.mutable_data_ptr<acc>() : nullptr,
                  compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, plane_loss, bad_label);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK_VALUE(bad_label[b] == kNoIgnore, "target: labels must lie in [0, ", C,
                  ") (C = pred.shape[1]) or equal ignore_index, got ", bad_label[b], " in image ", b);
    if (from_logits && compute_grad)
      softmax_adjoint_pass<scalar_t>(probs.const_data_ptr<acc>(), dp_full.const_data_ptr<acc>(),
                                     grad.mutable_data_ptr<scalar_t>(), B, C, HW);
    // Fixed-order combination of the per-plane partials: bit-identical whatever the thread count.
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    if (reduction == 0) {
      for (int64_t b = 0; b < B; ++b) {
        double sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += plane_loss[b * C + c];
        out[b] = static_cast<scalar_t>(sum);
      }
    } else {
      double sum = 0;
      for (double v : plane_loss) sum += v;
      out[0] = static_cast<scalar_t>(sum);
    }
  });
  return {loss, grad};
}

// grad_pred * grad_loss, per image for reduction none.
at::Tensor sobel_backward(const at::Tensor& grad_loss, const at::Tensor& grad_pred, int64_t reduction) {
  check_cpu(grad_pred, "grad_pred");
  check_rank(grad_pred, 4, "grad_pred", "[B, C, H, W] (the forward's d loss / d pred)");
  check_cpu(grad_loss, "grad_loss");
  const int64_t B = grad_pred.size(0);
  if (reduction == 0) {
    TORCH_CHECK(grad_loss.numel() == B, "grad_loss: expected ", B, " values (reduction none), got shape ",
                grad_loss.sizes());
    return grad_pred * grad_loss.reshape({B, 1, 1, 1}).to(grad_pred.scalar_type());
  }
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss: expected a scalar (reduction mean/sum), got shape ",
              grad_loss.sizes());
  return grad_pred * grad_loss.reshape({}).to(grad_pred.scalar_type());
}

}  // namespace
}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(sobel_forward);
MEDATTN_REGISTER_CPU_KERNEL(sobel_backward);

MEDATTN_CPU_OPS(m) {
  m.impl("sobel_boundary_loss", MEDATTN_CPU_DISPATCH(sobel_forward));
  m.impl("sobel_boundary_loss_backward", MEDATTN_CPU_DISPATCH(sobel_backward));
}

}  // namespace medattn
