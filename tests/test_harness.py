"""Tests of the benchmark harness itself (statistics, interleaving, load flag, files). Never times."""

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbert.bench import bench_gather_mlm, bench_gelu, bench_layernorm_residual, harness, report, run
from fastbert.bench.harness import Budget, Case, LoadProbe

# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("q", [0, 20, 50, 80, 100])
def test_percentile_matches_numpy(q):
    xs = list(np.random.default_rng(0).exponential(size=37))
    assert harness.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert harness.percentile([4, 1, 3, 2], q) == pytest.approx(np.percentile([1, 2, 3, 4], q))


def test_percentile_known_values():
    assert harness.percentile([1, 2, 3, 4, 5], 50) == 3
    assert harness.percentile([1, 2, 3, 4], 20) == pytest.approx(1.6)
    assert harness.percentile([7.0], 80) == 7.0
    assert math.isnan(harness.percentile([], 50))


def test_median_ci():
    assert harness.median_ci_rel([1.0] * 20) == 0
    assert harness.median_ci_rel([1.0] * 5) == math.inf  # too few samples to know the median
    xs = [1.0 + 0.01 * i for i in range(100)]
    assert 0 < harness.median_ci_rel(xs) < harness.median_ci_rel(xs[::4])


def test_summarize_ratios_and_bandwidth():
    samples = {"eager": [0.004, 0.002, 0.003], "torch.compile": [0.001] * 3, "fused": [0.0005] * 3}
    s = harness.summarize(samples, nbytes=2_000_000, copy_gbps=8.0)
    assert s["eager"]["p50_ms"] == pytest.approx(3.0)
    assert s["eager"]["p20_ms"] == pytest.approx(2.4) and s["eager"]["p80_ms"] == pytest.approx(3.6)
    assert s["fused"]["speedup_vs_eager"] == pytest.approx(6.0)
    assert s["fused"]["speedup_vs_compile"] == pytest.approx(2.0)
    assert s["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert s["fused"]["gbps"] == pytest.approx(4.0)  # 2 MB in 0.5 ms
    assert s["fused"]["frac_copy_bw"] == pytest.approx(0.5)  # of 8 GB/s
    assert s["fused"]["n"] == 3


def test_summarize_without_baselines_or_copy():
    s = harness.summarize({"a": [0.001] * 3}, nbytes=1000)
    assert s["a"]["speedup_vs_eager"] is None and s["a"]["speedup_vs_compile"] is None
    assert s["a"]["frac_copy_bw"] is None


# ---------------------------------------------------------------- interleaving


def test_round_order_rotates():
    assert [harness.round_order(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_candidates_are_interleaved_after_warmup():
    log = []
    cands = {n: (lambda n=n: log.append(n)) for n in "abc"}
    budget = Budget(min_rounds=3, max_rounds=3, warmup_calls=2, warmup_s=0.0)
    samples = harness.time_candidates(cands, budget, harness.CpuTimer())
    assert log[:6] == list("aabbcc")  # warm-up, each candidate in turn
    assert log[6:] == list("abcbcacab")  # round-robin, rotated each round
    assert {n: len(xs) for n, xs in samples.items()} == {"a": 3, "b": 3, "c": 3}


class FakeTimer:
    def __init__(self, times):
        self.times = itertools.cycle(times)

    def round(self, calls):
        return {name: [next(self.times)] for name, _ in calls}


def test_stops_at_min_rounds_once_medians_are_stable():
    cands = {"a": lambda: None, "b": lambda: None}
    budget = Budget(min_rounds=7, max_rounds=100, time_s=1e9, warmup_calls=0, warmup_s=0)
    samples = harness.time_candidates(cands, budget, FakeTimer([1e-3]))
    assert len(samples["a"]) == 7


def test_stops_at_the_time_cap_when_noisy():
    clock = itertools.count(0.0, 0.5)  # every clock read advances 0.5 s
    budget = Budget(min_rounds=2, max_rounds=100, time_s=5.0, rel_ci=1e-9, warmup_calls=0, warmup_s=0)
    samples = harness.time_candidates(
        {"a": lambda: None}, budget, FakeTimer([1e-3, 2e-3, 5e-3]), clock=lambda: next(clock)
    )
    assert 2 <= len(samples["a"]) <= 11


# ---------------------------------------------------------------- load and busy flag


def fake_probe(stat, own, hz=100):
    stat, own, clock = iter(stat), iter(own), iter([10.0, 12.0, 12.0])  # a 2 s window
    return LoadProbe(
        stat=lambda: next(stat),
        own_cpu=lambda: next(own),
        clock=lambda: next(clock),
        loadavg=lambda: (1.5, 1.0, 0.5),
        hz=hz,
    )


def test_load_probe_subtracts_own_cpu_time():
    probe = fake_probe(stat=[(1000, 0), (1300, 0)], own=[5.0, 6.0])  # 3 s busy, 1 s ours
    probe.start()
    load = probe.stop()
    assert load["other_load_cores"] == pytest.approx(1.0)
    assert load["steal_cores"] == 0 and load["loadavg_1m"] == 1.5
    assert harness.is_busy(load, ncores=2)
    assert not harness.is_busy(load, ncores=2, threshold=1.5)


def test_load_probe_quiet_machine_and_steal():
    probe = fake_probe(stat=[(1000, 0), (1420, 0)], own=[0.0, 4.0])  # 4.2 s busy, 4 s ours
    probe.start()
    quiet = probe.stop()
    assert quiet["other_load_cores"] == pytest.approx(0.1)
    assert not harness.is_busy(quiet, ncores=2)
    probe = fake_probe(stat=[(1000, 0), (1400, 100)], own=[0.0, 4.0])  # 1 s stolen over 2 s
    probe.start()
    stolen = probe.stop()
    assert stolen["steal_cores"] == pytest.approx(0.5) and harness.is_busy(stolen, ncores=2)
    assert not harness.is_busy({"other_load_cores": 2.0}, ncores=64)  # threshold scales: 3.2


def test_load_probe_real_short_window_is_sane():
    probe = LoadProbe(min_window_s=0.3)  # a 10 ms tick over a microsecond window was ~70 "cores"
    probe.start()
    load = probe.stop()
    if load["other_load_cores"] is not None:
        assert 0 <= load["other_load_cores"] <= (os.cpu_count() or 1) + 0.5


def test_load_probe_without_proc_stat():
    def missing():
        raise OSError("no /proc/stat")

    probe = LoadProbe(stat=missing)
    probe.start()
    load = probe.stop()
    assert load["other_load_cores"] is None and not harness.is_busy(load, ncores=2)


def test_wait_quiet_returns_once_the_machine_is_quiet():
    loads = iter([1.0, 0.9, 0.1, 0.0])

    class Probe:
        def start(self):
            pass

        def stop(self):
            return {"other_load_cores": next(loads), "steal_cores": 0.0}

    clock = itertools.count(0.0, 1.0)
    waited = harness.wait_quiet(60, 2, probe=Probe, sleep=lambda s: None, clock=lambda: next(clock))
    assert waited is not None and next(loads) == 0.0  # stopped at the third window (0.1 cores)
    loads = iter([1.0] * 100)
    assert harness.wait_quiet(3, 2, probe=Probe, sleep=lambda s: None, clock=lambda: next(clock)) is None


def test_read_proc_stat(tmp_path):
    p = tmp_path / "stat"
    p.write_text("cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert harness.read_proc_stat(p) == (160, 7)  # user+nice+system+irq+softirq; steal apart


# ---------------------------------------------------------------- results files

META = {
    "device": "cpu",
    "device_name": "Fake CPU",
    "host_kind": "cpu-fake-2c",
    "ncores": 2,
    "torch": "2.x",
    "triton": None,
    "fastbert": "0.1.0",
    "git_commit": "abc",
    "torch_threads": 2,
    "timestamp": "2026-01-01T00:00:00+00:00",
}


def fake_case(shape=(4, 8)):
    cands = {"eager": lambda: None, "torch.compile": lambda: None, "fused": lambda: None}
    return Case("op", shape, "float32", "fwd", 1024, lambda: cands, params={"k": "v"})


def fake_rows(shape=(4, 8)):
    budget = Budget(min_rounds=6, max_rounds=6, warmup_calls=1, warmup_s=0)
    return harness.run_case(
        fake_case(shape),
        META,
        budget,
        FakeTimer([1e-3, 2e-3, 3e-3]),
        copy_gbps=10.0,
        probe=fake_probe(stat=[(0, 0), (100, 0)], own=[0, 2]),
    )


def test_rows_have_the_schema():
    rows = fake_rows()
    assert [r["candidate"] for r in rows] == ["eager", "torch.compile", "fused"]
    for r in rows:
        assert set(harness.FIELDS) <= set(r)
        assert (r["op"], r["shape"], r["dtype"], r["pass"], r["params"]) == ("op", "4x8", "float32", "fwd", "k=v")
        assert r["n"] == 6 and r["host_kind"] == "cpu-fake-2c" and r["copy_gbps"] == 10.0
        assert isinstance(r["busy"], bool)


def test_json_and_csv_schema_and_merge(tmp_path):
    rows = fake_rows((4, 8)) + fake_rows((2, 2))
    rows[0]["median_ci_rel"] = math.inf  # non-finite numbers are written as null / empty
    jpath, cpath = report.write_results(rows, META, tmp_path)
    assert jpath.name == "cpu-fake-2c.json" and cpath.name == "cpu-fake-2c.csv"
    dated = tmp_path / "cpu-fake-2c-2026-01-01.json"  # the run's date (META's timestamp)
    assert dated.read_text() == jpath.read_text()
    assert dated.with_suffix(".csv").read_text() == cpath.read_text()
    doc = json.loads(jpath.read_text())
    assert doc["schema"] == harness.SCHEMA and doc["fields"] == harness.FIELDS
    assert doc["meta"]["host_kind"] == "cpu-fake-2c" and len(doc["rows"]) == 6
    assert all(list(r) == harness.FIELDS for r in doc["rows"])
    assert doc["rows"][0]["median_ci_rel"] is None
    with open(cpath) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.FIELDS
        table = list(reader)
    assert len(table) == 6 and {r["candidate"] for r in table} == {"eager", "torch.compile", "fused"}
    assert float(table[1]["p50_ms"]) > 0

    # a second run of one case replaces that case's rows and keeps the others
    new = fake_rows((2, 2))
    for r in new:
        r["timestamp"] = "later"
    report.write_results(new, META, tmp_path)
    doc = json.loads(jpath.read_text())
    assert len(doc["rows"]) == 6
    assert {r["timestamp"] for r in doc["rows"] if r["shape"] == "2x2"} == {"later"}
    assert {r["timestamp"] for r in doc["rows"] if r["shape"] == "4x8"} == {META["timestamp"]}
    report.write_results(new, META, tmp_path, merge=False)
    assert len(json.loads(jpath.read_text())["rows"]) == 3


def test_dated_results_hold_that_days_rows(tmp_path):
    report.write_results(fake_rows((4, 8)), META, tmp_path)
    report.write_results(fake_rows((2, 2)), META, tmp_path)  # the same day: merged into the dated file
    next_day = dict(META, timestamp="2026-01-02T09:00:00+00:00")
    report.write_results(fake_rows((2, 2)), next_day, tmp_path)
    shapes = lambda name: sorted({r["shape"] for r in json.loads((tmp_path / name).read_text())["rows"]})  # noqa: E731
    assert shapes("cpu-fake-2c-2026-01-01.json") == ["2x2", "4x8"]
    assert shapes("cpu-fake-2c-2026-01-02.json") == ["2x2"]
    assert shapes("cpu-fake-2c.json") == ["2x2", "4x8"]  # the latest: every case ever run
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-fake-2c-2026-01-01.csv",
        "cpu-fake-2c-2026-01-01.json",
        "cpu-fake-2c-2026-01-02.csv",
        "cpu-fake-2c-2026-01-02.json",
        "cpu-fake-2c.csv",
        "cpu-fake-2c.json",
    ]


def test_merge_by_candidate_keeps_the_other_candidates(tmp_path):
    report.write_results(fake_rows(), META, tmp_path)
    fused = [dict(r, timestamp="later") for r in fake_rows() if r["candidate"] == "fused"]
    jpath, _ = report.write_results(fused, META, tmp_path, by_candidate=True)
    rows = json.loads(jpath.read_text())["rows"]
    assert sorted((r["candidate"], r["timestamp"]) for r in rows) == [
        ("eager", META["timestamp"]),
        ("fused", "later"),
        ("torch.compile", META["timestamp"]),
    ]
    jpath, _ = report.write_results(fused, META, tmp_path)  # by case: the case's other rows go
    assert [r["candidate"] for r in json.loads(jpath.read_text())["rows"]] == ["fused"]


def test_run_case_keeps_the_backends_named():
    budget = Budget(min_rounds=6, max_rounds=6, warmup_calls=1, warmup_s=0)
    run_case = lambda backends: harness.run_case(  # noqa: E731
        fake_case(),
        META,
        budget,
        FakeTimer([1e-3, 2e-3]),
        copy_gbps=10.0,
        backends=backends,
        probe=fake_probe(stat=[(0, 0), (100, 0)], own=[0, 2]),
    )
    rows = run_case(["fused", "eager"])
    assert [r["candidate"] for r in rows] == ["eager", "fused"]  # the case's order
    assert rows[1]["speedup_vs_eager"] is not None and rows[1]["speedup_vs_compile"] is None
    (row,) = run_case(["fused"])  # without eager: no ratio over it
    assert row["speedup_vs_eager"] is None and row["speedup_vs_compile"] is None
    assert run_case(["fastbert-cuda"]) == []
    assert "fused" in report.format_table([row])


def test_table_marks_busy_rows():
    rows = fake_rows()
    rows[1]["busy"] = True
    text = report.format_table(rows)
    assert "torch.compile" in text and "fused" in text and text.count("*") == 1


def test_host_kind_slugs():
    assert report._slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "intel-xeon-platinum-8375c"
    assert report._slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13"
    assert report._slug(" H100 80GB HBM3") == "h100-80gb-hbm3"


# ---------------------------------------------------------------- the gelu bench, end to end


def test_gelu_cases_bytes_and_candidates_agree():
    cases = bench_gelu.cases(dtypes=["float32"], shapes=[(3, 8)], use_compile=False)
    assert [(c.pass_, c.bytes) for c in cases] == [("fwd", 2 * 24 * 4), ("fwd+bwd", 5 * 24 * 4)]
    fwd = cases[0].setup()
    assert {"eager", "fastbert-cpu"} <= set(fwd)
    assert "fastbert-reference" not in fwd  # the oracle is not benchmarked (eager is the baseline)
    ys = [fn() for fn in fwd.values()]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0])
    for fn in cases[1].setup().values():
        assert fn() is None  # fwd+bwd frees its grads, returns nothing


def test_layernorm_residual_cases_agree_without_dropout():
    cases = bench_layernorm_residual.cases(dtypes=["float32"], shapes=[(3, 8)], use_compile=False)
    assert [(c.pass_, c.params["p"], c.bytes) for c in cases] == [
        ("fwd", 0.0, 3 * 24 * 4),
        ("fwd+bwd", 0.0, 7 * 24 * 4),
        ("fwd", 0.1, 3 * 24 * 4),
        ("fwd+bwd", 0.1, 8 * 24 * 4),
    ]
    ys = [fn() for fn in cases[0].setup().values()]
    assert len(ys) >= 2
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)


