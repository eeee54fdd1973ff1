"""scripts/gpu_check.sh and its Python stages (scripts/gpu_check.py), checked here without a GPU: the
script parses and writes at most 8 files; the sanitize stage's op runs and the BERT step run on CPU
tensors (the same code the GPU run executes on CUDA tensors); the summary parses the stage logs."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = os.path.join(ROOT, "scripts", "gpu_check.py")


def run(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, STAGES, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def test_script_parses_and_writes_at_most_8_files():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    files = set(re.findall(r"\$OUT/([\w.]+)", text)) | {"results.json"}
    assert len(files) <= 8, sorted(files)
    header = text.split("set -uo pipefail")[0]
    for name in files:
        assert name in header, f"{name} is written but not listed in the script's header"
    limits = dict(re.findall(r"^\s*(?:if ! )?(?:\( )?stage (\w+) (\d+)", text, re.M))
    assert set(limits) == {"build", "tests", "sanitize", "bench", "bert"}, limits
    # tests and sanitize overlap: the longest of the two counts
    total = sum(int(v) for k, v in limits.items() if k not in ("tests", "sanitize"))
    total += max(int(limits["tests"]), int(limits["sanitize"]))
    assert total <= 9 * 60, f"stage limits add up to {total} s, over 9 minutes"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_sanitize_stage_runs_every_op(backend):
    env = {"TRITON_INTERPRET": "1"} if backend == "triton" else {}
    r = run("sanitize", "--backend", backend, "--device", "cpu", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == 14, r.stdout  # 7 ops x fp32, fp16


def test_bert_step_stage_on_cpu(tmp_path):
    out = tmp_path / "bert.json"
    r = run(
        "bert-step",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "2",
        "--modes",
        "eager",
        "--no-unpad",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["modes"]["eager"]
    assert res["error"] is None and len(res["losses"]) == 3 and res["median_ms"] > 0
    assert res["losses"][1] < res["losses"][0] + 1.0


def test_summarize(tmp_path):
    (tmp_path / "summary.txt").write_text(
        "== versions\n3.12 torch 2.11.0 cuda 13.0\nstage build 71 s exit 0\nstage tests 150 s exit 1\n"
    )
    (tmp_path / "tests.log").write_text("3 failed, 1200 passed, 4 skipped in 90s\n10 passed in 3s\n")
    (tmp_path / "sanitizer.log").write_text(
        "## compute-sanitizer --tool memcheck\nok x\n========= ERROR SUMMARY: 0 errors\n"
        "## compute-sanitizer --tool racecheck\nMISMATCH y\n"
        "========= ERROR SUMMARY: 2 errors\n"
    )
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"modes": {}}))
    r = run("summarize", str(tmp_path), "--bert", str(bert))
    assert r.returncode == 1, r.stdout + r.stderr  # a failed stage and sanitizer errors
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["versions"] == "3.12 torch 2.11.0 cuda 13.0"
    assert res["stages"] == [dict(name="build", seconds=71, status=0), dict(name="tests", seconds=150, status=1)]
    assert res["tests"] == dict(passed=1210, failed=3, skipped=4, error=0)
    assert res["sanitizer"] == {"memcheck": dict(errors=0, mismatches=0), "racecheck": dict(errors=2, mismatches=1)}
    assert res["bert_step"] == {"modes": {}} and res["bench"] is None
