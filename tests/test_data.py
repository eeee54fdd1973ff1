"""The data front end: WordPiece tokenizer (training, splitting, pairs, save/load, BERT vocab.txt)
and documents from text files (paragraphs, sentences, errors). NSP pairs and the bundled corpus are
in tests/test_corpus.py."""

import random
from pathlib import Path

import pytest
import torch

from fastbert.data import (
    SPECIAL_TOKENS,
    Document,
    WordPieceTokenizer,
    default_corpus_documents,
    document_from_text,
    read_documents,
    split_sentences,
)
from tests.utils import within

ROOT = Path(__file__).resolve().parent.parent
SHARED_AUSTEN = ROOT.parent / "shared" / "data" / "austen"  # beside the checkout, when present
FIRST_SENTENCE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)


@pytest.fixture(scope="module")
def corpus():
    return default_corpus_documents()


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    """A 2000-token vocabulary trained (from a file) on Pride and Prejudice."""
    path = tmp_path_factory.mktemp("train") / "pp.txt"
    pp = next(d for d in corpus if d.title == "4_pride_and_prejudice")
    path.write_text("\n".join(pp.sentences), encoding="utf-8")
    return WordPieceTokenizer.train(path, vocab_size=2000)


# ------------------------------------------------------------------------------------------ tokenizer


def test_trained_vocabulary(tok):
    assert tok.vocab[:5] == list(SPECIAL_TOKENS) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == frozenset(range(5)) and isinstance(tok.special_ids, frozenset)
    assert 1000 < tok.vocab_size <= 2000 and len(tok.vocab) == tok.vocab_size == len(tok)
    assert len(set(tok.vocab)) == tok.vocab_size and tok.lowercase
    mask = tok.continuation_mask
    assert mask.dtype == torch.bool and mask.shape == (tok.vocab_size,)
    assert mask.tolist() == [t.startswith("##") for t in tok.vocab] and 100 < mask.sum() < tok.vocab_size - 100
    assert all(tok.is_continuation(i) == mask[i].item() for i in range(tok.vocab_size))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.is_continuation(tok.vocab_size)


def test_encode_decode_round_trip(tok, corpus):
    ids = tok.encode(FIRST_SENTENCE)
    assert ids and tok.unk_id not in ids and not (set(ids) & tok.special_ids)
    assert tok.decode(ids) == FIRST_SENTENCE.lower()
    assert tok.encode(FIRST_SENTENCE.upper()) == ids  # uncased
    assert tok.encode("Café  NAÏVE") == tok.encode("cafe naive")  # lowercasing strips accents, as BERT uncased
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    # Sentences of another novel (rarer words split into pieces) whose spacing decode can restore.
    emma = next(d for d in corpus if d.title == "0_emma")
    plain = [s for s in emma.sentences if all(c.isalpha() or c in " ,.!?" for c in s)][:300]
    assert len(plain) == 300
    encoded = tok.encode_batch(plain)
    assert encoded == [tok.encode(s) for s in plain[:20]] + encoded[20:]
    assert sum(map(len, encoded)) > sum(len(s.split()) for s in plain)  # some words were split
    for s, ids in zip(plain, encoded):
        assert tok.unk_id not in ids, s
        assert tok.decode(ids) == s.lower()


def test_rare_word_splits_into_continuation_pieces(tok):
    whole = [t for t in tok.vocab[5:] if t.isalpha() and len(t) >= 4 and t.isascii()]
    word = whole[10] + whole[20] + whole[30]
    assert word not in tok.vocab
    ids = tok.encode(word.capitalize())
    assert len(ids) > 1 and tok.unk_id not in ids
    assert not tok.is_continuation(ids[0]) and all(tok.is_continuation(i) for i in ids[1:])
    assert "".join(tok.vocab[i].removeprefix("##") for i in ids) == word
    assert tok.decode(ids) == word
    assert tok.continuation_mask[ids].tolist() == [False] + [True] * (len(ids) - 1)


