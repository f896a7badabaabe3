// Global spatial attention on CPU: out = x * sigmoid(mean_c x) (+ y * sigmoid(mean_c y)).
//
// Memory-bound, so the kernel's job is to touch x once from DRAM. Work is split into (batch, pixel
// tile) items. NCHW: a tile of kPixelTile pixels across all C channels (kPixelTile * C elements, a few
// hundred KiB) is summed over channels with unit-stride, vectorised loops over pixels, then the same
// tile is re-read from L1/L2 to write the output. channels_last: each pixel's C values are contiguous,
// so the channel sum is a unit-stride reduction and the tile is one pixel row.
//
// Backward, with s = sigmoid(mean_c x) recomputed rather than saved:
//   d out_c / d x_c' = s [c == c'] + x_c s (1 - s) / C
//   grad_x_c = g_c s + (sum_c' g_c' x_c') s (1 - s) / C
// so one pass forms both channel sums (of x and of g*x) and a second pass, from cache, writes grad_x.
#include "medattn/common.h"
#include "medattn/dispatch.h"

#include <algorithm>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// 1024 x C values (a few hundred KiB) stay in L2 for the second pass, and 4 KiB unit-stride runs per
// channel row keep the prefetchers streaming: at (8, 64, 112, 112) the forward took 2.5 ms with 256.
constexpr int64_t kPixelTile = 1024;

template <typename acc>
inline acc sigmoid(acc v) {
  return acc(1) / (acc(1) + std::exp(-v));
}

enum class Layout { NCHW, NHWC };

inline Layout layout_of(const at::Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) ? Layout::NHWC : Layout::NCHW;
}

inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  return layout == Layout::NHWC ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Forward over one (batch, pixel range) item. `inputs` holds x (and y): out = sum_i in_i * s_i.
template <typename scalar_t, Layout L>
void forward_item(const scalar_t* const* inputs, int n_inputs, scalar_t* out, int64_t C, int64_t HW, int64_t p0,
                  int64_t p1) {
  using acc = acc_t<scalar_t>;
  const int64_t P = p1 - p0;
  std::vector<acc> sums(P);
  std::vector<acc> gates(P * n_inputs);
  for (int i = 0; i < n_inputs; ++i) {
    const scalar_t* in = inputs[i];
    std::fill(sums.begin(), sums.end(), acc(0));
    if constexpr (L == Layout::NCHW) {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = in + c * HW + p0;
        for (int64_t p = 0; p < P; ++p) sums[p] += static_cast<acc>(row[p]);
      }
    } else {
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t* px = in + (p0 + p) * C;
        acc s = 0;
        for (int64_t c = 0; c < C; ++c) s += static_cast<acc>(px[c]);
        sums[p] = s;
      }
    }
    const acc inv_c = acc(1) / static_cast<acc>(C);
    for (int64_t p = 0; p < P; ++p) gates[i * P + p] = sigmoid(sums[p] * inv_c);
  }
  if constexpr (L == Layout::NCHW) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* orow = out + c * HW + p0;
      const scalar_t* xrow = inputs[0] + c * HW + p0;
      if (n_inputs == 1) {
        for (int64_t p = 0; p < P; ++p) orow[p] = static_cast<scalar_t>(static_cast<acc>(xrow[p]) * gates[p]);
      } else {
        const scalar_t* yrow = inputs[1] + c * HW + p0;
        for (int64_t p = 0; p < P; ++p)
          orow[p] = static_cast<scalar_t>(static_cast<acc>(xrow[p]) * gates[p] +
                                          static_cast<acc>(yrow[p]) * gates[P + p]);
      }
    }
  } else {
    for (int64_t p = 0; p < P; ++p) {
      scalar_t* opx = out + (p0 + p) * C;
      const scalar_t* xpx = inputs[0] + (p0 + p) * C;
      const acc gx = gates[p];
      if (n_inputs == 1) {
        for (int64_t c = 0; c < C; ++c) opx[c] = static_cast<scalar_t>(static_cast<acc>(xpx[c]) * gx);
      } else {
        const scalar_t* ypx = inputs[1] + (p0 + p) * C;
        const acc gy = gates[P + p];
        for (int64_t c = 0; c < C; ++c)
          opx[c] = static_cast<scalar_t>(static_cast<acc>(xpx[c]) * gx + static_cast<acc>(ypx[c]) * gy);
      }
    }
  }
}

