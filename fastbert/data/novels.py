"""Downstream tasks for fine-tuning on passages of a corpus: which novel does this passage come
from (:func:`novel_passages`), and are its words in their original order (:func:`word_order_passages`)?

On the bundled corpus (:func:`~fastbert.data.corpus.default_corpus_documents`) the question is
"which of the six Jane Austen novels is this passage from"; any list of at least two documents
works. The label of a passage is the index of its document in the list given, so
:func:`novel_titles` (the documents' titles in that order) names the labels.

Passages: each document's sentences are tokenized (no special tokens; sentences without tokens
are skipped) and packed greedily, in order, into passages of at most ``max_seq_length - 2``
tokens: a sentence joins the current passage if it fits, otherwise it starts the next one. A
sentence longer than that on its own is its own passage, truncated. Each passage becomes
``[CLS] tokens [SEP]``. Passages never overlap, and every non-empty sentence is in exactly one.

Held-out split without leakage: a random split of passages would put the neighbours of most
test passages (the same scene, the same names) in the training set. Instead each document's
passage sequence is cut into contiguous blocks of ``block`` passages (the last may be shorter),
and a seeded random ``test_fraction`` of each document's blocks (rounded, at least one, never
all) goes to the test set, the rest to training. So the test set covers every novel, with whole
regions of each, and a document needs at least two blocks.
"""

import math
import random
from typing import List, NamedTuple, Sequence, Tuple

from fastbert.data.corpus import Document, tokenize_documents

__all__ = [
    "Passage",
    "WORD_ORDER_LABELS",
    "novel_passages",
    "novel_titles",
    "pack_sentences",
    "take_fraction",
    "word_order_passages",
]

WORD_ORDER_LABELS = ("original order", "shuffled")


class Passage(NamedTuple):
    """``[CLS] tokens [SEP]`` as a Python ``int`` list (no padding), and the document's index."""

    input_ids: List[int]
    label: int


def novel_titles(documents: Sequence[Document]) -> List[str]:
    """The label names: ``novel_titles(documents)[passage.label]`` is the passage's document title."""
    return [d.title for d in documents]


def pack_sentences(sentences: Sequence[Sequence[int]], max_tokens: int) -> List[List[int]]:
    """Token-id sentences packed greedily, in order, into chunks of at most ``max_tokens`` ids (a
    longer sentence is a chunk of its own, truncated; empty sentences are skipped)."""
    chunks, current = [], []
    for sentence in sentences:
        if not len(sentence):
            continue
        if current and len(current) + len(sentence) > max_tokens:
            chunks.append(current)
            current = []
        if not current and len(sentence) >= max_tokens:
            chunks.append(list(sentence[:max_tokens]))
        else:
            current.extend(sentence)
    if current:
        chunks.append(current)
    return chunks


def novel_passages(
    documents: Sequence[Document],
    tokenizer,
    max_seq_length: int = 128,
    test_fraction: float = 0.1,
    block: int = 20,
    seed: int = 0,
) -> Tuple[List[Passage], List[Passage]]:
    """``(train, test)`` lists of :class:`Passage` for the which-document task (see the module
    docstring). ``documents``: sentences as text (tokenized with ``tokenizer``) or token-id lists;
    the tokenizer's ``cls_id``/``sep_id`` frame the passages. Both lists are in document order,
    then passage order (a loader shuffles). Deterministic for a given ``seed``.

    Raises ``ValueError`` for fewer than 2 documents, ``max_seq_length < 3``, ``test_fraction``
    outside ``(0, 1)``, ``block < 1``, or a document with no passages or fewer than 2 blocks."""
    if len(documents) < 2:
        raise ValueError(f"novel_passages: needs at least 2 documents (one label each), got {len(documents)}")
    if not isinstance(max_seq_length, int) or max_seq_length < 3:
        raise ValueError(
            f"novel_passages: max_seq_length must be an int >= 3 ([CLS], a token, [SEP]), got {max_seq_length!r}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"novel_passages: test_fraction must be in (0, 1), got {test_fraction!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"novel_passages: block must be a positive int, got {block!r}")
    cls_id, sep_id = tokenizer.cls_id, tokenizer.sep_id
    rng = random.Random(seed)
    train, test = [], []
    for label, doc in enumerate(tokenize_documents(documents, tokenizer)):
        chunks = pack_sentences(doc.sentences, max_seq_length - 2)
        if not chunks:
            raise ValueError(f"novel_passages: document {label} ({doc.title!r}) has no passages (no tokens)")
        n_blocks = math.ceil(len(chunks) / block)
        if n_blocks < 2:
            raise ValueError(
                f"novel_passages: document {label} ({doc.title!r}) gives {len(chunks)} passages, "
                f"fewer than 2 blocks of {block} (one for training, one for testing); "
                f"lower block or max_seq_length"
            )
        n_test = min(n_blocks - 1, max(1, round(test_fraction * n_blocks)))
        test_blocks = set(rng.sample(range(n_blocks), n_test))
        for i, chunk in enumerate(chunks):
            (test if i // block in test_blocks else train).append(Passage([cls_id, *chunk, sep_id], label))
    return train, test


def take_fraction(passages: Sequence[Passage], fraction: float, seed: int = 0) -> List[Passage]:
    """A seeded sample of ``fraction`` of each label's passages (rounded, at least one per label
    present), in the input order: the low-label setting. ``fraction == 1`` returns all of them."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"take_fraction: fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return list(passages)
    by_label = {}
    for i, p in enumerate(passages):
        by_label.setdefault(p.label, []).append(i)
    rng = random.Random(seed)
    keep = set()
    for label in sorted(by_label):
        idx = by_label[label]
        keep.update(rng.sample(idx, max(1, round(fraction * len(idx)))))
    return [p for i, p in enumerate(passages) if i in keep]


def word_order_passages(passages: Sequence[Passage], seed: int = 0) -> List[Passage]:
    """The word-order task on the same passages: "are this passage's tokens in their original order
    (label 0), or shuffled (label 1)?" (names: ``WORD_ORDER_LABELS``). A seeded coin picks about half
    of the passages, and the tokens between ``[CLS]`` and ``[SEP]`` of each picked passage are put in
    a seeded random order different from the original; a passage whose tokens are all the same
    cannot be shuffled and keeps label 0. Both labels hold the same tokens, so a bag of words
    cannot tell them apart: the task needs what a masked-LM learns, which token follows which.
    Deterministic for a given ``seed``; the input's labels are ignored."""
    rng = random.Random(seed)
    out = []
    for p in passages:
        ids = list(p.input_ids)
        body = ids[1:-1]
        if rng.random() < 0.5 and len(set(body)) > 1:
            shuffled = list(body)
            while shuffled == body:
                rng.shuffle(shuffled)
            out.append(Passage([ids[0], *shuffled, ids[-1]], 1))
        else:
            out.append(Passage(ids, 0))
    return out
