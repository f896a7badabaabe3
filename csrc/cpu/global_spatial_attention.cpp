// Global spatial attention on CPU: out = x * sigmoid(mean_c x) (+ y * sigmoid(mean_c y)).
//
// Memory-bound, so the kernel's job is to touch x once from DRAM. Work is split into (batch, pixel
// tile) items. NCHW: a tile of P pixels across all C channels (L2-sized, see kTileBytes) is summed over
// channels with unit-stride vector loops over pixels, then the same tile is re-read from L2 to write the
// output while the next tile is prefetched. channels_last: each pixel's C values are
// contiguous, so a pixel's channel sum is a vector reduction over C (lane partials, then a fixed-order
// horizontal sum) and its output a vector loop over C.
// Per tile, the gates sigmoid(sum / C) are computed on vectors too (exp_nonpositive, medattn/vec_math.h:
// no libm call per pixel, NaN propagates).
//
// Backward, with s = sigmoid(mean_c x) recomputed rather than saved:
//   d out_c / d x_c' = s [c == c'] + x_c s (1 - s) / C
//   grad_x_c = g_c s + (sum_c' g_c' x_c') s (1 - s) / C
// so one pass forms both channel sums (of x and of g*x) and a second pass, from cache, writes grad_x.
// The two-branch sum's backward does both maps in one call: g is read once for the two.
//
// Explicit at::vec::Vectorized<acc> loops (16 floats per vector in the AVX512 pass, 8 in AVX2 and in the
// portable DEFAULT pass; double for float64); bfloat16 rows are converted to float runs
// (medattn/acc_run.h). Deterministic: every sum has a fixed order, whatever the thread count.
// The output pass writes with streaming stores when the call's maps are larger than a cache keeps
// (medattn/stream_store.h): a normal store would first read every output line from memory.
#include "medattn/acc_run.h"  // load_run, run_target, store_run
#include "medattn/common.h"
#include "medattn/dispatch.h"
#include "medattn/prefetch.h"  // prefetch_line
#include "medattn/stream_store.h"  // streaming_pays, store_maybe_streaming
#include "medattn/vec_math.h"  // Vectorized, exp_nonpositive, lane_sum

#include <algorithm>
#include <initializer_list>
#include <vector>

