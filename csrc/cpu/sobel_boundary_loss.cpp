// Multi-scale Sobel boundary loss on CPU, loss and d loss / d pred in one fused forward.
//
//   G(u) = sqrt(gx^2 + gy^2 + eps), gx = u (*) [[-1,0,1],[-2,0,2],[-1,0,1]] / 8, gy = u (*) its transpose,
//   replicate padding; loss = sum_s w_s * norm_s * sum | G(P_s(p)) - G(P_s(y)) |, P_s = avg_pool(s, s).
//
// Work item = one (b, c) plane; a thread loads the plane's probabilities p and target y once into
// plane buffers (softmax, one-hot and ignore mask applied on the fly: labels are never one-hot
// encoded in memory), then for every scale:
//  * builds the pooled maps P, Q with their replicate padding ((Hs+2) x (Ws+2) buffers), so that the
//    Sobel stencils run without clamps and vectorise;
//  * per output row, the separable stencils: vertical smooth vs = P[i-1] + 2P[i] + P[i+1] and vertical
//    difference vd = P[i+1] - P[i-1], then gx = (vs[j+1] - vs[j-1]) / 8, gy = (vd[j-1] + 2vd[j] + vd[j+1]) / 8;
//  * d = G(P) - G(Q); loss += |d|; the adjoint coefficients ax = c sgn(d) gx / G(P), ay = c sgn(d) gy / G(P)
//    (c = w_s norm_s), pushed back through the transposed stencils into a padded adjoint buffer, whose
//    padding ring is then folded onto the edge pixels (the adjoint of replicate padding: an out-of-range
//    tap read the edge pixel, so its gradient lands there);
//  * the average-pool adjoint spreads dP / s^2 over each s x s block (pixels beyond the floor get none).
// The plane's gradient then gets the ignore mask and, with from_logits, the softmax adjoint
// dz_c = p_c (dp_c - sum_c' p_c' dp_c'), which needs every channel of a pixel: a second, pixel-parallel
// pass over a full-size dp buffer (the probabilities of the first, pixel-parallel softmax pass are
// kept in a temporary buffer, so exp runs once per element).
//
// Determinism: per-plane loss partials in double, combined in plane order after the parallel loop.
// Memory: only grad_pred (pred's size) outlives the call; buffers are per thread or temporary.

#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/vec_math.h"  // exp_nonpositive, Vectorized

#include <algorithm>
#include <cstring>
#include <limits>
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

template <typename acc>
struct PlaneBuffers {
  std::vector<acc> ppad, ypad, apad;          // (Hs+2) x (Ws+2): padded pooled maps and adjoint
  std::vector<acc> vs_p, vd_p, vs_y, vd_y;    // Ws+2: vertical stencils of one row
  std::vector<acc> ax, ay;                    // Ws+4: adjoint coefficients with two zeros each side
  std::vector<acc> row;                       // Ws: pooling accumulator
  std::vector<acc> mag_p, mag_y;              // Ws: G(P), G(Q) of one row

  void resize(int64_t Hs, int64_t Ws) {
    const size_t padded = static_cast<size_t>((Hs + 2) * (Ws + 2));
    if (ppad.size() < padded) {
      ppad.resize(padded);
      ypad.resize(padded);
      apad.resize(padded);
    }
    if (vs_p.size() < static_cast<size_t>(Ws + 2)) {
      for (auto* v : {&vs_p, &vd_p, &vs_y, &vd_y}) v->resize(Ws + 2);
      ax.resize(Ws + 4);
      ay.resize(Ws + 4);
      row.resize(Ws);
      mag_p.resize(Ws);
      mag_y.resize(Ws);
    }
  }
};

// row[j] += sum_{k<s} in[j*s + k] and out[j*s + k] += v[j]: the pooling and its adjoint along a row.
// The common factors get a compile-time s, with which GCC vectorises the strided accesses.
template <int S, typename acc>
inline void add_block_sums_fixed(const acc* in, acc* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc sum = 0;
    for (int k = 0; k < S; ++k) sum += in[j * S + k];
    row[j] += sum;
  }
}

template <typename acc>
inline void add_block_sums(const acc* in, acc* row, int64_t n, int64_t s) {
  switch (s) {
    case 2: return add_block_sums_fixed<2>(in, row, n);
    case 4: return add_block_sums_fixed<4>(in, row, n);
    case 8: return add_block_sums_fixed<8>(in, row, n);
    default:
      for (int64_t j = 0; j < n; ++j) {
        acc sum = 0;
        for (int64_t k = 0; k < s; ++k) sum += in[j * s + k];
        row[j] += sum;
      }
  }
}

