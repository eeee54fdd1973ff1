"""fastbert/bench/bench_realistic.py (the `realistic` workload of `fastbert bench`) at a tiny size: the batch
it builds, its cases, candidates that run and agree, and the harness's per-case budget. Behaviour
only; no timing is checked."""

import dataclasses

import pytest
import torch

from fastbert.bench import bench_realistic as br
from fastbert.bench import harness


def test_lengths_are_fixed_and_about_54_percent_padding():
    lengths = br.sentence_lengths()
    assert torch.equal(lengths, br.sentence_lengths())  # fixed seed: every run times the same batch
    assert len(lengths) == br.BATCH and br.MIN_LEN <= int(lengths.min()) and int(lengths.max()) <= br.MAX_LEN
    assert abs(br.padding_fraction(lengths) - 0.54) < 0.01
    assert abs(lengths.float().median().item() - br.MEDIAN) <= 2
    assert br.padding_fraction(torch.tensor([5, 5])) == 0.0
    assert br.padding_fraction(torch.tensor([1, 3])) == pytest.approx(1 / 3)


def test_workload_batches():
    work = br.make_workload(101, batch=6, hi=16)
    lengths, p, n = work.lengths, work.padded, work.nopad
    assert int(lengths.max()) <= 16 and work.name.endswith("clamp8..16-seed178")
    assert p["input_ids"].shape == (6, int(lengths.max())) and p["labels"].shape == (6,)
    assert torch.equal(p["attention_mask"].sum(1), lengths)
    assert (p["input_ids"][:, 0] == 1).all()  # [CLS] first
    assert (p["input_ids"].gather(1, (lengths - 1)[:, None]) == 2).all()  # [SEP] last real token
    assert (p["input_ids"][p["attention_mask"] == 0] == 0).all()  # right padding, pad id 0
    assert n["attention_mask"].all() and n["input_ids"].shape == (6, round(int(lengths.sum()) / 6))
    assert abs(n["input_ids"].numel() - work.tokens) <= 3
    assert set(work.params()) == {"lengths", "pad_frac", "tokens", "padded_len", "nopad_len"}
    assert "labels" not in br.make_workload(101, batch=2, labels=False).padded


def test_cases_shapes_and_presets():
    step, fwd = br.cases()
    assert (step.op, step.shape, step.pass_, fwd.pass_) == ("bert_realistic", (32, 128, 768, 12), "step", "fwd")
    assert step.params["preset"] == "base" and step.params["pad_frac"] == pytest.approx(0.542, abs=1e-3)
    assert step.budget == br.QUICK_BUDGET and step.peak_memory(None, "cpu") is None
    assert br.cases(mode="full")[0].budget == br.FULL_BUDGET
    assert br.cases(preset="tiny")[0].shape == (32, 128, 128, 2)
    assert br.cases(dtypes=["float16"]) == [] and br.cases(shapes=[(4096, 3072)]) == []
    assert br.CANDIDATES == (*br.STEP_CANDIDATES, "eager-fp32") and set(br.FWD_CANDIDATES) < set(br.CANDIDATES)
    assert harness.expected_candidates(br, fwd, "cpu") == list(br.FWD_CANDIDATES)
    assert harness.expected_candidates(br, step, "cpu") == list(br.STEP_CANDIDATES)


def test_tiny_cases_run_and_agree():
    """Every candidate takes a step (the nopad ones on the same model and optimizer as their padded
    counterpart); with dropout off the inference candidates give the same logits (same weights)."""
    step_case, fwd_case = br.cases(shapes=[(4, 16, 32, 1)])
    assert step_case.params["preset"] == "custom" and step_case.params["padded_len"] <= 16
    steps = step_case.setup()
    hf = br.transformers is not None
    assert list(steps) == list(br.STEP_CANDIDATES if hf else (br.FASTBERT, br.FASTBERT_NOPAD))
    for name, step in steps.items():
        weights = [p.detach().clone() for p in step.model.parameters()]
        step()
        assert torch.isfinite(step.last_loss), name
        assert any(not torch.equal(w, p) for w, p in zip(weights, step.model.parameters())), name
    assert steps[br.FASTBERT_NOPAD].optimizer is steps[br.FASTBERT].optimizer
    assert steps[br.FASTBERT_NOPAD].inputs["attention_mask"].all()
    assert set(fwd_case.setup()) == set(br.FWD_CANDIDATES if hf else (br.FASTBERT,))

    _, cfg = br.config_for(32, 1)
    infer = br.make_fwd_candidates(
        cfg.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), batch=4, max_len=16
    )
    logits = {name: fn() for name, fn in infer.items()}
    for name, out in logits.items():
        assert out.shape == (4, 2) and not infer[name].model.training
        torch.testing.assert_close(out, logits[br.FASTBERT], rtol=1e-4, atol=1e-5, msg=name)