def test_unknown_characters_become_unk(tok):
    unk = tok.unk_id
    assert tok.encode("ЖЖЖ") == [unk]
    assert tok.encode("☃") == [unk]
    the, cat = tok.encode("the"), tok.encode("house")
    assert tok.encode("the ЖЖЖ house") == the + [unk] + cat
    assert tok.encode("houseЖ") == [unk]  # a word that cannot be split entirely is one [UNK]
    assert tok.decode(tok.encode("the ЖЖЖ house")) == "the [UNK] house"
    assert tok.encode("[MASK]") == [tok.mask_id]  # special tokens are recognised in text


def test_pair_layout(tok):
    a, b = "Mr. Darcy bowed.", "She smiled, and said nothing!"
    a_ids, b_ids = tok.encode(a), tok.encode(b)
    ids, types = tok.encode_pair(a, b)
    assert ids == [tok.cls_id] + a_ids + [tok.sep_id] + b_ids + [tok.sep_id]
    assert types == [0] * (len(a_ids) + 2) + [1] * (len(b_ids) + 1)
    assert tok.encode_pair(a_ids, b_ids) == (ids, types) == tok.encode_pair(torch.tensor(a_ids), b)
    # the tokenizers pipeline (what a saved tokenizer.json does in transformers) agrees
    enc = tok.backend_tokenizer.encode(a, b)
    assert (enc.ids, enc.type_ids) == (ids, types)
    assert tok.decode(ids, skip_special_tokens=True) == "mr. darcy bowed. she smiled, and said nothing!"
    assert tok.decode(ids).startswith("[CLS] mr. darcy bowed. [SEP] she")
    with pytest.raises(TypeError, match="encode_pair: a"):
        tok.encode_pair(1.5, b)
    with pytest.raises(ValueError, match=r"encode_pair: b holds ids outside"):
        tok.encode_pair(a, [5, tok.vocab_size])


def test_save_load_and_from_vocab(tok, tmp_path):
    text = "Elizabeth, feeling really anxious, walked on; Mr. Collins was astonishingly unabashed."
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").split("\n") == tok.vocab + [""]
    for loaded in (
        WordPieceTokenizer.load(tmp_path / "tok"),
        WordPieceTokenizer.from_vocab(tmp_path / "tok" / "vocab.txt"),
    ):
        assert loaded.vocab == tok.vocab and loaded.lowercase
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode_pair(text, "Ha!") == tok.encode_pair(text, "Ha!")
        assert torch.equal(loaded.continuation_mask, tok.continuation_mask)
        assert loaded.special_ids == tok.special_ids and loaded.mask_id == tok.mask_id
    cased = WordPieceTokenizer.from_vocab(tmp_path / "tok" / "vocab.txt", lowercase=False)
    assert not cased.lowercase and cased.encode("Elizabeth") != tok.encode("Elizabeth")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json .* it has a vocab.txt: use WordPieceTokenizer.from_vocab"):
        WordPieceTokenizer.load(tmp_path / "tok")


def test_from_vocab_matches_transformers_bert_tokenizer(tok, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    ours = WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt")
    sentences = corpus[3].sentences[200:400] + ["Ünïcode Ж, naïve café-au-lait; 12.5%... [MASK] ok?"]
    for s in sentences:
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False), s
    ids, types = ours.encode_pair(sentences[0], sentences[1])
    want = hf(sentences[0], sentences[1])
    assert (ids, types) == (want["input_ids"], want["token_type_ids"])


def test_from_vocab_bert_layout(tmp_path):
    """Google's layout: [PAD] first, [UNK] [CLS] [SEP] [MASK] after [unused] slots."""
    tokens = [
        "[PAD]",
        "[unused0]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "cat",
        "##s",
        "sat",
        ".",
        "c",
        "##a",
        "##t",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    t = WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt")
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 2, 3, 4, 5)
    assert t.special_ids == frozenset({0, 2, 3, 4, 5}) and t.vocab == tokens
    assert t.encode("The cats sat.") == [6, 7, 8, 9, 10]
    assert t.encode("catat dog") == [7, 12, 13, 2]
    assert t.continuation_mask.nonzero().flatten().tolist() == [8, 12, 13]
    assert t.encode_pair("the", "cat") == ([3, 6, 4, 7, 4], [0, 0, 0, 1, 1])


