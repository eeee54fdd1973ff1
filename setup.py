"""Build fastbert._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  FASTBERT_BUILD_CUDA=auto|0|1   auto (default) builds CUDA kernels when torch.version.cuda is set and
                                 nvcc is found; 1 requires them and fails loudly; 0 never builds them.
  CUDA_HOME                      toolkit root; defaults to /usr/local/cuda when unset and present.
  TORCH_CUDA_ARCH_LIST           defaults to "8.0;9.0" when no GPU is visible.
  MAX_JOBS                       parallel compile jobs; defaults to the number of cores.

CPU kernels (csrc/cpu/*_kernel.cpp) are compiled once per instruction set (avx512bf16, avx512, avx2,
generic) with their own flags and chosen at run time; everything else (the glue) is compiled once.
avx512bf16 is left out (with a note) when the compiler lacks -mavx512bf16 (GCC < 10).
"""

import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    # The nvcc first on PATH may be a wrapper script from which torch guesses a wrong root.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

X86 = platform.machine().lower() in ("x86_64", "amd64")
# Per-ISA flags for the kernel files, never tuned to the build machine: the wheel must run on other
# CPUs, which pick their variant at run time.
ISA_FLAGS = {"generic": []}
if X86:
    ISA_FLAGS["avx2"] = ["-mavx2", "-mfma", "-mf16c"]
    ISA_FLAGS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    # avx512 plus the AVX512-BF16 conversions (VCVTNEPS2BF16) for bf16 stores: Cooper Lake, Sapphire
    # Rapids and later, Zen 4 and later.
    ISA_FLAGS["avx512bf16"] = ISA_FLAGS["avx512"] + ["-mavx512bf16"]


def want_cuda():
    mode = os.environ.get("FASTBERT_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTBERT_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} was built without CUDA")
    if nvcc is None or not nvcc.exists():
        missing.append(f"nvcc not found (CUDA_HOME={home!r})")
    if missing and mode == "1":
        sys.exit("FASTBERT_BUILD_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(missing))
    if missing:
        print("fastbert: building without CUDA kernels: " + "; ".join(missing), file=sys.stderr)
    return not missing


def cuda_arch_list():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:  # a GPU is visible: torch compiles for it; record what it will pick
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = ";".join(f"{a}.{b}" for a, b in caps)
    return arch


def nvidia_include_dirs():
    """Headers of the nvidia-* wheels (cusparse.h for CUDA 13 lives in nvidia/cu13/include)."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "cusparse", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def compiler_accepts(cxx, flags, code):
    """Whether `cxx flags` compiles `code` (a probe for ISA flags that older compilers lack)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text(code)
        cmd = [cxx, *flags, "-c", str(src), "-o", str(Path(tmp, "probe.o"))]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


# The intrinsic the kernels use and the CPUID check dispatch.cpp makes (both GCC >= 10).
BF16_PROBE = """#include <immintrin.h>
__m256bh f(__m512 x) { return _mm512_cvtneps_pbh(x); }
int g() { return __builtin_cpu_supports("avx512bf16"); }
"""
if "avx512bf16" in ISA_FLAGS and not compiler_accepts(
    os.environ.get("CXX", "c++"), ISA_FLAGS["avx512bf16"], BF16_PROBE
):
    print("fastbert: the C++ compiler lacks -mavx512bf16: no avx512bf16 CPU kernels", file=sys.stderr)
    del ISA_FLAGS["avx512bf16"]


def write_if_changed(path, text):
    path = Path(path)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class BuildExt(cpp_extension.BuildExtension):
    """Compiles the per-ISA kernel objects with ninja (own flags per ISA), then the extension."""

    def finalize_options(self):
        super().finalize_options()
        # A fixed build folder (editable installs otherwise use a new temporary one each time), so
        # ninja recompiles only what changed.
        self.build_temp = str(ROOT / "build" / "temp")

    def build_extensions(self):
        for ext in self.extensions:
            ext.extra_objects += self.build_isa_objects()
        super().build_extensions()

    def build_isa_objects(self):
        kernels = sorted(glob.glob(str(ROOT / "csrc" / "cpu" / "*_kernel.cpp")))
        out = Path(self.build_temp).resolve() / "isa"
        out.mkdir(parents=True, exist_ok=True)
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        base = [
            "-O3",
            "-std=c++17",
            "-fPIC",
            "-fvisibility=hidden",
            "-ffp-contract=fast",
            "-fno-math-errno",
            "-fno-trapping-math",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{ROOT / 'csrc'}",
        ]
        cxx = os.environ.get("CXX", "c++")
        lines = [
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
            "",
        ]
        objects = []
        for isa, flags in ISA_FLAGS.items():
            for src in kernels:
                obj = out / isa / (Path(src).stem + ".o")
                objects.append(str(obj))
                allflags = base + flags + [f"-DFASTBERT_ISA={isa}"]
                lines += [
                    f"build {obj}: cxx {src}",
                    f"  cxx = {cxx}",
                    f"  flags = {' '.join(shlex.quote(f) for f in allflags)}",
                    "",
                ]
        write_if_changed(out / "build.ninja", "\n".join(lines))
        if shutil.which("ninja"):
            subprocess.check_call(["ninja", "-C", str(out), "-j", os.environ["MAX_JOBS"]])
        else:  # no ninja (e.g. an offline GPU box): compile serially, every time
            for isa, flags in ISA_FLAGS.items():
                for src in kernels:
                    obj = out / isa / (Path(src).stem + ".o")
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    subprocess.check_call([cxx, *base, *flags, f"-DFASTBERT_ISA={isa}", "-c", src, "-o", str(obj)])
        return objects


def make_extension():
    with_cuda = want_cuda()
    glue = sorted(glob.glob("csrc/*.cpp")) + sorted(
        f for f in glob.glob("csrc/cpu/*.cpp") if not f.endswith("_kernel.cpp")
    )
    arch = cuda_arch_list() if with_cuda else ""
    gen = ROOT / "build" / "generated"
    write_if_changed(
        gen / "fastbert_build_config.h",
        "\n".join(
            [
                "#pragma once",
                f"#define FASTBERT_BUILT_WITH_CUDA {int(with_cuda)}",
                f'#define FASTBERT_CUDA_ARCH_LIST "{arch}"',
                f'#define FASTBERT_BUILD_TORCH "{torch.__version__}"',
                f'#define FASTBERT_BUILD_CUDA_VERSION "{torch.version.cuda if with_cuda else ""}"',
                f'#define FASTBERT_CPU_ISAS "{",".join(ISA_FLAGS)}"',
                f"#define FASTBERT_HAVE_X86_ISAS {int(X86)}",
                f"#define FASTBERT_HAVE_AVX512BF16 {int('avx512bf16' in ISA_FLAGS)}",
                "",
            ]
        ),
    )
    cxx = ["-O3", "-fopenmp", f"-I{gen}", f"-I{ROOT / 'csrc'}"]
    # libgomp.so.1 is the SONAME torch ships and loads first, so this links to torch's OpenMP runtime.
    link = ["-fopenmp"]
    if not with_cuda:
        return cpp_extension.CppExtension("fastbert._C", glue, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    sources = glue + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    inc = [f"-I{d}" for d in nvidia_include_dirs()]
    nvcc = ["-O3", "-lineinfo", f"-I{ROOT / 'csrc'}"] + inc
    return cpp_extension.CUDAExtension(
        "fastbert._C",
        sources,
        define_macros=[("FASTBERT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + inc, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["fastbert", "fastbert.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
