"""Documents from text files, the bundled Jane Austen corpus, and next-sentence-prediction pairs.

Reading (:func:`read_documents`, :func:`document_from_text`)
    One ``.txt`` file (strict UTF-8; a leading byte-order mark is dropped) is one
    :class:`Document` titled by the file stem. Paragraphs are separated by blank lines (lines of
    only whitespace); the lines of a paragraph are joined and runs of whitespace collapse to one
    space. A paragraph is split into sentences after end punctuation (one or more of ``. ! ?``,
    then any closing quotes, brackets or ``_``) that is followed by whitespace and then an
    uppercase letter or a quote (``" ' “ ‘``; an opening ``(``, ``[`` or ``_`` before the letter
    is skipped). A single ``.`` right after a title or abbreviation in :data:`ABBREVIATIONS`
    (``Mr. Mrs. Dr. St.`` ...; case-sensitive) does not end a sentence. A paragraph end always
    ends a sentence, so every paragraph gives at least one. Sentences stay text:
    :func:`tokenize_documents` (or :func:`nsp_examples` itself) turns them into token ids.

Bundled corpus (:func:`default_corpus_documents`)
    ``fastbert/data/austen.tar.xz`` (1.1 MB, installed with the package) holds the six novels
    (Project Gutenberg texts) as ``<n>_<title>.txt``; they read exactly as :func:`read_documents`
    reads a folder of them.

Next-sentence prediction (:func:`nsp_examples`)
    Google's ``create_pretraining_data.py``, without the masking (the collator masks).
"""

import io
import os
import random
import re
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, NamedTuple, Sequence, Union

__all__ = [
    "ABBREVIATIONS",
    "DEFAULT_CORPUS_TITLES",
    "Document",
    "NSPExample",
    "default_corpus_documents",
    "document_from_text",
    "nsp_examples",
    "read_documents",
    "split_sentences",
    "tokenize_documents",
]

ABBREVIATIONS = frozenset(
    {
        "Mr",
        "Mrs",
        "Ms",
        "Messrs",
        "Mme",
        "Mlle",
        "Dr",
        "St",
        "Rev",
        "Col",
        "Capt",
        "Lt",
        "Gen",
        "Sr",
        "Jr",
        "Prof",
        "Hon",
        "Esq",
    }
)
DEFAULT_CORPUS = "austen.tar.xz"
DEFAULT_CORPUS_TITLES = (
    "0_emma",
    "1_mansfield_park",
    "2_northanger_abbey",
    "3_persuasion",
    "4_pride_and_prejudice",
    "5_sense_and_sensibility",
)

LONG_SENTENCE_TOKENS = 4096  # nsp_examples cuts longer sentences (see there)

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n\s*")
# A candidate boundary: a whole run of end punctuation, closing marks, whitespace, and next (after
# any openers) not a lowercase ASCII letter, digit or ASCII punctuation other than a quote
# (split_sentences checks the rest). Linear time: the lookbehind stops a match from starting
# inside a run and the possessive quantifiers never backtrack (no other match could be found by
# backtracking). The word before the punctuation is found by walking back (:func:`_word_before`),
# not by the regex, which would rescan a long word from each of its characters.
_BOUNDARY = re.compile(r"(?<![.!?])([.!?]++)([\"'”’)\]_]*+)\s++(?=[(\[_]*+[^a-z0-9\s!#-&)-/:-@\\\]^`{-~])")
_WORD_CHAR = re.compile(r"\w")
_OPENERS_RUN = re.compile(r"[(\[_]*+")
_QUOTES = "\"'“‘"


@dataclass
class Document:
    """One document: its ``title`` (the file stem) and its ``sentences``, as text (``str``) from
    the readers, or as token-id lists (``list[int]``) after :func:`tokenize_documents`."""

    title: str
    sentences: list

    def __len__(self):
        return len(self.sentences)


class NSPExample(NamedTuple):
    """``[CLS] A [SEP] B [SEP]`` as Python ``int`` lists, and the label (0: B follows A, 1: B is random)."""

    input_ids: List[int]
    token_type_ids: List[int]
    next_sentence_label: int


# ------------------------------------------------------------------------------------------- reading


