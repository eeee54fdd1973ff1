// fastbert._C: the module object. Operator schemas are defined in Python (fastbert/ops/*.py);
// csrc only registers implementations, so the ops exist even when this module was not built.
// Here: what the build contains and which CPU kernel variant runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/dispatch.h"
#include "fastbert_build_config.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbert compiled kernels (C++ CPU kernels, CUDA kernels when built with CUDA)";
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["cuda"] = bool(FASTBERT_BUILT_WITH_CUDA);
        d["cuda_arch_list"] = std::string(FASTBERT_CUDA_ARCH_LIST);
        d["cuda_version"] = std::string(FASTBERT_BUILD_CUDA_VERSION);
        d["torch"] = std::string(FASTBERT_BUILD_TORCH);
        d["cpu_isas"] = fastbert::cpu::isas_compiled();
        return d;
      },
      "What this build of fastbert._C contains.");
  m.def("cpu_isa", &fastbert::cpu::active_isa_name,
        "The CPU kernel variant in use (FASTBERT_CPU_ISA or the best this CPU runs).");
  m.def("cpu_isas_supported", &fastbert::cpu::isas_supported,
        "Compiled CPU kernel variants this CPU can run, best first.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        try {
          fastbert::cpu::set_isa(name);
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("name"), "Switch the CPU kernel variant ('auto', 'avx512bf16', 'avx512', 'avx2' or 'generic').");
}
