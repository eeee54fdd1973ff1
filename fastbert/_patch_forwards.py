"""The forwards :mod:`fastbert.patch` swaps into transformers' BERT-family modules, and the
``"fastbert"`` attention it registers with transformers (see :mod:`fastbert.patch` for the contract)."""

import importlib
import inspect

import torch
import torch.nn.functional as F

from fastbert import ops
from fastbert.models.layers import compute_dtype

ATTENTION = "fastbert"
GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> bias_gelu's approximate
# The kwargs that carry packed sequences to the attention function (the names transformers' own
# flash-attention varlen path uses, so its packed-batch collators work with the fastbert attention too).
CU_SEQLENS, MAX_SEQLEN = "cu_seq_lens_q", "max_length_q"


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _AddNorm:
    """transformers' BertSelfOutput / BertOutput layers: LayerNorm(dropout(dense(h)) + input)."""

    fastbert_op = "layernorm_residual"

    def forward(self, hidden_states, input_tensor):
        ln = self.LayerNorm
        h = F.linear(hidden_states, self.dense.weight)
        return ops.layernorm_residual(
            h,
            input_tensor.to(h.dtype),
            ln.weight,
            ln.bias,
            self.dense.bias,
            eps=ln.eps,
            dropout_p=self.dropout.p,
            training=self.training,
        )


class _Intermediate:
    """BertIntermediate: act(dense(h)) with the bias and GELU fused."""

    fastbert_op = "bias_gelu"

    def forward(self, hidden_states):
        return ops.bias_gelu(
            F.linear(hidden_states, self.dense.weight), self.dense.bias, approximate=self.fastbert_approximate
        )


