"""What fastbert._C contains: CPU ISA variants, CUDA kernels for the CUDA dispatch key, GPU code."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import backends
from tests.utils import requires_c

C = fastbert._ext.C
BUILT_CUDA = C is not None and C.build_info()["cuda"]
requires_cuda_build = pytest.mark.skipif(not BUILT_CUDA, reason="fastbert._C was built without CUDA")


@requires_c
def test_cpu_isa_variants():
    info = C.build_info()
    assert "generic" in info["cpu_isas"]
    supported = C.cpu_isas_supported()
    assert supported[-1] == "generic" and C.cpu_isa() == supported[0]
    for isa in supported:
        C.set_cpu_isa(isa)
        assert C.cpu_isa() == isa
    C.set_cpu_isa("auto")
    with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
        C.set_cpu_isa("sse9")
    for isa in set(info["cpu_isas"]) - set(supported):
        with pytest.raises(ValueError, match=rf"this CPU cannot run the {isa} kernels \(it lacks [a-z0-9_, ]+\)"):
            C.set_cpu_isa(isa)


@requires_c
def test_cpu_isa_list():
    """x86-64 builds hold all four variants, best first; the supported ones keep that order."""
    compiled = C.build_info()["cpu_isas"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert compiled == ["avx512bf16", "avx512", "avx2", "generic"]
    else:
        assert compiled == ["generic"]
    supported = C.cpu_isas_supported()
    assert supported == [isa for isa in compiled if isa in supported]
    if "avx512bf16" in supported:  # it needs everything avx512 needs
        assert "avx512" in supported


def run_with_isa(isa):
    """A fresh interpreter running one op with FASTBERT_CPU_ISA=isa (it prints the variant in use)."""
    code = "import torch, fastbert; print(fastbert._ext.C.cpu_isa()); fastbert.bias_gelu(torch.randn(2, 3))"
    env = {**os.environ, "FASTBERT_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@requires_c
def test_forced_unsupported_cpu_isa_env():
    """FASTBERT_CPU_ISA naming a compiled variant this CPU cannot run fails at the first op, saying why."""
    unsupported = [isa for isa in C.build_info()["cpu_isas"] if isa not in C.cpu_isas_supported()]
    if not unsupported:
        pytest.skip("this CPU runs every compiled variant")
    isa = unsupported[0]
    out = run_with_isa(isa)
    assert out.returncode != 0
    assert out.stdout.startswith(f"error: FASTBERT_CPU_ISA={isa}: this CPU cannot run the {isa} kernels (it lacks ")
    assert f"FASTBERT_CPU_ISA={isa}: this CPU cannot run the {isa} kernels (it lacks " in out.stderr
    with pytest.raises(ValueError, match="expected auto, avx512bf16, avx512, avx2 or generic"):
        C.set_cpu_isa("avx512bf17")


@requires_c
def test_forced_cpu_isa_env():
    out = run_with_isa("generic")
    assert out.returncode == 0 and out.stdout.strip() == "generic", out.stderr
    bad = run_with_isa("mmx")
    assert bad.returncode != 0 and "FASTBERT_CPU_ISA=mmx: unknown CPU ISA" in bad.stderr


def test_ci_builds_cuda():
    """CI sets FASTBERT_BUILD_CUDA=1: then the CUDA kernels must really be in the build."""
    if os.environ.get("FASTBERT_BUILD_CUDA") != "1":
        pytest.skip("FASTBERT_BUILD_CUDA=1 not set (CI sets it)")
    assert BUILT_CUDA


@requires_cuda_build
@pytest.mark.parametrize("op", backends.OPS)
def test_cuda_kernels_registered(op):
    if (op, "cuda") in backends.NOT_IMPLEMENTED:  # by design: the table must stay true
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}_fwd", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{op}_fwd", "CPU")
        return
    for suffix in ("fwd", "bwd"):
        name = f"fastbert::{op}_{suffix}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for path in (
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
        bundled,
    ):
        if path and os.path.exists(path):
            return path
    return None


@requires_cuda_build
def test_so_holds_gpu_code_for_every_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled copy) to list the GPU code")
    so = C.__file__
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, timeout=120).stdout
    listing += subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, timeout=120).stdout
    for arch in C.build_info()["cuda_arch_list"].replace(" ", ";").split(";"):
        if not arch:
            continue
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        assert sm in listing, f"{sm} missing from {so}:\n{listing}"


def test_build_requirements_match_the_metadata():
    """``license = "Apache-2.0"`` (a PEP 639 string) needs setuptools >= 77 to build at all: the
    declared build floor must be at least that (an image with an older setuptools failed at once)."""
    import re

    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    if isinstance(meta["project"].get("license"), str):
        req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
        floor = re.search(r">=\s*(\d+)", req)
        assert floor and int(floor.group(1)) >= 77, f"build-system requires {req!r}; PEP 639 licenses need >= 77"


def test_version_floors_are_the_tested_minimum():
    """pyproject.toml's floors for torch (runtime and build), triton and transformers are exactly the
    versions CI's second environment pins (.ci/min-versions.txt): the oldest ones that are tested."""
    import re

    import tomllib

    root = Path(__file__).resolve().parent.parent
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (root / ".ci" / "min-versions.txt").read_text(), re.M))
    assert set(pins) == {"torch", "triton", "transformers"}, pins
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    lists = {
        "[build-system] requires": meta["build-system"]["requires"],
        "[project] dependencies": meta["project"]["dependencies"],
        "the triton extra": extras["triton"],
        "the test extra": extras["test"],
    }
    expected = {
        "[build-system] requires": "torch",
        "[project] dependencies": "torch",
        "the triton extra": "triton",
        "the test extra": "transformers",
    }

    def release(v):  # "2.11" and "2.11.0" are the same floor
        parts = [int(x) for x in v.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts

    for where, reqs in lists.items():
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
            if name not in pins:
                continue
            floor = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9.]+)", req)
            assert floor, f"{where}: {req!r} must be exactly '{name}>=<floor>'"
            assert release(floor.group(1)) == release(pins[name]), (
                f"{where}: {req!r}, but CI's oldest environment tests {name}=={pins[name]} (.ci/min-versions.txt)"
            )
        assert any(r.startswith(expected[where]) for r in reqs), f"{where} names no {expected[where]} floor"


