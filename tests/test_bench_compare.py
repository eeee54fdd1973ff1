"""Tests of fastbert.bench.compare (matching, noise, verdicts, --fail-if-regression), fastbert.bench.plots
and the Markdown summary, on synthetic rows. Never times anything."""

import json
import math
import types

import pytest

from fastbert.bench import compare, harness, plots, report, run

META = {
    "device": "cpu",
    "device_name": "Test CPU (2 cores)",
    "host_kind": "cpu-test-2c",
    "ncores": 2,
    "torch": "2.0",
    "torch_threads": 2,
    "git_commit": "abc",
    "timestamp": "2026-01-02T03:04:05+00:00",
    "mode": "quick",
    "copy_gbps": 20.0,
}


def row(
    op="bias_gelu",
    candidate="fastbert-cpu",
    p50=1.0,
    ci=0.01,
    spread=0.1,
    busy=False,
    shape="64x64",
    dtype="float32",
    pass_="fwd",
    params="approximate=none",
    speedup=2.0,
    nbytes=10**6,
):
    r = dict.fromkeys(harness.FIELDS)
    r.update(
        op=op,
        shape=shape,
        dtype=dtype,
        params=params,
        candidate=candidate,
        n=50,
        busy=busy,
        p20_ms=p50 * (1 - spread / 2),
        p50_ms=p50,
        p80_ms=p50 * (1 + spread / 2),
        median_ci_rel=ci,
        bytes=nbytes,
        gbps=nbytes and nbytes / p50 / 1e6,
        copy_gbps=20.0,
        speedup_vs_eager=speedup,
        speedup_vs_compile=speedup / 1.5,
        other_load_cores=0.01,
        timestamp=META["timestamp"],
        **{"pass": pass_},
    )
    r["frac_copy_bw"] = r["gbps"] and r["gbps"] / 20.0
    return r


def write(path, rows, meta=META):
    path.write_text(json.dumps({"schema": harness.SCHEMA, "host_kind": meta["host_kind"], "meta": meta, "rows": rows}))
    return str(path)


def only(entries, status=None):
    (e,) = [e for e in entries if status is None or e["status"] == status]
    return e


def test_rows_match_on_case_and_candidate_not_derived_bytes():
    old = [row(p50=1.0, params="labelled=0.15,mlm_grad_bytes=1"), row(candidate="eager", p50=2.0)]
    new = [row(p50=1.2, params="labelled=0.15,mlm_grad_bytes=2"), row(candidate="eager", p50=2.0, dtype="bfloat16")]
    entries = compare.compare(new, old)
    e = entries[0]
    assert e["old"] is old[0] and e["new"] is new[0]
    assert e["ratio"] == pytest.approx(1.2) and e["noise"] == pytest.approx(math.hypot(0.01, 0.01))
    assert e["status"] == compare.SLOWER
    assert [x["status"] for x in entries[1:]] == [compare.ADDED, compare.REMOVED]  # dtype differs
    assert compare.identity_params("b=1,a_bytes=3,c=x") == "b=1,c=x"


@pytest.mark.parametrize(
    "new_p50, ci, spread, status",
    [
        (1.10, 0.01, 0.1, compare.SLOWER),
        (1.01, 0.01, 0.1, compare.SAME),
        (0.90, 0.01, 0.1, compare.FASTER),
        (1.10, 0.10, 0.1, compare.SAME),  # noise sqrt(2) * 10% > 10%
        (1.30, None, 0.3, compare.SAME),  # n < 6: the whole p20-p80 spread, 42% combined
        (1.50, None, 0.3, compare.SLOWER),
    ],
)
def test_noise_classification(new_p50, ci, spread, status):
    e = only(compare.compare([row(p50=new_p50, ci=ci, spread=spread)], [row(p50=1.0, ci=ci, spread=spread)]))
    assert e["status"] == status


def test_noise_unknown_and_missing_p50():
    assert compare.row_noise(dict(row(ci=None), p20_ms=None)) == math.inf
    e = only(compare.compare([dict(row(ci=None), p20_ms=None, p50_ms=5.0)], [row(ci=None)]))
    assert e["status"] == compare.SAME and e["ratio"] == 5.0  # cannot tell, never a regression
    e = only(compare.compare([dict(row(), p50_ms=None)], [row()]))
    assert e["status"] == compare.UNKNOWN and e["ratio"] is None


