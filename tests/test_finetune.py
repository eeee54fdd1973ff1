"""The which-novel task and the fine-tuning loop: passages are greedy packs of consecutive
sentences, split by whole blocks without leakage; collation pads and masks; evaluate equals the
accuracy computed by hand; fine-tuning a tiny model on two novels learns to tell them apart."""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from fastbert.data import WordPieceTokenizer, default_corpus_documents
from fastbert.data.corpus import Document, tokenize_documents
from fastbert.data.novels import Passage, novel_passages, novel_titles, take_fraction, word_order_passages
from fastbert.models import BertConfig, BertForSequenceClassification
from fastbert.train.finetune import FinetuneConfig, collate_passages, compare_arms, evaluate, finetune, mean_std


def random_documents(rng, n_docs=3):
    """Documents of made-up words; some sentences are long (truncated), some empty (skipped)."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "to", "vi", "be", "dor", "el", "fin"]
    word = lambda: "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))  # noqa: E731
    docs = []
    for d in range(n_docs):
        sentences = []
        for _ in range(rng.randint(150, 250)):
            n = rng.randint(40, 80) if rng.random() < 0.05 else rng.randint(1, 12)
            sentences.append("" if rng.random() < 0.03 else " ".join(word() for _ in range(n)).capitalize() + ".")
        docs.append(Document(f"{d}_doc", sentences))
    return docs


@pytest.fixture(scope="module")
def random_docs():
    s = int(os.environ.get("FASTBERT_TEST_SEED", torch.seed() % 2**31))
    print(f"documents seed={s}")
    docs = random_documents(random.Random(s))
    return docs, WordPieceTokenizer.train_from_texts([s for d in docs for s in d.sentences], vocab_size=300)


def expected_body(sentences, i, cap):
    """Greedy packing from sentence ``i``: (the passage's tokens, the next sentence's index)."""
    if len(sentences[i]) >= cap:
        return sentences[i][:cap], i + 1
    body, j = [], i
    while j < len(sentences) and len(body) + len(sentences[j]) <= cap:
        body += sentences[j]
        j += 1
    return body, j


def test_passages_are_greedy_packs_split_by_whole_blocks(random_docs, seed):
    docs, tok = random_docs
    rng = random.Random(seed)
    max_len, block, frac = rng.randint(8, 40), rng.randint(2, 5), rng.uniform(0.1, 0.5)
    train, test = novel_passages(docs, tok, max_seq_length=max_len, test_fraction=frac, block=block, seed=seed)
    for p in train + test:
        assert isinstance(p, Passage) and 3 <= len(p.input_ids) <= max_len
        assert p.input_ids[0] == tok.cls_id and p.input_ids[-1] == tok.sep_id
        assert not {tok.cls_id, tok.sep_id} & set(p.input_ids[1:-1])
    assert novel_titles(docs) == ["0_doc", "1_doc", "2_doc"]
    for label, doc in enumerate(tokenize_documents(docs, tok)):
        sentences = [s for s in doc.sentences if s]
        queues = {"train": [p for p in train if p.label == label], "test": [p for p in test if p.label == label]}
        n = len(queues["train"]) + len(queues["test"])
        sources, i = [], 0
        while i < len(sentences):  # every passage, in document order, from one split or the other
            body, i = expected_body(sentences, i, max_len - 2)
            split = next(s for s in ("train", "test") if queues[s] and queues[s][0].input_ids[1:-1] == body)
            queues[split].pop(0)
            sources.append(split)
        assert not queues["train"] and not queues["test"] and len(sources) == n  # all covered, exactly once
        blocks = [set(sources[k : k + block]) for k in range(0, n, block)]
        assert all(len(b) == 1 for b in blocks)  # whole blocks go to one split
        n_test = sum(b == {"test"} for b in blocks)
        assert n_test == min(len(blocks) - 1, max(1, round(frac * len(blocks)))) >= 1


def test_passages_are_deterministic_per_seed(random_docs, seed):
    docs, tok = random_docs
    a = novel_passages(docs, tok, max_seq_length=16, test_fraction=0.3, block=2, seed=seed)
    assert a == novel_passages(docs, tok, max_seq_length=16, test_fraction=0.3, block=2, seed=seed)
    b = novel_passages(docs, tok, max_seq_length=16, test_fraction=0.3, block=2, seed=seed + 1)
    assert a[1] != b[1] and sorted(a[0] + a[1]) == sorted(b[0] + b[1])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(documents=1), "at least 2 documents"),
        (dict(max_seq_length=2), "max_seq_length must be an int >= 3"),
        (dict(test_fraction=0.0), r"test_fraction must be in \(0, 1\)"),
        (dict(test_fraction=1.0), r"test_fraction must be in \(0, 1\)"),
        (dict(block=0), "block must be a positive int"),
        (dict(empty=True), "document 1 .* has no passages"),
        (dict(block=10_000), "fewer than 2 blocks of 10000"),
    ],
)
def test_passages_bad_inputs(random_docs, change, message):
    docs, tok = random_docs
    docs = docs[: change.pop("documents", len(docs))]
    if change.pop("empty", False):
        docs = [docs[0], Document("blank", ["", "  "]), docs[2]]
    with pytest.raises(ValueError, match=message):
        novel_passages(docs, tok, **{"max_seq_length": 16, "block": 2, **change})


def test_word_order_shuffles_about_half_and_keeps_every_token(random_docs, seed):
    docs, tok = random_docs
    train, _ = novel_passages(docs, tok, max_seq_length=24, block=3, seed=seed)
    same = Passage([tok.cls_id, 9, 9, 9, tok.sep_id], 4)  # cannot be shuffled: stays label 0
    short = Passage([tok.cls_id, 11, tok.sep_id], 2)
    passages = [*train, *[same] * 20, *[short] * 20]
    out = word_order_passages(passages, seed)
    assert out == word_order_passages(passages, seed) and len(out) == len(passages)
    assert out != word_order_passages(passages, seed + 1)
    for p, q in zip(passages, out):
        assert q.input_ids[0] == tok.cls_id and q.input_ids[-1] == tok.sep_id
        assert sorted(q.input_ids) == sorted(p.input_ids)  # the same tokens, in any order
        assert (q.input_ids != p.input_ids) == (q.label == 1)
        assert q.label == 0 or len(set(p.input_ids[1:-1])) > 1
    shuffled = sum(q.label for q in out[: len(train)])
    assert abs(shuffled - len(train) / 2) < 4 * math.sqrt(len(train) / 4)  # a fair coin, within 4 sigma
    assert all(q.label == 0 for q in out[len(train) :])


def test_collate_pads_and_masks(seed):
    lengths = torch.randint(1, 30, (9,)).tolist()
    passages = [Passage(torch.randint(5, 100, (n,)).tolist(), int(torch.randint(0, 4, ()))) for n in lengths]
    b = collate_passages(passages, pad_id=7)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape == (9, max(lengths))
    for row, (ids, label) in enumerate(passages):
        n = len(ids)
        assert b["input_ids"][row, :n].tolist() == ids and (b["input_ids"][row, n:] == 7).all()
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert b["labels"][row] == label
    assert not b["token_type_ids"].any() and all(v.dtype == torch.long for v in b.values())
    with pytest.raises(ValueError, match="no passages"):
        collate_passages([], 0)


def tiny_model(vocab_size=100, num_labels=4, max_len=64):
    return BertForSequenceClassification(
        BertConfig.from_preset("tiny", vocab_size=vocab_size, num_labels=num_labels, max_position_embeddings=max_len)
    )


def random_passages(n, num_labels, vocab_size=100):
    return [
        Passage(
            [2, *torch.randint(5, vocab_size, (int(torch.randint(1, 20, ())),)).tolist(), 3],
            int(torch.randint(0, num_labels, ())),
        )
        for _ in range(n)
    ]


def test_evaluate_matches_the_accuracy_by_hand(seed):
    model = tiny_model(num_labels=4)
    passages = random_passages(37, num_labels=3)  # label 3 has no passages
    model.train()
    res = evaluate(model, passages, pad_id=0, batch_size=7)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        batch = collate_passages(passages, 0)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    hit = logits.argmax(-1) == batch["labels"]
    assert res["accuracy"] == hit.sum().item() / len(passages)
    assert res["per_class"][:3] == [
        hit[batch["labels"] == c].sum().item() / (batch["labels"] == c).sum().item() for c in range(3)
    ]
    assert res["per_class"][3] is None
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)
    assert evaluate(model, passages, 0)["accuracy"] == res["accuracy"] and not model.training
    with pytest.raises(ValueError, match="label 4 outside"):
        evaluate(model, [Passage([2, 9, 3], 4)], 0)


@pytest.fixture(scope="module")
def two_novels():
    docs = [d for d in default_corpus_documents() if d.title in ("2_northanger_abbey", "3_persuasion")]
    tok = WordPieceTokenizer.train_from_texts([s for d in docs for s in d.sentences], vocab_size=1000)
    return tok, novel_passages(docs, tok, max_seq_length=64, seed=0)


@pytest.fixture
def one_thread():
    """One intra-op thread: steadier on a small, shared CPU (oversubscribed threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_finetune_learns_which_novel(tmp_path, two_novels, seed, one_thread):
    tok, (train, test) = two_novels
    model = tiny_model(tok.vocab_size, num_labels=2).eval()
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=1e-3, seed=seed)
    res = finetune(model, train, test, tok.pad_id, cfg, out_dir=tmp_path, progress=False)
    hist, steps = res["history"], 2 * math.ceil(len(train) / 32)
    assert [h["step"] for h in hist] == list(range(1, steps + 1)) and not model.training
    assert hist[0]["lr"] == 0.0 and max(h["lr"] for h in hist) == pytest.approx(1e-3)
    first, last = (sum(h["loss"] for h in hs) / 20 for hs in (hist[:20], hist[-20:]))
    assert last < first - 0.2, (first, last)  # from ln 2 = 0.69 to about 0.3
    assert [(e["epoch"], e["step"]) for e in res["evals"]] == [(1, steps // 2), (2, steps)]
    majority = max(sum(p.label == c for p in test) for c in (0, 1)) / len(test)
    print(res["evals"])
    assert res["accuracy"] == res["evals"][-1]["accuracy"] > majority + 0.12  # ~0.8 against ~0.52
    rows = [json.loads(line) for line in (tmp_path / "finetune_metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("train") == steps and rows[-1]["kind"] == "eval"
    assert rows[-1]["accuracy"] == res["accuracy"] and rows[0]["step"] == 1


def test_the_six_novels_all_reach_the_test_set(two_novels):
    docs = default_corpus_documents()
    train, test = novel_passages(docs, two_novels[0], max_seq_length=128)
    assert novel_titles(docs)[0] == "0_emma" and len(docs) == 6
    for c in range(6):
        n_train, n_test = sum(p.label == c for p in train), sum(p.label == c for p in test)
        assert n_train > 500 and 0.05 < n_test / (n_train + n_test) < 0.15


def test_finetune_max_steps_appends_metrics_and_errors(tmp_path, seed):
    model = tiny_model(num_labels=3)
    train, test = random_passages(40, 3), random_passages(10, 3)
    cfg = FinetuneConfig(epochs=5, batch_size=8, max_steps=3, seed=seed)
    for _ in range(2):
        res = finetune(model, train, test, 0, cfg, out_dir=tmp_path, progress=False)
        assert [h["step"] for h in res["history"]] == [1, 2, 3]
        assert [(e["epoch"], e["step"]) for e in res["evals"]] == [(1, 3)] and model.training
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "finetune_metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train"] * 3 + ["eval"] + ["train"] * 3 + ["eval"]
    with pytest.raises(ValueError, match="training set is empty"):
        finetune(model, [], test, 0, cfg, progress=False)
    with pytest.raises(ValueError, match="test set is empty"):
        finetune(model, train, [], 0, cfg, progress=False)
    with pytest.raises(ValueError, match="training set has label 3 outside"):
        finetune(model, train + [Passage([2, 9, 3], 3)], test, 0, cfg, progress=False)
    for bad, message in [
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(epochs=0), "epochs must be a positive int"),
        (dict(max_steps=0), "max_steps must be None or a positive int"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(clip=-1.0), "clip must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**bad)


def test_finetune_rejects_non_finite_settings_and_stops_when_it_diverges(tmp_path, seed):
    for bad, message in [
        (dict(lr=math.inf), "lr must be > 0 and finite"),
        (dict(lr=math.nan), "lr must be > 0"),
        (dict(clip=math.inf), "clip must be >= 0"),
        (dict(weight_decay=math.nan), "weight_decay"),
        (dict(seed=2**70), "seed must be an int"),
    ]:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**bad)
    model = tiny_model(num_labels=3)
    train, test = random_passages(40, 3), random_passages(10, 3)
    with pytest.raises(ValueError, match="loss is (nan|inf).*diverged"):
        finetune(
            model,
            train,
            test,
            0,
            FinetuneConfig(epochs=3, batch_size=8, lr=1e30, clip=0.0, seed=seed),
            out_dir=tmp_path,
            progress=False,
        )

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    rows = [
        json.loads(line, parse_constant=refuse)
        for line in (tmp_path / "finetune_metrics.jsonl").read_text().splitlines()
    ]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_finetune_bf16_runs_forward_under_autocast(tmp_path, seed):
    model = tiny_model(num_labels=3)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_autocast_enabled("cpu"))))
    train, test = random_passages(24, 3), random_passages(10, 3)
    res = finetune(model, train, test, 0, FinetuneConfig(epochs=1, batch_size=8, seed=seed, bf16=True), progress=False)
    assert (True, True) in seen and (False, True) in seen and all(autocast for _, autocast in seen)
    assert all(math.isfinite(h["loss"]) for h in res["history"]) and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="bf16 must be a bool"):
        FinetuneConfig(bf16="yes")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 1.0])
