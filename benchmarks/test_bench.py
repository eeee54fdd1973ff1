"""The benchmark cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only [--bench-ops gelu]
[--bench-shapes 8x16] [-k fastbert-cpu]``.

One test ``test_<op>[<shape>-<dtype>-<pass>[-<params>]-<candidate>]`` per case of fastbert.bench.bench_<op> (the
cases of ``fastbert bench --quick``) and candidate. The case's ``setup()`` (inputs, and
torch.compile's compilation) runs once per case, outside the timed region, its candidates shared by
that case's tests; each test then warms its candidate up and times ``--bench-rounds`` single calls
with ``benchmark.pedantic`` (CUDA: synchronized after each call). A candidate the case does not have
here (a backend that cannot run it) is skipped. The benchmarks of one case form one group of
pytest-benchmark's table. ``fastbert bench`` remains the measurement (interleaved
candidates, adaptive repeats, load flag, results files); this is for pytest-benchmark's tooling
(``--benchmark-autosave``, ``--benchmark-compare``, ``--benchmark-json``).
"""

import gc

import pytest

from fastbert.bench import run

_built = {}  # {case key: the case's candidates}: only the case being run (its tests are consecutive)


def candidates_of(case):
    key = case.key()
    if key not in _built:
        _built.clear()
        gc.collect()
        _built[key] = case.setup()
    return _built[key]


def _run(benchmark, bench, request):
    case, name, device = bench
    candidates = candidates_of(case)
    if name not in candidates:
        pytest.skip(f"{name} cannot run this case here (candidates: {', '.join(candidates)})")
    fn = candidates[name]
    if device == "cuda":
        import torch

        call = fn

        def fn():
            out = call()
            torch.cuda.synchronize()
            return out

    benchmark.group = " ".join(k for k in case.key() if k)
    benchmark.extra_info.update(op=case.op, bytes=case.bytes, candidate=name)
    benchmark.pedantic(
        fn, rounds=request.config.getoption("bench_rounds"), warmup_rounds=request.config.getoption("bench_warmup")
    )


def _make_test(op):
    def test(benchmark, bench, request):
        _run(benchmark, bench, request)

    test.__name__ = test.__qualname__ = f"test_{op}"
    test.__doc__ = f"bench_{op}.py's cases x candidates under pytest-benchmark"
    return test


for _op in run.discover():
    globals()[f"test_{_op}"] = _make_test(_op)