class _MaskedLM:
    """*ForMaskedLM / BertForPreTraining in training mode with labels: the head and the loss on the
    labelled rows only; no logits are built (``logits`` / ``prediction_logits`` is None), unless the
    forward keyword ``return_logits=True`` asks for the labelled rows' logits ``[M, vocab]``. In eval
    mode, or without labels, transformers' own forward (full ``[batch, seq, vocab]`` logits);
    ``return_logits=False`` with labels: the fused loss and no logits in eval mode too (the contract of
    ``fastbert.models``)."""

    fastbert_op = "mlm_loss"

    def forward(self, *args, **kwargs):
        spec = self.fastbert_mlm
        original = type(self).fastbert_original.forward
        return_logits = kwargs.pop("return_logits", None)
        if return_logits not in (None, True, False):
            raise ValueError(f"fastbert.patch: return_logits must be None, True or False, got {return_logits!r}")
        a = type(self).fastbert_signature.bind(self, *args, **kwargs).arguments
        extra = dict(a.pop("kwargs", {}))
        labels, nsp_labels = a.pop("labels", None), a.pop("next_sentence_label", None)
        return_dict = extra.pop("return_dict", None)
        fused = self.training or return_logits is False
        if not fused or labels is None or (spec.nsp is not None and nsp_labels is None):
            return original(self, *args, **kwargs)  # the logits are wanted, or no loss to fuse: transformers' own
        a.pop("self")
        out = _get(self, spec.base)(**a, **extra, return_dict=True)
        seq = out[0]
        rows, targets, _ = ops.gather_masked(seq, labels.to(seq.device))
        dense, norm, decoder = _get(self, spec.dense), _get(self, spec.norm), _get(self, spec.decoder)
        act = spec.act or self.config.hidden_act
        if isinstance(act, str) and act in GELU:
            h = ops.bias_gelu(F.linear(rows, dense.weight), dense.bias, approximate=GELU[act])
        else:
            h = _activation(act)(dense(rows))
        h = norm(h)
        loss = ops.linear_cross_entropy(h, decoder.weight, targets, decoder.bias)
        logits = decoder(h) if self.training and return_logits is True else None  # the labelled rows [M, vocab]
        if spec.nsp is None:
            res = _output_class(self, spec)(
                loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
            )
        else:
            nsp_logits = _get(self, spec.nsp)(out[1])
            loss = loss + F.cross_entropy(nsp_logits.view(-1, 2), nsp_labels.to(nsp_logits.device).view(-1))
            res = _output_class(self, spec)(
                loss=loss,
                prediction_logits=logits,
                seq_relationship_logits=nsp_logits,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return res if return_dict else res.to_tuple()


class _Unpadded:
    """*Model (the encoder model, also inside a heads model): the encoder on the real tokens only.

    The embeddings run on the padded inputs (so position and token-type ids are exactly
    transformers'), :func:`fastbert.ops.unpad` keeps the real tokens ``[T, H]``, every encoder layer
    runs on them as one packed sequence ``[1, T, H]`` (token-wise layers on T rows, attention by
    :func:`fastbert.ops.varlen_attention` within each sequence), and :func:`fastbert.ops.pad` rebuilds
    ``last_hidden_state [B, S, H]``, zeros at padding. The pooler reads each row's first real token
    (its [CLS]: position 0 with right padding, as transformers; the first unmasked position with left
    padding, where transformers reads a pad). A row with no real token is all zeros and pools zeros
    (``pooler_output = tanh(pooler.dense.bias)``). A batch without padding, and calls the unpadded
    path cannot serve (see :func:`_padded_because`), run the padded forward (the other patched layers
    still fused)."""

    fastbert_op = "unpad"

    def forward(self, *args, **kwargs):
        original = type(self).fastbert_original.forward
        a = type(self).fastbert_signature.bind(self, *args, **kwargs).arguments
        extra = dict(a.pop("kwargs", {}))
        if _padded_because(self, a, extra) is not None:
            return original(self, *args, **kwargs)
        mask = a["attention_mask"]
        device = (a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")).device
        packing = ops.packing(mask.to(device))
        if packing.total == packing.batch * packing.seqlen:  # no padding: the padded path is cheaper
            return original(self, *args, **kwargs)
        return_dict = extra.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        for k in (
            "output_attentions",
            "output_hidden_states",
            "use_cache",
            "encoder_attention_mask",
            "cache",
            "past_key_values",
            "encoder_hidden_states",
        ):
            extra.pop(k, None)
        emb = self.embeddings(
            input_ids=a.get("input_ids"),
            token_type_ids=a.get("token_type_ids"),
            position_ids=a.get("position_ids"),
            inputs_embeds=a.get("inputs_embeds"),
        )
        if packing.total == 0:  # no real token in the batch: nothing to run
            return _output(self, emb.new_zeros(packing.batch, packing.seqlen, self.config.hidden_size), return_dict)
        x = ops.unpad(emb, packing)  # [T, E]
        x = x.to(compute_dtype(x))  # under autocast: once here, not in every projection that reads x
        if getattr(self, "embeddings_project", None) is not None:  # ELECTRA: E -> H on the real rows only
            x = self.embeddings_project(x)
        extra[CU_SEQLENS] = extra["cu_seq_lens_k"] = packing.cu_seqlens
        extra[MAX_SEQLEN] = extra["max_length_k"] = packing.max_seqlen
        packed = self.encoder(x.unsqueeze(0), attention_mask=None, **extra)[0][0]  # [T, H]
        seq = ops.pad(packed, packing)  # [B, S, H], zeros at padding
        return _output(self, seq, return_dict, _first_tokens(packed, packing))


def _output(model, seq, return_dict, first=None):
    """The base model's output: ``last_hidden_state`` and, where the model has a pooler, its output
    on each row's first real token (zeros for a row without one)."""
    from transformers import modeling_outputs as mo

    if hasattr(model, "pooler"):
        pooled = None
        if model.pooler is not None:
            if first is None:
                first = seq.new_zeros(seq.shape[0], seq.shape[-1])
            pooled = model.pooler(first.unsqueeze(1))
        out = mo.BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=pooled)
    else:
        out = mo.BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=seq)
    return out if return_dict else out.to_tuple()


def _padded_because(model, a, extra):
    """Why this call of an unpadded model runs transformers' padded forward instead (None: it doesn't)."""
    config = model.config
    mask = a.get("attention_mask")
    ids = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
    if mask is None:
        return "no attention_mask (nothing to unpad)"
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() != 2
        or ids is None
        or tuple(mask.shape) != tuple(ids.shape[:2])
    ):
        return "attention_mask is not a [batch, seq] padding mask"
    if config._attn_implementation != ATTENTION:
        return f"attention implementation is {config._attn_implementation!r}, not {ATTENTION!r}"
    for flag in ("output_attentions", "output_hidden_states"):
        value = extra.get(flag)
        if value is None:
            value = getattr(config, flag, False)
        if value:
            return flag
    for name in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "head_mask"):
        if a.get(name) is not None or extra.get(name) is not None:
            return name
    if extra.get(CU_SEQLENS) is not None:
        return "the caller packs the sequences itself"
    return None


