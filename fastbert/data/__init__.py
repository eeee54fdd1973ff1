"""Data front end: a WordPiece tokenizer, documents from text files (and the bundled Jane Austen
corpus), and next-sentence-prediction pairs for BERT pretraining.

    tok = WordPieceTokenizer.train(["corpus.txt"], vocab_size=8000)
    docs = default_corpus_documents()            # or read_documents("my_folder")
    examples = nsp_examples(docs, tok, max_seq_length=128, seed=0)
    collate = MaskingCollator(tok.vocab_size, tok.mask_id, tok.pad_id, tok.special_ids,
                              continuation=tok.continuation_mask, whole_word=True)
    batch = collate(examples[:32])              # input_ids, token_type_ids, attention_mask, labels, ...

Needs the ``tokenizers`` package (``pip install 'fastbert[train]'``; without it importing this
package raises :class:`fastbert._optional.MissingExtra`, an ImportError naming that command).
"""

from fastbert.data.corpus import (
    ABBREVIATIONS,
    DEFAULT_CORPUS_TITLES,
    Document,
    NSPExample,
    default_corpus_documents,
    document_from_text,
    nsp_examples,
    read_documents,
    split_sentences,
    tokenize_documents,
)
from fastbert.data.masking import MaskingCollator
from fastbert.data.novels import Passage, novel_passages, novel_titles, word_order_passages
from fastbert.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

__all__ = [
    "ABBREVIATIONS",
    "DEFAULT_CORPUS_TITLES",
    "Document",
    "MaskingCollator",
    "NSPExample",
    "Passage",
    "SPECIAL_TOKENS",
    "WordPieceTokenizer",
    "default_corpus_documents",
    "document_from_text",
    "novel_passages",
    "novel_titles",
    "nsp_examples",
    "read_documents",
    "split_sentences",
    "tokenize_documents",
    "word_order_passages",
]
