"""Fixed local attention heads (fastbert.train.local_attention): the pattern seen by transformers on the
saved checkpoint, and the pinned rows through training."""

import pytest
import torch

from fastbert.data import MaskingCollator, WordPieceTokenizer, default_corpus_documents, nsp_examples
from fastbert.models import BertConfig, BertForPreTraining
from fastbert.train import TrainConfig, pretrain
from fastbert.train.local_attention import PinnedLocalAttention, local_attention_init

transformers = pytest.importorskip("transformers")


def attention(model, tmp_path, input_ids):
    """Each layer's attention probabilities [B, heads, S, S], from transformers' eager attention on the
    saved checkpoint (what a user of the checkpoint gets, not fastbert's own kernels)."""
    model.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=input_ids, output_attentions=True).attentions


def offset_mass(probs, offset):
    """Mean probability a query puts on the key ``offset`` positions away (keys that exist)."""
    s = probs.shape[-1]
    q = torch.arange(max(0, -offset), s - max(0, offset))
    return probs[:, :, q, q + offset].mean(dim=(0, 2))  # per head


@pytest.mark.parametrize("preset,heads", [("tiny", 2), ("tiny", 4), ("mini", 4)])
def test_heads_attend_to_the_previous_and_next_token(tmp_path, seed, preset, heads):
    config = BertConfig.from_preset(preset, vocab_size=997, num_attention_heads=heads)
    model = local_attention_init(BertForPreTraining(config), seed=seed)
    ids = torch.randint(5, 997, (4, 77))  # random tokens: the pattern comes from positions alone
    for probs in attention(model, tmp_path, ids):
        prev, nxt = offset_mass(probs, -1), offset_mass(probs, 1)
        assert (prev[0::2] > 0.5).all() and (nxt[1::2] > 0.5).all(), (prev, nxt)
        assert (prev[1::2] < 0.05).all() and (nxt[0::2] < 0.05).all(), (prev, nxt)


def test_odd_head_size_is_refused():
    config = BertConfig(vocab_size=50, hidden_size=30, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8)
    with pytest.raises(ValueError, match="even head size"):
        local_attention_init(BertForPreTraining(config))


def test_pinned_rows_stay_fixed_while_the_rest_trains(tmp_path, seed):
    docs = [d for d in default_corpus_documents() if d.title in ("2_northanger_abbey", "3_persuasion")]
    tok = WordPieceTokenizer.train_from_texts([s for d in docs[:1] for s in d.sentences[:400]], vocab_size=500)
    examples = nsp_examples(docs, tok, max_seq_length=48, seed=seed)[:64]
    config = BertConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=48)
    model = local_attention_init(BertForPreTraining(config), seed=seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collate = MaskingCollator(tok.vocab_size, tok.mask_id, tok.pad_id, tok.special_ids, seed=seed)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, weight_decay=0.1)
    pretrain(model, examples, collate, cfg, tmp_path / "run", progress=False, pin=PinnedLocalAttention)
    after = model.state_dict()
    h = config.hidden_size
    pos = "bert.embeddings.position_embeddings.weight"
    assert torch.equal(after[pos], before[pos])  # bit for bit, weight decay included
    for i in range(config.num_hidden_layers):
        w, b = f"bert.encoder.layer.{i}.attention.self.qkv.weight", f"bert.encoder.layer.{i}.attention.self.qkv.bias"
        assert torch.equal(after[w][: 2 * h], before[w][: 2 * h]) and torch.equal(after[b][: 2 * h], before[b][: 2 * h])
        assert not torch.equal(after[w][2 * h :], before[w][2 * h :])  # the value rows train
    trained = [k for k in before if not torch.equal(after[k], before[k])]
    assert "bert.embeddings.word_embeddings.weight" in trained and len(trained) > 10
    ids = torch.randint(5, tok.vocab_size, (2, 40))
    for probs in attention(model, tmp_path / "hf", ids):  # still local after training
        assert (offset_mass(probs, -1)[0::2] > 0.3).all() and (offset_mass(probs, 1)[1::2] > 0.3).all()