def split_sentences(paragraph: str) -> List[str]:
    """The sentences of one paragraph (whitespace already collapsed or not), by the rule in the
    module docstring."""
    text = " ".join(paragraph.split())
    sentences, start, previous_end = [], 0, 0
    for m in _BOUNDARY.finditer(text):
        punct, close = m.group(1), m.group(2)
        floor, previous_end = previous_end, m.end()
        if punct == "." and not close and _word_before(text, m.start(), floor).strip("_") in ABBREVIATIONS:
            continue
        j = _OPENERS_RUN.match(text, m.end()).end()  # skip an opening ( [ _ (no copy of the rest)
        nxt = text[j : j + 1]
        if not nxt or not (nxt.isupper() or nxt in _QUOTES):
            continue
        sentences.append(text[start : m.end(2)])
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def _word_before(text: str, end: int, floor: int) -> str:
    """The run of word characters (``\\w``) that ends at ``end`` and starts at or after ``floor``.
    Each character is visited once per boundary and the runs of successive boundaries do not
    overlap, so a paragraph costs linear time."""
    i = end
    while i > floor and _WORD_CHAR.match(text, i - 1):
        i -= 1
    return text[i:end]


def document_from_text(title: str, text: str) -> Document:
    """Split ``text`` into paragraphs and sentences (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sentences = []
    for paragraph in _BLANK_LINE.split(text):
        if paragraph.strip():
            sentences.extend(split_sentences(paragraph))
    return Document(title, sentences)


def _decode(data: bytes, name) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{name}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}: {e.reason})"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_documents(folder: Union[str, os.PathLike]) -> List[Document]:
    """Every ``*.txt`` file directly in ``folder``, in sorted name order, as a :class:`Document`.
    Files with no text (empty or only whitespace) are skipped; it is an error (``ValueError``)
    when the folder is missing, has no ``.txt`` file or only empty ones, or a file is not UTF-8."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"read_documents: corpus folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"read_documents: {folder} is not a folder")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"read_documents: no .txt files in {folder}")
    documents = [document_from_text(p.stem, _decode(p.read_bytes(), p)) for p in files]
    documents = [d for d in documents if d.sentences]
    if not documents:
        raise ValueError(f"read_documents: every .txt file in {folder} is empty ({len(files)} files)")
    return documents


def default_corpus_documents() -> List[Document]:
    """The six Jane Austen novels bundled with fastbert (``Document`` titles
    :data:`DEFAULT_CORPUS_TITLES`), read as :func:`read_documents` would read them."""
    data = resources.files(__package__).joinpath(DEFAULT_CORPUS).read_bytes()
    documents = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")), key=lambda m: m.name)
        for m in members:
            name = f"{DEFAULT_CORPUS}:{m.name}"
            doc = document_from_text(Path(m.name).stem, _decode(tar.extractfile(m).read(), name))
            if doc.sentences:
                documents.append(doc)
    return documents


def tokenize_documents(documents: Sequence[Document], tokenizer) -> List[Document]:
    """New documents whose sentences are token-id lists (``tokenizer.encode``, no specials); a
    sentence that is already a list of ids is kept. Sentences stay aligned (none dropped)."""
    out = []
    for doc in documents:
        texts = [s for s in doc.sentences if isinstance(s, str)]
        encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
        out.append(
            Document(doc.title, [next(encoded) if isinstance(s, str) else [int(i) for i in s] for s in doc.sentences])
        )
    return out


# --------------------------------------------------------------------------- next-sentence prediction


def _truncate_pair(a: list, b: list, max_num_tokens: int, rng: random.Random) -> None:
    """Remove tokens from the longer segment (``b`` on a tie), one at a time, each at its front or
    back at random (one ``rng.random()`` per token), until they fit. In linear time: the removals
    are counted and each list is sliced once (deleting from a list's front one token at a time is
    quadratic in a long sentence)."""
    la, lb, fa, fb = len(a), len(b), 0, 0  # the lengths left and the tokens taken from each front
    while la + lb > max_num_tokens:
        if la > lb:  # a stays the longer for this many removals
            k = min(la - lb, la + lb - max_num_tokens)
            fa += sum(rng.random() < 0.5 for _ in range(k))
            la -= k
        else:  # b (the longer, or as long) stays chosen for this many removals
            k = min(lb - la + 1, la + lb - max_num_tokens)
            fb += sum(rng.random() < 0.5 for _ in range(k))
            lb -= k
    a[:] = a[fa : fa + la]
    b[:] = b[fb : fb + lb]