template <int S, typename acc>
inline void spread_fixed(const acc* v, acc* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    for (int k = 0; k < S; ++k) out[j * S + k] += v[j];
}

template <typename acc>
inline void spread(const acc* v, acc* out, int64_t n, int64_t s) {
  switch (s) {
    case 1:
      for (int64_t j = 0; j < n; ++j) out[j] += v[j];
      return;
    case 2: return spread_fixed<2>(v, out, n);
    case 4: return spread_fixed<4>(v, out, n);
    case 8: return spread_fixed<8>(v, out, n);
    default:
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < s; ++k) out[j * s + k] += v[j];
  }
}

// Writes the s x s average pool of plane u (H x W) into the interior of the padded buffer, then
// replicates the edges into the padding ring.
template <typename acc>
void pool_padded(const acc* u, int64_t W, const Scale& sc, acc* pad, acc* row) {
  const int64_t s = sc.s, Hs = sc.Hs, Ws = sc.Ws, Wp = Ws + 2;
  const acc inv_area = acc(1) / static_cast<acc>(s * s);
  for (int64_t i = 0; i < Hs; ++i) {
    acc* out = pad + (i + 1) * Wp + 1;
    if (s == 1) {
      std::copy(u + i * W, u + i * W + Ws, out);
    } else {
      std::fill(row, row + Ws, acc(0));
      for (int64_t a = 0; a < s; ++a) add_block_sums(u + (i * s + a) * W, row, Ws, s);
      for (int64_t j = 0; j < Ws; ++j) out[j] = row[j] * inv_area;
    }
    out[-1] = out[0];
    out[Ws] = out[Ws - 1];
  }
  std::copy(pad + Wp, pad + 2 * Wp, pad);
  std::copy(pad + Hs * Wp, pad + (Hs + 1) * Wp, pad + (Hs + 1) * Wp);
}

template <typename acc>
inline void vertical_stencils(const acc* pad, int64_t i, int64_t Wp, acc* vs, acc* vd) {
  const acc* r0 = pad + i * Wp;
  const acc* r1 = r0 + Wp;
  const acc* r2 = r1 + Wp;
  for (int64_t j = 0; j < Wp; ++j) {
    vs[j] = r0[j] + acc(2) * r1[j] + r2[j];
    vd[j] = r2[j] - r0[j];
  }
}

// In-place sqrt of a row on this pass's vectors (IEEE correctly rounded, as std::sqrt; NaN in, NaN out).
// Explicit vectors because std::sqrt may set errno, a side effect that keeps GCC from vectorising a loop
// that calls it.
template <typename acc>
inline void sqrt_inplace(acc* x, int64_t n) {
  using V = Vectorized<acc>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) V::loadu(x + j).sqrt().store(x + j);
  for (; j < n; ++j) x[j] = std::sqrt(x[j]);
}

// The abs adjoint as torch computes it: sign(d), 0 at 0 and at NaN (torch.sign(nan) == 0).
template <typename acc>
inline acc sgn(acc d) {
  return static_cast<acc>(d > acc(0)) - static_cast<acc>(d < acc(0));
}

