"""Next-sentence-prediction pairs (layout, truncation, short sequences, determinism, linear time on
huge input), the bundled corpus, and NSP pairs -> masked batch -> a training step. The tokenizer
and document tests are in tests/test_data.py, whose fixtures these tests share."""

import math
import random
from fnmatch import fnmatch

import pytest
import torch

from fastbert.data import (
    DEFAULT_CORPUS_TITLES,
    Document,
    MaskingCollator,
    nsp_examples,
    read_documents,
    tokenize_documents,
)
from tests.test_data import FIRST_SENTENCE, ROOT, SHARED_AUSTEN, corpus, tok  # noqa: F401  (fixtures)
from tests.utils import within

# ---------------------------------------------------------------------------- next-sentence prediction

BASE, STRIDE = 100, 10_000


def synthetic_documents(n_docs, n_tokens, sentence_lengths, seed=0):
    """Documents of token ids: document k counts up from BASE + k * STRIDE, so every token says
    which document it is from and where, and segments must be runs of consecutive ids."""
    rng = random.Random(seed)
    docs = []
    for k in range(n_docs):
        sentences, start = [], BASE + k * STRIDE
        while start < BASE + k * STRIDE + n_tokens:
            n = rng.randint(*sentence_lengths)
            sentences.append(list(range(start, start + n)))
            start += n
        docs.append(Document(f"doc{k}", sentences))
    return docs


def check_example(example, tok, max_seq_length):
    """The layout of one example; returns (segment A, segment B, label)."""
    ids, types, label = example
    assert len(ids) == len(types) <= max_seq_length and label in (0, 1)
    seps = [i for i, t in enumerate(ids) if t == tok.sep_id]
    assert ids[0] == tok.cls_id and len(seps) == 2 and seps[1] == len(ids) - 1 and tok.cls_id not in ids[1:]
    a, b = ids[1 : seps[0]], ids[seps[0] + 1 : -1]
    assert a and b
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return a, b, label


def test_nsp_pairs(tok):
    docs = synthetic_documents(16, 2500, (1, 8))
    max_len = 24
    examples = nsp_examples(docs, tok, max_seq_length=max_len, short_seq_prob=0.0, seed=1)
    is_next = 0
    for ex in examples:
        a, b, label = check_example(ex, tok, max_len)
        for seg in (a, b):  # contiguous spans of one document (sentences in order, truncated at the ends)
            assert seg == list(range(seg[0], seg[0] + len(seg)))
        doc_a, doc_b = (a[0] - BASE) // STRIDE, (b[0] - BASE) // STRIDE
        if label == 0:
            is_next += 1
            assert doc_a == doc_b and a[-1] < b[0]
        else:
            assert doc_a != doc_b  # NotNext: B from another document
    n = len(examples)
    assert n > 2000
    # B is random with probability 1/2, except for a one-sentence chunk (at most one per document end here)
    assert abs(is_next - n / 2) <= 4 * math.sqrt(n / 4) + len(docs), (is_next, n)
    # every token of every document is used as A or B at least once (unused sentences are put back)
    seen = {t for ex in examples for t in ex.input_ids}
    assert sum(t in seen for d in docs for s in d.sentences for t in s) > 0.85 * 16 * 2500


def test_nsp_truncation_and_short_sequences(tok):
    docs = synthetic_documents(3, 3000, (30, 60), seed=2)  # sentences longer than the whole pair
    examples = nsp_examples(docs, tok, max_seq_length=20, short_seq_prob=0.0, seed=0)
    assert examples and all(len(ex.input_ids) == 20 for ex in examples)
    for ex in examples:
        a, b, _ = check_example(ex, tok, 20)
        assert abs(len(a) - len(b)) <= 1  # the longer side was trimmed
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
    # short targets shorten pairs of short sentences
    docs = synthetic_documents(4, 2000, (1, 4), seed=3)
    full = nsp_examples(docs, tok, max_seq_length=64, short_seq_prob=0.0, seed=0)
    short = nsp_examples(docs, tok, max_seq_length=64, short_seq_prob=1.0, seed=0)
    mean = lambda exs: sum(len(e.input_ids) for e in exs) / len(exs)  # noqa: E731
    assert mean(short) < 0.75 * mean(full) and len(short) > len(full)
    for ex in short:
        check_example(ex, tok, 64)


