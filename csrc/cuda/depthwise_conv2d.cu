// Depthwise conv2d, CUDA C++ (stride 1, zero padding, dilation): shared-memory tiled direct convolution.
//
// Registered as medattn::_cuda_depthwise_conv2d(_backward); medattn_kernels/ops/depthwise_conv2d.py
// routes large kernels (KH * KW >= 81) here and small ones to Triton (choose_gpu).
//
// Forward / grad input (one kernel, `correlate_kernel`): a block of 32 x 8 threads owns a 32 x 32 output
// tile of one (batch, channel) plane; each thread computes 4 outputs of one column (rows ty + 8 i).
// The block stages the input window the tile needs, (32 + dh (KH-1)) x (32 + dw (KW-1)) values in the
// accumulation type, in shared memory ONCE, then every staged value is reused up to KH * KW times from
// shared memory (consecutive threads read consecutive words: no bank conflicts). When the window
// would exceed kSmemBytes (very large dilated kernels) the taps are processed in chunks of kernel rows /
// columns, each chunk staging its own window. Grad input is the same correlation over grad_out with the
// flipped kernel and the window origin (ph - dh (KH-1), pw - dw (KW-1)).
//
// Grad weight (`weight_grad_kernel`): one block per (channel, kernel row kh, block of 8 taps kw); each
// thread accumulates a fixed, strided subset of the (b, h, w) positions for its 8 taps in registers,
// then a fixed-shape shared-memory tree reduction sums the 256 partials: no atomics, bit-identical run
// to run. Grad bias: at::sum over (B, H, W) (ATen's reductions are deterministic).
//
// All element offsets are int64; inputs of any strides are made contiguous first (channels_last inputs
// get a channels_last output, matching ops.depthwise_conv2d's fake kernel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

namespace medattn {
namespace {

constexpr int kTileW = 32;               // output columns per block (one warp wide)
constexpr int kThreadRows = 8;           // thread rows per block
constexpr int kRowsPerThread = 4;        // outputs per thread, stacked vertically
constexpr int kTileH = kThreadRows * kRowsPerThread;  // 32 output rows per block
constexpr int kThreads = kTileW * kThreadRows;        // 256
constexpr size_t kSmemBytes = 48 * 1024;              // no opt-in needed on any architecture
constexpr int kTapBlock = 8;                          // grad-weight taps per thread

template <typename scalar_t, bool kFlip>
__global__ void __launch_bounds__(kThreads)
correlate_kernel(const scalar_t* __restrict__ src, const scalar_t* __restrict__ weight,
                 const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst, int64_t C, int64_t src_h,
                 int64_t src_w, int64_t out_h, int64_t out_w, int64_t row0, int64_t col0, int KH, int KW, int dh,
                 int dw, int khc, int kwc, int64_t tiles_h, int64_t tiles_w) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);

  const int64_t tiles = tiles_h * tiles_w;
  const int64_t plane = blockIdx.x / tiles;
  const int64_t t = blockIdx.x % tiles;
  const int64_t c = plane % C;
  const int64_t out_r0 = (t / tiles_w) * kTileH, out_c0 = (t % tiles_w) * kTileW;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileW + tx;
  const scalar_t* src_plane = src + plane * src_h * src_w;
  const scalar_t* w = weight + c * KH * KW;

