// The argument checks every CPU kernel shares (declared in medattn/common.h). This file is compiled once,
// with the DEFAULT flags, unlike the kernels (csrc/cpu/*.cpp, once per ISA pass): the messages instantiate
// c10::str's templates, inline functions the linker merges across the library, and a merged copy must
// never be one a vector pass compiled (see medattn/common.h and tools/check_isa_library.py).
#include "medattn/common.h"

namespace medattn {

void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", layout, ", got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16,
              name, ": expected float32, float64 or bfloat16 on CPU, got ", t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating dtype, got ", t.scalar_type());
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_b, ": expected dtype ", a.scalar_type(), " (as ", name_a,
              "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), name_b, ": expected device ", a.device(), " (as ", name_a, "), got ",
              b.device());
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
}

}  // namespace medattn

// The kernels' own TORCH_CHECKs format their messages inline, in every pass. Where the DEFAULT pass inlined a
// c10::str wrapper into all its calls and a vector pass called it out of line, the only copy, and so the one
// the linker kept, was the vector pass's (tools/check_isa_library.py: an AVX2 `vmovq` in the wrapper of
// (message, sizes)). The wrappers the vector passes call are instantiated here, in a DEFAULT object that is
// linked before theirs, so the kept copy is this one.
template struct c10::detail::_str_wrapper<const char*, const c10::IntArrayRef&>;