template <typename scalar_t, Layout L>
void backward_item(const scalar_t* g, const scalar_t* x, scalar_t* gx, int64_t C, int64_t HW, int64_t p0,
                   int64_t p1) {
  using acc = acc_t<scalar_t>;
  const int64_t P = p1 - p0;
  const acc inv_c = acc(1) / static_cast<acc>(C);
  std::vector<acc> sum_x(P, acc(0)), sum_gx(P, acc(0));
  if constexpr (L == Layout::NCHW) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + c * HW + p0;
      const scalar_t* gr = g + c * HW + p0;
      for (int64_t p = 0; p < P; ++p) {
        const acc xv = static_cast<acc>(xr[p]);
        sum_x[p] += xv;
        sum_gx[p] += xv * static_cast<acc>(gr[p]);
      }
    }
    // Reuse the sums as the two per-pixel coefficients: grad = g * s + coef.
    for (int64_t p = 0; p < P; ++p) {
      const acc s = sigmoid(sum_x[p] * inv_c);
      sum_x[p] = s;
      sum_gx[p] = sum_gx[p] * s * (acc(1) - s) * inv_c;
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* gr = g + c * HW + p0;
      scalar_t* out = gx + c * HW + p0;
      for (int64_t p = 0; p < P; ++p) out[p] = static_cast<scalar_t>(static_cast<acc>(gr[p]) * sum_x[p] + sum_gx[p]);
    }
  } else {
    for (int64_t p = 0; p < P; ++p) {
      const scalar_t* xp = x + (p0 + p) * C;
      const scalar_t* gp = g + (p0 + p) * C;
      acc sx = 0, sgx = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc xv = static_cast<acc>(xp[c]);
        sx += xv;
        sgx += xv * static_cast<acc>(gp[c]);
      }
      const acc s = sigmoid(sx * inv_c);
      const acc coef = sgx * s * (acc(1) - s) * inv_c;
      scalar_t* out = gx + (p0 + p) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(static_cast<acc>(gp[c]) * s + coef);
    }
  }
}

// Splits B x HW into (batch, pixel tile) items and runs `fn(b, p0, p1)` on each, in parallel.
template <typename Fn>
void for_each_pixel_tile(int64_t B, int64_t HW, Layout layout, const Fn& fn) {
  // NHWC items are pixel rows of C contiguous values; a smaller tile keeps enough items per thread.
  const int64_t tile = layout == Layout::NCHW ? kPixelTile : 64;
  const int64_t tiles = (HW + tile - 1) / tile;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, t = item % tiles;
      fn(b, t * tile, std::min(HW, (t + 1) * tile));
    }
  });
}

void check_map(const at::Tensor& t, const char* name) {
  check_rank(t, 4, name, "[B, C, H, W]");
  check_cpu(t, name);
  check_float(t, name);
}

at::Tensor gsa_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in) {
  check_map(x_in, "x");
  const Layout layout = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  at::Tensor y;
  if (y_in.has_value()) {
    check_map(*y_in, "y");
    check_same(x_in, *y_in, "x", "y");
    TORCH_CHECK(y_in->sizes() == x_in.sizes(), "y: expected shape ", x_in.sizes(), " (as x), got ", y_in->sizes());
    y = in_layout(*y_in, layout);
  }
  at::Tensor out = at::empty_like(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (out.numel() == 0) return out;
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "global_spatial_attention", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int n_inputs = y.defined() ? 2 : 1;
    for_each_pixel_tile(B, HW, layout, [&](int64_t b, int64_t p0, int64_t p1) {
      const scalar_t* inputs[2] = {xp + b * C * HW, yp ? yp + b * C * HW : nullptr};
      if (layout == Layout::NCHW)
        forward_item<scalar_t, Layout::NCHW>(inputs, n_inputs, op + b * C * HW, C, HW, p0, p1);
      else
        forward_item<scalar_t, Layout::NHWC>(inputs, n_inputs, op + b * C * HW, C, HW, p0, p1);
    });
  });
  return out;
}

at::Tensor gsa_backward(const at::Tensor& grad_in, const at::Tensor& x_in) {
  check_map(x_in, "x");
  check_map(grad_in, "grad_out");
  check_same(x_in, grad_in, "x", "grad_out");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad_out: expected shape ", x_in.sizes(), ", got ", grad_in.sizes());
  const Layout layout = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  const at::Tensor g = in_layout(grad_in, layout);
  at::Tensor grad_x = at::empty_like(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (grad_x.numel() == 0) return grad_x;
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "global_spatial_attention_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
    for_each_pixel_tile(B, HW, layout, [&](int64_t b, int64_t p0, int64_t p1) {
      const int64_t off = b * C * HW;
      if (layout == Layout::NCHW)
        backward_item<scalar_t, Layout::NCHW>(gp + off, xp + off, op + off, C, HW, p0, p1);
      else
        backward_item<scalar_t, Layout::NHWC>(gp + off, xp + off, op + off, C, HW, p0, p1);
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace CPU_CAPABILITY

MEDATTN_REGISTER_CPU_KERNEL(gsa_forward);
MEDATTN_REGISTER_CPU_KERNEL(gsa_backward);

MEDATTN_CPU_OPS(m) {
  m.impl("global_spatial_attention", MEDATTN_CPU_DISPATCH(gsa_forward));
  m.impl("global_spatial_attention_backward", MEDATTN_CPU_DISPATCH(gsa_backward));
}

}  // namespace medattn