  acc_t sum[kRowsPerThread];
  const acc_t init = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) sum[i] = init;

  for (int kh0 = 0; kh0 < KH; kh0 += khc) {
    const int nkh = min(khc, KH - kh0);
    for (int kw0 = 0; kw0 < KW; kw0 += kwc) {
      const int nkw = min(kwc, KW - kw0);
      const int rows_s = kTileH + dh * (nkh - 1), cols_s = kTileW + dw * (nkw - 1);
      const int64_t sr0 = row0 + out_r0 + int64_t(dh) * kh0, sc0 = col0 + out_c0 + int64_t(dw) * kw0;
      __syncthreads();  // the previous chunk's readers are done with the tile
      for (int idx = tid; idx < rows_s * cols_s; idx += kThreads) {
        const int64_t sr = sr0 + idx / cols_s, sc = sc0 + idx % cols_s;
        tile[idx] = (sr >= 0 && sr < src_h && sc >= 0 && sc < src_w) ? static_cast<acc_t>(src_plane[sr * src_w + sc])
                                                                     : acc_t(0);
      }
      __syncthreads();
      for (int kh = 0; kh < nkh; ++kh) {
        for (int kw = 0; kw < nkw; ++kw) {
          const int tap = kFlip ? (KH - 1 - (kh0 + kh)) * KW + (KW - 1 - (kw0 + kw)) : (kh0 + kh) * KW + (kw0 + kw);
          const acc_t wv = static_cast<acc_t>(w[tap]);
          const acc_t* base = tile + (ty + dh * kh) * cols_s + tx + dw * kw;
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) sum[i] += wv * base[i * kThreadRows * cols_s];
        }
      }
    }
  }
  const int64_t oc = out_c0 + tx;
  if (oc >= out_w) return;
  scalar_t* dst_plane = dst + plane * out_h * out_w;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t orow = out_r0 + ty + i * kThreadRows;
    if (orow < out_h) dst_plane[orow * out_w + oc] = static_cast<scalar_t>(sum[i]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x, scalar_t* __restrict__ grad_w,
                   int64_t B, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t ph, int64_t pw, int KH,
                   int KW, int dh, int dw) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kTapBlock][kThreads];
  const int64_t c = blockIdx.x;
  const int kh = blockIdx.y;
  const int kw0 = blockIdx.z * kTapBlock;
  const int tid = threadIdx.x;
  acc_t sum[kTapBlock];
#pragma unroll
  for (int j = 0; j < kTapBlock; ++j) sum[j] = acc_t(0);
  const int64_t per_image = Ho * Wo;
  for (int64_t p = tid; p < B * per_image; p += kThreads) {
    const int64_t b = p / per_image, q = p % per_image, h = q / Wo, wcol = q % Wo;
    const int64_t plane = b * C + c;
    const acc_t g = static_cast<acc_t>(grad_out[plane * per_image + q]);
    const int64_t xr = h - ph + int64_t(dh) * kh;
    if (xr < 0 || xr >= H) continue;
    const scalar_t* xrow = x + (plane * H + xr) * W;
#pragma unroll
    for (int j = 0; j < kTapBlock; ++j) {
      const int64_t xc = wcol - pw + int64_t(dw) * (kw0 + j);
      if (kw0 + j < KW && xc >= 0 && xc < W) sum[j] += g * static_cast<acc_t>(xrow[xc]);
    }
  }
#pragma unroll
  for (int j = 0; j < kTapBlock; ++j) partial[j][tid] = sum[j];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {  // fixed tree: deterministic
    if (tid < stride) {
#pragma unroll
      for (int j = 0; j < kTapBlock; ++j) partial[j][tid] += partial[j][tid + stride];
    }
    __syncthreads();
  }
  if (tid < kTapBlock && kw0 + tid < KW) grad_w[(c * KH + kh) * KW + kw0 + tid] = static_cast<scalar_t>(partial[tid][0]);
}

struct Conv {
  int64_t B, C, H, W, KH, KW, ph, pw, dh, dw, Ho, Wo;
  bool channels_last;
};

Conv check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-D tensor [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "weight: expected shape [C, 1, KH, KW] with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "weight: expected the dtype and device of x");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "padding: expected two non-negative ints, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, "dilation: expected two ints >= 1, got ",
              dilation);
  Conv s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3),
         padding[0], padding[1], dilation[0], dilation[1], 0, 0, false};
  s.Ho = s.H + 2 * s.ph - s.dh * (s.KH - 1);
  s.Wo = s.W + 2 * s.pw - s.dw * (s.KW - 1);
  TORCH_CHECK(s.KH >= 1 && s.KW >= 1 && s.Ho >= 1 && s.Wo >= 1, "x: output size ", s.Ho, "x", s.Wo,
              " is below 1 (kernel ", s.KH, "x", s.KW, ")");
  s.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return s;
}

// Largest tap chunks (kernel rows, kernel columns) whose staged window fits kSmemBytes.
std::pair<int, int> tap_chunks(int64_t KH, int64_t KW, int64_t dh, int64_t dw, size_t elem) {
  int64_t khc = KH, kwc = KW;
  auto bytes = [&] { return size_t(kTileH + dh * (khc - 1)) * size_t(kTileW + dw * (kwc - 1)) * elem; };
  while (bytes() > kSmemBytes) {
    if (dh * (khc - 1) >= dw * (kwc - 1) && khc > 1)
      khc = (khc + 1) / 2;
    else
      kwc = (kwc + 1) / 2;
  }
  return {int(khc), int(kwc)};
}

