// C++ unit tests of the activated batch norm CPU kernels, through the dispatcher, against the ATen
// composite (batch_norm with weight |w| + eps, then leaky_relu) and its autograd gradients.
#include "test_util.h"

#include <random>

using namespace medattn_test;

int main() {
  at::manual_seed(static_cast<uint64_t>(std::random_device{}()));
  using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  auto forward = op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>(
      "medattn::activated_batch_norm");
  auto backward = op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, double, std::array<bool, 3>)>(
      "medattn::activated_batch_norm_backward");
  const double eps = 1e-5, slope = 0.05;

  for (auto layout : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const std::string tag = layout == at::MemoryFormat::Contiguous ? "nchw" : "channels_last";
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const double tol = dtype == at::kDouble ? 1e-10 : 1e-5;
      auto x = (at::randn({3, 6, 13, 11}, at::kDouble) * 2 + 1).contiguous(layout).requires_grad_();
      auto w = (at::rand({6}, at::kDouble) + 0.5) * at::where(at::rand({6}) < 0.5, -1.0, 1.0);
      auto b = at::randn({6}, at::kDouble);
      w.requires_grad_();
      b.requires_grad_();
      auto composite = at::leaky_relu(
          at::batch_norm(x, w.abs() + eps, b, {}, {}, /*training=*/true, 0.0, eps, false), slope);
      auto [y, mean, var] = forward.call(x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype), eps, slope);
      expect_close(y, composite, tol, "forward " + tag);
      expect_close(mean, x.detach().mean({0, 2, 3}), tol, "mean " + tag);
      expect_close(var, x.detach().var({0, 2, 3}, /*unbiased=*/false), tol, "var " + tag);
      auto g = at::randn_like(composite);
      auto expected = torch::autograd::grad({composite}, {x, w, b}, {g});
      auto got = backward.call(g.to(dtype), y, w.detach().to(dtype), b.detach().to(dtype), var, eps, slope,
                               {true, true, true});
      expect_close(std::get<0>(got), expected[0], tol, "grad x " + tag);
      expect_close(std::get<1>(got), expected[1], tol, "grad weight " + tag);
      expect_close(std::get<2>(got), expected[2], tol, "grad bias " + tag);
    }
  }
  auto w = at::ones({3}), b = at::zeros({3});
  expect_throws([&] { forward.call(at::randn({2, 3, 4}), w, b, eps, slope); }, "x: expected a 4-D tensor", "rank check");
  expect_throws([&] { forward.call(at::randn({2, 3, 4, 4}), w, b, eps, 0.0); }, "negative_slope: expected > 0",
                "slope check");
  expect_throws([&] { forward.call(at::randn({1, 3, 1, 1}), w, b, eps, slope); }, "more than 1 value per channel",
                "batch statistics check");
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
