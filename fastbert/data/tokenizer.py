"""BERT's WordPiece tokenizer on the Hugging Face ``tokenizers`` library (Rust; fast batch encoding).

The pipeline is Google BERT's: ``BertNormalizer`` (clean control characters, space out CJK
characters, optional lowercasing, which also strips accents as BERT-uncased does),
``BertPreTokenizer`` (split on whitespace and punctuation), a ``WordPiece`` model with the ``##``
continuation prefix (greedy longest match; a word that cannot be split into vocabulary pieces
becomes one ``[UNK]``), and a ``[CLS] A [SEP] B [SEP]`` post-processor. A saved ``tokenizer.json``
therefore loads in ``transformers.PreTrainedTokenizerFast`` and ``vocab.txt`` in ``BertTokenizer``.

Ids are Python ``int`` lists; :meth:`WordPieceTokenizer.encode_pair` returns the ``(input_ids,
token_type_ids)`` pair BERT reads. Special tokens are looked up by name, so any BERT ``vocab.txt``
works (Google's uncased vocabulary has ``[PAD]`` at 0 and ``[UNK] [CLS] [SEP] [MASK]`` at
100..103); a vocabulary trained here has ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at 0..4.
"""

import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from fastbert._optional import require

require("tokenizers", "train", "fastbert.data (the WordPiece tokenizer)")  # else MissingExtra, naming the pip command
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION = "##"
VOCAB_FILE, TOKENIZER_FILE = "vocab.txt", "tokenizer.json"

PathLike = Union[str, os.PathLike]

MAX_WORD_CHARS = 100  # a longer word encodes as one [UNK] (BERT's max_input_chars_per_word)
# Characters at which BertPreTokenizer always ends a word: its whitespace and ASCII punctuation.
# A run of other characters longer than MAX_WORD_CHARS may hold a word too long to encode.
_BREAKS = " \t\n\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000!-/:-@\\[-`{-~"
_LONG_RUN = re.compile(f"(?<![^{_BREAKS}])[^{_BREAKS}]{{{MAX_WORD_CHARS + 1},}}")
# Letters and digits outside BERT's CJK blocks: a run of them is one word, at least as long after
# normalisation (no such character is removed or split off).
_PLAIN_WORD = re.compile("[^\\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]+")


def _bert_tokenizer(vocab: Optional[dict], lowercase: bool) -> Tokenizer:
    """BERT's normaliser, pre-tokeniser, WordPiece model (over ``vocab``, or empty for training) and decoder."""
    tok = Tokenizer(
        models.WordPiece(
            vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION, max_input_chars_per_word=MAX_WORD_CHARS
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
    return tok


def _pipeline(vocab: dict, lowercase: bool) -> Tokenizer:
    """A BERT tokenizer over ``vocab`` (token -> id) with the special tokens registered."""
    tok = _bert_tokenizer(vocab, lowercase)
    # Special tokens keep their ids and are matched verbatim in text ("[MASK]" encodes as the mask id).
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    _set_post_processor(tok)
    return tok


def _sorted_vocab(trained: Tokenizer, lowercase: bool) -> Tokenizer:
    """The trained vocabulary re-numbered: the special tokens first, then the rest sorted."""
    rest = sorted(set(trained.get_vocab()) - set(SPECIAL_TOKENS))
    return _pipeline({t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])}, lowercase)


def _without_long_words(tok: Tokenizer, text):
    """``text`` less its words of more than :data:`MAX_WORD_CHARS` characters (as ``tok``'s
    normaliser and pre-tokeniser make words), for training: such a word only ever encodes as
    ``[UNK]``, and the trainer's time grows with the square of a word's length (an 80,000-character
    word took minutes). Text without such a word comes back unchanged, in linear time."""
    if not isinstance(text, str) or len(text) <= MAX_WORD_CHARS:
        return text

    def short_words(m):
        if _PLAIN_WORD.fullmatch(m.group()):
            return " "
        words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(m.group()))]
        if all(len(w) <= MAX_WORD_CHARS for w in words):
            return m.group()
        return " ".join(w for w in words if len(w) <= MAX_WORD_CHARS) or " "

    return _LONG_RUN.sub(short_words, text)


