"""The lean core: ``pip install fastbert`` needs only torch, ``import fastbert`` imports no optional
package (triton loads at the first Triton kernel), and a missing extra is one clear error naming the
pip command. Each check runs in a fresh interpreter; a missing package is simulated by
``sys.modules[name] = None`` (which makes its import fail) before fastbert is imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("triton", "tokenizers", "tqdm", "safetensors", "matplotlib", "transformers")


def run_py(code, blocked=(), timeout=600, **env):
    """Run ``code`` in a fresh interpreter with the ``blocked`` modules made unimportable; ``env``
    entries set (a ``None`` value removes the variable)."""
    full_env = {k: v for k, v in os.environ.items() if k not in env}
    full_env.update({k: v for k, v in env.items() if v is not None})
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_import_fastbert_imports_no_optional_package():
    """(torch itself imports tqdm where it is installed: only what fastbert adds counts.)"""
    out = run_py(
        """
        import json, torch
        before = set(sys.modules)
        import fastbert
        added = sorted(set(sys.modules) - before)
        print(json.dumps({"added": added, "triton": "triton" in sys.modules}))
        """,
        TRITON_INTERPRET=None,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert not got["triton"], "import fastbert imported triton"
    for name in (*OPTIONAL, "fastbert.triton", "torch._dynamo"):  # torch._dynamo imports triton
        assert name not in got["added"], f"import fastbert imported {name}"


def test_core_runs_without_any_extra():
    """Every optional package missing: import fastbert, run an op (forward and backward) on the
    automatic backend; triton is then only a reason naming its extra."""
    out = run_py(
        """
        import torch, fastbert
        x = torch.randn(4, 8, requires_grad=True)
        fastbert.bias_gelu(x, torch.randn(8)).sum().backward()
        assert x.grad is not None
        print(fastbert.backends.availability("triton"))
        with fastbert.backend("triton"):
            try:
                fastbert.bias_gelu(torch.randn(2, 2))
            except fastbert.BackendUnavailable as e:
                print(e)
        """,
        blocked=OPTIONAL,
        TRITON_INTERPRET="1",
    )
    assert out.returncode == 0, out.stderr
    reasons, forced = out.stdout.splitlines()[-2:]
    assert "pip install 'fastbert[triton]'" in reasons
    assert "backend 'triton' cannot run bias_gelu" in forced and "pip install 'fastbert[triton]'" in forced


@pytest.mark.parametrize(
    "blocked,code",
    [
        (
            "tokenizers",
            "from fastbert.data import WordPieceTokenizer\n"
            "WordPieceTokenizer.train_from_texts(['a b c'], vocab_size=10)",
        ),
        ("tqdm", "from fastbert.train import pretrain\npretrain(None, [], None, None, 'unused')"),
        (
            "matplotlib",
            "import pathlib, tempfile\n"
            "from fastbert.train.plot import loss_curve_png\n"
            "loss_curve_png([{'step': 1, 'loss': 1.0}], pathlib.Path(tempfile.mkdtemp()) / 'loss.png')",
        ),
        (
            "safetensors",
            "import pathlib, tempfile\n"
            "from fastbert.models.checkpoint import read_state_dict\n"
            "d = pathlib.Path(tempfile.mkdtemp()); (d / 'model.safetensors').write_bytes(b'')\n"
            "read_state_dict(d)",
        ),
    ],
    ids=["tokenizers", "tqdm", "matplotlib", "safetensors"],
)
def test_missing_extra_names_the_pip_command(blocked, code):
    out = run_py(
        f"""
import fastbert
from fastbert._optional import MissingExtra
try:
{textwrap.indent(code, "    ")}
except MissingExtra as e:
    assert isinstance(e, ImportError)
    print("MissingExtra:", e)
else:
    print("no error")
