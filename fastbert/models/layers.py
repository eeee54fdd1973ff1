"""BERT's building blocks on fastbert's fused ops (or, per ``BertConfig.fused``, eager PyTorch).

Module and parameter names follow Hugging Face's ``BertModel`` so checkpoints map one to one,
except the attention projection: one ``qkv`` Linear ``[3H, H]`` (rows: query, key, value) instead of
three, so Q, K and V come out of one matmul (fastbert/models/checkpoint.py splits and joins them).

Each sub-layer output is ``layernorm_residual(x @ W.T, residual, ..., x_bias=b)``: the dense bias,
dropout, the residual add and LayerNorm in one pass; the intermediate layer is ``x @ W.T`` then
``bias_gelu``; attention probabilities come from ``masked_softmax`` (scale, key-padding mask and
dropout in one pass). Every op is called with ``training=self.training``.

Unpadded execution (``BertConfig.unpad``, fastbert/models/bert.py): the encoder then runs on the
real tokens ``[T, H]`` of a :class:`fastbert.ops.Packing`; every layer but attention is token-wise
and runs as it is, attention sees each sequence's own tokens (``varlen_attention``, or re-padded Q/K/V
through the padded path's attention and the context unpadded again).

A sequence whose key-padding mask is all False (no token to attend to) gets a zero attention output on
every attention path: ``masked_softmax`` yields zero probabilities, the eager and SDPA paths zero the
output (their softmax over an all-``finfo.min`` mask would otherwise attend uniformly to the padding),
and the unpadded paths have no query for it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops


def compute_dtype(x):
    """The dtype an autocast region computes ``x``'s device in (``x.dtype`` outside autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: Hugging Face's BertSelfOutput / BertOutput layers."""

    def __init__(self, n_in, n_out, config):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob
        self.fused = config.fuses("layernorm_residual")

    def forward(self, x, residual):
        ln = self.LayerNorm
        if self.fused:
            h = F.linear(x, self.dense.weight)  # under autocast: the autocast dtype, the residual cast to it
            return ops.layernorm_residual(
                h,
                residual.to(h.dtype),
                ln.weight,
                ln.bias,
                self.dense.bias,
                eps=ln.eps,
                dropout_p=self.p,
                training=self.training,
            )
        h = F.dropout(self.dense(x), self.p, self.training)
        return F.layer_norm(h + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class Intermediate(nn.Module):
    """``gelu(dense(x))``: the dense bias and GELU fused in ``bias_gelu``."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate
        self.fused = config.fuses("bias_gelu")

    def forward(self, x):
        if self.fused:
            return ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, approximate=self.approximate)
        return F.gelu(self.dense(x), approximate=self.approximate)


