"""Every op has every part of the recipe in CONTRIBUTING.md ("Adding an op").

The ops are those of the registry, ``fastbert.backends.OPS`` (each fastbert/ops/<op>.py calls
``backends.register_op``). For each one the tree must hold: a float64-capable reference in
fastbert/reference.py, CPU and CUDA kernels in csrc/ (unless ``backends.NOT_IMPLEMENTED`` says
otherwise), a Triton op with ``AOT_SPECS``, trace cases (fastbert/triton/trace_cases.py), a module in
fastbert/nn.py (unless :data:`NO_MODULE` says why not), tests/test_<op>.py, a property test in
tests/test_properties.py, a benchmark case, a GPU-check case and a README row. Everything is read
from the tree itself: imported modules' attributes, or the parsed source where importing would run
the code (tests, benchmarks, scripts).
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import backends, reference
from fastbert.triton import trace_cases

ROOT = Path(__file__).resolve().parent.parent
OPS = tuple(backends.OPS)

# The one list of ops without a fastbert.nn module, each with the reason.
NO_MODULE = {
    "varlen_attention": (
        "its inputs are per-batch packing metadata (cu_seqlens, max_seqlen), not state a module holds: "
        "attention layers (fastbert/models/layers.py, fastbert.patch) call the op"
    ),
}
# Benchmark modules live in the package (fastbert bench runs from a wheel).
BENCH_DIRS = ("fastbert/bench",)


def _tree(path):
    return ast.parse(Path(path).read_text(), filename=str(path))


def _top_functions(path):
    return {n.name for n in _tree(path).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _root_name(node):
    """The leftmost name of an attribute chain (``fastbert`` of ``fastbert.ops.x``), or None."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _uses(tree, op, roots):
    """Whether ``tree`` refers to ``<root>...<op>`` (``fastbert.ops.bias_gelu``, ``ops.bias_gelu``)."""
    return any(isinstance(n, ast.Attribute) and n.attr == op and _root_name(n) in roots for n in ast.walk(tree))


def _assigned(tree, name):
    """The value node assigned to the module-level ``name`` (None if never assigned)."""
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets):
            return n.value
    return None


def test_the_registry_holds_every_defined_op_and_only_public_ops():
    assert OPS, "fastbert.backends.OPS is empty: no fastbert/ops/<op>.py registered itself"
    assert len(set(OPS)) == len(OPS), OPS
    defined = {
        name.split("::")[1][: -len("_fwd")]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fastbert::") and name.endswith("_fwd")
    }
    assert defined <= set(OPS), (
        f"fastbert::<op>_fwd defined but not registered (backends.register_op): {sorted(defined - set(OPS))}"
    )
    for op in OPS:
        assert op in fastbert.ops.__all__ and callable(getattr(fastbert.ops, op, None)), (
            f"{op}: not exported by fastbert/ops/__init__.py"
        )
        assert (ROOT / "fastbert" / "ops" / f"{op}.py").is_file(), f"{op}: no fastbert/ops/{op}.py"
    assert set(NO_MODULE) <= set(OPS), f"NO_MODULE names unknown ops: {sorted(set(NO_MODULE) - set(OPS))}"


@pytest.mark.parametrize("op", OPS)
def test_reference(op):
    assert callable(getattr(reference, op, None)), f"{op}: no reference function {op}() in fastbert/reference.py"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_csrc_kernels(op, device):
    glue = ROOT / "csrc" / device / f"{op}.cpp"
    if (op, device) in backends.NOT_IMPLEMENTED:
        assert not glue.exists(), (
            f"{op}: csrc/{device}/{op}.cpp exists but backends.NOT_IMPLEMENTED says there is no {device} kernel"
        )
        return
    assert glue.is_file(), f"{op}: no csrc/{device}/{op}.cpp (or list it in backends.NOT_IMPLEMENTED, with why)"
    text = glue.read_text()
    key = device.upper()
    for want in (f"TORCH_LIBRARY_IMPL(fastbert, {key}", f'"{op}_fwd"', f'"{op}_bwd"'):
        assert want in text, f"{op}: csrc/{device}/{op}.cpp does not register {want}"


