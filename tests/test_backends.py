"""Backend choice: priorities, forcing, FASTBERT_BACKEND, availability, `fastbert info`."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastbert
from fastbert import backends
from tests.utils import requires_c

ENV = {**os.environ, "PYTHONWARNINGS": "default"}


def run_py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, **env}, timeout=300)


@requires_c
def test_auto_prefers_compiled_cpu_kernels():
    x = torch.randn(2, 3)
    assert backends.select("bias_gelu", x, None) == "cpu"
    # float64 runs on the cpu backend too; an unknown device type falls back to the reference
    assert backends.select("bias_gelu", x.double(), None) == "cpu"
    assert backends.select("bias_gelu", torch.empty(2, 3, device="meta")) == "reference"


def test_reasons_name_the_problem():
    assert backends.reasons_for("reference", "bias_gelu", {"cpu"}, {torch.float64}) == []
    reasons = backends.reasons_for("cuda", "bias_gelu", {"cpu"}, {torch.float64})
    assert any("tensors on cpu" in r for r in reasons)
    assert any("dtype float64 is not supported" in r for r in reasons)
    if not backends._TRITON_INTERPRET:
        assert any("TRITON_INTERPRET" in r for r in backends.reasons_for("triton", "bias_gelu", {"cpu"}, set()))


def test_converted_tensors_accept_the_dtypes_the_glue_converts():
    """A float64 mask / x_bias (converted by the CUDA glue) does not rule the cuda backend out; a
    float64 tensor whose dtype the kernel takes as is does, and triton takes no float64 x_bias."""
    f32, f64 = {torch.float32}, {torch.float64}
    assert backends.reasons_for("cuda", "masked_softmax", {"cuda"}, f32, f64) == backends.reasons_for(
        "cuda", "masked_softmax", {"cuda"}, f32
    )
    assert backends.reasons_for("cuda", "layernorm_residual", {"cuda"}, f32, f64) == backends.reasons_for(
        "cuda", "layernorm_residual", {"cuda"}, f32
    )
    assert any("float64" in r for r in backends.reasons_for("cuda", "masked_softmax", {"cuda"}, f64))
    assert any("float64" in r for r in backends.reasons_for("cuda", "bias_gelu", {"cuda"}, f32, f64))
    assert any("float64" in r for r in backends.reasons_for("triton", "layernorm_residual", {"cuda"}, f32, f64))
    # a converted tensor's device still counts
    assert any(
        "tensors on cpu" in r
        for r in backends.not_supported_reasons(
            "cuda", "masked_softmax", torch.empty(1, device="meta"), converted=(torch.zeros(1),)
        )
    )


def _fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, backends.ReferenceFallbackWarning)]


def test_auto_warns_once_when_cuda_tensors_run_the_reference(monkeypatch):
    """One ReferenceFallbackWarning per (op, reasons), naming each faster backend's reasons; none
    for CPU tensors or a forced reference."""
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setitem(backends._global, "triton", ["triton is off in this test"])
    with FakeTensorMode(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        x = torch.randn(4, 8, device="cuda", dtype=torch.float64)  # no GPU backend takes float64
        for _ in range(3):
            assert backends.select("bias_gelu", x) == "reference"
        assert backends.select("bias_gelu", x, x[0]) == "reference"  # same reasons: no second warning
        assert backends.select("masked_softmax", x.view(1, 1, 4, 8)) == "reference"  # another op: one more
        with fastbert.backend("reference"):
            backends.select("bias_gelu", x.float())
        backends.select("bias_gelu", torch.randn(2, 2, dtype=torch.float64))  # CPU: no warning
    got = _fallback_warnings(record)
    assert len(got) == 2, got
    assert got[0].startswith("fastbert: bias_gelu runs on the reference backend") and "masked_softmax" in got[1]
    assert "cuda: " in got[0] and "dtype float64 is not supported" in got[0]
    assert "triton: triton is off in this test" in got[0]


@requires_c
def test_reference_fallback_warning_does_not_break_fullgraph_compile(monkeypatch):
    """select's warning is skipped while torch.compile traces (fullgraph=True); eager calls warn."""
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "WARN_DEVICES", ("cpu",))  # CPU tensors stand in for CUDA ones here
    monkeypatch.setitem(backends._global, "cpu", ["cpu is off in this test"])
    x = torch.randn(3, 8)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = torch.compile(lambda t: fastbert.ops.bias_gelu(t, None), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x))
        assert _fallback_warnings(record) == []
        fastbert.ops.bias_gelu(x)
        fastbert.ops.bias_gelu(x)
    torch._dynamo.reset()
    got = _fallback_warnings(record)
    assert len(got) == 1 and "cpu: cpu is off in this test" in got[0]


