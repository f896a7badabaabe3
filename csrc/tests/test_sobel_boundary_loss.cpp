// C++ unit tests of the Sobel boundary loss CPU kernel against an ATen composite of design.md's
// formula (and its autograd gradient), through the dispatcher.
#include "test_util.h"

#include <limits>
#include <random>

using namespace medattn_test;

static at::Tensor magnitude(const at::Tensor& u, double eps) {
  const int64_t C = u.size(1);
  auto kx = at::tensor({-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0}, u.options()).view({3, 3}) / 8;
  auto w = at::stack({kx, kx.t()}).unsqueeze(1).repeat({C, 1, 1, 1});
  auto gr = at::conv2d(at::pad(u, {1, 1, 1, 1}, "replicate"), w, std::nullopt, at::IntArrayRef{1}, at::IntArrayRef{0},
                       at::IntArrayRef{1}, C);
  auto gx = gr.slice(1, 0, c10::nullopt, 2), gy = gr.slice(1, 1, c10::nullopt, 2);
  return at::sqrt(gx * gx + gy * gy + eps);
}

int main() {
  at::manual_seed(static_cast<uint64_t>(std::random_device{}()));
  auto loss_op = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                                        c10::ArrayRef<double>, double, bool, int64_t, int64_t, bool)>(
      "medattn::sobel_boundary_loss");
  const double eps = 1e-6;
  auto pred = at::softmax(at::randn({2, 4, 17, 23}, at::kDouble), 1).requires_grad_();
  auto labels = at::randint(0, 4, {2, 17, 23}, at::kLong);
  auto onehot = at::one_hot(labels, 4).permute({0, 3, 1, 2}).to(at::kDouble);
  at::Tensor ref = at::zeros({}, pred.options());
  for (int64_t s : {1, 2, 4}) {
    auto ps = s == 1 ? pred : at::avg_pool2d(pred, {s, s}, {s, s});
    auto ys = s == 1 ? onehot : at::avg_pool2d(onehot, {s, s}, {s, s});
    ref = ref + (magnitude(ps, eps) - magnitude(ys, eps)).abs().mean();
  }
  auto grad_ref = torch::autograd::grad({ref}, {pred})[0];
  const std::vector<int64_t> scales = {1, 2, 4};
  const std::vector<double> weights = {1.0, 1.0, 1.0};
  const int64_t no_ignore = std::numeric_limits<int64_t>::min();  // the package's "no ignore_index" sentinel
  for (auto [target, name] : {std::pair{onehot, "one-hot"}, std::pair{labels, "int64 labels"}}) {
    auto [loss, grad] = loss_op.call(pred.detach(), target, scales, weights, eps, false, no_ignore, 1, true);
    expect_close(loss, ref.detach(), 1e-10, std::string("loss, ") + name);
    expect_close(grad, grad_ref, 1e-10, std::string("grad, ") + name);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