def test_gather_and_mlm_head_candidates_agree():
    """Small shapes: every gather candidate returns the same rows, every MLM head candidate (Hugging
    Face style, gathered eager, fastbert) the same loss and gradients; the head has no byte count."""
    cases = bench_gather_mlm.cases(shapes=[(2, 16, 8), (2, 16, 8, 50)], use_compile=False)
    assert [(c.op, c.pass_) for c in cases] == [
        ("gather_masked", "fwd"),
        ("gather_masked", "fwd+bwd"),
        ("mlm_head", "fwd+bwd"),
    ]
    assert cases[2].bytes is None and cases[2].params["mlm_grad_bytes"] == (8 * 8 + 3 * 8 + 50 * 8 + 50) * 4
    ys = [fn() for fn in cases[0].setup().values()]
    assert "fastbert-cpu" in cases[0].setup() and len(ys) >= 2
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, 8)
    labels = bench_gather_mlm.make_labels(2, 16, 50, "cpu")
    labels[0, 0] = 3  # at least one labelled token
    w = bench_gather_mlm.make_head(8, 50, torch.float32, "cpu")
    results = []
    for fn in (
        bench_gather_mlm.eager_head,
        bench_gather_mlm.eager_gathered_head,
        bench_gather_mlm.fastbert_head("cpu"),
    ):
        h = hidden.clone().requires_grad_()
        for t in w.values():
            t.grad = None
        loss = fn(h, labels, w)
        loss.backward()
        results.append([loss.detach(), h.grad, w["dec_w"].grad, w["dense_w"].grad])
    for got in results[1:]:
        for g, ref in zip(got, results[0]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_markdown_table_small_times_and_no_bandwidth():
    rows = fake_rows()
    for r in rows:
        r["p50_ms"], r["gbps"], r["frac_copy_bw"], r["peak_mem_bytes"] = 0.0413, None, None, 3 << 20
    line = report.markdown_table(rows, fused="fused").splitlines()[2]
    assert "| 0.0413 |" in line and "| - | 3.0 / 3.0 |" in line
    assert harness.gbps(None, 1.0) is None and harness.gbps(2e9, 1.0) == 2.0


def test_run_gelu_end_to_end(tmp_path, capsys):
    rc = run.main(
        [
            "--quick",
            "--ops",
            "gelu",
            "--dtype",
            "fp32",
            "--shapes",
            "8x16",
            "--case-seconds",
            "0.1",
            "--copy-mib",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    kind = report.host_info("cpu")["host_kind"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{kind}-bandwidth.png", f"{kind}-speedup.png"]  # of the latest file
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".csv", ".json"))
    assert len(files) == 4
    (dated,) = [f for f in files if f.endswith(".json") and f != f"{kind}.json"]
    assert re.fullmatch(re.escape(kind) + r"-\d{4}-\d\d-\d\d\.json", dated)
    assert set(files) == {f"{kind}.json", f"{kind}.csv", dated, dated.replace(".json", ".csv")}
    doc = json.loads((tmp_path / f"{kind}.json").read_text())
    assert json.loads((tmp_path / dated).read_text())["rows"] == doc["rows"]
    assert (tmp_path / f"{kind}.csv").read_text() == (tmp_path / dated).with_suffix(".csv").read_text()
    assert dated == f"{kind}-{doc['meta']['timestamp'][:10]}.json"
    rows = doc["rows"]
    assert {r["candidate"] for r in rows} == {"eager", "torch.compile", "fastbert-cpu"}
    assert {(r["pass"], r["bytes"]) for r in rows} == {("fwd", 1024), ("fwd+bwd", 2560)}
    assert all(r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["n"] >= 1 for r in rows)
    assert doc["meta"]["copy_gbps"] > 0 and doc["meta"]["mode"] == "quick"
    assert "torch.compile" in capsys.readouterr().out
    assert not torch.cuda.is_initialized()  # nothing touched CUDA on a CPU run


def test_run_backends_without_eager(tmp_path, capsys):
    """--backends fastbert-cpu: only its rows (no torch.compile compiled), ratios over eager blank,
    the table and plots drawn all the same; the latest file keeps the other candidates' rows."""
    argv = [
        "--ops",
        "gelu",
        "--dtype",
        "fp32",
        "--shapes",
        "8x16",
        "--case-seconds",
        "0.05",
        "--copy-mib",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert run.main(argv + ["--backends", "eager"]) == 0
    assert run.main(argv + ["--backends", "fastbert-cpu"]) == 0
    out = capsys.readouterr()
    assert "plots not written" not in out.err
    kind = report.host_info("cpu")["host_kind"]
    rows = json.loads((tmp_path / f"{kind}.json").read_text())["rows"]
    assert sorted((r["candidate"], r["pass"]) for r in rows) == [
        ("eager", "fwd"),
        ("eager", "fwd+bwd"),
        ("fastbert-cpu", "fwd"),
        ("fastbert-cpu", "fwd+bwd"),
    ]
    assert {(r["candidate"], r["speedup_vs_eager"], r["speedup_vs_compile"]) for r in rows} == {
        ("eager", 1.0, None),
        ("fastbert-cpu", None, None),
    }  # each run: no ratio over what it left out
    assert (tmp_path / f"{kind}-bandwidth.png").exists()


def test_run_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        SystemExit,
        match=r"unknown backend\(s\) fastbert-nope; known candidates: eager, "
        r"torch\.compile, fastbert-cuda, fastbert-triton, fastbert-cpu",
    ):
        run.main(["--ops", "gelu", "--device", "cpu", "--backends", "eager", "fastbert-nope"])
    known = harness.known_candidates(run.discover().values())
    assert {"eager+gather", "fastbert", "fastbert-unfused", "patched"} <= set(known)
    assert "fastbert-reference" not in known  # the test oracle is not benchmarked


def test_expected_candidates_match_the_cases():
    """What test_bench.py names its tests after, without a setup, is what a setup gives (CPU)."""
    modules = run.discover()
    for op, kw in (("gelu", {"shapes": [(3, 8)]}), ("gather_mlm", {"shapes": [(2, 16, 8), (2, 16, 8, 50)]})):
        for case in modules[op].cases(dtypes=["float32"], use_compile=False, **kw):
            expected = harness.expected_candidates(modules[op], case, "cpu")
            assert [n for n in expected if n != harness.COMPILE] == list(case.setup()), case.key()
    assert harness.expected_candidates(bench_gelu, bench_gelu.cases()[0], "cpu") == [
        "eager",
        "torch.compile",
        "fastbert-cpu",
    ]


def test_pytest_benchmark_collects_and_runs_one_case(tmp_path):
    """``pytest benchmarks/ --benchmark-only``: one test per case x candidate, narrowed by --bench-*
    and -k; the plain ``pytest`` (testpaths) never collects benchmarks/."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pytest_ = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *a],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    narrow = [
        "benchmarks/",
        "--benchmark-only",
        "--bench-ops",
        "gelu",
        "--bench-shapes",
        "8x16",
        "--bench-dtype",
        "fp32",
    ]
    got = pytest_(*narrow, "--collect-only")
    assert got.returncode == 0, got.stdout + got.stderr
    ids = [line.split("::")[1] for line in got.stdout.splitlines() if "::" in line]
    assert ids == [
        f"test_gelu[8x16-float32-{p}-approximate=none-{c}]"
        for p in ("fwd", "fwd+bwd")
        for c in ("eager", "torch.compile", "fastbert-cpu")
    ]
    got = pytest_(
        *narrow, "-k", "fwd+bwd and fastbert-cpu", "--bench-rounds", "2", "--benchmark-json", str(tmp_path / "b.json")
    )
    assert got.returncode == 0 and "1 passed" in got.stdout, got.stdout + got.stderr
    (bench,) = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert bench["group"] == "bias_gelu 8x16 float32 fwd+bwd approximate=none"
    assert bench["stats"]["rounds"] == 2 and bench["extra_info"]["candidate"] == "fastbert-cpu"
    got = pytest_("--collect-only", "tests/test_harness.py")
    assert got.returncode == 0 and "benchmarks/" not in got.stdout
    assert 'testpaths = ["tests"]' in (root / "pyproject.toml").read_text()  # `make test`, plain pytest


def test_bert_step_cases_run_and_agree():
    """A tiny BERT (batch 2, seq 16, hidden 32, 1 layer): every candidate but torch.compile runs a
    training step; fastbert fused and unfused (same seed, same weights) start from the same loss;
    with dropout off and the same weights, Hugging Face's model gives that loss too."""
    from fastbert.bench import bench_bert

    (case,) = bench_bert.cases(shapes=[(2, 16, 32, 1), (2, 16, 32)], use_compile=False)
    assert (case.op, case.shape, case.pass_, case.bytes) == ("bert_pretrain", (2, 16, 32, 1), "step", None)
    _, cfg = bench_bert.config_for(32, 1)
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 64, 101)
    steps = case.setup()
    hf = bench_bert.transformers is not None
    assert set(steps) == {"fastbert", "fastbert-unfused"} | ({"eager"} if hf else set())
    for name, step in steps.items():
        weights = [p.detach().clone() for p in step.model.parameters()]
        step()
        assert torch.isfinite(step.last_loss), name
        assert bench_bert.count_parameters(step.model) * 16 == case.params["state_bytes"], name
        assert any(not torch.equal(w, p) for w, p in zip(weights, step.model.parameters())), name  # AdamW stepped
        assert case.peak_memory(step, "cpu") > 0
    torch.testing.assert_close(steps["fastbert"].last_loss, steps["fastbert-unfused"].last_loss, rtol=0.05, atol=0)

    cfg = cfg.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    steps = bench_bert.make_candidates(cfg, 2, 16, use_compile=False)
    if hf:  # the fastbert weights in Hugging Face's names (one qkv Linear split into query/key/value)
        from fastbert.models.checkpoint import to_hf

        missing, unused = steps["eager"].model.load_state_dict(to_hf(steps["fastbert"].model), strict=False)
        assert not unused and all("decoder" in k for k in missing)
    losses = {}
    for name, step in steps.items():
        step()
        losses[name] = step.last_loss
    for name, loss in losses.items():
        torch.testing.assert_close(loss, losses["fastbert"], rtol=1e-5, atol=1e-5, msg=name)


def test_patch_step_cases_run_and_agree():
    """bench_patch: transformers' BertForPreTraining eager vs fastbert.patch'ed, tiny shape: both
    candidates take a step; with dropout off (same weights) they start from the same loss."""
    from fastbert.bench import bench_bert, bench_patch

    if bench_bert.transformers is None:
        pytest.skip("transformers not installed")
    (case,) = bench_patch.cases(shapes=[(2, 16, 32, 1)])
    assert (case.op, case.shape, case.pass_) == ("hf_patch_step", (2, 16, 32, 1), "step")
    for name, step in case.setup().items():
        step()
        assert torch.isfinite(step.last_loss), name
        assert case.peak_memory(step, "cpu") > 0
    _, cfg = bench_bert.config_for(32, 1)
    steps = bench_patch.make_candidates(cfg.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 2, 16)
    assert "layernorm_residual x2" in str(steps["patched"].patch_report)
    for step in steps.values():
        step()
    torch.testing.assert_close(steps["patched"].last_loss, steps["eager"].last_loss, rtol=1e-5, atol=1e-6)