def _unk_long_words(text):
    """``text`` with each over-long run of letters and digits (one word of more than
    :data:`MAX_WORD_CHARS` characters) written ``[UNK]``: the same ids, without normalising and
    pre-tokenising a word of megabytes only to throw it away."""
    if not isinstance(text, str) or len(text) <= MAX_WORD_CHARS:
        return text
    return _LONG_RUN.sub(lambda m: f" {UNK} " if _PLAIN_WORD.fullmatch(m.group()) else m.group(), text)


CHUNK_CHARS = 1 << 14  # longer texts are cut at spaces for the Rust tokenizer (see _chunks)


def _chunks(text):
    """``text`` cut at spaces (the cut spaces dropped) into pieces of about :data:`CHUNK_CHARS`
    characters or more (a cut never splits a word), or ``[text]`` when short or not a ``str``. The
    pieces' ids, concatenated, are ``text``'s ids (BERT's pre-tokeniser ends a word at a space),
    and the Rust tokenizer splits one long string over no thread and slows on it: a 20 MB
    one-line sentence took 30 s to encode whole and 7 s cut (two cores)."""
    if not isinstance(text, str) or len(text) <= CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while True:
        cut = text.find(" ", start + CHUNK_CHARS)
        if cut < 0:
            pieces.append(text[start:])
            return pieces
        pieces.append(text[start:cut])
        start = cut + 1


def _file_lines(files):
    """The lines of UTF-8 text files (what ``Tokenizer.train`` reads), long words dropped later."""
    for f in files:
        try:
            with open(f, encoding="utf-8") as lines:
                yield from lines
        except UnicodeDecodeError as e:
            raise ValueError(
                f"WordPieceTokenizer.train: {f} is not UTF-8 ({e.reason} at byte {e.start} of a line)"
            ) from None


def _set_post_processor(tok: Tokenizer) -> None:
    ids = {t: tok.token_to_id(t) for t in (CLS, SEP)}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])]
    )


def _missing_specials(token_to_id) -> List[str]:
    return [t for t in SPECIAL_TOKENS if token_to_id(t) is None]


