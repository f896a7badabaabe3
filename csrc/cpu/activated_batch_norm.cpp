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
// Work item = one channel (its B * HW values are reduced together). Reductions are `omp simd`
// reductions (vectorised) over blocks of 512 values, whose sums accumulate in double; the variance is taken around the channel's first value
// (shifted sums), which avoids the cancellation of E[x^2] - E[x]^2 without a third pass over x.
// NCHW and channels_last inputs are read in place through (batch, channel, pixel) strides; the output
// has the input's layout.
#include "medattn/common.h"
#include "medattn/dispatch.h"

#include <algorithm>
#include <type_traits>
#include <utility>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

struct MapView {
  int64_t B, C, HW, sb, sc, sp;
};

inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::Tensor in_own_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

inline MapView view_of(const at::Tensor& x) {
  // Both layouts merge (h, w) into one pixel index p = h * W + w with stride stride(3).
  return {x.size(0), x.size(1), x.size(2) * x.size(3), x.stride(0), x.stride(1), x.stride(3)};
}

// Calls fn(row pointer, stride, length) for every contiguous run of channel c's values: one run per
// batch image in NCHW (stride 1, vectorisable), one strided run per image in channels_last.
// Runs body(row_offset, stride) over channel c's rows (one per image). Unit stride (NCHW) is passed as
// a compile-time 1 so that the loops over `i * stride` vectorise into plain loads; channels_last rows
// (stride C) take the strided instantiation.
template <typename Body>
inline void for_each_row(const MapView& v, int64_t c, const Body& body) {
  for (int64_t b = 0; b < v.B; ++b) {
    const int64_t off = b * v.sb + c * v.sc;
    if (v.sp == 1)
      body(off, std::integral_constant<int64_t, 1>{});
    else
      body(off, v.sp);
  }
}

// Partial sums run in `acc` (float for float32 / bfloat16: twice the vector width of double) over blocks
// of kSumBlock values, and the block sums are added in double: the rounding error of a block sum stays
// at float's over 512 terms, and the channel total (up to millions of terms) at double's.
constexpr int64_t kSumBlock = 512;

// (sum a_i, sum b_i) over i in [0, n) for (a_i, b_i) = terms(i), into the double totals s1 and s2.
template <typename acc, typename Terms>
inline void add_blocked_sums(int64_t n, const Terms& terms, double& s1, double& s2) {
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t i1 = std::min(n, i0 + kSumBlock);
    acc r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
    for (int64_t i = i0; i < i1; ++i) {
      const std::pair<acc, acc> t = terms(i);
      r1 += t.first;
      r2 += t.second;
    }
    s1 += static_cast<double>(r1);
    s2 += static_cast<double>(r2);
  }
}

// Shifted sums over channel c's M values: (sum (x - shift), sum (x - shift)^2), shift = its first value.
template <typename scalar_t>
std::pair<double, double> shifted_sums(const scalar_t* xp, const MapView& v, int64_t c, double shift) {
  using acc = acc_t<scalar_t>;
  const acc shift_acc = static_cast<acc>(shift);
  double s1 = 0, s2 = 0;
  for_each_row(v, c, [&](int64_t off, auto st) {
    const scalar_t* row = xp + off;
    add_blocked_sums<acc>(v.HW, [&](int64_t i) {
      const acc d = static_cast<acc>(row[i * st]) - shift_acc;
      return std::pair<acc, acc>(d, d * d);
    }, s1, s2);
  });
  return {s1, s2};
}

// z = ((x - mean_hi) - mean_lo) * scale + beta rather than x * scale + (beta - mean * scale): x - mean_hi
// is exact for x near the mean and mean_lo = mean - mean_hi carries the bits of the (double) mean that
// `acc` cannot hold, so a large common offset of x does not cost y its low bits.
template <typename scalar_t, typename acc>
void apply_channel(const scalar_t* xp, scalar_t* yp, const MapView& v, int64_t c, acc mean_hi, acc mean_lo,
                   acc scale, acc beta, acc slope) {
  for_each_row(v, c, [&](int64_t off, auto st) {
    const scalar_t* xr = xp + off;
    scalar_t* yr = yp + off;
#pragma omp simd
    for (int64_t i = 0; i < v.HW; ++i) {
      const acc z = ((static_cast<acc>(xr[i * st]) - mean_hi) - mean_lo) * scale + beta;
      yr[i * st] = static_cast<scalar_t>(z > acc(0) ? z : z * slope);
    }
  });
}

// Channel c's backward constants: dz and xhat rebuilt from y (see the top of the file).
template <typename acc>
struct Inverse {
  acc slope, inv_slope, beta, inv_gamma;
};

