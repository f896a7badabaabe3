// Runtime CPU ISA dispatch (ATen's DispatchStub, reduced to what the medattn ops need).
//
// Each csrc/cpu/<op>.cpp is compiled once per capability into the same extension (setup.py and
// CMakeLists.txt own the list):
//     DEFAULT  portable baseline (x86-64 without AVX; the only pass on other architectures)
//     AVX2     -mavx2 -mfma -mf16c
//     AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// with -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>, the macros ATen's own kernels are built with, so
// that at::vec::Vectorized<T> (in the inline namespace at::vec::CPU_CAPABILITY) is the AVX2 / AVX-512 /
// portable vector of that pass. An op file puts its kernels in `namespace medattn::CPU_CAPABILITY`, registers
// each entry point with MEDATTN_REGISTER_CPU_KERNEL(fn) and, once, in the DEFAULT pass only, binds the
// schema to the dispatcher with MEDATTN_CPU_DISPATCH(fn):
//
//     namespace medattn {
//     namespace CPU_CAPABILITY { at::Tensor my_forward(const at::Tensor& x) { ... } }
//     MEDATTN_REGISTER_CPU_KERNEL(my_forward);
//     MEDATTN_CPU_OPS(m) { m.impl("my_op", MEDATTN_CPU_DISPATCH(my_forward)); }
//     }
//
// The capability used is PyTorch's own choice, at::get_cpu_capability(): the best the CPU
// supports, or what the ATEN_CPU_CAPABILITY environment variable asks for (default / avx2 / avx512), so
// one switch drives ATen and medattn alike. A capability this build lacks falls back to the next lower one.
//
// Inline functions that several passes instantiate (std:: templates, c10 helpers) are merged by the
// linker, which keeps the first copy it meets; the build links the DEFAULT objects first, then AVX2, then
// AVX512, so whichever copy is kept was compiled for an ISA no higher than its caller's.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <vector>

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu sources are compiled once per ISA with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (see setup.py)"
#endif

namespace medattn {

enum class CpuIsa : int { Default = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kCpuIsaCount = 3;

#if defined(CPU_CAPABILITY_AVX512)
constexpr CpuIsa kThisIsa = CpuIsa::Avx512;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr CpuIsa kThisIsa = CpuIsa::Avx2;
#elif defined(CPU_CAPABILITY_DEFAULT)
constexpr CpuIsa kThisIsa = CpuIsa::Default;
#else
#error "CPU_CAPABILITY must be DEFAULT, AVX2 or AVX512 (with the matching CPU_CAPABILITY_<name> macro)"
#endif

// Implemented once, in csrc/dispatch.cpp.
const char* cpu_isa_name(CpuIsa isa);                                 // "DEFAULT" | "AVX2" | "AVX512"
CpuIsa requested_cpu_isa();                                           // PyTorch's capability on x86, else DEFAULT
bool register_cpu_kernel(const char* name, CpuIsa isa, void* fn);     // static-initialisation time
void* resolve_cpu_kernel(const char* name, CpuIsa* resolved_isa);     // best registered <= requested
std::vector<std::string> compiled_cpu_isas();                        // passes linked into this build

namespace detail {
// The op-level function bound to the dispatcher: resolves the ISA variant once (the capability is fixed
// for the life of the process, as ATen's is) and forwards to it.
template <typename Tag, typename Fn>
struct CpuKernelDispatch;
template <typename Tag, typename R, typename... Args>
struct CpuKernelDispatch<Tag, R (*)(Args...)> {
  static R call(Args... args) {
    static const auto fn = reinterpret_cast<R (*)(Args...)>(resolve_cpu_kernel(Tag::name, nullptr));
    return fn(std::forward<Args>(args)...);
  }
};
}  // namespace detail

}  // namespace medattn

// In namespace medattn, after the definition of CPU_CAPABILITY::fn: this pass's variant of fn.
#define MEDATTN_REGISTER_CPU_KERNEL(fn)                                                                      \
  struct fn##_cpu_kernel_tag {                                                                               \
    static constexpr const char* name = #fn;                                                                 \
  };                                                                                                         \
  [[maybe_unused]] static const bool fn##_registered_for_this_isa =                                         \
      ::medattn::register_cpu_kernel(#fn, ::medattn::kThisIsa, reinterpret_cast<void*>(&CPU_CAPABILITY::fn))

#if defined(CPU_CAPABILITY_DEFAULT)
// The schema bindings: compiled in the DEFAULT pass only, so each op is registered once.
#define MEDATTN_CPU_OPS(m) TORCH_LIBRARY_IMPL(medattn, CPU, m)
#else
// Other passes compile the bindings into an unused function (kept type-checked, never registered).
#define MEDATTN_CPU_OPS(m) [[maybe_unused]] static void medattn_cpu_ops_unused_in_this_pass(torch::Library& m)
#endif

// A function pointer with fn's signature that runs the variant of fn for the process's CPU capability.
#define MEDATTN_CPU_DISPATCH(fn) \
  (&::medattn::detail::CpuKernelDispatch<fn##_cpu_kernel_tag, decltype(&CPU_CAPABILITY::fn)>::call)