def _pieces(sentence: list, longest: int) -> list:
    """``sentence`` cut into consecutive pieces of at most ``longest`` tokens (itself when it fits)."""
    if len(sentence) <= longest:
        return [sentence]
    return [sentence[i : i + longest] for i in range(0, len(sentence), longest)]


def nsp_examples(
    documents: Sequence[Document],
    tokenizer,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    nsp_prob: float = 0.5,
    seed: int = 0,
) -> List[NSPExample]:
    """Sentence pairs for BERT pretraining, as Google's ``create_pretraining_data.py`` makes them.

    For each document in turn, consecutive sentences accumulate into a chunk until it holds
    ``target`` tokens (``max_seq_length - 3``; with probability ``short_seq_prob`` a random
    length in ``[2, max_seq_length - 3]`` instead) or the document ends. The chunk splits at a
    random sentence boundary into A and B. With probability ``nsp_prob``, or always when the
    chunk is one sentence, B is replaced by a span of consecutive sentences from a random start
    in a different random document, long enough to fill the target (label 1, NotNext), and the
    chunk's unused sentences go back to be read again; otherwise B is the rest of the chunk
    (label 0, IsNext). The pair is truncated to ``max_seq_length - 3`` tokens by removing tokens
    from the longer segment, at its front or back at random.

    A sentence longer than ``max(LONG_SENTENCE_TOKENS, 8 * (max_seq_length - 3))`` tokens (4096
    for ``max_seq_length`` <= 515; no sentence of prose comes near) is first cut into consecutive
    sentences of that length: a paragraph without sentence ends, such as a whole file on one line,
    would otherwise be copied and truncated token by token in every pair that draws it. So the work
    is linear in the corpus size.

    ``documents``: sentences as text (tokenized here with ``tokenizer``) or as token-id lists;
    sentences without tokens and documents without sentences are skipped; at least two documents
    must remain. Returns :class:`NSPExample` tuples ``(input_ids, token_type_ids,
    next_sentence_label)`` of Python ``int`` lists (no padding; ``len(input_ids) <=
    max_seq_length``), in document order (a loader shuffles them). Deterministic for a given
    ``seed`` (the tokenizer's ``cls_id``/``sep_id`` are used).

    Differences from Google's script: the short target is drawn per chunk, not once per document
    (so about ``short_seq_prob`` of the pairs are short, as the BERT paper says, even for a
    corpus of a few long documents); the random document is drawn among the others, never the
    same one; one pass (no ``dupe_factor``), no shuffling.
    """
    if not isinstance(max_seq_length, int) or max_seq_length < 5:
        raise ValueError(f"nsp_examples: max_seq_length must be an int >= 5, got {max_seq_length!r}")
    for name, p in (("short_seq_prob", short_seq_prob), ("nsp_prob", nsp_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"nsp_examples: {name} must be in [0, 1], got {p!r}")
    max_num_tokens = max_seq_length - 3
    longest = max(LONG_SENTENCE_TOKENS, 8 * max_num_tokens)
    docs = [
        [piece for s in d.sentences if len(s) for piece in _pieces(s, longest)]
        for d in tokenize_documents(documents, tokenizer)
    ]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise ValueError(
            f"nsp_examples: needs at least 2 non-empty documents (for the random next sentences), got {len(docs)}"
        )
    rng = random.Random(seed)
    cls_id, sep_id = tokenizer.cls_id, tokenizer.sep_id
    examples = []

    def new_target():
        return rng.randint(2, max_num_tokens) if rng.random() < short_seq_prob else max_num_tokens

    for d, document in enumerate(docs):
        target = new_target()
        chunk, length, i = [], 0, 0
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i])
            if i == len(document) - 1 or length >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                tokens_a = [t for s in chunk[:a_end] for t in s]
                if len(chunk) == 1 or rng.random() < nsp_prob:
                    label = 1
                    target_b = target - len(tokens_a)
                    other = rng.randrange(len(docs) - 1)
                    other = docs[other + (other >= d)]
                    tokens_b = []
                    for j in range(rng.randrange(len(other)), len(other)):  # no copy of the rest
                        tokens_b.extend(other[j])
                        if len(tokens_b) >= target_b:
                            break
                    i -= len(chunk) - a_end  # the unused sentences are read again
                else:
                    label = 0
                    tokens_b = [t for s in chunk[a_end:] for t in s]
                _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
                input_ids = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
                token_type_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                examples.append(NSPExample(input_ids, token_type_ids, label))
                chunk, length = [], 0
                target = new_target()
            i += 1
    return examples