template <typename scalar_t, typename acc>
std::pair<double, double> backward_sums(const scalar_t* yp, const scalar_t* gp, const MapView& v, int64_t c,
                                        Inverse<acc> k) {
  double sum_dz = 0, sum_dz_xhat = 0;
  for_each_row(v, c, [&](int64_t off, auto st) {
    const scalar_t* yr = yp + off;
    const scalar_t* gr = gp + off;
    add_blocked_sums<acc>(v.HW, [&](int64_t i) {
      const acc yv = static_cast<acc>(yr[i * st]), gv = static_cast<acc>(gr[i * st]);
      const bool pos = yv > acc(0);
      const acc dz = pos ? gv : gv * k.slope;
      const acc xhat = ((pos ? yv : yv * k.inv_slope) - k.beta) * k.inv_gamma;
      return std::pair<acc, acc>(dz, dz * xhat);
    }, sum_dz, sum_dz_xhat);
  });
  return {sum_dz, sum_dz_xhat};
}

template <typename scalar_t, typename acc>
void grad_x_channel(const scalar_t* yp, const scalar_t* gp, scalar_t* out, const MapView& v, int64_t c,
                    Inverse<acc> k, acc coef, acc mean_dz, acc mean_dz_xhat) {
  for_each_row(v, c, [&](int64_t off, auto st) {
    const scalar_t* yr = yp + off;
    const scalar_t* gr = gp + off;
    scalar_t* orow = out + off;
#pragma omp simd
    for (int64_t i = 0; i < v.HW; ++i) {
      const acc yv = static_cast<acc>(yr[i * st]), gv = static_cast<acc>(gr[i * st]);
      const bool pos = yv > acc(0);
      const acc dz = pos ? gv : gv * k.slope;
      const acc xhat = ((pos ? yv : yv * k.inv_slope) - k.beta) * k.inv_gamma;
      orow[i * st] = static_cast<scalar_t>(coef * (dz - mean_dz - xhat * mean_dz_xhat));
    }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> abn_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                           const at::Tensor& bias_in, double eps,
                                                           double negative_slope) {
  check_rank(x_in, 4, "x", "[B, C, H, W]");
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  check_params(x_in, weight_in, "weight");
  check_params(x_in, bias_in, "bias");
  check_slope(negative_slope);
  TORCH_CHECK(eps > 0, "eps: expected > 0, got ", eps);
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = in_own_layout(x_in, cl);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const MapView v = view_of(x);
  const int64_t M = v.B * v.HW;
  TORCH_CHECK(M > 1, "x: expected more than 1 value per channel (B * H * W > 1) for batch statistics, got shape ",
              x.sizes());
  at::Tensor y = at::empty_like(x);
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({v.C}, x.options().dtype(stat_dtype));
  at::Tensor var = at::empty({v.C}, x.options().dtype(stat_dtype));
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "activated_batch_norm", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    acc* mp = mean.mutable_data_ptr<acc>();
    acc* vp = var.mutable_data_ptr<acc>();
    const acc slope = static_cast<acc>(negative_slope);
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const double shift = static_cast<double>(xp[c * v.sc]);
        const auto [s1, s2] = shifted_sums(xp, v, c, shift);
        const double m1 = s1 / static_cast<double>(M);
        const double variance = std::max(s2 / static_cast<double>(M) - m1 * m1, 0.0);
        const double mu = shift + m1;
        mp[c] = static_cast<acc>(mu);
        vp[c] = static_cast<acc>(variance);
        const double gamma = std::abs(static_cast<double>(wp[c])) + eps;
        const acc scale = static_cast<acc>(gamma / std::sqrt(variance + eps));
        const acc mean_hi = static_cast<acc>(mu), mean_lo = static_cast<acc>(mu - static_cast<double>(mean_hi));
        apply_channel(xp, yp, v, c, mean_hi, mean_lo, scale, static_cast<acc>(bp[c]), slope);
      }
    });
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
  const MapView v = view_of(y);
  const int64_t M = v.B * v.HW;
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
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    const acc* vp = var.const_data_ptr<acc>();
    scalar_t* gxp = output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    const acc slope = static_cast<acc>(negative_slope), inv_slope = acc(1) / slope;
    at::parallel_for(0, v.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc w = static_cast<acc>(wp[c]);
        const acc gamma = std::abs(w) + static_cast<acc>(eps);
        const acc inv_gamma = acc(1) / gamma, beta = static_cast<acc>(bp[c]);
        const Inverse<acc> k{slope, inv_slope, beta, inv_gamma};
        const auto [sum_dz, sum_dz_xhat] = backward_sums(yp, gp, v, c, k);
        if (output_mask[1]) {
          const double sgn = w > 0 ? 1.0 : (w < 0 ? -1.0 : 0.0);  // d|w|/dw as torch.abs's backward
          grad_w.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dz_xhat * sgn);
        }
        if (output_mask[2]) grad_b.mutable_data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dz);
        if (!output_mask[0]) continue;
        const acc coef = gamma / std::sqrt(vp[c] + static_cast<acc>(eps));
        const acc mean_dz = static_cast<acc>(sum_dz / static_cast<double>(M));
        const acc mean_dz_xhat = static_cast<acc>(sum_dz_xhat / static_cast<double>(M));
        grad_x_channel(yp, gp, gxp, v, c, k, coef, mean_dz, mean_dz_xhat);
      }
    });
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