namespace medattn {
namespace CPU_CAPABILITY {  // one copy per ISA pass (medattn/dispatch.h)
namespace {

// NCHW tile: a pixel range of every channel row, about kTileBytes of input (all inputs the pass reads),
// with runs of at least kMinRun pixels per channel row. Each tile is read twice: once from memory for
// the channel sums, then from L2 for the output pass, while the thread's next tile is prefetched into L2
// (NextTile). So the tile and the next one must both fit in L2 beside the sums: 2 x 128 KiB leaves room
// in the smallest L2 of the x86 cores we target (512 KiB, Zen 2/3). A sweep on a Zen 4 (1 MiB L2), fwd
// and bwd separately, in warm memory (bench/harness.py, keep_freed_memory), two threads, with the
// prefetch: 64 KiB to 1 MiB tiles, 128 and 256 KiB best on every shape, 1 MiB 15-35% slower on the x+y
// pass at (8, 64, 112, 112). The 4 MiB tiles before had been chosen from runs that paid page faults.
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kMinRun = 32;
constexpr int64_t kMaxTilePixels = 65536;  // few channels: long runs anyway, and smaller per-thread buffers
// channels_last tile: pixels of about this many values (a pixel's C values are one contiguous run), at
// least one vector of pixels (tile_pixels rounds up). Small tiles keep the second pass (the output, or
// grad x from g) in L1 and interleave the reads of memory with the streamed writes at a fine grain. Swept
// on a Zen 5, two threads, warm memory, old and new in one process, interleaved: at (2, 32, 48, 64, 64)
// 512 values against 16384 gave fwd 1.86-1.98 / 2.22-2.30 ms, fwd+bwd 4.76-4.98 / 5.38-5.62 (AVX512
// pass; the AVX2 path alike), and of 256 to 16384 values none ran more than 2% faster than 512 at
// (8, 96, 56, 56) or (8, 64, 112, 112) (docs/global_spatial_attention.md).
constexpr int64_t kTileValuesNHWC = 512;

// sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0, e = exp(-|v|) <= 1: exp of a non-positive
// argument only, so no overflow; +-inf give 1 and 0, NaN gives NaN.
template <typename acc>
inline Vectorized<acc> sigmoid(const Vectorized<acc>& v) {
  using Vec = Vectorized<acc>;
  const Vec e = exp_nonpositive(Vec(0) - v.abs());
  const Vec r = Vec(1) / (Vec(1) + e);
  return Vec::blendv(e * r, r, v >= Vec(0));
}

// gates[p] = sigmoid(sums[p] * inv_c) for p < n (both arrays padded to whole vectors).
template <typename acc>
inline void gates_of(const acc* sums, acc* gates, int64_t n, acc inv_c) {
  using Vec = Vectorized<acc>;
  for (int64_t p = 0; p < n; p += Vec::size()) sigmoid(Vec::loadu(sums + p) * Vec(inv_c)).store(gates + p);
}

template <typename acc>
inline int64_t padded(int64_t n) {
  const int64_t V = Vectorized<acc>::size();
  return (n + V - 1) / V * V;
}

enum class Layout { NCHW, NHWC };

inline Layout layout_of(const at::Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) ? Layout::NHWC : Layout::NCHW;
}

inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  return layout == Layout::NHWC ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Pixels per tile: the NCHW tile of `inputs` maps in about kTileBytes, balanced over the image's tiles
// and rounded to whole vectors; channels_last tiles of about kTileValuesNHWC values.
template <typename scalar_t>
int64_t tile_pixels(Layout layout, int64_t C, int64_t HW, int inputs) {
  using acc = acc_t<scalar_t>;
  int64_t want;
  if (layout == Layout::NCHW) {
    want = std::clamp<int64_t>(kTileBytes / (inputs * C * static_cast<int64_t>(sizeof(scalar_t))), kMinRun,
                               kMaxTilePixels);
  } else {
    want = std::max<int64_t>(1, kTileValuesNHWC / C);
  }
  const int64_t tiles = (HW + want - 1) / want;
  return std::min(HW, padded<acc>((HW + tiles - 1) / tiles));
}

// Per-thread buffers of a tile: channel sums and gates per pixel (padded to whole vectors) and
// the bfloat16 conversion runs; whether the output pass streams (medattn/stream_store.h).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
struct TileScratch {
  std::vector<acc> sum0, sum1, sum2, sum3, in0, in1, in2, out;
  bool stream;
  TileScratch(int64_t tile, int64_t run, bool stream_out)
      : sum0(padded<acc>(tile)), sum1(padded<acc>(tile)), sum2(padded<acc>(tile)), sum3(padded<acc>(tile)),
        in0(run_buffer<scalar_t>(run)), in1(run_buffer<scalar_t>(run)), in2(run_buffer<scalar_t>(run)),
        out(run_buffer<scalar_t>(run)), stream(stream_out) {}
};

// sums[p] = sum_c in[c][p] over an NCHW tile (rows of P values, HW apart). Four channel rows per sweep over
// the sums: a sweep loads and stores every running sum, so grouping quarters those loads and stores (part of
// the change measured in docs/global_spatial_attention.md, not timed on its own).
template <typename scalar_t, typename acc>
void channel_sums_nchw(const scalar_t* in, int64_t C, int64_t HW, int64_t P, acc* sums, acc* tmp) {
  using Vec = Vectorized<acc>;
  std::fill(sums, sums + padded<acc>(P), acc(0));
  int64_t c = 0;
  if constexpr (!converts_runs<scalar_t>) {
    for (; c + 4 <= C; c += 4) {
      const acc* r = in + c * HW;
      for_vectors<acc>(P, [&](int64_t p, int64_t n) {
        const Vec a = Vec::loadu(r + p, n) + Vec::loadu(r + HW + p, n);
        const Vec b = Vec::loadu(r + 2 * HW + p, n) + Vec::loadu(r + 3 * HW + p, n);
        (Vec::loadu(sums + p) + (a + b)).store(sums + p);
      });
    }
  }
  for (; c < C; ++c) {
    const acc* row = load_run(in + c * HW, P, tmp);
    for_vectors<acc>(P, [&](int64_t p, int64_t n) { (Vec::loadu(sums + p) + Vec::loadu(row + p, n)).store(sums + p); });
  }
}

// Sum of a pixel's n channel values (lane partials, then the lanes in order).
template <typename acc>
inline acc pixel_sum(const acc* v, int64_t n) {
  using Vec = Vectorized<acc>;
  Vec s(0);
  for_vectors<acc>(n, [&](int64_t c, int64_t count) { s = s + Vec::loadu(v + c, count); });
  return lane_sum(s);
}

// NCHW: the thread's next tile, fetched into L2 while this tile runs its output pass. That pass reads
// only cache and streams its stores past it, so without this a core alternates between reading memory
// (the channel sums) and writing it, its reads idle half the time; and the sums' short runs per channel
// row (a few hundred bytes to a few KiB) end each hardware prefetch stream early. The fetches are spread
// over the output loop, a line per input per step. Measured on a Zen 4, two threads, warm memory: the
// x+y pass at (8, 64, 112, 112) 1.9-2.2 ms forward / 3.5-3.7 ms backward against 2.9-3.7 / 5.5-6.3
// without; at (2, 32, 48, 64, 64) 2.5-3.1 / 4.2-4.7 against 3.6-4.9 / 5.9-6.6. (channels_last tiles
// are one contiguous run, which the hardware prefetchers follow: fetching them measured within +-10%.)
template <typename scalar_t>
struct NextTile {
  // One channel row of the next tile in every input: fetch(offset) prefetches the line at byte `offset` of
  // each (offsets past the row: nothing). Called once per output vector, so a step narrower than a line,
  // as on AVX2, fetches its line twice: cheaper than a test per step.
  struct Row {
    const char* rows[3];
    int n;
    int64_t bytes;
    void fetch(int64_t offset) const {
      if (offset >= bytes) return;
      for (int m = 0; m < n; ++m) prefetch_line<2>(rows[m] + offset);
    }
  };

