"""torch.compile sees through every Triton op and can rebuild its kernels: ``python -m
fastbert.triton.trace_check`` traces each ``torch.ops.fastbert.*_triton`` op on fake CUDA tensors
with AOTAutograd (and the public ops with ``torch.compile(fullgraph=True)``), regenerates every
launched kernel from source the way Inductor does, and compiles it for sm_90 with the traced
launch's specialisation (no GPU needed). Runs in subprocesses without TRITON_INTERPRET, under which
the ops are opaque custom ops and the kernels interpreted Python functions."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout):
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a triton that does not load
        pytest.skip(f"triton is not importable ({type(e).__name__}: {e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, f"stdout:\n{proc.stdout[-20000:]}\nstderr:\n{proc.stderr[-5000:]}"


def test_triton_ops_trace_and_their_regenerated_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "trace.json"
    proc, log = _run(["-m", "fastbert.triton.trace_check", "--json", str(out)], tmp_path, 900)
    assert out.exists(), log
    report = json.loads(out.read_text())
    assert report["missing"] == [], log  # every *_triton op has a case, every kernel a traced launch

    traces = report["traces"]
    by_op = {}
    for t in traces:
        assert t["error"] is None, f"{t['label']}: {t['error']}"
        by_op.setdefault(t["op"], []).append(t)
    for op, cases in by_op.items():
        if op == "gather_masked_fwd_triton":  # an opaque custom op by design: no launches to trace
            assert all(c["launches"] == 0 and c["status"].startswith("opaque") for c in cases), cases
        elif op != "torch.compile":
            assert all(c["launches"] > 0 for c in cases), f"{op}: a case traced no Triton launch\n{log}"
    public = [t for t in traces if t["op"] == "torch.compile"]
    assert any("dynamic=True" in t["label"] for t in public) and len(public) >= 10, log

    compiles = report["compiles"]
    assert compiles, log
    for r in compiles:
        assert r["arch"] == 90, r
        assert r["error"] is None, f"{r['name']} ({r['cases']}): {r['error']}"
        assert r["cubin"], f"{r['name']}: no cubin\n{log}"
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, f"{r['name']}: {r['spill_bytes']} bytes spilled ({r['registers']} registers)"
    kernels = {r["kernel"] for r in compiles}
    # the layernorm kernels that call philox_keep through _tile: the regenerated closure must carry it
    assert "fastbert.triton._layernorm_residual_kernels:_ln_fwd_kernel" in kernels, sorted(kernels)
    assert proc.returncode == 0, log


_KERNEL = """
import triton
import triton.language as tl

from fastbert.triton._common import {import_}


@triton.jit
def _dropout_kernel(x_ptr, seed_ptr, y_ptr, n, threshold, BLOCK: tl.constexpr):
    r = tl.arange(0, 1).to(tl.int64)
    c = tl.arange(0, BLOCK)
    keep = {call}(seed_ptr, r, 0, n, threshold, False, 1, BLOCK)
    x = tl.load(x_ptr + c[None, :], mask=(c < n)[None, :], other=0.0)
    tl.store(y_ptr + c[None, :], tl.where(keep, x, 0.0), mask=(c < n)[None, :])
"""

_CHECK = """
import importlib.util, json, sys
import torch
from fastbert.triton import aot, trace_check

out = {{}}
for name in ("aliased", "plain"):
    spec = importlib.util.spec_from_file_location(name, name + ".py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        regen = trace_check.regenerate(mod._dropout_kernel)
    except RuntimeError as e:
        out[name] = str(e)
        continue
    t = torch.empty(64)
    args = dict(x_ptr=t, seed_ptr=torch.empty(1, dtype=torch.int64), y_ptr=t, n=64, threshold=99, BLOCK=64)
    res = aot.compile_one(aot.launch_spec(regen, args, dict(num_warps=4)), 90)
    out[name] = res["error"] or ("ok" if res["cubin"] else "no cubin")
json.dump(out, open("result.json", "w"))
"""


def test_trace_check_catches_a_helper_imported_under_an_alias(tmp_path):
    """The check that would have caught ``from ._common import philox_keep as _keep`` (Inductor's
    regenerated closure defines ``philox_keep``; the kernel calls ``_keep``): the aliased kernel is
    reported, the same kernel with the helper under its own name regenerates and compiles."""
    (tmp_path / "aliased.py").write_text(_KERNEL.format(import_="philox_keep as _keep", call="_keep"))
    (tmp_path / "plain.py").write_text(_KERNEL.format(import_="philox_keep", call="philox_keep"))
    (tmp_path / "check.py").write_text(textwrap.dedent(_CHECK.format()))
    proc, log = _run(["check.py"], tmp_path, 300)
    assert proc.returncode == 0, log
    result = json.loads((tmp_path / "result.json").read_text())
    assert "'_keep' (philox_keep of fastbert.triton._common) is not defined" in result["aliased"], result
    assert result["plain"] == "ok", result