// dst[p] = bias + correlation of src plane p with its (optionally flipped) kernel; see the header.
void launch_correlate(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& dst,
                      int64_t row0, int64_t col0, const Conv& s, bool flip) {
  const int64_t planes = dst.size(0) * dst.size(1), out_h = dst.size(2), out_w = dst.size(3);
  if (dst.numel() == 0) return;
  const int64_t tiles_h = (out_h + kTileH - 1) / kTileH, tiles_w = (out_w + kTileW - 1) / kTileW;
  const dim3 block(kTileW, kThreadRows);
  const int64_t blocks = planes * tiles_h * tiles_w;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "depthwise_conv2d: too many tiles for one launch (", blocks, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "medattn_depthwise_correlate", [&] {
    using acc = at::opmath_type<scalar_t>;
    const auto [khc, kwc] = tap_chunks(s.KH, s.KW, s.dh, s.dw, sizeof(acc));
    const size_t smem = size_t(kTileH + s.dh * (khc - 1)) * size_t(kTileW + s.dw * (kwc - 1)) * sizeof(acc);
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    auto kernel = flip ? correlate_kernel<scalar_t, true> : correlate_kernel<scalar_t, false>;
    kernel<<<unsigned(blocks), block, smem, stream>>>(
        src.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bp, dst.mutable_data_ptr<scalar_t>(),
        s.C, src.size(2), src.size(3), out_h, out_w, row0, col0, int(s.KH), int(s.KW), int(s.dh), int(s.dw), khc,
        kwc, tiles_h, tiles_w);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor to_layout(const at::Tensor& nchw, bool channels_last) {
  return channels_last ? nchw.contiguous(at::MemoryFormat::ChannelsLast) : nchw;
}

at::Tensor cuda_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Conv s = check_conv(x_in, weight_in, padding, dilation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == s.C && bias.scalar_type() == x.scalar_type(),
                "bias: expected shape [", s.C, "] and the dtype of x, got ", bias.sizes(), " ", bias.scalar_type());
  }
  at::Tensor out = at::empty({s.B, s.C, s.Ho, s.Wo}, x.options());
  launch_correlate(x, weight, bias, out, -s.ph, -s.pw, s, false);
  return to_layout(out, s.channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& weight_in, at::IntArrayRef padding,
                                                             at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const Conv s = check_conv(x_in, weight_in, padding, dilation);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({s.B, s.C, s.Ho, s.Wo}) && grad_in.scalar_type() == x_in.scalar_type(),
              "grad_out: expected shape [", s.B, ", ", s.C, ", ", s.Ho, ", ", s.Wo, "] and the dtype of x, got ",
              grad_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = grad_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor grad_x = at::empty({0}, x_in.options()), grad_w = grad_x, grad_b = grad_x;
  if (mask[0]) {
    at::Tensor gx = at::empty({s.B, s.C, s.H, s.W}, x_in.options());
    launch_correlate(g, weight, at::Tensor(), gx, s.ph - s.dh * (s.KH - 1), s.pw - s.dw * (s.KW - 1), s, true);
    grad_x = to_layout(gx, s.channels_last);
  }
  if (mask[1]) {
    const at::Tensor x = x_in.contiguous();
    grad_w = at::empty({s.C, 1, s.KH, s.KW}, x_in.options());
    const dim3 grid(unsigned(s.C), unsigned(s.KH), unsigned((s.KW + kTapBlock - 1) / kTapBlock));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "medattn_depthwise_weight_grad", [&] {
      weight_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(), s.B, s.C,
          s.H, s.W, s.Ho, s.Wo, s.ph, s.pw, int(s.KH), int(s.KW), int(s.dh), int(s.dw));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (mask[2]) grad_b = g.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(g.scalar_type())).to(g.scalar_type());
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(medattn, CUDA, m) {
  m.impl("_cuda_depthwise_conv2d", &cuda_forward);
  m.impl("_cuda_depthwise_conv2d_backward", &cuda_backward);
}

}  // namespace medattn
