"""Every Triton kernel lowers for real GPUs, with the specialisations the tests launch:
``python -m fastbert.triton.aot`` compiles for sm_80 and sm_90 (no GPU needed), and each compile
must produce a cubin without register spills. Compiled are

* every launch the session's other tests made (tests/triton_launches.py records them, and
  tests/conftest.py runs this test last), as ``launch_spec`` turns it into exactly what a CUDA
  launch specialises to (ints equal to 1 become constants, multiples of 16 and 16-byte-aligned
  pointers get ``tt.divisibility``, i32 or i64 by value, the backend's default ``num_stages``);
* the ``AOT_SPECS`` of the fastbert.triton modules: production BERT shapes the tests do not run.

Run alone (nothing recorded), the test first launches each op's forward and backward kernels on a
few small shapes with the edge cases (``triton_launches.drive``), so it still compiles what real
launches specialise to, not hand-written signatures only.

The compiles run in a subprocess without TRITON_INTERPRET, which would turn the kernels into
interpreted Python functions."""

import json
import os
import subprocess
import sys

import pytest

from tests import triton_launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


def test_triton_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a triton that does not load
        pytest.skip(f"triton is not importable ({type(e).__name__}: {e})")
    import fastbert

    assert fastbert.triton.available, fastbert.triton.error
    if not triton_launches.SPECS:  # run alone: launch the ops' kernels here
        with triton_launches.recording():
            triton_launches.drive()
    assert not triton_launches.ERRORS, "\n".join(triton_launches.ERRORS[:20])
    recorded = {s["name"] for s in triton_launches.SPECS.values()}
    assert recorded, "no Triton launch was recorded"
    launches = tmp_path / "launches.json"
    triton_launches.dump(str(launches))

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbert.triton.aot",
            "--arch",
            *map(str, ARCHS),
            "--json",
            str(out),
            "--launches",
            str(launches),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = f"stdout:\n{proc.stdout[-20000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.exists(), log
    report = json.loads(out.read_text())
    results = report["results"]
    assert results, log
    assert report["uncovered"] == [], log

    by_name = {}
    for r in results:
        by_name.setdefault(r["name"], {})[r["arch"]] = r
    missing = recorded - {r["name"] for r in results if r["launch"]}
    assert not missing, f"recorded launches not compiled: {sorted(missing)[:20]}\n{log}"
    for name, per_arch in by_name.items():
        assert sorted(per_arch) == sorted(ARCHS), f"{name}: compiled for {sorted(per_arch)}\n{log}"
        for arch, r in per_arch.items():
            assert r["error"] is None, f"{name} sm_{arch}: {r['error']}"
            assert r["cubin"], f"{name} sm_{arch}: no cubin\n{log}"
            assert r["registers"] is not None and 0 < r["registers"] <= 255, f"{name} sm_{arch}: {r}"
            assert r["spill_bytes"] == 0, (
                f"{name} sm_{arch}: {r['spill_stores']} bytes spill stores, "
                f"{r['spill_loads']} bytes spill loads ({r['registers']} registers)"
            )
    assert proc.returncode == 0, log


def test_launch_spec_specialises_as_a_cuda_launch():
    """``launch_spec`` gives what Triton's JIT computes on a CUDA launch: an int equal to 1 becomes
    a constant, multiples of 16 and 16-byte-aligned pointers get ``tt.divisibility`` 16 (an
    interpreter CPU tensor or a FakeTensor counts as a fresh CUDA allocation plus its storage
    offset), i32/i64 by value, floats fp32, the backend's default num_stages."""
    pytest.importorskip("triton")
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastbert.triton import aot
    from fastbert.triton._layernorm_residual_kernels import _ln_fwd_kernel

    def spec(x, res, w, n, rows_per_prog, threshold):
        args = dict(
            x_ptr=x,
            res_ptr=res,
            w_ptr=w,
            b_ptr=w,
            xb_ptr=x,
            seed_ptr=x,
            y_ptr=x,
            mean_ptr=w,
            rstd_ptr=w,
            rows=3,
            n=n,
            rows_per_prog=rows_per_prog,
            eps=1e-12,
            threshold=threshold,
            scale=1.0,
            HAS_XBIAS=False,
            DROPOUT=False,
            GROUPED=False,
            LOOPED=False,
            BLOCK_M=4,
            BLOCK_N=16,
        )
        return aot.launch_spec(_ln_fwd_kernel, args, {"num_warps": 4})

    with FakeTensorMode():
        base = torch.empty(64, device="cuda")
    cpu = torch.empty(64)
    for t in (cpu, base):  # an interpreter CPU tensor, a FakeTensor
        s = spec(t[:3].view(3, 1), t[1:4].view(3, 1), t[8:9], 1, 2**40 + 1, 5)
        assert s["constexprs"]["n"] == 1 and "n" not in s["signature"]
        assert s["signature"]["rows_per_prog"] == "i64" and s["signature"]["eps"] == "fp32"
        assert "x_ptr" in s["divisible_by_16"] and "res_ptr" not in s["divisible_by_16"]
        assert "rows_per_prog" not in s["divisible_by_16"] and "threshold" not in s["divisible_by_16"]
        assert s["num_warps"] == 4 and s["num_stages"] == 3
    s = spec(base[4:7].view(3, 1), base[:3].view(3, 1), base[32:64], 32, 64, 0)
    assert s["signature"]["n"] == "i32" and s["signature"]["rows_per_prog"] == "i32"
    assert {"x_ptr", "res_ptr", "n", "rows_per_prog", "threshold"} <= set(s["divisible_by_16"])
    assert s["attrs"]["n"] == [["tt.divisibility", 16]]
    one = spec(base[4:7].view(3, 1), base[:3].view(3, 1), base[32:64], 32, 64, 1)
    assert one["constexprs"]["threshold"] == 1 and aot.spec_key(one) != aot.spec_key(s)
