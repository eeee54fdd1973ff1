"""The masking collator (15%, 80/10/10, whole-word masking, padding) and the learning-rate schedule,
checked statistically over many batches with binomial bounds."""

import math

import pytest
import torch

from fastbert.data.masking import IGNORE, MaskingCollator
from fastbert.train.schedule import linear_warmup_decay, make_scheduler

PAD, UNK, CLS, SEP, MASK = range(5)
V = 1000
SPECIAL = {PAD, UNK, CLS, SEP, MASK}
CONT = torch.zeros(V, dtype=torch.bool)
CONT[600:] = True  # ids 600.. are "##" continuation pieces


def word_tokens(g, n_words):
    """A segment of words of 1-3 pieces: a start piece (5..599) then continuation pieces (600..)."""
    out = []
    for _ in range(n_words):
        out.append(int(torch.randint(5, 600, (), generator=g)))
        out += torch.randint(600, V, (int(torch.randint(0, 3, (), generator=g)),), generator=g).tolist()
    return out


def examples(g, count=64):
    ex = []
    for _ in range(count):
        a, b = (
            word_tokens(g, int(torch.randint(1, 30, (), generator=g))),
            word_tokens(g, int(torch.randint(1, 30, (), generator=g))),
        )
        ids = [CLS] + a + [SEP] + b + [SEP]
        ex.append((ids, [0] * (len(a) + 2) + [1] * (len(b) + 1), int(torch.randint(0, 2, (), generator=g))))
    return ex


def collator(**kw):
    return MaskingCollator(V, MASK, PAD, SPECIAL, continuation=CONT, **kw)