class SelfAttention(nn.Module):
    """Multi-head self-attention: one QKV matmul, ``masked_softmax`` (or SDPA), the context matmul."""

    def __init__(self, config):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.p = config.attention_probs_dropout_prob
        self.fused = config.fuses("attention")
        self.sdpa = config.attention == "sdpa"
        self.varlen = {d: config.attention_for_unpadded(d) == "varlen" for d in ("cpu", "cuda")}

    def forward(self, x, key_mask, additive_mask, packing=None):
        """``x``: ``[B, S, H]``, or the packed ``[T, H]`` when ``packing`` is given. ``key_mask``:
        bool ``[B, S]`` (True = attend) or None; ``additive_mask``: its ``[B, 1, 1, S]`` float form
        (0 / finfo.min) for the eager and SDPA paths, or None."""
        if packing is not None:
            return self.packed(x, key_mask, additive_mask, packing)
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attend(q, k, v, key_mask, additive_mask).transpose(1, 2).reshape(b, s, h)

    def packed(self, x, key_mask, additive_mask, p):
        """Attention on packed tokens ``[T, H]``: each sequence attends to its own tokens only."""
        t, h = x.shape
        qkv = self.qkv(x)
        if self.varlen.get(x.device.type, False):
            q, k, v = qkv.view(t, 3, self.heads, self.head_dim).unbind(1)
            ctx = ops.varlen_attention(
                q,
                k,
                v,
                p.cu_seqlens,
                p.max_seqlen,
                scale=1.0 / math.sqrt(self.head_dim),
                dropout_p=self.p,
                training=self.training,
            )
            return ctx.reshape(t, h)
        padded = ops.pad(qkv, p).view(p.batch, p.seqlen, 3, self.heads, self.head_dim)
        q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)
        ctx = self.attend(q, k, v, key_mask, additive_mask).transpose(1, 2)
        return ops.unpad(ctx.reshape(p.batch, p.seqlen, h), p)

    def attend(self, q, k, v, key_mask, additive_mask):
        """``[B, heads, S, D]`` context of padded ``q, k, v``."""
        p = self.p if self.training else 0.0
        if self.fused and not self.sdpa:  # masked_softmax: a fully masked row's probabilities are zeros
            scale = 1.0 / math.sqrt(self.head_dim)
            probs = ops.masked_softmax(
                q @ k.transpose(-1, -2), key_mask, scale=scale, dropout_p=self.p, training=self.training
            )
            return probs @ v
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=p)
        else:
            x = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))
            x = x if additive_mask is None else x + additive_mask
            out = F.dropout(torch.softmax(x, -1), p, self.training) @ v
        if key_mask is None:
            return out
        # a sequence with no key to attend to: zeros, as masked_softmax gives (softmax over an additive
        # mask of finfo.min everywhere would be uniform attention over the padding instead)
        return torch.where(key_mask.any(-1)[:, None, None, None], out, out.new_zeros(()))


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AddNorm(config.hidden_size, config.hidden_size, config)

    def forward(self, x, key_mask, additive_mask, packing=None):
        return self.output(self.self(x, key_mask, additive_mask, packing), x)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = AddNorm(config.intermediate_size, config.hidden_size, config)

    def forward(self, x, key_mask, additive_mask, packing=None):
        a = self.attention(x, key_mask, additive_mask, packing)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, key_mask, additive_mask, packing=None):
        for layer in self.layer:
            x = layer(x, key_mask, additive_mask, packing)
        return x


class Embeddings(nn.Module):
    """``dropout(LayerNorm(word + position + token_type))``; the add and LayerNorm fused."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.p = config.hidden_dropout_prob
        self.fused = config.fuses("layernorm_residual")

    def forward(self, input_ids, token_type_ids, position_ids=None):
        """``[B, S]`` ids (positions ``0 .. S-1``), or packed ``[T]`` ids with their ``position_ids``."""
        if position_ids is None:
            pos = self.position_embeddings.weight[: input_ids.shape[1]]
        else:
            pos = self.position_embeddings(position_ids)
        rest = pos + self.token_type_embeddings(token_type_ids)
        words, ln = self.word_embeddings(input_ids), self.LayerNorm
        if self.fused:  # under autocast the LayerNorm runs in its dtype, so the encoder gets no fp32 rows
            dtype = compute_dtype(words)
            words, rest = words.to(dtype), rest.to(dtype)
            x = ops.layernorm_residual(words, rest, ln.weight, ln.bias, eps=ln.eps)  # dropout: below, after LN
        else:
            x = F.layer_norm(words + rest, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return F.dropout(x, self.p, self.training)


class Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls):
        """``tanh(dense(cls))`` of each sequence's first token ``[B, H]``."""
        return torch.tanh(self.dense(cls))


class MLMTransform(nn.Module):
    """HF's BertPredictionHeadTransform: ``LayerNorm(gelu(dense(x)))`` (dense bias fused into GELU)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = config.gelu_approximate
        self.fused = config.fuses("bias_gelu")

    def forward(self, x):
        if self.fused:
            x = ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, approximate=self.approximate)
        else:
            x = F.gelu(self.dense(x), approximate=self.approximate)
        return self.LayerNorm(x)
