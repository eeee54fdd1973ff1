"""The benchmark cases (on tiny shapes every candidate runs and agrees: gelu, layernorm_residual,
gather and MLM head, BERT and patched-transformers steps) and the runner end to end (run.main,
--backends, the pytest-benchmark plugin). The harness's own pieces are in tests/test_harness.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert.bench import bench_gather_mlm, bench_gelu, bench_layernorm_residual, harness, report, run

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


def test_bert_bf16_step_case():
    """bench_bert's bf16 case: fastbert and transformers eager under bf16 autocast (fp32 parameters),
    eager-fp32 without; each takes a finite step; the summary gives both speed-ups."""
    from fastbert.bench import bench_bert

    (case,) = bench_bert.cases(dtypes=["bfloat16"], shapes=[(2, 16, 32, 1)])
    assert (case.op, case.dtype, case.pass_, case.params["autocast"]) == ("bert_pretrain", "bfloat16", "step", "bf16")
    assert harness.expected_candidates(bench_bert, case, "cpu") == list(bench_bert.BF16_CANDIDATES)
    shapes = [(2, 16, 32, 1)]  # by default the bf16 case is in --full and on CUDA, not in a quick CPU run
    assert [c.dtype for c in bench_bert.cases(dtypes=["float32"], shapes=shapes)] == ["float32"]
    assert [c.dtype for c in bench_bert.cases(shapes=shapes)] == ["float32"]
    assert [c.dtype for c in bench_bert.cases(mode="full", shapes=shapes)] == ["float32", "bfloat16"]
    assert [c.dtype for c in bench_bert.cases("cuda", shapes=shapes)] == ["float32", "bfloat16"]
    steps = case.setup()
    hf = bench_bert.transformers is not None
    assert set(steps) == {"fastbert"} | ({"eager", "eager-fp32"} if hf else set())
    for name, step in steps.items():
        seen = []
        hook = step.model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        step()
        hook.remove()
        assert seen == [name != "eager-fp32"] and torch.isfinite(step.last_loss), name
        assert all(p.dtype == torch.float32 for p in step.model.parameters()), name
    row = lambda name, ms: dict(zip(harness.KEY, case.key()), candidate=name, p50_ms=ms)  # noqa: E731
    text = bench_bert.summary([row("eager", 100.0), row("eager-fp32", 50.0), row("fastbert", 40.0)])
    assert "x eager (same autocast): eager-fp32 2.00x, fastbert 2.50x" in text
    assert "x eager fp32 (no autocast): eager 0.50x, fastbert 1.25x" in text
