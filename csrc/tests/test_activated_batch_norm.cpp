// C++ unit tests of the activated batch norm CPU kernels, through the dispatcher, against the ATen
// composite (batch_norm with weight |w| + eps, then leaky_relu) and its autograd gradients.
#include "test_util.h"

#include <random>

using namespace medattn_test;

int main() {
  at::manual_seed(static_cast<uint64_t>(std::random_device{}()));
  using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using OptionalTensor = const std::optional<at::Tensor>&;
  auto forward = op<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, OptionalTensor,
                           OptionalTensor, double)>("medattn::activated_batch_norm");
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
      // ATen's batch_norm moves its running estimates in the same call: ours must move them the same way.
      const double momentum = 0.3;
      auto aten_mean = at::randn({6}, at::kDouble), aten_var = at::rand({6}, at::kDouble) + 0.5;
      // copies even in float64 (where .to(dtype) would hand back ATen's buffers, which its backward saved)
      auto running_mean = aten_mean.to(dtype).clone(), running_var = aten_var.to(dtype).clone();
      auto composite = at::leaky_relu(
          at::batch_norm(x, w.abs() + eps, b, aten_mean, aten_var, /*training=*/true, momentum, eps, false), slope);
      auto [y, mean, var] = forward.call(x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype), eps, slope,
                                         running_mean, running_var, momentum);
      expect_close(y, composite, tol, "forward " + tag);
      expect_close(running_mean, aten_mean, tol, "running mean " + tag);
      expect_close(running_var, aten_var, tol, "running var " + tag);
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
  const std::optional<at::Tensor> none;
  auto without_stats = [&](const at::Tensor& x, double slope_arg) {
    return forward.call(x, w, b, eps, slope_arg, none, none, 0.1);
  };
  expect_throws([&] { without_stats(at::randn({2, 3, 4}), slope); }, "x: expected a 4-D tensor", "rank check");
  expect_throws([&] { without_stats(at::randn({2, 3, 4, 4}), 0.0); }, "negative_slope: expected > 0",
                "slope check");
  expect_throws([&] { without_stats(at::randn({1, 3, 1, 1}), slope); }, "more than 1 value per channel",
                "batch statistics check");
  expect_throws([&] { forward.call(at::randn({2, 3, 4, 4}), w, b, eps, slope, at::zeros({3}), none, 0.1); },
                "running_mean, running_var: expected both or neither", "running statistics pair check");
  expect_throws([&] { forward.call(at::randn({2, 3, 4, 4}), w, b, eps, slope, at::zeros({4}), at::ones({4}), 0.1); },
                "running_mean: expected shape [C] = [3]", "running statistics shape check");
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
