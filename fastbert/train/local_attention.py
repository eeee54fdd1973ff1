"""Fixed local attention heads for pretraining from scratch (``fastbert pretrain --local-attention``).

Measured on the bundled corpus (``benchmarks/results/pretrain/``): a small BERT pretrained from
random weights for minutes of CPU never learns to attend to its neighbours. Its attention stays
uniform, and the MLM stays on the "copy + unigram" plateau (~15% held-out accuracy). A local pattern
given only at initialisation is trained away within a few hundred steps, because a bag of words is
the quicker gain. Fixed positional heads, as in Raganato et al. 2020 ("Fixed Encoder Self-Attention
Patterns in Transformer-Based Machine Translation"), remove that search. Every head of every layer
attends to the previous token (even heads) or the next one (odd heads) and keeps that pattern for
the whole pretraining, so training spends its steps on what to read from the neighbours.

The heads live in ordinary BERT weights, so the checkpoint is a plain Hugging Face BERT, and
fine-tuning trains everything:
- The position embeddings are sin/cos pairs at random frequencies in (0.25, pi), not the usual
  geometric ones, whose low frequencies cannot tell neighbours apart.
- Each head's key projection is ``scale`` times the rotation that moves a position's pair one step
  (``R``, or ``R^T`` for the next token). Its query projection is ``scale`` times the identity on
  the head's slice of the hidden state, added to the usual random initialisation.
- :class:`PinnedLocalAttention` restores these rows (and the position embeddings) after every
  optimizer step, so they stay exactly as set: weight decay included.
"""

import math

import torch


def local_attention_init(model, amplitude=0.05, scale=1.5, seed=0):
    """Set ``model``'s (a fastbert BERT with ``.bert``) position embeddings and every layer's query and
    key projections so that head ``h`` attends to the previous token (``h`` even) or the next (odd)."""
    bert = model.bert
    c = bert.config
    hidden, heads = c.hidden_size, c.num_attention_heads
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"local attention needs an even head size, got hidden {hidden} / {heads} heads")
    d = hidden // heads
    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(hidden // 2, generator=g, dtype=torch.float64) * (math.pi - 0.25) + 0.25
    pe = bert.embeddings.position_embeddings.weight
    angle = torch.arange(pe.shape[0], dtype=torch.float64)[:, None] * freq
    cos, sin = torch.cos(freq), torch.sin(freq)
    step = torch.zeros(hidden, hidden, dtype=torch.float64)  # (sin, cos) of position i+1 = step @ those of i
    k = torch.arange(hidden // 2)
    step[2 * k, 2 * k], step[2 * k, 2 * k + 1] = cos, sin
    step[2 * k + 1, 2 * k], step[2 * k + 1, 2 * k + 1] = -sin, cos
    with torch.no_grad():
        pe[:, 0::2] = (amplitude * torch.sin(angle)).to(pe.dtype)
        pe[:, 1::2] = (amplitude * torch.cos(angle)).to(pe.dtype)
        for layer in bert.encoder.layer:
            w = layer.attention.self.qkv.weight  # [3 * hidden, hidden]: query, key, value rows
            for h in range(heads):
                s = slice(h * d, (h + 1) * d)
                r = step[s, s] if h % 2 == 0 else step[s, s].T
                w[s, s] += scale * torch.eye(d, dtype=w.dtype)
                w[hidden + h * d : hidden + (h + 1) * d, s] += (scale * r).to(w.dtype)
    return model


class PinnedLocalAttention:
    """The query/key rows of every layer and the position embeddings as they are now; ``restore()``
    (after each optimizer step) writes them back, so the local heads stay fixed while the rest of
    the model (values, outputs, feed-forward, word embeddings) trains."""

    def __init__(self, model):
        bert = model.bert
        hidden = bert.config.hidden_size
        self.kept = [(bert.embeddings.position_embeddings.weight, slice(None))]
        self.kept += [(layer.attention.self.qkv.weight, slice(0, 2 * hidden)) for layer in bert.encoder.layer]
        self.kept += [(layer.attention.self.qkv.bias, slice(0, 2 * hidden)) for layer in bert.encoder.layer]
        self.saved = [p.detach()[rows].clone() for p, rows in self.kept]

    @torch.no_grad()
    def restore(self):
        for (p, rows), value in zip(self.kept, self.saved):
            p[rows] = value
