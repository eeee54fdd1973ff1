#pragma once
// Run-time choice of the CPU kernel variant (glue only; kernel files do not include this).
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "fastbert_build_config.h"

namespace fastbert::cpu {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

const char* isa_name(Isa isa);
std::vector<std::string> isas_compiled();
std::vector<std::string> isas_supported();  // compiled and runnable on this CPU
// The variant in use: FASTBERT_CPU_ISA (auto|avx512bf16|avx512|avx2|generic) or the best this CPU runs.
// Throws if FASTBERT_CPU_ISA names a variant this CPU cannot run or that was not compiled.
Isa active_isa();
std::string active_isa_name();  // as active_isa(), but returns the error text instead of throwing
void set_isa(const std::string& name);  // "auto" or a variant name; throws if not runnable

DType dtype_of(const at::Tensor& t);

// The kernels' dropout parameters from the op's seed tensor (one int64) and probability.
Dropout dropout_of(const at::Tensor& seed, double p);

}  // namespace fastbert::cpu

#if FASTBERT_HAVE_X86_ISAS && FASTBERT_HAVE_AVX512BF16
#define FASTBERT_CPU_CASE_AVX512BF16(fn, ...) \
  case ::fastbert::cpu::Isa::avx512bf16: ::fastbert::cpu::avx512bf16::fn(__VA_ARGS__); break;
#else
#define FASTBERT_CPU_CASE_AVX512BF16(fn, ...)
#endif
#if FASTBERT_HAVE_X86_ISAS
#define FASTBERT_CPU_CALL(fn, ...)                                                        \
  do {                                                                                    \
    switch (::fastbert::cpu::active_isa()) {                                              \
      FASTBERT_CPU_CASE_AVX512BF16(fn, __VA_ARGS__)                                       \
      case ::fastbert::cpu::Isa::avx512: ::fastbert::cpu::avx512::fn(__VA_ARGS__); break; \
      case ::fastbert::cpu::Isa::avx2: ::fastbert::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: ::fastbert::cpu::generic::fn(__VA_ARGS__); break;                          \
    }                                                                                     \
  } while (0)
#else
#define FASTBERT_CPU_CALL(fn, ...) ::fastbert::cpu::generic::fn(__VA_ARGS__)
#endif