// One scale of one plane: returns sum |G(P) - G(Q)|; with dp, adds the scale's gradient to dp (H x W).
template <typename acc>
double plane_scale(const acc* p, const acc* y, acc* dp, int64_t W, const Scale& sc, acc eps, PlaneBuffers<acc>& buf) {
  const int64_t s = sc.s, Hs = sc.Hs, Ws = sc.Ws, Wp = Ws + 2;
  buf.resize(Hs, Ws);
  acc* ppad = buf.ppad.data();
  acc* ypad = buf.ypad.data();
  acc* apad = buf.apad.data();
  pool_padded(p, W, sc, ppad, buf.row.data());
  pool_padded(y, W, sc, ypad, buf.row.data());
  const bool grad = dp != nullptr;
  if (grad) std::fill(apad, apad + (Hs + 2) * Wp, acc(0));
  acc* vs_p = buf.vs_p.data();
  acc* vd_p = buf.vd_p.data();
  acc* vs_y = buf.vs_y.data();
  acc* vd_y = buf.vd_y.data();
  acc* ax = buf.ax.data() + 2;  // ax[-2..-1] and ax[Ws..Ws+1] stay zero
  acc* ay = buf.ay.data() + 2;
  acc* mag_p = buf.mag_p.data();
  acc* mag_y = buf.mag_y.data();
  ax[-2] = ax[-1] = ax[Ws] = ax[Ws + 1] = acc(0);
  ay[-2] = ay[-1] = ay[Ws] = ay[Ws + 1] = acc(0);
  const acc eighth = acc(0.125);
  const acc coef = static_cast<acc>(sc.coef);
  double total = 0;
  for (int64_t i = 0; i < Hs; ++i) {
    vertical_stencils(ppad, i, Wp, vs_p, vd_p);
    vertical_stencils(ypad, i, Wp, vs_y, vd_y);
    // Three branch-free, vectorisable loops: stencils and squared magnitudes, sqrt, then |d| and the
    // adjoint coefficients (ax, ay hold gx(P), gy(P) until they are scaled).
    for (int64_t j = 0; j < Ws; ++j) {
      const acc gxp = (vs_p[j + 2] - vs_p[j]) * eighth;
      const acc gyp = (vd_p[j] + acc(2) * vd_p[j + 1] + vd_p[j + 2]) * eighth;
      const acc gxy = (vs_y[j + 2] - vs_y[j]) * eighth;
      const acc gyy = (vd_y[j] + acc(2) * vd_y[j + 1] + vd_y[j + 2]) * eighth;
      ax[j] = gxp;
      ay[j] = gyp;
      mag_p[j] = gxp * gxp + gyp * gyp + eps;
      mag_y[j] = gxy * gxy + gyy * gyy + eps;
    }
    sqrt_inplace(mag_p, Ws);
    sqrt_inplace(mag_y, Ws);
    acc row_sum = 0;
    for (int64_t j = 0; j < Ws; ++j) {
      const acc d = mag_p[j] - mag_y[j];
      row_sum += std::abs(d);
      const acc k = coef * sgn(d) / mag_p[j];  // also computed without grad: keeps the loop branch-free
      ax[j] *= k;
      ay[j] *= k;
    }
    total += static_cast<double>(row_sum);
    if (grad) {
      // Transposed stencils, in padded coordinates: gx[j] = (vs[j+2] - vs[j]) / 8 gives
      // tx[k] = (ax[k-2] - ax[k]) / 8; gy[j] = (vd[j] + 2 vd[j+1] + vd[j+2]) / 8 gives
      // ty[k] = (ay[k] + 2 ay[k-1] + ay[k-2]) / 8; then vs = r0 + 2 r1 + r2 and vd = r2 - r0 spread
      // tx, ty over the three padded rows i, i+1, i+2.
      acc* a0 = apad + i * Wp;
      acc* a1 = a0 + Wp;
      acc* a2 = a1 + Wp;
      for (int64_t k = 0; k < Wp; ++k) {
        const acc tx = (ax[k - 2] - ax[k]) * eighth;
        const acc ty = (ay[k] + acc(2) * ay[k - 1] + ay[k - 2]) * eighth;
        a0[k] += tx - ty;
        a1[k] += acc(2) * tx;
        a2[k] += tx + ty;
      }
    }
  }
  if (!grad) return total;
  // Adjoint of replicate padding: fold the ring onto the edge rows, then columns.
  for (int64_t k = 0; k < Wp; ++k) {
    apad[Wp + k] += apad[k];
    apad[Hs * Wp + k] += apad[(Hs + 1) * Wp + k];
  }
  for (int64_t i = 1; i <= Hs; ++i) {
    acc* r = apad + i * Wp;
    r[1] += r[0];
    r[Ws] += r[Ws + 1];
  }
  // Adjoint of the average pool: dP / s^2 over each s x s block.
  const acc inv_area = acc(1) / static_cast<acc>(s * s);
  acc* scaled = buf.row.data();
  for (int64_t i = 0; i < Hs; ++i) {
    const acc* a = apad + (i + 1) * Wp + 1;
    for (int64_t j = 0; j < Ws; ++j) scaled[j] = a[j] * inv_area;
    for (int64_t r = 0; r < s; ++r) spread(s == 1 ? a : scaled, dp + (i * s + r) * W, Ws, s);
  }
  return total;
}

struct Problem {
  int64_t B, C, H, W;
  bool labels, from_logits, grad;
  int64_t ignore_index;
  double eps;
  std::vector<Scale> scales;
};