def test_take_fraction_samples_each_label(seed, fraction):
    passages = random_passages(int(torch.randint(40, 200, ())), num_labels=5)
    got = take_fraction(passages, fraction, seed)
    assert got == take_fraction(passages, fraction, seed)  # deterministic per seed
    it = iter(passages)
    assert all(any(p is q for q in it) for p in got)  # a subsequence: input order, no repeats
    for label in {p.label for p in passages}:
        n = sum(p.label == label for p in passages)
        assert sum(p.label == label for p in got) == max(1, round(fraction * n))
    if fraction < 1.0:
        assert any(take_fraction(passages, fraction, s) != got for s in range(seed + 1, seed + 6))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction must be in"):
            take_fraction(passages, bad, seed)


def test_mean_std_and_compare_arms_match_statistics(seed):
    import statistics

    rng = random.Random(seed)
    n = rng.randint(2, 6)
    pre = [{"seed": s, "accuracy": rng.random()} for s in range(n)]
    scr = [{"seed": s, "accuracy": rng.random()} for s in range(n)]
    acc_pre, acc_scr = [r["accuracy"] for r in pre], [r["accuracy"] for r in scr]
    mean, std = mean_std(acc_pre)
    assert mean == pytest.approx(statistics.fmean(acc_pre), abs=1e-12)
    assert std == pytest.approx(statistics.stdev(acc_pre), abs=1e-12)  # the sample (n - 1) std
    assert mean_std([0.4]) == (0.4, None)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
    gain = compare_arms(pre, scr[::-1])  # paired by seed, not by position
    diff = statistics.fmean(acc_pre) - statistics.fmean(acc_scr)
    assert gain["mean"] == pytest.approx(diff, abs=1e-12)
    assert gain["paired"] == pytest.approx([a - b for a, b in zip(acc_pre, acc_scr)], abs=1e-12)
    spread = max(statistics.stdev(acc_pre), statistics.stdev(acc_scr))
    assert gain["in_std"] == pytest.approx(diff / spread, rel=1e-9)
    assert compare_arms(pre[:1], scr[:1])["in_std"] is None  # one seed: no spread to compare with
