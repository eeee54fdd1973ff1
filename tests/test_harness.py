"""Tests of the benchmark harness itself (statistics, interleaving, load flag, files). Never times.

The benchmark cases and the runner end to end are in tests/test_harness_cases.py."""

import csv
import itertools
import json
import math
import os

import numpy as np
import pytest

from fastbert.bench import harness, report
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


def test_markdown_table_small_times_and_no_bandwidth():
    rows = fake_rows()
    for r in rows:
        r["p50_ms"], r["gbps"], r["frac_copy_bw"], r["peak_mem_bytes"] = 0.0413, None, None, 3 << 20
    line = report.markdown_table(rows, fused="fused").splitlines()[2]
    assert "| 0.0413 |" in line and "| - | 3.0 / 3.0 |" in line
    assert harness.gbps(None, 1.0) is None and harness.gbps(2e9, 1.0) == 2.0