  const scalar_t* maps[3] = {nullptr, nullptr, nullptr};  // each input at row 0 of the tile
  int n_maps = 0;
  int64_t HW = 0;
  int64_t bytes = 0;  // of each channel row of the tile; 0: no next tile

  NextTile() = default;  // no next tile
  // Pixels [p0, p1) of image b of up to three inputs (null: absent).
  NextTile(int64_t C, int64_t HW_, int64_t b, int64_t p0, int64_t p1, std::initializer_list<const scalar_t*> inputs)
      : HW(HW_), bytes((p1 - p0) * static_cast<int64_t>(sizeof(scalar_t))) {
    for (const scalar_t* in : inputs)
      if (in != nullptr) maps[n_maps++] = in + b * C * HW + p0;
  }

  Row row(int64_t c) const {
    Row r{{nullptr, nullptr, nullptr}, n_maps, bytes};
    for (int m = 0; m < n_maps; ++m) r.rows[m] = reinterpret_cast<const char*>(maps[m] + c * HW);
    return r;
  }
};

template <typename scalar_t, Layout L>
void forward_tile(const scalar_t* const* inputs, int n_inputs, scalar_t* out, int64_t C, int64_t HW, int64_t p0,
                  int64_t p1, TileScratch<scalar_t>& s, const NextTile<scalar_t>& next) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t kBytes = sizeof(scalar_t);
  const int64_t P = p1 - p0;
  const acc inv_c = acc(1) / static_cast<acc>(C);
  acc* gates[2] = {s.sum0.data(), s.sum1.data()};
  for (int i = 0; i < n_inputs; ++i) {
    if constexpr (L == Layout::NCHW) {
      channel_sums_nchw(inputs[i] + p0, C, HW, P, gates[i], s.in0.data());
    } else {
      const acc* tile = load_run(inputs[i] + p0 * C, P * C, s.in0.data());
      for (int64_t p = 0; p < P; ++p) gates[i][p] = pixel_sum(tile + p * C, C);
    }
    gates_of(gates[i], gates[i], P, inv_c);
  }
  // out = x * gate_x (+ y * gate_y): per channel row over pixels (NCHW), per pixel over channels (NHWC).
  // fetch(j) runs once per output vector at lane j (NCHW: the next tile's line at the same byte offset).
  const auto write = [&](const scalar_t* x, const scalar_t* y, scalar_t* o, int64_t n, const auto& gate_x,
                         const auto& gate_y, const auto& fetch) {
    const acc* xv = load_run(x, n, s.in0.data());
    acc* ov = run_target(o, s.out.data());
    if (y == nullptr) {
      write_run(ov, n, s.stream, [&](int64_t j, int64_t cnt) {
        fetch(j);
        return Vec::loadu(xv + j, cnt) * gate_x(j);
      });
    } else {
      const acc* yv = load_run(y, n, s.in1.data());
      write_run(ov, n, s.stream, [&](int64_t j, int64_t cnt) {
        fetch(j);
        return at::vec::fmadd(Vec::loadu(yv + j, cnt), gate_y(j), Vec::loadu(xv + j, cnt) * gate_x(j));
      });
    }
    store_run(ov, o, n);
  };
  const scalar_t* y = n_inputs > 1 ? inputs[1] : nullptr;
  if constexpr (L == Layout::NCHW) {
    const auto gate_x = [&](int64_t j) { return Vec::loadu(gates[0] + j); };
    const auto gate_y = [&](int64_t j) { return Vec::loadu(gates[1] + j); };
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = c * HW + p0;
      const auto row = next.row(c);
      write(inputs[0] + off, y ? y + off : nullptr, out + off, P, gate_x, gate_y,
            [&](int64_t j) { row.fetch(j * kBytes); });
    }
  } else {
    for (int64_t p = p0; p < p1; ++p) {
      const Vec gx(gates[0][p - p0]), gy(n_inputs > 1 ? gates[1][p - p0] : acc(0));
      write(inputs[0] + p * C, y ? y + p * C : nullptr, out + p * C, C, [&](int64_t) { return gx; },
            [&](int64_t) { return gy; }, [](int64_t) {});
    }
  }
}