template <typename scalar_t>
void run(const Problem& pb, const scalar_t* pred, const scalar_t* target_f, const int64_t* labels,
         acc_t<scalar_t>* probs /* from_logits: softmax of pred, [B,C,H,W] */,
         acc_t<scalar_t>* dp_full /* from_logits: plane gradients before the softmax adjoint */,
         scalar_t* grad_out, std::vector<double>& plane_loss, std::vector<int64_t>& bad_label) {
  using acc = acc_t<scalar_t>;
  const int64_t C = pb.C, HW = pb.H * pb.W;
  at::parallel_for(0, pb.B * C, 1, [&](int64_t begin, int64_t end) {
    PlaneBuffers<acc> buf;
    std::vector<acc> p(HW), y(HW), dp(pb.grad ? HW : 0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const int64_t off = plane * HW;
      if (pb.from_logits) {
        std::copy(probs + off, probs + off + HW, p.begin());
      } else {
        for (int64_t i = 0; i < HW; ++i) p[i] = static_cast<acc>(pred[off + i]);
      }
      if (pb.labels) {
        const int64_t* lab = labels + b * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const int64_t l = lab[i];
          const acc valid = l != pb.ignore_index ? acc(1) : acc(0);
          y[i] = l == c && valid != acc(0) ? acc(1) : acc(0);
          p[i] *= valid;  // a multiply, not a select: NaN in pred still propagates as in the reference
        }
        if (c == 0) {  // each image's labels are checked once, by its first plane
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t l = lab[i];
            if ((l < 0 || l >= C) && l != pb.ignore_index) {
              bad_label[b] = l;
              break;
            }
          }
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) y[i] = static_cast<acc>(target_f[off + i]);
      }
      if (pb.grad) std::fill(dp.begin(), dp.end(), acc(0));
      double loss = 0;
      for (const Scale& sc : pb.scales) {
        if (sc.Hs == 0 || sc.Ws == 0) continue;
        loss += sc.coef * plane_scale<acc>(p.data(), y.data(), pb.grad ? dp.data() : nullptr, pb.W, sc,
                                           static_cast<acc>(pb.eps), buf);
      }
      plane_loss[plane] = loss;
      if (!pb.grad) continue;
      if (pb.labels) {
        const int64_t* lab = labels + b * HW;
        for (int64_t i = 0; i < HW; ++i) dp[i] *= lab[i] != pb.ignore_index ? acc(1) : acc(0);
      }
      if (pb.from_logits) {
        std::copy(dp.begin(), dp.end(), dp_full + off);
      } else {
        for (int64_t i = 0; i < HW; ++i) grad_out[off + i] = static_cast<scalar_t>(dp[i]);
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

// probs = softmax_c(pred), in the accumulation type.
template <typename scalar_t>
void softmax_pass(const scalar_t* pred, acc_t<scalar_t>* probs, int64_t B, int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  for_each_pixel_tile(B, HW, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t P = p1 - p0;
    std::vector<acc> mx(P, -std::numeric_limits<acc>::infinity()), sum(P, acc(0));
    const scalar_t* z = pred + b * C * HW + p0;
    acc* out = probs + b * C * HW + p0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; ++i) {
        const acc v = static_cast<acc>(z[c * HW + i]);
        mx[i] = (v > mx[i] || v != v) ? v : mx[i];  // NaN wins, so it propagates like torch.softmax
      }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; ++i) {
        const acc e = exp_nonpositive(static_cast<acc>(z[c * HW + i]) - mx[i]);
        out[c * HW + i] = e;
        sum[i] += e;
      }
    for (int64_t i = 0; i < P; ++i) sum[i] = acc(1) / sum[i];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; ++i) out[c * HW + i] *= sum[i];
  });
}

// grad_z_c = p_c (dp_c - sum_c' p_c' dp_c').
template <typename scalar_t>
void softmax_adjoint_pass(const acc_t<scalar_t>* probs, const acc_t<scalar_t>* dp, scalar_t* grad, int64_t B,
                          int64_t C, int64_t HW) {
  using acc = acc_t<scalar_t>;
  for_each_pixel_tile(B, HW, [&](int64_t b, int64_t p0, int64_t p1) {
    const int64_t P = p1 - p0, base = b * C * HW + p0;
    std::vector<acc> dot(P, acc(0));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; ++i) dot[i] += probs[base + c * HW + i] * dp[base + c * HW + i];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < P; ++i) {
        const int64_t k = base + c * HW + i;
        grad[k] = static_cast<scalar_t>(probs[k] * (dp[k] - dot[i]));
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