@pytest.mark.parametrize("new_busy, old_busy", [(True, False), (False, True)])
def test_busy_rows_marked_and_never_regressions(new_busy, old_busy):
    entries = compare.compare([row(p50=3.0, busy=new_busy)], [row(p50=1.0, busy=old_busy)])
    assert only(entries)["status"] == compare.SLOWER and only(entries)["busy"]
    assert compare.regressions(entries, 5) == []
    lines = []
    assert compare.report(entries, 5, out=lines.append) == 0
    assert "slower (busy)" in lines[0] and "1 busy" in lines[0]


def test_added_and_removed_rows_listed():
    old = [row(candidate="eager"), row(candidate="torch.compile")]
    new = [row(candidate="eager"), row(candidate="fastbert-cpu")]
    entries = compare.compare(new, old)
    assert [(e["key"][-1], e["status"]) for e in entries] == [
        ("eager", compare.SAME),
        ("fastbert-cpu", compare.ADDED),
        ("torch.compile", compare.REMOVED),
    ]
    text = compare.format_comparison(entries)
    assert "1 added, 1 removed" in text and "torch.compile" in text


@pytest.mark.parametrize(
    "new_p50, ci, pct, rc",
    [
        (2.00, 0.01, 5, 1),  # slower beyond noise and PCT
        (1.04, 0.005, 5, 0),  # beyond noise, under PCT
        (1.20, 0.20, 5, 0),  # over PCT, within noise
        (0.50, 0.01, 5, 0),  # faster
        (2.00, 0.01, None, 0),  # no --fail-if-regression
    ],
)
def test_fail_if_regression_exit_status(tmp_path, capsys, new_p50, ci, pct, rc):
    new = write(tmp_path / "new.json", [row(p50=new_p50, ci=ci), row(op="gelu2", p50=1.0)])
    old = write(tmp_path / "old.json", [row(p50=1.0, ci=ci), row(op="gelu2", p50=1.0)])
    argv = [new, old] + ([] if pct is None else ["--fail-if-regression", str(pct)])
    assert compare.main(argv) == rc
    out = capsys.readouterr().out
    assert ("REGRESSION: 1 row(s)" in out) == bool(rc)
    if rc:
        assert "bias_gelu 64x64 float32 fwd approximate=none fastbert-cpu: 1.00 -> 2.00 ms (+100.0%" in out