def test_from_vocab_errors(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[MASK\]"):
        WordPieceTokenizer.from_vocab(path)
    path.write_text("[UNK]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[PAD\], \[CLS\], \[MASK\]"):
        WordPieceTokenizer.from_vocab(path)
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 7: token 'the' repeats line 6"):
        WordPieceTokenizer.from_vocab(path)
    with pytest.raises(ValueError, match="is not a file"):
        WordPieceTokenizer.from_vocab(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        WordPieceTokenizer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="vocab_size"):
        WordPieceTokenizer.train_from_texts(["a b c"], vocab_size=5)


def test_train_from_texts_cased():
    texts = ["The Cat sat on the mat.", "the cat sat on the Mat!"] * 20
    t = WordPieceTokenizer.train_from_texts(texts, vocab_size=60, lowercase=False, min_frequency=1)
    assert not t.lowercase and t.vocab[:5] == list(SPECIAL_TOKENS)
    assert t.encode("Cat") != t.encode("cat") and t.decode(t.encode("The Cat sat.")) == "The Cat sat."


# ---------------------------------------------------------------------------------------- documents


def test_split_sentences():
    text = (
        "Mr. Bennet and Mrs. Long met Dr. Grant at St. James's. She left!  He stayed? "
        "\"Yes,\" said he. 'Oh.' It was 3 p.m. when she came. _Then_ the end. No. 97 is here..."
    )
    assert split_sentences(text) == [
        "Mr. Bennet and Mrs. Long met Dr. Grant at St. James's.",
        "She left!",
        "He stayed?",
        '"Yes," said he.',
        "'Oh.'",
        "It was 3 p.m. when she came.",
        "_Then_ the end.",
        "No. 97 is here...",
    ]
    assert split_sentences('"Is it?" said she. "It is." (Quite so.) And so on') == [
        '"Is it?" said she.',
        '"It is."',
        "(Quite so.)",
        "And so on",
    ]
    assert split_sentences("one.two. three! four") == ["one.two. three! four"]  # no uppercase after: one sentence
    assert split_sentences("  ") == []


def test_read_documents(tmp_path):
    (tmp_path / "b_second.txt").write_text("Only one line\n", encoding="utf-8")
    (tmp_path / "a_first.txt").write_bytes(
        "\ufeffTITLE LINE\r\n\r\nIt is a truth\r\nuniversally acknowledged.  Mr. Bennet\r\nsaid so! Did he?\r\n"
        '\r\nA paragraph without end punctuation\nends its sentence\n \t \n\n"Quoted." Yes. Mrs. Long\n'
        "agreed.\n".encode("utf-8")
    )
    (tmp_path / "c_empty.txt").write_text("\n \n\t\n", encoding="utf-8")  # no text: skipped
    (tmp_path / "notes.md").write_text("Not a document.", encoding="utf-8")
    (tmp_path / "sub.txt").mkdir()  # not a file
    docs = read_documents(tmp_path)
    assert docs == [
        Document(
            "a_first",
            [
                "TITLE LINE",
                "It is a truth universally acknowledged.",
                "Mr. Bennet said so!",
                "Did he?",
                "A paragraph without end punctuation ends its sentence",
                '"Quoted."',
                "Yes.",
                "Mrs. Long agreed.",
            ],
        ),
        Document("b_second", ["Only one line"]),
    ]
    assert read_documents(str(tmp_path)) == docs
    assert document_from_text("x", "One. Two.\n\nThree") == Document("x", ["One.", "Two.", "Three"])


def test_read_documents_errors(tmp_path):
    with pytest.raises(ValueError, match=f"corpus folder {tmp_path / 'missing'} does not exist"):
        read_documents(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("Some text.", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a folder"):
        read_documents(tmp_path / "file.txt")
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "readme.md").write_text("Text.", encoding="utf-8")
    with pytest.raises(ValueError, match=f"no .txt files in {no_txt}"):
        read_documents(no_txt)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("", encoding="utf-8")
    (empty / "b.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"every .txt file in {empty} is empty"):
        read_documents(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "good.txt").write_text("Fine text.", encoding="utf-8")
    (bad / "latin1.txt").write_bytes("Hello café.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 9 \(byte 0xe9"):
        read_documents(bad)


# ------------------------------------------------------------------------- linear time on huge input


def test_split_sentences_is_linear_on_long_runs():
    long_word = "x" * 200_000  # 61 s for 80,000 characters when the regex backtracked
    with within(20):
        assert split_sentences(f"{long_word}. Next one.") == [f"{long_word}.", "Next one."]
        assert split_sentences(f"A {long_word} and more") == [f"A {long_word} and more"]
        assert split_sentences(f"{long_word}.{long_word}") == [f"{long_word}.{long_word}"]
        assert split_sentences("!" * 200_000 + " Yes.") == ["!" * 200_000, "Yes."]
        assert split_sentences("a. " * 100_000 + "Mr. B. C") == [("a. " * 100_000).strip(), "Mr. B.", "C"]
        assert split_sentences("(" * 200_000 + ". _" * 100_000) == ["(" * 200_000 + ". _" * 100_000]
        assert len(document_from_text("t", ("Word " + "word " * 400_000 + "end. ") * 2).sentences) == 2


def test_training_skips_overlong_words_and_encoding_is_unchanged(tok):
    texts = ["x" * 200_000 + " the cat sat on the mat.", "the cat and the hat."] * 3
    with within(20):  # the trainer's time grew with the square of a word's length
        t = WordPieceTokenizer.train_from_texts(texts, vocab_size=200, min_frequency=1)
    assert not [w for w in t.vocab if len(w.lstrip("#")) > 1 and set(w.lstrip("#")) == {"x"}]
    assert "cat" in t.vocab
    with within(20):
        assert tok.encode("x" * 2_000_000) == [tok.unk_id]
    raw = tok.backend_tokenizer
    for text in ["a" * 101 + " é" + "b" * 150 + ".c", "Ab" * 60 + "—" + "x" * 120, "中" * 120, "e\u0301" * 80]:
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids


def test_long_texts_are_cut_at_spaces_with_the_same_ids_and_words(tok, corpus, monkeypatch):
    import fastbert.data.tokenizer as tokenizer_module

    rng = random.Random(5)
    words = [w for d in corpus[:2] for s in d.sentences[:400] for w in s.split()]
    # one "line" of prose with long words, specials, tabs and non-ASCII spaces between the cut points
    text = " ".join(rng.choice(words + ["[MASK]", "x" * 150, "é\u00a0b", "a\tb", "中文", "  "]) for _ in range(3000))
    raw = tok.backend_tokenizer
    whole = raw.encode(tokenizer_module._unk_long_words(text), add_special_tokens=False).ids
    words = [w for w, _ in raw.pre_tokenizer.pre_tokenize_str(text)]
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 97)
    assert len(tokenizer_module._chunks(text)) > 100
    assert "".join(tokenizer_module._chunks("x" * 500)) == "x" * 500  # no space, no cut
    assert tok.encode(text) == whole
    assert tok.encode_batch(["", text, "short one."]) == [[], whole, raw.encode("short one.").ids[1:-1]]
    # the trainer counts the same words (its vocabulary itself breaks ties differently run to run)
    assert [w for c in tokenizer_module._chunks(text) for w, _ in raw.pre_tokenizer.pre_tokenize_str(c)] == words