# simd.h's float_to_bf16 (every bf16 store of the CPU kernels) as a standalone program: raw fp32
# on stdin, the stored bf16 bits on stdout, W lanes at a time and a partial tail.
_BF16_PROGRAM = r"""
#include <cstdio>
#include <vector>
#include "common/simd.h"
using namespace fastbert::simd;
int main() {
  std::vector<float> x;
  float buf[256];
  size_t got;
  while ((got = std::fread(buf, sizeof(float), 256, stdin)) > 0) x.insert(x.end(), buf, buf + got);
  std::vector<bf16> y(x.size());
  const int64_t n = static_cast<int64_t>(x.size());
  int64_t i = 0;
  for (; i + W <= n; i += W) store(&y[i], load(&x[i]));
  if (i < n) store_partial(&y[i], load_partial(&x[i], n - i), n - i);
  std::fwrite(y.data(), sizeof(bf16), y.size(), stdout);
  return 0;
}
"""
# setup.py's ISA_FLAGS for the kernel files.
_ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
_ISA_FLAGS["avx512bf16"] = _ISA_FLAGS["avx512"] + ["-mavx512bf16"]


def _bf16_inputs():
    """fp32 bit patterns: specials, round-to-even halfway cases, subnormals, random patterns and values."""
    import numpy as np

    rng = np.random.default_rng(0)
    special = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFFFFFFFF, 0x7FBFFFFF, 0x7FFF0001,  # NaNs
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,  # max (rounds to inf), near it
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0xBF808000, 0xBF818000,  # halfway: to even
        0x00800000, 0x80800000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,  # smallest normal, subnormals
        0x00008000, 0x00018000, 0x00007FFF, 0x007F8000, 0x007F7FFF,  # subnormal halfway cases
    ]  # fmt: skip
    halfway = (rng.integers(0, 1 << 16, 20000, dtype=np.uint32) << 16) | 0x8000
    parts = [
        np.array(special, dtype=np.uint32),
        rng.integers(0, 1 << 32, 100000, dtype=np.uint32),  # every class, NaN payloads included
        halfway,
        halfway - 1,
        halfway + 1,
        rng.integers(0, 1 << 23, 10000, dtype=np.uint32) | (rng.integers(0, 2, 10000, dtype=np.uint32) << 31),
        (rng.standard_normal(20000) * np.exp2(rng.uniform(-140, 125, 20000))).astype(np.float32).view(np.uint32),
        np.array([0x3F800000] * 5, dtype=np.uint32),  # a partial tail for every W
    ]
    return np.concatenate(parts)


def _vcvtneps2bf16(u):
    """The documented semantics of VCVTNEPS2BF16 (Intel SDM): round to nearest even, NaN truncated and
    made quiet, zero and denormal inputs to a zero of the same sign."""
    import numpy as np

    u = u.astype(np.uint64)
    exp, frac = (u >> 23) & 0xFF, u & 0x7FFFFF
    rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    out = np.where((exp == 0xFF) & (frac != 0), (u >> 16) | 0x40, np.where(exp == 0, (u >> 16) & 0x8000, rne))
    return out.astype(np.uint16)


@pytest.mark.parametrize("isa", list(_ISA_FLAGS))
def test_float_to_bf16_matches_torch(isa, tmp_path):
    """simd.h's fp32 -> bf16 store in each ISA build this CPU runs, against torch's conversion: the same
    bits for every non-NaN value (0x7fc0 for NaN); with AVX512-BF16 the same except what the
    instruction documents (denormal inputs to a signed zero, NaN keeping sign and payload)."""
    import numpy as np

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    if C is None or isa not in C.cpu_isas_supported():
        pytest.skip(f"this CPU does not run {isa} code (or fastbert._C is not built to tell)")
    src = tmp_path / "bf16.cpp"
    src.write_text(_BF16_PROGRAM)
    exe = tmp_path / "bf16"
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math"]
    subprocess.run([*cmd, *_ISA_FLAGS[isa], f"-I{csrc}", str(src), "-o", str(exe)], check=True, timeout=300)
    u = _bf16_inputs()
    got = np.frombuffer(subprocess.run([str(exe)], input=u.tobytes(), capture_output=True, check=True).stdout, "<u2")
    assert got.shape == u.shape
    ref = torch.from_numpy(u.view(np.int32)).view(torch.float32).to(torch.bfloat16).view(torch.int16).numpy()
    ref = ref.view(np.uint16)
    is_nan = ((u >> 23) & 0xFF == 0xFF) & (u & 0x7FFFFF != 0)
    assert np.all((ref[is_nan] & 0x7F80 == 0x7F80) & (ref[is_nan] & 0x7F != 0))  # torch: NaN to a NaN
    if isa == "avx512bf16":
        expected = _vcvtneps2bf16(u)
        denormal = ((u >> 23) & 0xFF == 0) & (u & 0x7FFFFF != 0)
        plain = ~is_nan & ~denormal
        np.testing.assert_array_equal(expected[plain], ref[plain])  # the model is torch's rounding elsewhere
    else:
        expected = np.where(is_nan, np.uint16(0x7FC0), ref)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(hex(u[i]), hex(got[i]), hex(expected[i])) for i in bad[:10]]