def test_case_budget_replaces_the_runs_and_summary_names_the_overhead():
    calls = {"a": 0, "b": 0}

    def setup():
        return {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}

    fixed = harness.Budget(min_rounds=3, max_rounds=3, time_s=0.0, rel_ci=0.0, warmup_calls=1, warmup_s=0.0)
    case = harness.Case("x", (1,), "float32", "fwd", None, setup, peak_memory=br._no_peak_memory, budget=fixed)
    rows = harness.run_case(case, {"device": "cpu", "ncores": 2}, budget=harness.FULL)
    assert [r["n"] for r in rows] == [3, 3] and calls == {"a": 4, "b": 4}

    step, _ = br.cases(shapes=[(4, 16, 32, 1)])
    row = lambda name, ms: dict(zip(harness.KEY, step.key()), candidate=name, p50_ms=ms)  # noqa: E731
    text = br.summary([row("eager", 100.0), row("fastbert", 50.0), row("fastbert-nopad", 40.0)])
    assert "fastbert 2.00x" in text and "padding overhead" in text and "fastbert 1.25x" in text
    assert step.params["lengths"] in text and f"{100 * step.params['pad_frac']:.1f}% padding" in text
    assert dataclasses.replace(step, budget=None).budget is None


def test_bf16_cases_run_under_autocast():
    """The bf16 cases (default in --full and on CUDA, else with --dtype bf16): the same workload,
    params autocast=bf16; every candidate runs under bf16 autocast with fp32 parameters (eager-fp32
    without autocast) and takes a finite step; the fwd candidates give bf16 logits."""
    assert br.case_dtypes() == ["float32"] and br.case_dtypes(mode="full") == ["float32", "bfloat16"]
    assert br.case_dtypes("cuda") == ["float32", "bfloat16"] and br.case_dtypes(dtypes=["bfloat16"]) == ["bfloat16"]
    assert [(c.dtype, c.pass_) for c in br.cases(mode="full", preset="tiny")] == [
        ("float32", "step"),
        ("float32", "fwd"),
        ("bfloat16", "step"),
        ("bfloat16", "fwd"),
    ]
    step_case, fwd_case = br.cases(dtypes=["bfloat16"], shapes=[(4, 16, 32, 1)])
    assert (step_case.dtype, fwd_case.dtype) == ("bfloat16", "bfloat16")
    assert step_case.params["autocast"] == "bf16" and "autocast=bf16" in step_case.key()[4]
    assert harness.expected_candidates(br, step_case, "cpu") == list(br.BF16_STEP_CANDIDATES)
    assert harness.expected_candidates(br, fwd_case, "cpu") == list(br.BF16_FWD_CANDIDATES)
    steps = step_case.setup()
    hf = br.transformers is not None
    assert list(steps) == list(br.BF16_STEP_CANDIDATES if hf else (br.FASTBERT,))
    for name, step in steps.items():
        seen = []
        hook = step.model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        weights = [p.detach().clone() for p in step.model.parameters()]
        step()
        hook.remove()
        assert seen == [name != "eager-fp32"] and torch.isfinite(step.last_loss), name
        assert all(p.dtype == torch.float32 for p in step.model.parameters()), name  # mixed precision
        assert any(not torch.equal(w, p) for w, p in zip(weights, step.model.parameters())), name
    assert not torch.is_autocast_enabled("cpu")
    for name, infer in fwd_case.setup().items():
        logits = infer()
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all(), name


def test_summary_prints_the_bf16_ratios_over_eager_and_eager_fp32():
    step, _ = br.cases(dtypes=["bfloat16"], shapes=[(4, 16, 32, 1)])
    row = lambda name, ms: dict(zip(harness.KEY, step.key()), candidate=name, p50_ms=ms)  # noqa: E731
    rows = [row("eager", 100.0), row("eager-fp32", 80.0), row("patched", 50.0), row("fastbert", 40.0)]
    lines = br.summary(rows).splitlines()
    assert "bf16 autocast" in lines[0] and "vs eager (same bf16 autocast): eager-fp32 1.25x" in lines[0]
    assert "patched 2.00x, fastbert 2.50x" in lines[0]
    assert lines[1].startswith("  vs eager fp32") and "eager 0.80x, patched 1.60x, fastbert 2.00x" in lines[1]
    assert "padding overhead" not in br.summary(rows)
