"""The pretraining loop on the bundled corpus: the MLM loss falls; Ctrl-C mid-step then resume
reproduces the uninterrupted run's losses exactly; metrics and checkpoints on disk."""

import json
import math

import pytest
import torch

from fastbert.data import MaskingCollator, WordPieceTokenizer, default_corpus_documents, nsp_examples
from fastbert.models import BertConfig, BertForPreTraining
from fastbert.train import TrainConfig, evaluate_pretraining, latest_checkpoint, pretrain


@pytest.fixture(scope="module")
def data():
    docs = [d for d in default_corpus_documents() if d.title in ("2_northanger_abbey", "3_persuasion")]
    tok = WordPieceTokenizer.train_from_texts([s for d in docs for s in d.sentences], vocab_size=1000)
    return tok, nsp_examples(docs, tok, max_seq_length=64, seed=0)


def parts(tok, seed=0):
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64))
    collate = MaskingCollator(
        tok.vocab_size,
        tok.mask_id,
        tok.pad_id,
        tok.special_ids,
        continuation=tok.continuation_mask,
        whole_word=True,
        seed=seed,
    )
    return model, collate


def test_pretraining_lowers_the_mlm_loss(tmp_path, data):
    tok, examples = data
    model, collate = parts(tok)
    hist = pretrain(
        model,
        examples,
        collate,
        TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=6),
        tmp_path,
        progress=False,
    )
    first = sum(h["mlm_loss"] for h in hist[:5]) / 5
    last = sum(h["mlm_loss"] for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)  # nats: from ~ln(vocab) towards the unigram entropy and below
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61)) and rows[-1]["tokens_per_s"] > 0
    assert latest_checkpoint(tmp_path).name == "step-60"


def test_held_out_evaluation_at_checkpoints_leaves_training_unchanged(tmp_path, data):
    tok, examples = data
    held, train = examples[:24], examples[24:]
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, save_every=2)
    model, collate = parts(tok)
    plain = pretrain(model, train, collate, cfg, tmp_path / "plain", progress=False)
    model, collate = parts(tok)
    seen = []

    def evaluate(m):
        assert not m.training
        seen.append(evaluate_pretraining(m, held, parts(tok, seed=7)[1]))
        return seen[-1]

    timed = pretrain(model, train, collate, cfg, tmp_path / "eval", progress=False, evaluate=evaluate)
    assert model.training  # back in training mode
    assert [h["loss"] for h in timed] == [h["loss"] for h in plain]  # bit for bit: no RNG or weight touched
    rows = [json.loads(line) for line in (tmp_path / "eval" / "held_out.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [{k: v for k, v in r.items() if k != "step"} for r in rows] == json.loads(json.dumps(seen))
    again = evaluate_pretraining(model, held, parts(tok, seed=7)[1])  # the final row is the final model's
    assert again["mlm_loss"] == pytest.approx(rows[-1]["mlm_loss"], rel=1e-6)


def test_interrupt_mid_step_then_resume_is_exact(tmp_path, data):
    tok, examples = data
    cfg = TrainConfig(steps=6, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2)
    model, collate = parts(tok)
    full = pretrain(model, examples, collate, cfg, tmp_path / "full", progress=False)

    model, collate = parts(tok)
    calls = {"n": 0}
    real = collate.__call__

    class Interrupting:  # Ctrl-C during the second micro-batch of step 4
        def __call__(self, ex):
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt
            return real(ex)

        def __getattr__(self, name):
            return getattr(collate, name)

    with pytest.raises(KeyboardInterrupt):
        pretrain(model, examples, Interrupting(), cfg, tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    torch.manual_seed(123)  # as a fresh process would
    model2, collate2 = parts(tok, seed=5)
    rest = pretrain(model2, examples, collate2, cfg, tmp_path / "run", resume=True, progress=False)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[3:]]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_bad_arguments(tmp_path, data):
    tok, examples = data
    model, collate = parts(tok)
    with pytest.raises(ValueError, match="has no checkpoint"):
        pretrain(model, examples, collate, TrainConfig(steps=1, batch_size=2), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretrain(model, examples[:3], collate, TrainConfig(steps=1, batch_size=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainConfig(steps=0)


def strict_json(line):
    """json.loads that rejects NaN and Infinity (not JSON; jq and JavaScript reject them)."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def test_a_diverging_run_stops_and_metrics_stay_json(tmp_path, data):
    tok, examples = data
    model, collate = parts(tok)
    with pytest.raises(ValueError, match="loss is (nan|inf).*diverged"):
        pretrain(
            model,
            examples,
            collate,
            TrainConfig(steps=3, batch_size=4, lr=1e30, save_every=1),
            tmp_path,
            progress=False,
        )
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert latest_checkpoint(tmp_path).name == f"step-{rows[-1]['step']}"  # nothing saved past the last good step
    # no NSP labels: the NSP accuracy is not a number, written as null (not NaN)
    model, collate = parts(tok)
    bare = [e[:2] for e in examples[:8]]
    pretrain(model, bare, collate, TrainConfig(steps=1, batch_size=4), tmp_path / "mlm", progress=False)
    row = strict_json((tmp_path / "mlm" / "metrics.jsonl").read_text())
    assert row["nsp_accuracy"] is None and math.isfinite(row["loss"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", float("inf"), "lr must be a finite number > 0"),
        ("lr", float("nan"), "lr must be"),
        ("lr", 0.0, "lr must be"),
        ("lr", -1e-3, "lr must be"),
        ("clip", float("inf"), "clip must be"),
        ("weight_decay", float("nan"), "weight_decay must be"),
        ("seed", 2**70, "seed must be"),
        ("seed", -1, "seed must be"),
        ("save_every", -1, "save_every must be"),
        ("batch_size", True, "batch_size must be"),
        ("warmup_ratio", float("inf"), "warmup_ratio"),
        ("warmup_steps", 5, "warmup_steps must be"),
    ],
)
def test_config_rejects_non_finite_and_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=4, **{field: value})
