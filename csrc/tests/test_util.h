// Minimal test support for the ctest unit tests: look up a medattn op through the dispatcher and
// compare tensors by the package's metric (max |a - b| / max |b|).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <string>

namespace medattn_test {

inline int failures = 0;

template <typename Signature>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline double rel_error(const at::Tensor& a, const at::Tensor& b) {
  const auto da = a.to(at::kDouble), db = b.to(at::kDouble);
  const double denom = db.abs().max().item<double>();
  const double err = (da - db).abs().max().item<double>();
  return denom > 0 ? err / denom : err;
}

inline void expect_error_within(double err, double tol, const std::string& what, bool shapes_match = true) {
  const bool ok = err <= tol && shapes_match;
  std::printf("%s %s: rel err %.3e (tol %.1e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
  if (!ok) ++failures;
}

inline void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  expect_error_within(rel_error(a, b), tol, what, a.sizes() == b.sizes());
}

inline void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

template <typename Fn>
inline void expect_throws(Fn&& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    std::printf("%s %s: threw%s\n", ok ? "ok  " : "FAIL", what.c_str(), ok ? "" : (" without '" + needle + "'").c_str());
    if (!ok) ++failures;
    return;
  }
  std::printf("FAIL %s: did not throw\n", what.c_str());
  ++failures;
}

}  // namespace medattn_test