""",
        blocked=(blocked,),
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    assert last.startswith("MissingExtra:"), out.stdout
    assert "pip install 'fastbert[train]'" in last and f"`{blocked}`" in last, last


@pytest.mark.parametrize(
    "command,blocked",
    [
        ("pretrain", "tokenizers"),
        ("pretrain", "tqdm"),
        ("pretrain", "matplotlib"),
        ("pretrain", "safetensors"),
        ("finetune", "tokenizers"),
        ("finetune", "tqdm"),
        ("finetune", "safetensors"),
    ],
)
def test_cli_missing_extra_is_one_line_and_exit_2(command, blocked, tmp_path):
    """``fastbert pretrain|finetune`` check the whole of what they need from [train] before doing
    anything: a missing package is one line on stderr, exit status 2, nothing written."""
    out = run_py(
        f"""
        from fastbert.cli import main
        sys.exit(main([{command!r}, "--out", {str(tmp_path / "run")!r}]))
        """,
        blocked=(blocked,),
        FASTBERT_TRACEBACK=None,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"fastbert {command}:"), lines[0]
    assert "pip install 'fastbert[train]'" in lines[0] and f"`{blocked}`" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not installed("triton"), reason="needs triton")
@pytest.mark.parametrize("how", ["context", "env", "compile"])
def test_triton_loads_at_the_first_triton_kernel(how):
    """Under TRITON_INTERPRET=1: import fastbert and an op on the automatic (cpu) backend leave
    triton unimported; the triton backend (``with fastbert.backend``, ``FASTBERT_BACKEND`` or traced
    by torch.compile, whose dynamo imports triton itself) loads fastbert.triton at its first op."""
    out = run_py(
        f"""
        import torch, fastbert
        how = {how!r}
        x, b = torch.randn(4, 8), torch.randn(8)
        if how != "env":
            fastbert.ops.masked_softmax(torch.randn(1, 1, 2, 2))  # auto: the cpu backend
        assert "triton" not in sys.modules and "fastbert.triton" not in sys.modules
        if how == "context":
            with fastbert.backend("triton"):
                y = fastbert.bias_gelu(x, b)
        elif how == "env":
            assert fastbert.backends.current() == "triton"
            y = fastbert.bias_gelu(x, b)
        else:
            from torch._dynamo.testing import CompileCounter
            counter = CompileCounter()
            f = torch.compile(lambda x, b: fastbert.bias_gelu(x, b), fullgraph=True, backend=counter)
            with fastbert.backend("triton"):
                y = f(x, b)
                f(x, b)
            assert counter.frame_count == 1, counter.frame_count
        torch.testing.assert_close(y, torch.nn.functional.gelu(x + b))
        assert "triton" in sys.modules and fastbert.triton.available, fastbert.triton.error
        assert fastbert.backends.reasons_for("triton", "bias_gelu", {{"cpu"}}, {{torch.float32}}) == []
        print("ok")
        """,
        TRITON_INTERPRET="1",
        FASTBERT_BACKEND="triton" if how == "env" else None,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "ok"


@pytest.mark.skipif(not installed("triton"), reason="needs triton")
def test_info_imports_triton():
    out = run_py("""
        import json
        from fastbert.info import collect
        info = collect()
        print(json.dumps({"triton": info["triton"], "error": info["triton_error"]}))
        """)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    import importlib.metadata

    assert got == {"triton": importlib.metadata.version("triton"), "error": None}


def test_dependencies_are_torch_only():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.11"]
    extras = project["optional-dependencies"]
    assert extras["triton"] == ["triton>=3.6"]
    assert set(extras["train"]) == {"tokenizers", "tqdm", "safetensors", "matplotlib"}
    assert extras["hf"] == ["transformers>=5.17"]
    assert set(extras["bench"]) == {"matplotlib", "pytest-benchmark", "tqdm"}
    assert {"pytest", "pytest-benchmark", "expecttest", "hypothesis", "accelerate"} <= set(extras["test"])
    assert "fastbert[train,hf,bench]" in extras["test"]
    assert extras["all"] == ["fastbert[triton,train,hf,bench,test]"]
    # every extra _optional.require names in the package exists
    import re

    named = set()
    for path in (ROOT / "fastbert").rglob("*.py"):
        named |= set(re.findall(r"""require\(\s*["'][\w.]+["'],\s*["'](\w+)["']""", path.read_text()))
    assert named and named <= set(extras), named - set(extras)
