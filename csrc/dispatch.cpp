// The registry behind medattn/dispatch.h: which ISA variants of each CPU kernel this build holds, and
// which one the process uses. Compiled once, with the DEFAULT pass's flags, like ops.cpp.
#include "medattn/dispatch.h"

#include <ATen/Version.h>  // at::get_cpu_capability

#include <array>
#include <map>
#include <mutex>

namespace medattn {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::array<void*, kCpuIsaCount>> kernels;
  std::array<bool, kCpuIsaCount> compiled{};
};

// Function-local static: registrations run from other translation units' static initialisers, in an
// order the language leaves open.
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512:
      return "AVX512";
    case CpuIsa::Avx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

CpuIsa requested_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  // ATen's choice as torch.backends.cpu.get_cpu_capability() reports it ("NO AVX", "AVX2", "AVX512"): the
  // best the CPU supports, or what ATEN_CPU_CAPABILITY asks for. (The enum behind it is not exported.)
  static const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512") return CpuIsa::Avx512;
  if (aten == "AVX2") return CpuIsa::Avx2;
  return CpuIsa::Default;
#else
  // Elsewhere (aarch64: SVE, ppc64: VSX, s390x: ZVECTOR) only the portable pass is built.
  return CpuIsa::Default;
#endif
}

bool register_cpu_kernel(const char* name, CpuIsa isa, void* fn) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.kernels.try_emplace(name).first;  // value-initialised: no variant yet
  it->second[static_cast<int>(isa)] = fn;
  r.compiled[static_cast<int>(isa)] = true;
  return true;
}

void* resolve_cpu_kernel(const char* name, CpuIsa* resolved_isa) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.kernels.find(name);
  TORCH_CHECK(it != r.kernels.end(), "medattn: no CPU kernel named ", name, " was registered");
  for (int isa = static_cast<int>(requested_cpu_isa()); isa >= 0; --isa) {
    if (it->second[isa] != nullptr) {
      if (resolved_isa != nullptr) *resolved_isa = static_cast<CpuIsa>(isa);
      return it->second[isa];
    }
  }
  TORCH_CHECK(false, "medattn: CPU kernel ", name, " has no DEFAULT variant (a build error)");
}

std::vector<std::string> compiled_cpu_isas() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> names;
  for (int isa = 0; isa < kCpuIsaCount; ++isa)
    if (r.compiled[isa]) names.emplace_back(cpu_isa_name(static_cast<CpuIsa>(isa)));
  return names;
}

namespace {

// The ISA whose kernels this process runs: the requested one if this build holds it, else the next
// lower one that it holds (every kernel has all the passes the build compiled).
std::string cpu_isa_in_use() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (int isa = static_cast<int>(requested_cpu_isa()); isa >= 0; --isa)
    if (r.compiled[isa]) return cpu_isa_name(static_cast<CpuIsa>(isa));
  return cpu_isa_name(CpuIsa::Default);
}

}  // namespace

TORCH_LIBRARY_IMPL(medattn, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", &cpu_isa_in_use);
  m.impl("_cpu_isas_compiled", &compiled_cpu_isas);
}

}  // namespace medattn