def test_context_manager_restores_on_error():
    assert backends.current() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with fastbert.backend("reference"):
            assert backends.current() == "reference"
            raise RuntimeError("boom")
    assert backends.current() == "auto"


def test_backend_override_is_per_thread_and_exits_in_any_order():
    """Two threads: each sees only its own ``with fastbert.backend(...)`` (a thread without one sees
    the process default), and exits interleaved A-in, B-in, A-out, B-out leave nothing forced."""
    import threading

    x = torch.randn(2, 3)
    seen, errors = {}, []
    barriers = [threading.Barrier(2) for _ in range(4)]

    def worker(name, forced):
        try:
            barriers[0].wait()
            seen[name, "before"] = backends.current()
            with fastbert.backend(forced):
                barriers[1].wait()  # both threads are inside their blocks now
                seen[name, "inside"] = backends.current(), backends.select("bias_gelu", x)
                barriers[2].wait()
                if name == "b":
                    barriers[3].wait()  # b leaves its block after a has left its own
            if name == "a":
                seen[name, "after"] = backends.current()
                barriers[3].wait()
            else:
                seen[name, "after"] = backends.current()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            for b in barriers:
                b.abort()

    threads = [
        threading.Thread(target=worker, args=("a", "reference")),
        threading.Thread(target=worker, args=("b", "auto")),
    ]
    with fastbert.backend("reference"):  # the main thread's override is not the others'
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert backends.current() == "reference"
    assert not errors, errors
    assert seen["a", "before"] == seen["b", "before"] == "auto"
    assert seen["a", "inside"] == ("reference", "reference")
    assert seen["b", "inside"] == ("auto", backends.select("bias_gelu", x))
    assert seen["a", "after"] == seen["b", "after"] == "auto"
    assert backends.current() == "auto" and backends._last == "auto"


@pytest.mark.parametrize("contextvar_tracing", [True, False], ids=["dynamo-contextvar", "old-dynamo"])
def test_compiled_select_follows_the_backend_choice(monkeypatch, contextvar_tracing):
    """``fullgraph=True`` traces select under an override; switching the backend recompiles (the
    compiled function is guarded on the choice), switching back reuses the first graph. Where dynamo
    traces ContextVar, another thread's override is its own under compile too; the old-dynamo
    fallback (torch 2.11) runs here on any torch."""
    import threading

    from torch._dynamo.testing import CompileCounter

    if contextvar_tracing and not backends._dynamo_traces_contextvar():
        pytest.skip("this torch's dynamo does not trace ContextVar.get")
    monkeypatch.setattr(backends, "_DYNAMO_TRACES_CONTEXTVAR", contextvar_tracing)
    x = torch.randn(2, 3)
    counter = CompileCounter()
    f = torch.compile(lambda t: t + len(backends.select("bias_gelu", t)), fullgraph=True, backend=counter)
    torch._dynamo.reset()
    try:
        auto = len(backends.select("bias_gelu", x))
        torch.testing.assert_close(f(x), x + auto)
        with fastbert.backend("reference"):
            torch.testing.assert_close(f(x), x + len("reference"))
        torch.testing.assert_close(f(x), x + auto)
        assert counter.frame_count == (2 if auto != len("reference") else 1)
        if contextvar_tracing:
            got = {}

            def other():
                with fastbert.backend("reference"):
                    got["other"] = f(x)

            with fastbert.backend(backends.select("bias_gelu", x)):
                t = threading.Thread(target=other)
                t.start()
                t.join(60)
                got["main"] = f(x)
            torch.testing.assert_close(got["other"], x + len("reference"))
            torch.testing.assert_close(got["main"], x + auto)
    finally:
        torch._dynamo.reset()


def test_forced_reference_runs_anywhere():
    x = torch.randn(3, 4)
    with fastbert.backend("reference"):
        assert backends.select("bias_gelu", x) == "reference"


