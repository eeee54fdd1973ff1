// Which CPU kernel variant runs: detected once from CPUID, overridable by FASTBERT_CPU_ISA.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "common/philox.h"

namespace fastbert::cpu {
namespace {

// The CPU features a variant needs that this CPU lacks, comma-separated ("" when it runs).
// __builtin_cpu_supports takes string literals only, hence the macro.
std::string missing_features(Isa isa) {
  std::string out;
#if FASTBERT_HAVE_X86_ISAS
#define FASTBERT_NEED(feature) \
  if (!__builtin_cpu_supports(feature)) out += (out.empty() ? "" : ", ") + std::string(feature)
  switch (isa) {
    case Isa::avx512bf16:
#if FASTBERT_HAVE_AVX512BF16  // setup.py checked that the compiler knows the name
      FASTBERT_NEED("avx512bf16");
#endif
      [[fallthrough]];
    case Isa::avx512:
      FASTBERT_NEED("avx512f");
      FASTBERT_NEED("avx512bw");
      FASTBERT_NEED("avx512vl");
      FASTBERT_NEED("avx512dq");
      FASTBERT_NEED("fma");
      FASTBERT_NEED("f16c");
      break;
    case Isa::avx2:
      FASTBERT_NEED("avx2");
      FASTBERT_NEED("fma");
      FASTBERT_NEED("f16c");
      break;
    case Isa::generic: break;
  }
#undef FASTBERT_NEED
#else
  if (isa != Isa::generic) out = "x86-64";
#endif
  return out;
}

bool cpu_runs(Isa isa) { return missing_features(isa).empty(); }

bool compiled(Isa isa) {
  if (isa == Isa::avx512bf16) return FASTBERT_HAVE_X86_ISAS && FASTBERT_HAVE_AVX512BF16;
  return FASTBERT_HAVE_X86_ISAS || isa == Isa::generic;
}

constexpr Isa kBestFirst[] = {Isa::avx512bf16, Isa::avx512, Isa::avx2, Isa::generic};

Isa best() {
  for (Isa isa : kBestFirst) {
    if (compiled(isa) && cpu_runs(isa)) return isa;
  }
  return Isa::generic;
}

// Resolves a name to a runnable variant; returns false with a reason otherwise.
bool resolve(const std::string& name, Isa* out, std::string* why) {
  if (name.empty() || name == "auto") {
    *out = best();
    return true;
  }
  for (Isa isa : kBestFirst) {
    if (name != isa_name(isa)) continue;
    if (!compiled(isa)) {
      *why = name + " kernels were not compiled for this architecture" +
             (isa == Isa::avx512bf16 && FASTBERT_HAVE_X86_ISAS ? " (the compiler lacked -mavx512bf16)" : "");
      return false;
    }
    if (!cpu_runs(isa)) {
      *why = "this CPU cannot run the " + name + " kernels (it lacks " + missing_features(isa) + ")";
      return false;
    }
    *out = isa;
    return true;
  }
  *why = "unknown CPU ISA '" + name + "' (expected auto, avx512bf16, avx512, avx2 or generic)";
  return false;
}

std::mutex mu;
std::atomic<int> active{-1};  // -1: not resolved yet
std::string active_error;

void resolve_from_env() {
  std::lock_guard<std::mutex> lock(mu);
  if (active.load() != -1) return;
  const char* env = std::getenv("FASTBERT_CPU_ISA");
  Isa isa;
  std::string why;
  if (resolve(env ? env : "auto", &isa, &why)) {
    active.store(static_cast<int>(isa));
  } else {
    active_error = "FASTBERT_CPU_ISA=" + std::string(env) + ": " + why;
    active.store(-2);
  }
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

std::vector<std::string> isas_compiled() {
  std::vector<std::string> out;
  for (Isa isa : kBestFirst)
    if (compiled(isa)) out.push_back(isa_name(isa));
  return out;
}

std::vector<std::string> isas_supported() {
  std::vector<std::string> out;
  for (Isa isa : kBestFirst) {
    if (compiled(isa) && cpu_runs(isa)) out.push_back(isa_name(isa));
  }
  return out;
}

Isa active_isa() {
  int v = active.load(std::memory_order_relaxed);
  if (v == -1) {
    resolve_from_env();
    v = active.load();
  }
  TORCH_CHECK(v >= 0, "fastbert: ", active_error);
  return static_cast<Isa>(v);
}

std::string active_isa_name() {
  int v = active.load();
  if (v == -1) {
    resolve_from_env();
    v = active.load();
  }
  return v >= 0 ? isa_name(static_cast<Isa>(v)) : "error: " + active_error;
}

void set_isa(const std::string& name) {
  Isa isa;
  std::string why;
  TORCH_CHECK_VALUE(resolve(name, &isa, &why), "fastbert: ", why);
  std::lock_guard<std::mutex> lock(mu);
  active.store(static_cast<int>(isa));
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK_VALUE(false, "fastbert: unsupported dtype ", t.scalar_type());
  }
}

Dropout dropout_of(const at::Tensor& seed, double p) {
  return {static_cast<uint64_t>(seed.reshape(-1)[0].item<int64_t>()), philox::threshold(p), philox::scale(p)};
}

}  // namespace fastbert::cpu