def within(count, n, p, sigmas=5.0):
    """``count`` successes of ``n`` trials is within ``sigmas`` binomial deviations of ``p``."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def run_batches(col, batches=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ex = examples(g)
        out.append((ex, col(ex)))
    return out


def originals(ex, length):
    ids = torch.full((len(ex), length), PAD, dtype=torch.long)
    for i, (e, _, _) in enumerate(ex):
        ids[i, : len(e)] = torch.tensor(e)
    return ids


@pytest.mark.parametrize("whole_word", [False, True])
def test_rates_80_10_10_and_what_is_never_touched(seed, whole_word):
    col = collator(whole_word=whole_word, seed=seed)
    selected = candidates = budget = masked = randomised = kept = 0
    for ex, batch in run_batches(col, seed=seed + 1):
        orig = originals(ex, batch["input_ids"].shape[1])
        special = torch.isin(orig, torch.tensor(sorted(SPECIAL)))
        sel = batch["labels"] != IGNORE
        assert torch.equal(batch["labels"][sel], orig[sel])  # labels: the original ids, only where selected
        assert not (sel & special).any()  # specials and padding never selected
        assert torch.equal(batch["input_ids"][~sel], orig[~sel])  # nothing else changed
        new = batch["input_ids"][sel]
        assert not torch.isin(new[new != MASK], torch.tensor(sorted(SPECIAL))).any()  # replacements non-special
        assert torch.equal(batch["attention_mask"].bool(), orig != PAD)
        n_cand = (~special).sum(1)
        candidates += int(n_cand.sum())
        budget += sum(max(1, round(0.15 * int(c))) for c in n_cand)
        selected += int(sel.sum())
        masked += int((new == MASK).sum())
        randomised += int(((new != MASK) & (new != orig[sel])).sum())
        kept += int((new == orig[sel]).sum())
    if whole_word:  # whole words only fill the budget approximately
        assert budget * 0.93 <= selected <= budget
    else:
        assert selected == budget
    assert 0.13 <= selected / candidates <= 0.16
    # per-token draws; under whole-word masking per word (correlated), so the bound is looser there
    sig = 10.0 if whole_word else 5.0
    r = len(col.replacements)
    assert within(masked, selected, 0.8, sig) and within(randomised, selected, 0.1 * (1 - 1 / r), sig)
    assert within(kept, selected, 0.1 + 0.1 / r, sig)


def test_whole_word_masking_never_splits_a_word_and_acts_per_word(seed):
    col = collator(whole_word=True, seed=seed)
    words = random_words = 0
    for ex, batch in run_batches(col, batches=20, seed=seed + 1):
        for i, (ids, _, _) in enumerate(ex):
            labels, inputs = batch["labels"][i], batch["input_ids"][i]
            pos = 0
            while pos < len(ids):
                end = pos + 1
                while end < len(ids) and CONT[ids[end]] and ids[end] not in SPECIAL:
                    end += 1
                picked = labels[pos:end] != IGNORE
                assert picked.all() or not picked.any(), f"word {ids[pos:end]} split: {labels[pos:end]}"
                if picked.any():
                    words += 1
                    m = inputs[pos:end] == MASK
                    assert m.all() or not m.any(), "80/10/10 applied per piece, not per word"
                    orig = torch.tensor(ids[pos:end])
                    random_words += int(not m.any() and not torch.equal(inputs[pos:end], orig))
                pos = end
    assert within(random_words, words, 0.1, 5.0) and random_words > 0


def test_padding_types_nsp_and_pad_to():
    col = collator(pad_to=64)
    batch = col([([CLS, 7, SEP], [0, 0, 0], 1), ([CLS, 8, 9, SEP, 10, SEP], [0, 0, 0, 0, 1, 1], 0)])
    assert batch["input_ids"].shape == (2, 64) and batch["next_sentence_label"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [3, 6] and batch["token_type_ids"][1, :6].tolist() == [
        0,
        0,
        0,
        0,
        1,
        1,
    ]
    assert (batch["labels"] != IGNORE).sum(1).tolist() == [1, 1]  # at least one label a sequence
    assert "next_sentence_label" not in col([{"input_ids": [CLS, 5, SEP]}])


def test_seeded_and_resumable():
    a, b = collator(seed=3), collator(seed=3)
    ex = examples(torch.Generator().manual_seed(0), 8)
    first = a(ex)
    state = a.state_dict()
    second = a(ex)
    assert torch.equal(b(ex)["input_ids"], first["input_ids"])
    b.load_state_dict(state)
    assert torch.equal(b(ex)["labels"], second["labels"])
    assert not torch.equal(first["input_ids"], second["input_ids"])


def test_bad_input():
    with pytest.raises(ValueError, match="mlm_probability"):
        collator(mlm_probability=0.0)
    with pytest.raises(ValueError, match="continuation"):
        MaskingCollator(V, MASK, PAD, SPECIAL, whole_word=True)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1000\)"):
        collator()([([CLS, 1000, SEP], [0, 0, 0])])
    with pytest.raises(ValueError, match="longer than pad_to"):
        collator(pad_to=2)([([CLS, 7, SEP], [0, 0, 0])])
    with pytest.raises(ValueError, match="token_type_ids"):
        collator()([([CLS, 7, SEP], [0, 0])])


def test_schedule_values():
    warm, total = 10, 110
    assert linear_warmup_decay(0, warm, total) == 0.0
    assert linear_warmup_decay(5, warm, total) == 0.5
    assert linear_warmup_decay(10, warm, total) == 1.0
    assert linear_warmup_decay(60, warm, total) == 0.5
    assert linear_warmup_decay(110, warm, total) == 0.0 and linear_warmup_decay(500, warm, total) == 0.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = make_scheduler(opt, 100, warmup_ratio=0.1)  # 10 warmup steps
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(5e-4) and max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 90)
    assert opt.param_groups[0]["lr"] == 0.0  # after total_steps
    with pytest.raises(ValueError, match="not both"):
        make_scheduler(opt, 10, warmup_steps=1, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="warmup_steps must be"):
        make_scheduler(opt, 10, warmup_steps=11)
