"""pytest-benchmark set-up of ``pytest benchmarks/ --benchmark-only`` (see test_bench.py): options that
narrow the cases of ``fastbert.bench``, and one test id per case x candidate. ``make test`` never
collects this directory (pyproject's testpaths is ``tests``). Needs pytest-benchmark
(``pip install 'fastbert[bench]'``)."""

import pytest

from fastbert._optional import require
from fastbert.bench import compare, harness, run

require("pytest_benchmark", "bench", "pytest benchmarks/ --benchmark-only")


def pytest_addoption(parser):
    g = parser.getgroup("fastbert benchmarks (benchmarks/test_bench.py)")
    g.addoption("--bench-ops", nargs="+", help="bench modules to run (bench_<op>.py names), default all")
    g.addoption("--bench-dtype", nargs="+", help="float32, bfloat16, float16 (or fp32/bf16/fp16)")
    g.addoption("--bench-shapes", nargs="+", help="override the shapes, e.g. 8x16 4096x3072")
    g.addoption("--bench-device", default="auto", choices=["auto", "cpu", "cuda"])
    g.addoption(
        "--bench-mode",
        default="quick",
        choices=["quick", "full"],
        help="the cases of fastbert bench --quick (default) or --full",
    )
    g.addoption("--bench-rounds", type=int, default=5, help="timed rounds per candidate (default 5)")
    g.addoption("--bench-warmup", type=int, default=2, help="untimed warm-up calls (default 2)")


def _split(config, name):
    return run._split(config.getoption(name))


def bench_device(config):
    device = config.getoption("bench_device")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def selected_ops(config, modules):
    ops = _split(config, "bench_ops") or sorted(modules)
    unknown = sorted(set(ops) - set(modules))
    if unknown:
        raise pytest.UsageError(
            f"--bench-ops: unknown op(s) {', '.join(unknown)}; available: {', '.join(sorted(modules))}"
        )
    return ops


def case_id(case, candidate, several_ops):
    """``4096x3072-float32-fwd+bwd-approximate=none-fastbert-cpu`` (the op first when the module has
    several; params without the derived ``*_bytes`` ones)."""
    parts = [case.op] if several_ops else []
    parts += [
        harness.shape_str(case.shape),
        case.dtype,
        case.pass_,
        compare.identity_params(harness.params_str(case.params)),
        candidate,
    ]
    return "-".join(p for p in parts if p)


def pytest_generate_tests(metafunc):
    """``test_<op>(benchmark, bench)``: ``bench`` = (case, candidate name, device) for every case of
    bench_<op>.py and every candidate it should have here (``harness.expected_candidates``)."""
    if "bench" not in metafunc.fixturenames:
        return
    config, modules = metafunc.config, run.discover()
    op = metafunc.function.__name__[len("test_") :]
    params = []
    if op in selected_ops(config, modules):
        device = bench_device(config)
        dtypes = [harness.dtype_name(d) for d in _split(config, "bench_dtype")] or None
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in _split(config, "bench_shapes")] or None
        cases = modules[op].cases(device=device, mode=config.getoption("bench_mode"), dtypes=dtypes, shapes=shapes)
        several = len({c.op for c in cases}) > 1
        params = [
            pytest.param((case, name, device), id=case_id(case, name, several))
            for case in cases
            for name in harness.expected_candidates(modules[op], case, device)
        ]
    metafunc.parametrize("bench", params)


def pytest_collection_modifyitems(config, items):
    """Deselect the tests of the bench modules not chosen by --bench-ops (no 'empty parameter
    set' skips for them)."""
    if not config.getoption("bench_ops"):
        return
    ops = set(selected_ops(config, run.discover()))
    keep, drop = [], []
    for item in items:
        name = getattr(item, "originalname", "")
        unselected = "bench" in getattr(item, "fixturenames", ()) and name[len("test_") :] not in ops
        (drop if unselected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