def _first_tokens(packed, p):
    """Each sequence's first packed row ``[B, H]``; zeros for a sequence with no token."""
    lengths = p.cu_seqlens[1:] - p.cu_seqlens[:-1]
    if p.total == 0:
        return packed.new_zeros((p.batch, packed.shape[-1]))
    rows = packed.index_select(0, p.cu_seqlens[:-1].long().clamp(max=p.total - 1))
    return torch.where((lengths > 0).unsqueeze(1), rows, rows.new_zeros(()))


def _activation(act):
    if callable(act):
        return act
    from transformers.activations import ACT2FN

    return ACT2FN[act]


def _output_class(model, spec):
    if spec.output == "MaskedLMOutput":
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput
    return getattr(importlib.import_module(type(model).fastbert_original.__module__), spec.output)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: ``softmax(QK^T * scaling + mask)``, dropout, ``@ V``,
    with the softmax, mask and dropout in :func:`fastbert.ops.masked_softmax`.

    Packed sequences (batch 1, no mask, ``cu_seq_lens_q`` / ``max_length_q`` in the kwargs, as
    transformers passes them to flash-attention's varlen path; the unpadded encoder passes them so)
    run :func:`fastbert.ops.varlen_attention` instead: each token attends to its own sequence only.
    No attention probabilities exist then: the weights returned are ``None``."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    cu_seqlens = kwargs.get(CU_SEQLENS)
    if cu_seqlens is not None and attention_mask is None and query.shape[0] == 1:
        max_seqlen = kwargs.get(MAX_SEQLEN)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, heads, T, D] -> [T, heads, D]
        out = ops.varlen_attention(
            q,
            k,
            v,
            cu_seqlens.to(torch.int32),
            int(max_seqlen),
            scale=scaling,
            dropout_p=dropout,
            training=module.training,
        )
        return out.unsqueeze(0), None  # [1, T, heads, D], as the padded path's transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3))
    # transformers passes dropout=0.0 in eval mode (dropout = 0.0 if not self.training else p)
    probs = ops.masked_softmax(scores, attention_mask, scale=scaling, dropout_p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_attention():
    """Register the ``"fastbert"`` attention with transformers (idempotent), and let a config whose
    attention is ``"fastbert"`` take ``output_attentions=True`` (see :func:`_accept_output_attentions`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # bool [B, 1, q, kv] (True = attend) or None
    _accept_output_attentions()


def _accept_output_attentions():
    """transformers refuses ``config.output_attentions = True`` (the property's setter) for every
    attention but ``"eager"``, because the others return no probabilities. The fastbert attention returns
    them (padded path; a call asking for them never runs unpadded), so the setter is extended to accept
    ``"fastbert"`` as well; every other attention keeps transformers' check and error."""
    from transformers import PreTrainedConfig

    prop = inspect.getattr_static(PreTrainedConfig, "output_attentions", None)
    if not isinstance(prop, property) or prop.fset is None or getattr(prop.fset, "fastbert", False):
        return
    original = prop.fset

    def fset(self, value):
        if value and getattr(self, "_attn_implementation", None) == ATTENTION:
            self._output_attentions = value  # what transformers' setter stores once its check passes
        else:
            original(self, value)

    fset.fastbert = True
    PreTrainedConfig.output_attentions = property(prop.fget, fset, prop.fdel, prop.__doc__)


def accept_output_attentions_on_save(config):
    """``save_pretrained`` validates a config (its ``@strict`` class validators): the
    ``validate_output_attentions`` of ``config``'s classes accepts ``"fastbert"`` as it accepts ``"eager"``."""
    for cls in type(config).__mro__:
        validators = cls.__dict__.get("__class_validators__")
        if not isinstance(validators, list):
            continue
        for i, v in enumerate(validators):
            if getattr(v, "__name__", "") == "validate_output_attentions" and not getattr(v, "fastbert", False):
                validators[i] = _fastbert_aware(v)


def _fastbert_aware(validator):
    def validate_output_attentions(self):
        if getattr(self, "_attn_implementation", None) != ATTENTION:
            validator(self)

    validate_output_attentions.fastbert = True
    return validate_output_attentions
