// C++ unit tests of the global spatial attention CPU kernels, through the dispatcher.
#include "test_util.h"

#include <random>

using namespace medattn_test;

int main() {
  at::manual_seed(static_cast<uint64_t>(std::random_device{}()));
  auto forward = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>("medattn::global_spatial_attention");
  auto backward = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const std::optional<at::Tensor>&)>(
      "medattn::global_spatial_attention_backward");
  auto gate = [](const at::Tensor& t) { return t * at::sigmoid(t.mean({1}, true)); };

  for (auto layout : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const std::string tag = layout == at::MemoryFormat::Contiguous ? "nchw" : "channels_last";
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const double tol = dtype == at::kDouble ? 1e-10 : 2e-6;
      auto x = at::randn({2, 7, 17, 23}, at::kDouble).contiguous(layout);
      auto y = at::randn({2, 7, 17, 23}, at::kDouble).contiguous(layout);
      expect_close(forward.call(x.to(dtype), std::nullopt), gate(x), tol, "forward x " + tag);
      expect_close(forward.call(x.to(dtype), y.to(dtype)), gate(x) + gate(y), tol, "forward x+y " + tag);
      // grad_x = g s + (sum_c g x) s (1 - s) / C, from ATen ops
      auto g = at::randn_like(x);
      auto grad_of = [&](const at::Tensor& t) {
        auto s = at::sigmoid(t.mean({1}, true));
        return g * s + (g * t).sum({1}, true) * s * (1 - s) / t.size(1);
      };
      auto [gx, none] = backward.call(g.to(dtype), x.to(dtype), std::nullopt);
      expect_close(gx, grad_of(x), tol, "backward " + tag);
      expect(none.numel() == 0, "backward without y: grad_y has shape [0] " + tag);
      auto [gx2, gy2] = backward.call(g.to(dtype), x.to(dtype), y.to(dtype));
      expect_close(gx2, grad_of(x), tol, "backward x+y, grad x " + tag);
      expect_close(gy2, grad_of(y), tol, "backward x+y, grad y " + tag);
    }
  }
  expect_throws([&] { forward.call(at::randn({2, 3, 4}), std::nullopt); }, "x: expected a 4-D tensor", "rank check");
  expect_throws([&] { forward.call(at::randn({1, 2, 3, 3}), at::randn({1, 2, 3, 4})); }, "y: expected shape", "shape check");
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