// Backward of one tile for n_inputs maps (x, and y for the two-branch sum) sharing one grad_out g: one
// pass forms every map's two channel sums (g is read once for both), the second writes every grad.
template <typename scalar_t, Layout L>
void backward_tile(const scalar_t* g, const scalar_t* const* maps, scalar_t* const* grads, int n_inputs, int64_t C,
                   int64_t HW, int64_t p0, int64_t p1, TileScratch<scalar_t>& s, const NextTile<scalar_t>& next) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t kBytes = sizeof(scalar_t);
  const int64_t P = p1 - p0;
  const acc inv_c = acc(1) / static_cast<acc>(C);
  // per map: sum_c x, then s; sum_c g x, then (sum_c g x) s (1 - s) / C
  acc* gate[2] = {s.sum0.data(), s.sum2.data()};
  acc* coef[2] = {s.sum1.data(), s.sum3.data()};
  acc* map_buf[2] = {s.in0.data(), s.in2.data()};
  if constexpr (L == Layout::NCHW) {
    for (int i = 0; i < n_inputs; ++i) {
      std::fill(gate[i], gate[i] + padded<acc>(P), acc(0));
      std::fill(coef[i], coef[i] + padded<acc>(P), acc(0));
    }
    int64_t c = 0;
    if constexpr (!converts_runs<scalar_t>) {
      // Two channel rows per sweep over the running sums (as channel_sums_nchw does with four: here each
      // row brings two loads, of g and of x, and each sweep two sums to load and store).
      for (; c + 2 <= C; c += 2) {
        const scalar_t* gr = g + c * HW + p0;
        for (int i = 0; i < n_inputs; ++i) {
          const scalar_t* xr = maps[i] + c * HW + p0;
          for_vectors<acc>(P, [&](int64_t p, int64_t n) {
            const Vec x0 = Vec::loadu(xr + p, n), x1 = Vec::loadu(xr + HW + p, n);
            (Vec::loadu(gate[i] + p) + (x0 + x1)).store(gate[i] + p);
            const Vec gx = at::vec::fmadd(x1, Vec::loadu(gr + HW + p, n), x0 * Vec::loadu(gr + p, n));
            (Vec::loadu(coef[i] + p) + gx).store(coef[i] + p);
          });
        }
      }
    }
    for (; c < C; ++c) {
      const acc* gr = load_run(g + c * HW + p0, P, s.in1.data());
      for (int i = 0; i < n_inputs; ++i) {
        const acc* xr = load_run(maps[i] + c * HW + p0, P, map_buf[i]);
        for_vectors<acc>(P, [&](int64_t p, int64_t n) {
          const Vec xv = Vec::loadu(xr + p, n);
          (Vec::loadu(gate[i] + p) + xv).store(gate[i] + p);
          at::vec::fmadd(xv, Vec::loadu(gr + p, n), Vec::loadu(coef[i] + p)).store(coef[i] + p);
        });
      }
    }
  } else {
    const acc* gt = load_run(g + p0 * C, P * C, s.in1.data());
    for (int i = 0; i < n_inputs; ++i) {
      const acc* xt = load_run(maps[i] + p0 * C, P * C, map_buf[i]);
      for (int64_t p = 0; p < P; ++p) {
        Vec sx(0), sgx(0);
        for_vectors<acc>(C, [&](int64_t c, int64_t n) {
          const Vec xv = Vec::loadu(xt + p * C + c, n);
          sx = sx + xv;
          sgx = at::vec::fmadd(xv, Vec::loadu(gt + p * C + c, n), sgx);
        });
        gate[i][p] = lane_sum(sx);
        coef[i][p] = lane_sum(sgx);
      }
    }
  }
  for (int i = 0; i < n_inputs; ++i) {
    for (int64_t p = 0; p < P; p += Vec::size()) {
      const Vec sv = sigmoid(Vec::loadu(gate[i] + p) * Vec(inv_c));
      sv.store(gate[i] + p);
      (Vec::loadu(coef[i] + p) * sv * (Vec(1) - sv) * Vec(inv_c)).store(coef[i] + p);
    }
  }
  // grad_i = g * s_i + coef_i, for every map from one read of g. fetch(j) as in forward_tile, during the
  // first map's pass.
  const auto write = [&](int64_t g_off, int64_t n, const auto& s_at, const auto& coef_at, const auto& fetch) {
    const acc* gv = load_run(g + g_off, n, s.in1.data());
    for (int i = 0; i < n_inputs; ++i) {
      acc* ov = run_target(grads[i] + g_off, s.out.data());
      if (i == 0)
        write_run(ov, n, s.stream, [&](int64_t j, int64_t cnt) {
          fetch(j);
          return at::vec::fmadd(Vec::loadu(gv + j, cnt), s_at(0, j), coef_at(0, j));
        });
      else
        write_run(ov, n, s.stream, [&](int64_t j, int64_t cnt) {
          return at::vec::fmadd(Vec::loadu(gv + j, cnt), s_at(i, j), coef_at(i, j));
        });
      store_run(ov, grads[i] + g_off, n);
    }
  };
  if constexpr (L == Layout::NCHW) {
    for (int64_t c = 0; c < C; ++c) {
      const auto row = next.row(c);
      write(c * HW + p0, P, [&](int i, int64_t j) { return Vec::loadu(gate[i] + j); },
            [&](int i, int64_t j) { return Vec::loadu(coef[i] + j); }, [&](int64_t j) { row.fetch(j * kBytes); });
    }
  } else {
    for (int64_t p = p0; p < p1; ++p) {
      const Vec sv[2] = {Vec(gate[0][p - p0]), Vec(n_inputs > 1 ? gate[1][p - p0] : acc(0))};
      const Vec cv[2] = {Vec(coef[0][p - p0]), Vec(n_inputs > 1 ? coef[1][p - p0] : acc(0))};
      write(p * C, C, [&](int i, int64_t) { return sv[i]; }, [&](int i, int64_t) { return cv[i]; }, [](int64_t) {});
    }
  }
}