@pytest.mark.parametrize("op", OPS)
def test_triton_op_and_aot_specs(op):
    path = ROOT / "fastbert" / "triton" / f"{op}.py"
    assert path.is_file(), f"{op}: no fastbert/triton/{op}.py"
    loaded = {
        alias.name
        for n in ast.walk(_tree(ROOT / "fastbert" / "triton" / "__init__.py"))
        if isinstance(n, ast.ImportFrom) and n.module == "fastbert.triton"
        for alias in n.names
    }
    assert op in loaded, f"{op}: fastbert/triton/__init__.py does not import fastbert.triton.{op}"
    if not fastbert.triton.available:  # cannot import the module: its source must still list the specs
        assert _assigned(_tree(path), "AOT_SPECS") is not None, f"{op}: fastbert/triton/{op}.py has no AOT_SPECS"
        return
    module = importlib.import_module(f"fastbert.triton.{op}")
    assert list(getattr(module, "AOT_SPECS", ())), f"{op}: fastbert.triton.{op}.AOT_SPECS is missing or empty"
    for suffix in ("fwd_triton", "bwd_triton"):
        assert hasattr(torch.ops.fastbert, f"{op}_{suffix}"), f"{op}: no fastbert::{op}_{suffix} op"


@pytest.mark.parametrize("op", OPS)
def test_trace_cases(op):
    traced = {name for _, name, _ in trace_cases.cases()}
    for suffix in ("fwd_triton", "bwd_triton"):
        assert f"{op}_{suffix}" in traced, f"{op}: no {op}_{suffix} case in fastbert/triton/trace_cases.py cases()"
    public = {label.split()[0] for label, *_ in trace_cases.public_cases()}
    assert f"ops.{op}" in public, f"{op}: no 'ops.{op} ...' case in fastbert/triton/trace_cases.py public_cases()"


def _nn_modules():
    """``{class name: parsed source}`` of the torch.nn.Module classes of fastbert.nn."""
    out = {}
    for name, obj in vars(fastbert.nn).items():
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == fastbert.nn.__name__:
            out[name] = ast.parse(inspect.getsource(obj))
    return out


@pytest.mark.parametrize("op", OPS)
def test_nn_module(op):
    modules = [name for name, tree in _nn_modules().items() if _uses(tree, op, ("ops", "fastbert"))]
    if op in NO_MODULE:
        assert not modules, f"{op}: NO_MODULE says it has no module, but fastbert.nn {modules} call it: drop the entry"
    else:
        assert modules, f"{op}: no fastbert.nn module calls ops.{op} (or add it to NO_MODULE in this file, with why)"


@pytest.mark.parametrize("op", OPS)
def test_unit_tests(op):
    path = ROOT / "tests" / f"test_{op}.py"
    assert path.is_file(), f"{op}: no tests/test_{op}.py"
    assert any(name.startswith("test_") for name in _top_functions(path)), f"{op}: tests/test_{op}.py has no tests"


@pytest.mark.parametrize("op", OPS)
def test_property_test(op):
    assert f"test_{op}" in _top_functions(ROOT / "tests" / "test_properties.py"), (
        f"{op}: no property test test_{op} in tests/test_properties.py"
    )


@pytest.mark.parametrize("op", OPS)
def test_benchmark_case(op):
    modules = [path for d in BENCH_DIRS for path in sorted((ROOT / d).glob("bench_*.py"))]
    assert modules, f"no bench_*.py module in {' or '.join(BENCH_DIRS)}"
    covering = [p.name for p in modules if _uses(_tree(p), op, ("fastbert", "ops"))]
    assert covering, (
        f"{op}: no benchmark module ({' or '.join(d + '/bench_*.py' for d in BENCH_DIRS)}) times fastbert.{op}"
    )


@pytest.mark.parametrize("op", OPS)
def test_gpu_check_case(op):
    listed = _assigned(_tree(ROOT / "scripts" / "gpu_check.py"), "OPS")
    assert listed is not None, "scripts/gpu_check.py has no OPS"
    assert op in ast.literal_eval(listed), f"{op}: not in scripts/gpu_check.py OPS (the compute-sanitizer run)"


@pytest.mark.parametrize("op", OPS)
def test_readme_row(op):
    assert f"| `fastbert.ops.{op}(" in (ROOT / "README.md").read_text(), f"{op}: no row in README.md's op table"