def test_not_a_results_file(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a benchmarks results file"):
        compare.load(tmp_path / "x.json")


def fake_run(monkeypatch, new_rows):
    """run.main with its measurement replaced: one fake op whose rows are ``new_rows``."""
    case = harness.Case("bias_gelu", (64, 64), "float32", "fwd", 10**6, dict, {"approximate": "none"})
    monkeypatch.setattr(run, "discover", lambda: {"bias_gelu": types.SimpleNamespace(cases=lambda **kw: [case])})
    monkeypatch.setattr(report, "host_info", lambda device: dict(META))
    monkeypatch.setattr(
        harness,
        "measure_copy_bandwidth",
        lambda *a, **kw: {"copy_gbps": 20.0, "loadavg_1m": 0.0, "other_load_cores": 0.0, "steal_cores": 0.0},
    )
    monkeypatch.setattr(harness, "run_case", lambda *a, **kw: [dict(r) for r in new_rows])


@pytest.mark.parametrize("new_p50, rc", [(2.0, 1), (0.5, 0)])
def test_run_compare_after_a_run(tmp_path, monkeypatch, capsys, new_p50, rc):
    old = [row(candidate="eager", p50=2.0), row(p50=1.0), row(op="masked_softmax", p50=1.0)]
    old_path = write(tmp_path / f"{META['host_kind']}.json", old)  # the file the run overwrites
    fake_run(monkeypatch, [row(candidate="eager", p50=2.0), row(p50=new_p50)])
    assert (
        run.main(["--device", "cpu", "--out", str(tmp_path), "--compare", old_path, "--fail-if-regression", "10"]) == rc
    )
    out = capsys.readouterr().out
    assert "2 rows: " in out and "masked_softmax" not in out.split("compared with")[1]  # op not run
    assert ("REGRESSION" in out) == bool(rc)
    assert {p.name for p in tmp_path.glob("*.png")} == {"cpu-test-2c-speedup.png", "cpu-test-2c-bandwidth.png"}


def test_run_backends_compare_and_files(tmp_path, monkeypatch, capsys):
    """--backends fastbert-cpu --compare: only that candidate's old rows are compared (eager is not
    'removed'); the latest file keeps eager's row, the dated file has the run's rows."""
    old = [row(candidate="eager", p50=2.0), row(p50=1.0)]
    old_path = write(tmp_path / f"{META['host_kind']}.json", old)
    fake_run(monkeypatch, [row(p50=1.0)])
    assert (
        run.main(
            [
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--compare",
                old_path,
                "--backends",
                "fastbert-cpu",
                "--fail-if-regression",
                "10",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 rows: 0 faster, 0 slower, 1 within noise, 0 added, 0 removed" in out
    candidates = lambda name: [r["candidate"] for r in json.loads((tmp_path / name).read_text())["rows"]]  # noqa: E731
    assert candidates(f"{META['host_kind']}.json") == ["eager", "fastbert-cpu"]
    assert candidates(f"{META['host_kind']}-2026-01-02.json") == ["fastbert-cpu"]


def test_plots_written(tmp_path):
    rows = [
        row(candidate=c, shape=s, pass_=p, speedup=sp)
        for s in ("64x64", "128x64")
        for p in ("fwd", "fwd+bwd")
        for c, sp in (("eager", 1.0), ("torch.compile", 1.5), ("fastbert-cpu", 3.0))
    ]
    rows += [
        row(op="bert_pretrain", candidate=c, nbytes=None, params="preset=mini,state_bytes=9", pass_="step")
        for c in ("eager", "fastbert")
    ]
    json_path, _ = report.write_results(rows, META, tmp_path)
    paths = plots.write_plots(json_path)
    assert [p.name for p in paths] == ["cpu-test-2c-speedup.png", "cpu-test-2c-bandwidth.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [op for op, _, _ in plots.bandwidth_panels(rows)] == ["bias_gelu"]  # bert: no byte count
    (_, cases, series), (_, _, bert) = plots.speedup_panels(rows)
    assert [s[0] for s in series] == ["fastbert-cpu vs eager", "fastbert-cpu vs torch.compile"]
    assert [s[0] for s in bert] == ["fastbert vs eager", "fastbert vs torch.compile"]
    assert len(cases) == 4 and series[0][1](cases[("64x64", "float32", "fwd", "approximate=none")]) == (3.0, "3.00")


def test_markdown_summary_written(tmp_path):
    rows = [
        row(candidate=c, p50=p, busy=c == "eager")
        for c, p in (("eager", 2.0), ("torch.compile", 1.5), ("fastbert-cpu", 1.0))
    ]
    rows += [row(op="bert_pretrain", candidate="fastbert", nbytes=None, pass_="step", params="preset=mini")]
    json_path, _ = report.write_results(rows, META, tmp_path)
    md = report.write_markdown(json_path)
    assert md == tmp_path / "cpu-test-2c.md"
    text = md.read_text()
    assert text.startswith("# Benchmarks: Test CPU (2 cores)\n")
    assert "measured 2026-01-02, commit abc; torch 2.0" in text and "1 rows flagged busy" in text
    assert "| bias_gelu | 64x64 | float32 | fwd | approximate=none | 2 | 1.5 | 1 (0.95-1.05) | 2.00 | 1.33 |" in text
    assert "| bert_pretrain | 64x64 | float32 | step | preset=mini |" in text  # its fused candidate: fastbert


def test_readme_block_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.update_readme(readme, "# Benchmarks: X\n\nline one\n| a | b |\n")
    assert readme.read_text() == f"intro\n{report.BEGIN}\nline one\n| a | b |\n{report.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one"):
        report.update_readme(readme, "# t\nx\n")