// Splits B x HW into (batch, pixel tile) items and runs `fn(scratch, b, p0, p1, bn, p0n, p1n)` on each, in
// parallel, with one TileScratch per thread: image b's pixels [p0, p1), and the thread's next item (image
// bn's [p0n, p1n); bn = -1 after its last). The call reads `inputs` maps and writes `outputs`: streamed when
// that is more than a cache keeps (streaming_pays).
template <typename scalar_t, typename Fn>
void for_each_pixel_tile(int64_t B, int64_t C, int64_t HW, Layout layout, int inputs, int outputs, const Fn& fn) {
  const bool stream =
      streaming_pays<scalar_t>((inputs + outputs) * B * C * HW * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t tile = tile_pixels<scalar_t>(layout, C, HW, inputs);
  const int64_t tiles = (HW + tile - 1) / tile;
  // A conversion run is one channel row of a tile (NCHW) or the whole tile (channels_last).
  const int64_t run = layout == Layout::NCHW ? tile : tile * C;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    TileScratch<scalar_t> scratch(tile, run, stream);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, t = item % tiles;
      const int64_t bn = item + 1 < end ? (item + 1) / tiles : -1, tn = (item + 1) % tiles;
      fn(scratch, b, t * tile, std::min(HW, (t + 1) * tile), bn, tn * tile, std::min(HW, (tn + 1) * tile));
    }
    if (stream) stream_fence();
  });
}