def test_nsp_deterministic_and_checked(tok):
    docs = synthetic_documents(4, 400, (1, 10))
    first = nsp_examples(docs, tok, max_seq_length=32, seed=7)
    assert first == nsp_examples(docs, tok, max_seq_length=32, seed=7)
    assert first != nsp_examples(docs, tok, max_seq_length=32, seed=8)
    text_docs = [Document("a", ["Mr. Darcy bowed.", "She smiled."]), Document("b", ["It rained.", "", "Then not."])]
    assert nsp_examples(text_docs, tok, max_seq_length=16, seed=0) == nsp_examples(
        tokenize_documents(text_docs, tok), tok, max_seq_length=16, seed=0
    )
    with pytest.raises(ValueError, match="at least 2 non-empty documents"):
        nsp_examples(docs[:1] + [Document("empty", [[]])], tok)
    with pytest.raises(ValueError, match="max_seq_length must be an int >= 5"):
        nsp_examples(docs, tok, max_seq_length=4)
    with pytest.raises(ValueError, match="nsp_prob must be in"):
        nsp_examples(docs, tok, nsp_prob=1.5)


# ----------------------------------------------------------------------------------- bundled corpus


def test_default_corpus(corpus, tok):
    assert (
        [d.title for d in corpus]
        == list(DEFAULT_CORPUS_TITLES)
        == [
            "0_emma",
            "1_mansfield_park",
            "2_northanger_abbey",
            "3_persuasion",
            "4_pride_and_prejudice",
            "5_sense_and_sensibility",
        ]
    )
    assert all(len(d.sentences) > 3000 and all(isinstance(s, str) and s for s in d.sentences) for d in corpus)
    pp = corpus[4].sentences
    assert pp[:4] == ["PRIDE AND PREJUDICE", "By Jane Austen", "Chapter 1", FIRST_SENTENCE]
    assert (
        '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let '
        'at last?"' in pp
    )
    if SHARED_AUSTEN.is_dir():  # the bundled copy reads exactly as the original folder
        assert read_documents(SHARED_AUSTEN) == corpus
    # pretraining pairs from two of the novels
    examples = nsp_examples(corpus[2:4], tok, max_seq_length=64, seed=0)
    assert len(examples) > 2000 and {ex.next_sentence_label for ex in examples} == {0, 1}
    for ex in examples:
        check_example(ex, tok, 64)
    assert sum(len(ex.input_ids) == 64 for ex in examples) > len(examples) / 2


def test_corpus_is_package_data():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not run from a source checkout")
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["fastbert"]
    assert any(fnmatch("data/austen.tar.xz", p) for p in patterns), patterns
    assert (ROOT / "fastbert" / "data" / "austen.tar.xz").stat().st_size < 1_500_000


def test_examples_to_masked_batch_to_a_training_step(corpus, tok):
    """Tokenizer -> NSP pairs -> whole-word masked batch -> one fused BertForPreTraining step."""
    from fastbert.models import BertConfig, BertForPreTraining

    docs = [d for d in corpus if d.title in ("2_northanger_abbey", "3_persuasion")]
    examples = nsp_examples(docs, tok, max_seq_length=64, seed=1)[:16]
    collate = MaskingCollator(
        tok.vocab_size,
        tok.mask_id,
        tok.pad_id,
        tok.special_ids,
        continuation=tok.continuation_mask,
        whole_word=True,
        seed=2,
    )
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 64
    assert ((batch["labels"] != -100).sum(1) >= 1).all()
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64))
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.mlm_loss > 0 and out.nsp_loss > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------- linear time on huge input


def _truncate_one_at_a_time(a, b, max_num_tokens, rng):  # what nsp_examples did (quadratic), the reference
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def test_nsp_truncation_is_linear_and_unchanged(tok):
    from fastbert.data.corpus import LONG_SENTENCE_TOKENS, _truncate_pair

    rng = random.Random(0)
    for trial in range(2000):
        a, b = list(range(rng.randint(0, 50))), list(range(100, 100 + rng.randint(0, 50)))
        m = rng.randint(1, 60)
        a2, b2, r1, r2 = a[:], b[:], random.Random(trial), random.Random(trial)
        _truncate_one_at_a_time(a, b, m, r1)
        _truncate_pair(a2, b2, m, r2)
        assert (a2, b2) == (a, b) and r1.random() == r2.random()  # same tokens, same draws
    a = list(range(400_000))
    with within(20):
        _truncate_pair(a, [1, 2], 125, random.Random(0))
    assert len(a) == 123 and a == list(range(a[0], a[0] + 123))
    # a document that is one sentence of a million tokens (a file on one line without sentence ends)
    giant = Document("one_line", [[7 + i % 500 for i in range(1_000_000)]])
    other = Document("other", [[9, 10, 11, 12]] * 50)
    with within(20):
        examples = nsp_examples([giant, other], tok, max_seq_length=64, seed=0)
    assert all(len(e.input_ids) <= 64 for e in examples)
    assert sum(e.input_ids[1] >= 7 and e.input_ids[1] != 9 for e in examples) >= 1_000_000 // LONG_SENTENCE_TOKENS