def test_env_var_forces_backend():
    code = (
        "import torch, fastbert; from fastbert import backends;"
        "print(backends.current(), backends.select('bias_gelu', torch.randn(2, 2)))"
    )
    out = run_py(code, FASTBERT_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "reference"]
    bad = run_py("import fastbert", FASTBERT_BACKEND="gpu")
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr
    forced = run_py("import torch, fastbert; fastbert.bias_gelu(torch.randn(2, 2))", FASTBERT_BACKEND="cuda")
    assert forced.returncode != 0 and "BackendUnavailable" in forced.stderr and "tensors on cpu" in forced.stderr


def test_triton_is_imported_only_when_a_triton_kernel_would_run():
    """``import fastbert`` checks that triton is installed without importing it; a forced triton
    backend that cannot run for another reason (CPU tensors without TRITON_INTERPRET) does not import
    it either; ``fastbert.triton`` (attribute access) does, and refreshes the backends."""
    code = (
        "import sys, torch, fastbert\n"
        "from fastbert import backends\n"
        "assert backends._global['triton'] == [] and backends._TRITON_PENDING\n"
        "with fastbert.backend('triton'):\n"
        "    try:\n"
        "        fastbert.bias_gelu(torch.randn(2, 2))\n"
        "    except fastbert.BackendUnavailable as e:\n"
        "        print(e)\n"
        "print('triton' in sys.modules, 'fastbert.triton' in sys.modules)\n"
        "print(fastbert.triton.available, 'triton' in sys.modules, backends._TRITON_PENDING)"
    )
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    forced, before, after = out.stdout.splitlines()[-3:]
    assert "CPU tensors run on triton only under TRITON_INTERPRET=1" in forced
    assert before == "False False"
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        assert after == "True True False"


def test_import_without_extension_degrades_to_reference():
    code = (
        "import sys, warnings, torch; sys.modules['fastbert._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbert\n"
        "print(sum('compiled kernels are unavailable' in str(x.message) for x in w))\n"
        "print(fastbert.backends.select('bias_gelu', torch.randn(2, 2)))\n"
        "y = fastbert.bias_gelu(torch.randn(2, 2))\n"
        "print(fastbert.backends.availability('cpu'))"
    )
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1", "exactly one warning"
    assert lines[1] == "reference"
    assert "fastbert._C is not available" in lines[2]


@pytest.mark.parametrize("as_module", [True, False])
def test_info_tells_the_truth(as_module):
    cmd = [sys.executable, "-m", "fastbert", "info", "--json"] if as_module else ["fastbert", "info", "--json"]
    exe = os.path.join(os.path.dirname(sys.executable), "fastbert")
    if not as_module:
        if not os.path.exists(exe):
            pytest.skip("console script not installed (package not pip-installed)")
        cmd[0] = exe
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    for name in backends.BACKENDS:
        assert info["backends"][name]["available"] == (not backends.availability(name)), name
    assert info["backends"]["reference"]["available"]
    assert info["backends"]["cuda"]["available"] == (
        torch.cuda.is_available() and fastbert._ext.C is not None and fastbert._ext.C.build_info()["cuda"]
    )
    if fastbert._ext.C is not None:
        ext = info["extension"]
        assert ext["cpu_isa_in_use"] == fastbert._ext.C.cpu_isas_supported()[0]
        assert set(ext["cpu_isas_supported"]) <= set(ext["cpu_isas"])
    text = subprocess.run(
        [sys.executable, "-m", "fastbert", "info"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert "backends:" in text.stdout and "bias_gelu" in text.stdout


def test_fastbert_bench_runs_the_suite(tmp_path):
    """``fastbert bench`` (the console script make bench calls) runs fastbert.bench.run from any
    directory: one tiny gelu case, results written where --out says."""
    exe = os.path.join(os.path.dirname(sys.executable), "fastbert")
    if not os.path.exists(exe):
        pytest.skip("console script not installed (package not pip-installed)")
    cmd = [
        exe,
        "bench",
        "--ops",
        "gelu",
        "--dtype",
        "fp32",
        "--shapes",
        "8x16",
        "--case-seconds",
        "0.5",
        "--copy-mib",
        "8",
        "--out",
        str(tmp_path),
        "--no-plots",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bias_gelu" in out.stdout and list(tmp_path.glob("*.json"))
    bad = subprocess.run([exe, "bench", "--ops", "nope"], capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode != 0 and "unknown op" in bad.stderr