void check_map(const at::Tensor& t, const char* name) {
  check_rank(t, 4, name, "[B, C, H, W]");
  check_cpu(t, name);
  check_float(t, name);
}

// The optional second map y, checked against x and in x's layout (undefined when not given).
at::Tensor second_map(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, Layout layout) {
  if (!y_in.has_value()) return at::Tensor();
  check_map(*y_in, "y");
  check_same(x_in, *y_in, "x", "y");
  TORCH_CHECK(y_in->sizes() == x_in.sizes(), "y: expected shape ", x_in.sizes(), " (as x), got ", y_in->sizes());
  return in_layout(*y_in, layout);
}

at::Tensor gsa_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in) {
  check_map(x_in, "x");
  const Layout layout = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  const at::Tensor y = second_map(x_in, y_in, layout);
  at::Tensor out = at::empty_like(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (out.numel() == 0) return out;
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "global_spatial_attention", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int n_inputs = y.defined() ? 2 : 1;
    const auto tile = [&](auto& s, int64_t b, int64_t p0, int64_t p1, int64_t bn, int64_t p0n, int64_t p1n) {
      const scalar_t* inputs[2] = {xp + b * C * HW, yp ? yp + b * C * HW : nullptr};
      const auto next = bn >= 0 && layout == Layout::NCHW ? NextTile<scalar_t>(C, HW, bn, p0n, p1n, {xp, yp})
                                                          : NextTile<scalar_t>();
      if (layout == Layout::NCHW)
        forward_tile<scalar_t, Layout::NCHW>(inputs, n_inputs, op + b * C * HW, C, HW, p0, p1, s, next);
      else
        forward_tile<scalar_t, Layout::NHWC>(inputs, n_inputs, op + b * C * HW, C, HW, p0, p1, s, next);
    };
    for_each_pixel_tile<scalar_t>(B, C, HW, layout, n_inputs, 1, tile);
  });
  return out;
}

// Returns (grad_x, grad_y): grad_y has shape [0] when y is not given.
std::tuple<at::Tensor, at::Tensor> gsa_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& y_in) {
  check_map(x_in, "x");
  check_map(grad_in, "grad_out");
  check_same(x_in, grad_in, "x", "grad_out");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad_out: expected shape ", x_in.sizes(), ", got ", grad_in.sizes());
  const Layout layout = layout_of(x_in);
  const at::Tensor x = in_layout(x_in, layout);
  const at::Tensor g = in_layout(grad_in, layout);
  const at::Tensor y = second_map(x_in, y_in, layout);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = y.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (grad_x.numel() == 0) return {grad_x, grad_y};
  MEDATTN_DISPATCH_FLOATING(x.scalar_type(), "global_spatial_attention_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gyp = y.defined() ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
    const int n_inputs = y.defined() ? 2 : 1;
    const auto tile = [&](auto& s, int64_t b, int64_t p0, int64_t p1, int64_t bn, int64_t p0n, int64_t p1n) {
      const int64_t off = b * C * HW;
      const auto next = bn >= 0 && layout == Layout::NCHW ? NextTile<scalar_t>(C, HW, bn, p0n, p1n, {gp, xp, yp})
                                                          : NextTile<scalar_t>();
      const scalar_t* maps[2] = {xp + off, yp ? yp + off : nullptr};
      scalar_t* grads[2] = {gxp + off, gyp ? gyp + off : nullptr};
      if (layout == Layout::NCHW)
        backward_tile<scalar_t, Layout::NCHW>(gp + off, maps, grads, n_inputs, C, HW, p0, p1, s, next);
      else
        backward_tile<scalar_t, Layout::NHWC>(gp + off, maps, grads, n_inputs, C, HW, p0, p1, s, next);
    };
    for_each_pixel_tile<scalar_t>(B, C, HW, layout, 1 + n_inputs, n_inputs, tile);
  });
  return {grad_x, grad_y};
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
