"""What fastbert._C contains: CPU ISA variants, CUDA kernels for the CUDA dispatch key, GPU code."""

import os
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
        with pytest.raises(ValueError, match=f"this CPU cannot run the {isa} kernels"):
            C.set_cpu_isa(isa)


@requires_c
def test_forced_cpu_isa_env():
    code = "import torch, fastbert; print(fastbert._ext.C.cpu_isa()); fastbert.bias_gelu(torch.randn(2, 3))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTBERT_CPU_ISA": "generic"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "generic", out.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FASTBERT_CPU_ISA": "mmx"},
    )
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
