// Every medattn operator schema, declared once (extension-cpp pattern).
//
// Kernels register against these names per dispatch key: the CPU kernels in csrc/cpu/<op>.cpp with
// TORCH_LIBRARY_IMPL(medattn, CPU, m); the GPU kernels from Python (medattn_kernels/ops/<op>.py picks
// Triton or the CUDA C++ kernels of csrc/cuda/, which register under the internal `_cuda_*` names).
// Fake (meta) kernels and autograd formulas are registered from Python.
//
// Conventions
//  * forward ops return whatever the backward needs besides the inputs (log-sum-exp rows for the
//    attention ops, the per-element gradient for the terminal Sobel loss), so autograd saves O(N*D)
//    or less and never an N x N matrix;
//  * every `<op>` has a registered `<op>_backward`, so the backward is itself a dispatchable op;
//  * an "absent" optional gradient is returned as an empty tensor of shape [0].
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>  // torch::autograd::increment_version
#include <torch/library.h>

#include <optional>
#include <tuple>

TORCH_LIBRARY(medattn, m) {
  // ---- runtime CPU ISA dispatch (csrc/dispatch.cpp): the capability whose kernels this process runs
  // ("DEFAULT", "AVX2" or "AVX512", PyTorch's names) and the capabilities compiled into this build.
  m.def("_cpu_isa() -> str");
  m.def("_cpu_isas_compiled() -> str[]");
  // GFLOP/s of independent vector multiply-add chains on every thread of torch's pool, on the ISA pass in
  // use (csrc/cpu/fma_peak.cpp): the compute roofline the benchmark reports beside sgemm.
  m.def("_cpu_vector_fma_gflops(int fmas_per_thread) -> float");

  // ---- global spatial attention: x * sigmoid(mean_c x) (+ the same of y, summed in one pass)
  m.def("global_spatial_attention(Tensor x, Tensor? y=None) -> Tensor");
  // (grad_x, grad_y) of x * sigmoid(mean_c x) (+ the same of y), grad_out read once for both; grad_y has
  // shape [0] when y is not given.
  m.def("global_spatial_attention_backward(Tensor grad_out, Tensor x, Tensor? y=None) -> (Tensor, Tensor)");

  // ---- activated batch norm: leaky_relu(batch_norm(x)) with batch statistics, gamma = |weight| + eps,
  // keeping only its output for backward (InPlace-ABN). Returns (y, mean, var): the biased batch
  // statistics [C] (float32, float64 for float64 x) for the running estimates and the backward.
  // running_mean / running_var (both or neither, [C], any floating dtype): updated in place as ATen's
  // batch_norm does, running = (1 - momentum) * running + momentum * batch statistic (the variance unbiased,
  // x M / (M - 1) for M values per channel), so a BatchNorm layer's bookkeeping costs no op of its own.
  m.def("activated_batch_norm(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope, "
        "Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, float momentum=0.1) "
        "-> (Tensor, Tensor, Tensor)");
  // output_mask = (grad_x, grad_weight, grad_bias); unrequested gradients come back as shape [0]
  m.def(
      "activated_batch_norm_backward(Tensor grad_y, Tensor y, Tensor weight, Tensor bias, Tensor var, float eps, "
      "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- attention, tokens layout [B, H, N, D]; returns (out, lse) with lse [B, H, Nq] in float32
  // (float64 for float64 inputs). gate: optional point-wise logits [B, H, Nq]; out = sigmoid(gate) * attn.
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, float? scale=None, Tensor? gate=None) -> (Tensor, Tensor)");
  m.def(
      "cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float? scale=None, Tensor? gate=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // DIFM: o_a = softmax(s q_a k_b^T) v_b, o_b = softmax(s q_b k_a^T) v_a; returns (o_a, o_b, lse_a, lse_b)
  m.def(
      "bidirectional_cross_attention(Tensor q_a, Tensor k_a, Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, "
      "float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bidirectional_cross_attention_backward(Tensor grad_o_a, Tensor grad_o_b, Tensor q_a, Tensor k_a, "
      "Tensor v_a, Tensor q_b, Tensor k_b, Tensor v_b, Tensor o_a, Tensor o_b, Tensor lse_a, Tensor lse_b, "
      "float? scale=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Tied: S = s r_a r_b^T; o_a = softmax_row(S) v_b, o_b = softmax_col(S)^T v_a;
  // returns (o_a, o_b, lse_row [B,H,Na], lse_col [B,H,Nb])
  m.def(
      "tied_cross_attention(Tensor r_a, Tensor v_a, Tensor r_b, Tensor v_b, float? scale=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "tied_cross_attention_backward(Tensor grad_o_a, Tensor grad_o_b, Tensor r_a, Tensor v_a, Tensor r_b, "
      "Tensor v_b, Tensor o_a, Tensor o_b, Tensor lse_row, Tensor lse_col, float? scale=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // ---- depthwise conv2d, stride 1, zero padding (explicit, resolved by the Python wrapper)
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding, int[2] dilation) -> Tensor");
  // output_mask = (grad_input, grad_weight, grad_bias); unrequested gradients come back as shape [0]
  m.def(
      "depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] padding, int[2] dilation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // CUDA C++ kernels (csrc/cuda/depthwise_conv2d.cu); the Python CUDA kernel chooses them or Triton.
  m.def("_cuda_depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_cuda_depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] padding, "
      "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- multi-scale Sobel boundary loss (terminal node: the forward also forms d loss / d pred when
  // compute_grad, so the backward only rescales it). target: float [B,C,H,W] or int64 labels [B,H,W].
  // reduction: 0 none (per image, [B]), 1 mean, 2 sum. Returns (loss, grad_pred or shape [0]).
  m.def(
      "sobel_boundary_loss(Tensor pred, Tensor target, int[] scales, float[] weights, float eps, "
      "bool from_logits, int ignore_index, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("sobel_boundary_loss_backward(Tensor grad_loss, Tensor grad_pred, int reduction) -> Tensor");
}

// The one mutating schema (activated_batch_norm's running statistics) gets what ATen's generated
// ADInplaceOrView kernels give every in-place op: the version counters of the tensors it writes move, so
// that autograd refuses a backward that saved one of them before this call changed it.
namespace {
using AbnOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using AbnSignature = AbnOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double);

AbnOutputs activated_batch_norm_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                double negative_slope, const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, double momentum) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("medattn::activated_batch_norm", "").typed<AbnSignature>();
  AbnOutputs outputs;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    outputs = op.redispatch(keys & c10::after_ADInplaceOrView_keyset, x, weight, bias, eps, negative_slope,
                            running_mean, running_var, momentum);
  }
  for (const auto* written : {&running_mean, &running_var}) {
    if (written->has_value()) torch::autograd::increment_version(**written);
  }
  return outputs;
}
}  // namespace

TORCH_LIBRARY_IMPL(medattn, ADInplaceOrView, m) {
  m.impl("activated_batch_norm", TORCH_FN(activated_batch_norm_inplace_or_view));
}

#ifdef TORCH_EXTENSION_NAME
// Built as the Python module medattn_kernels._C: importing it runs the registrations above. It has
// no Python-level functions (every entry point is a torch.ops.medattn op), so an empty module suffices.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
