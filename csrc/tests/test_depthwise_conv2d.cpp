// C++ unit tests of the depthwise conv2d CPU kernels against at::conv2d / its autograd, through the dispatcher.
#include "test_util.h"

#include <random>

using namespace medattn_test;

int main() {
  at::manual_seed(static_cast<uint64_t>(std::random_device{}()));
  auto forward = op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               c10::IntArrayRef, c10::IntArrayRef)>("medattn::depthwise_conv2d");
  auto backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, c10::IntArrayRef,
                                                                     c10::IntArrayRef, std::array<bool, 3>)>(
      "medattn::depthwise_conv2d_backward");
  struct Case { int64_t kh, kw, dil; };
  for (auto c : {Case{7, 7, 1}, Case{21, 21, 1}, Case{1, 9, 1}, Case{9, 1, 2}, Case{7, 7, 3}}) {
    const std::string tag = std::to_string(c.kh) + "x" + std::to_string(c.kw) + " d" + std::to_string(c.dil);
    const int64_t C = 5;
    auto x = at::randn({2, C, 37, 29}, at::kDouble).requires_grad_();
    auto w = at::randn({C, 1, c.kh, c.kw}, at::kDouble).requires_grad_();
    auto b = at::randn({C}, at::kDouble).requires_grad_();
    std::vector<int64_t> pad = {c.dil * (c.kh - 1) / 2, c.dil * (c.kw - 1) / 2}, dil = {c.dil, c.dil};
    auto ref = at::conv2d(x, w, b, {1, 1}, pad, dil, C);
    auto g = at::randn_like(ref);
    auto grads = torch::autograd::grad({ref}, {x, w, b}, {g});
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const double tol = dtype == at::kDouble ? 1e-10 : 2e-5;
      const std::string t = tag + (dtype == at::kDouble ? " f64" : " f32");
      auto out = forward.call(x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype), pad, dil);
      expect_close(out, ref.detach(), tol, "forward " + t);
      auto [gx, gw, gb] = backward.call(g.to(dtype), x.detach().to(dtype), w.detach().to(dtype), pad, dil,
                                        {true, true, true});
      expect_close(gx, grads[0], tol, "grad input " + t);
      expect_close(gw, grads[1], tol, "grad weight " + t);
      expect_close(gb, grads[2], tol, "grad bias " + t);
    }
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