class WordPieceTokenizer:
    """A BERT WordPiece tokenizer: train a vocabulary, load one (``vocab.txt`` or a saved folder),
    encode text to ids, build ``[CLS] A [SEP] B [SEP]`` pairs, decode.

    Build with :meth:`train`, :meth:`from_vocab` or :meth:`load` (the constructor wraps an existing
    ``tokenizers.Tokenizer`` whose vocabulary holds the five special tokens).
    """

    def __init__(self, tokenizer: Tokenizer):
        missing = _missing_specials(tokenizer.token_to_id)
        if missing:
            raise ValueError(
                f"WordPieceTokenizer: the vocabulary lacks the special token(s) {', '.join(missing)} "
                f"(needs all of {' '.join(SPECIAL_TOKENS)})"
            )
        self._tok = tokenizer
        self._vocab = None  # list of tokens by id, built on first use
        self._continuation = None

    # ----------------------------------------------------------------------------------- building

    @classmethod
    def train(
        cls,
        files: Union[PathLike, Sequence[PathLike]],
        vocab_size: int = 8000,
        lowercase: bool = True,
        min_frequency: int = 2,
    ) -> "WordPieceTokenizer":
        """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens from UTF-8 text files.
        ``[PAD] [UNK] [CLS] [SEP] [MASK]`` get ids 0..4, the other tokens (every character seen and
        the merged pieces; pieces that do not start a word carry the ``##`` prefix) follow in sorted
        order, so the ids do not depend on the hash order in which ``tokenizers`` lists them. (Its
        trainer also breaks ties between equally frequent merges in hash order, so two trainings
        on the same text can differ in a few rare pieces: save a tokenizer to reuse it.) Pieces
        seen fewer than ``min_frequency`` times are not merged. Words longer than
        :data:`MAX_WORD_CHARS` characters are left out (they encode as ``[UNK]`` anyway), so
        training takes time linear in the text."""
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise ValueError("WordPieceTokenizer.train: no files given")
        for f in files:
            if not Path(f).is_file():
                raise ValueError(f"WordPieceTokenizer.train: {f} is not a file")
        tok = cls._untrained(vocab_size, lowercase, min_frequency)
        tok.train_from_iterator(
            (_without_long_words(tok, c) for t in _file_lines(files) for c in _chunks(t)),
            cls._trainer(vocab_size, min_frequency),
        )
        return cls(_sorted_vocab(tok, lowercase))

    @classmethod
    def train_from_texts(
        cls, texts: Iterable[str], vocab_size: int = 8000, lowercase: bool = True, min_frequency: int = 2
    ) -> "WordPieceTokenizer":
        """:meth:`train` from an iterable of strings (sentences, paragraphs or whole documents)."""
        tok = cls._untrained(vocab_size, lowercase, min_frequency)
        tok.train_from_iterator(
            (_without_long_words(tok, c) for t in texts for c in _chunks(t)), cls._trainer(vocab_size, min_frequency)
        )
        return cls(_sorted_vocab(tok, lowercase))

    @staticmethod
    def _untrained(vocab_size, lowercase, min_frequency):
        if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"WordPieceTokenizer.train: vocab_size must be an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"WordPieceTokenizer.train: min_frequency must be an int >= 0, got {min_frequency!r}")
        return _bert_tokenizer(None, bool(lowercase))

    @staticmethod
    def _trainer(vocab_size, min_frequency):
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix=CONTINUATION,
            show_progress=False,
        )

    @classmethod
    def from_vocab(cls, path: PathLike, lowercase: bool = True) -> "WordPieceTokenizer":
        """Load a BERT ``vocab.txt`` (one token a line; the line number is the id). It must hold
        ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (anywhere); ``lowercase`` must match how the vocabulary
        was made (True for "uncased" checkpoints)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"WordPieceTokenizer.from_vocab: {path} is not a file")
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"WordPieceTokenizer.from_vocab: {path} is not UTF-8 (byte {e.start})") from None
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        vocab = {}
        for i, line in enumerate(lines):
            token = line.rstrip("\r")
            if not token.strip():
                raise ValueError(f"WordPieceTokenizer.from_vocab: {path} line {i + 1} is empty")
            if token in vocab:
                raise ValueError(
                    f"WordPieceTokenizer.from_vocab: {path} line {i + 1}: token {token!r} "
                    f"repeats line {vocab[token] + 1}"
                )
            vocab[token] = i
        missing = _missing_specials(vocab.get)
        if missing:
            raise ValueError(
                f"WordPieceTokenizer.from_vocab: {path} lacks the special token(s) {', '.join(missing)} "
                f"(a BERT vocabulary needs all of {' '.join(SPECIAL_TOKENS)})"
            )
        return cls(_pipeline(vocab, bool(lowercase)))

    def save(self, directory: PathLike) -> Path:
        """Write ``vocab.txt`` (tokens in id order) and ``tokenizer.json`` (the whole pipeline) into
        ``directory`` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")
        self._tok.save(str(directory / TOKENIZER_FILE))
        return directory

    @classmethod
    def load(cls, directory: PathLike) -> "WordPieceTokenizer":
        """Load what :meth:`save` wrote (reads ``tokenizer.json``; for a folder with only a
        ``vocab.txt`` use :meth:`from_vocab`)."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            hint = (
                f"; it has a {VOCAB_FILE}: use WordPieceTokenizer.from_vocab"
                if (Path(directory) / VOCAB_FILE).is_file()
                else ""
            )
            raise ValueError(f"WordPieceTokenizer.load: no {TOKENIZER_FILE} in {directory}{hint}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise ValueError(
                f"WordPieceTokenizer.load: cannot read {path} (damaged or not a tokenizers "
                f"tokenizer.json): {str(e)[:200]}"
            ) from None
        if not isinstance(tok.model, models.WordPiece):
            raise ValueError(
                f"WordPieceTokenizer.load: {path} is a {type(tok.model).__name__} tokenizer, not WordPiece"
            )
        return cls(tok)

    # ----------------------------------------------------------------------------------- encoding

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without ``[CLS]``/``[SEP]``."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """:meth:`encode` of many texts at once (parallel in Rust)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts must be str, got {type(t).__name__}")
        pieces = [_chunks(t) for t in texts]
        encoded = iter(
            self._tok.encode_batch([_unk_long_words(p) for ps in pieces for p in ps], add_special_tokens=False)
        )
        return [[i for _ in ps for i in next(encoded).ids] for ps in pieces]

    def encode_pair(self, a: Union[str, Sequence[int]], b: Union[str, Sequence[int]]) -> Tuple[List[int], List[int]]:
        """``(input_ids, token_type_ids)`` of ``[CLS] A [SEP] B [SEP]``; types are 0 over
        ``[CLS] A [SEP]`` and 1 over ``B [SEP]``. ``a`` and ``b`` are texts or token-id sequences
        (from :meth:`encode`). No truncation."""
        a_ids, b_ids = self._ids(a, "a"), self._ids(b, "b")
        input_ids = [self.cls_id, *a_ids, self.sep_id, *b_ids, self.sep_id]
        token_type_ids = [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)
        return input_ids, token_type_ids

    def _ids(self, x, name):
        if isinstance(x, str):
            return self.encode(x)
        if isinstance(x, torch.Tensor):
            x = x.tolist()
        try:
            ids = [int(i) for i in x]
        except (TypeError, ValueError):
            raise TypeError(
                f"encode_pair: {name} must be a str or a sequence of token ids, got {type(x).__name__}"
            ) from None
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"encode_pair: {name} holds ids outside [0, {n}): {bad[:5]}")
        return ids

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: ``##`` pieces are glued to the word before, words are space-separated and
        spaces before punctuation removed (BERT's cleanup), so ``decode(encode(t))`` equals the
        normalised ``t`` up to spacing around punctuation such as apostrophes."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --------------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> List[str]:
        """The tokens, indexed by id."""
        if self._vocab is None:
            by_id = [None] * self.vocab_size
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                by_id[i] = token
            holes = [i for i, t in enumerate(by_id) if t is None]
            if holes:
                raise ValueError(f"WordPieceTokenizer: the vocabulary has no token for ids {holes[:5]}")
            self._vocab = by_id
        return self._vocab

    @property
    def lowercase(self) -> bool:
        return bool(getattr(self._tok.normalizer, "lowercase", False))

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD)

    @property
    def unk_id(self) -> int:
        return self._tok.token_to_id(UNK)

    @property
    def cls_id(self) -> int:
        return self._tok.token_to_id(CLS)

    @property
    def sep_id(self) -> int:
        return self._tok.token_to_id(SEP)

    @property
    def mask_id(self) -> int:
        return self._tok.token_to_id(MASK)

    @property
    def special_ids(self) -> frozenset:
        """Ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (what masking never selects)."""
        return frozenset(self._tok.token_to_id(t) for t in SPECIAL_TOKENS)

    def is_continuation(self, i: int) -> bool:
        """Whether token ``i`` continues a word (a ``##`` piece): whole-word masking masks it with
        the tokens before it."""
        token = self._tok.id_to_token(int(i))
        if token is None:
            raise ValueError(f"is_continuation: id {i} is outside the vocabulary [0, {self.vocab_size})")
        return len(token) > len(CONTINUATION) and token.startswith(CONTINUATION)

    @property
    def continuation_mask(self) -> torch.Tensor:
        """Bool tensor ``[vocab_size]``, True at ``##`` pieces (a fresh copy each call)."""
        if self._continuation is None:
            self._continuation = torch.tensor(
                [len(t) > len(CONTINUATION) and t.startswith(CONTINUATION) for t in self.vocab], dtype=torch.bool
            )
        return self._continuation.clone()

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self):
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"
