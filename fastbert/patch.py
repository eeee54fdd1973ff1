"""Drop fastbert's fused layers into existing Hugging Face BERT-family models.

    model = transformers.AutoModelForMaskedLM.from_pretrained(...)
    report = fastbert.patch(model)        # in place; print(report) says what was replaced
    ...                                   # train as before (Trainer, torch.compile, your own loop)
    fastbert.unpatch(model)               # back to transformers' own code, bit for bit

    fastbert.patch_transformers()         # or: every supported model built from now on is patched
    model = transformers.AutoModel.from_pretrained(...)
    fastbert.unpatch_transformers()

What is replaced, in every layer of the encoder:

* ``intermediate``: dense bias + activation -> :func:`fastbert.ops.bias_gelu` (exact for
  ``hidden_act="gelu"``, tanh for ``"gelu_new"`` / ``"gelu_pytorch_tanh"``; any other activation
  is left alone, and the report says so);
* ``attention.output`` and ``output``: dense bias + dropout + residual + LayerNorm ->
  :func:`fastbert.ops.layernorm_residual`;
* attention: the model's ``attn_implementation`` becomes ``"fastbert"``, registered with
  transformers' ``AttentionInterface``: ``QK^T`` -> :func:`fastbert.ops.masked_softmax` (scale,
  padding mask, dropout) -> ``@ V`` (left alone for decoders and cross-attention);
* the MLM loss of ``*ForMaskedLM`` / ``BertForPreTraining``: when ``labels`` are given, only the
  labelled rows go through the head (:func:`fastbert.ops.gather_masked`) and the loss through
  :func:`fastbert.ops.linear_cross_entropy`, never building ``[tokens, vocab]`` logits. The
  returned logits (``logits`` / ``prediction_logits``) are then ``[labelled tokens, vocab]``, in
  row-major order of ``labels != -100``, and detached (the gradient flows through ``loss``).
  Without ``labels`` the model returns its full logits, as before;
* unpadded execution (``unpad=True``, the default; needs ``attention``): the encoder model
  (``BertModel``, ``RobertaModel``, ``ElectraModel``, ... also as the ``.bert`` / ``.roberta`` /
  ``.electra`` of a heads model) runs the embeddings on the padded batch (position and token-type ids
  exactly transformers'), keeps the real tokens (:func:`fastbert.ops.unpad`), runs every layer on
  them only (attention by :func:`fastbert.ops.varlen_attention`, each token within its own
  sequence) and pads back once (:func:`fastbert.ops.pad`). ``last_hidden_state`` is ``[B, S, H]``
  with **zeros at padding positions**; ``pooler_output`` is the pooler on each row's first real
  token (its [CLS]: the same as transformers with right padding; under left padding transformers
  pools position 0, a pad); a row whose mask is all zeros gives zeros (``pooler_output =
  tanh(pooler.dense.bias)``), never NaN. Batches without padding, and calls with no
  ``attention_mask``, a mask that is not ``[batch, seq]``, ``output_attentions``,
  ``output_hidden_states`` (argument or config), ``encoder_hidden_states`` or a cache, run the padded
  path above (decoder / cross-attention configs are never unpadded; the report says so).

How: each patched module's class is swapped for a subclass whose ``forward`` is fastbert's (the
parameters, their names and the state dict are untouched); :func:`unpatch` swaps it back. One
table (:data:`FAMILIES`) describes each model family; a family whose module this transformers
lacks is skipped.
"""

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastbert import ops

ATTENTION = "fastbert"
GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}   # hidden_act -> bias_gelu's approximate
OPTIONS = ("gelu", "layernorm", "attention", "mlm_loss", "unpad")
# The kwargs that carry packed sequences to the attention function (the names transformers' own
# flash-attention varlen path uses, so its packed-batch collators work with the fastbert attention too).
CU_SEQLENS, MAX_SEQLEN = "cu_seq_lens_q", "max_length_q"


@dataclass(frozen=True)
class MLMHead:
    """Where a masked-LM model keeps its pieces (attribute paths from the model)."""
    base: str                     # the encoder: "bert"
    dense: str                    # the head transform's dense layer
    norm: str                     # its LayerNorm
    act: Optional[str]            # the transform's activation; None: config.hidden_act
    decoder: str                  # the output projection (weight tied to the word embeddings)
    nsp: Optional[str] = None     # the next-sentence head (BertForPreTraining)
    output: str = "MaskedLMOutput"


@dataclass(frozen=True)
class Family:
    module: str                   # transformers.models.<x>.modeling_<x>
    prefix: str                   # class-name prefix: Bert -> BertIntermediate, BertOutput, ...
    mlm: Dict[str, MLMHead] = field(default_factory=dict)


def _roberta_like(module, prefix, base):
    return Family(module, prefix, {f"{prefix}ForMaskedLM": MLMHead(base, "lm_head.dense", "lm_head.layer_norm", "gelu",
                                                                   "lm_head.decoder")})


_BERT_HEAD = dict(base="bert", dense="cls.predictions.transform.dense", norm="cls.predictions.transform.LayerNorm",
                  act=None, decoder="cls.predictions.decoder")
FAMILIES = {
    "bert": Family("transformers.models.bert.modeling_bert", "Bert", {
        "BertForMaskedLM": MLMHead(**_BERT_HEAD),
        "BertForPreTraining": MLMHead(**_BERT_HEAD, nsp="cls.seq_relationship", output="BertForPreTrainingOutput")}),
    "roberta": _roberta_like("transformers.models.roberta.modeling_roberta", "Roberta", "roberta"),
    "xlm-roberta": _roberta_like("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRoberta", "roberta"),
    "camembert": _roberta_like("transformers.models.camembert.modeling_camembert", "Camembert", "roberta"),
    "electra": Family("transformers.models.electra.modeling_electra", "Electra", {
        "ElectraForMaskedLM": MLMHead("electra", "generator_predictions.dense", "generator_predictions.LayerNorm",
                                      "gelu", "generator_lm_head")}),
}


def supported():
    """The model types this transformers has and :func:`patch` knows."""
    out = []
    for name, fam in FAMILIES.items():
        try:
            importlib.import_module(fam.module)
            out.append(name)
        except ImportError:
            pass
    return out


@dataclass
class PatchReport:
    model_type: str
    replaced: Dict[str, int] = field(default_factory=dict)          # what -> how many modules
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (what, why)
    notes: List[str] = field(default_factory=list)                  # how a replacement behaves per call

    def __str__(self):
        lines = [f"fastbert.patch ({self.model_type}): replaced "
                 + (", ".join(f"{k} x{v}" for k, v in self.replaced.items()) or "nothing")]
        lines += [f"  left alone: {what}: {why}" for what, why in self.left_alone]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the fused forwards

def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _AddNorm:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + input)."""
    fastbert_op = "layernorm_residual"

    def forward(self, hidden_states, input_tensor):
        ln = self.LayerNorm
        h = F.linear(hidden_states, self.dense.weight)
        return ops.layernorm_residual(h, input_tensor.to(h.dtype), ln.weight, ln.bias, ln.eps, x_bias=self.dense.bias,
                                      dropout_p=self.dropout.p, training=self.training)


class _Intermediate:
    """BertIntermediate: act(dense(h)) with the bias and GELU fused."""
    fastbert_op = "bias_gelu"

    def forward(self, hidden_states):
        return ops.bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias, self.fastbert_approximate)


class _MaskedLM:
    """*ForMaskedLM / BertForPreTraining: with labels, the head and the loss on the labelled rows."""
    fastbert_op = "mlm_loss"

    def forward(self, *args, **kwargs):
        spec = self.fastbert_mlm
        original = type(self).fastbert_original.forward
        a = type(self).fastbert_signature.bind(self, *args, **kwargs).arguments
        extra = dict(a.pop("kwargs", {}))
        labels, nsp_labels = a.pop("labels", None), a.pop("next_sentence_label", None)
        return_dict = extra.pop("return_dict", None)
        if labels is None or (spec.nsp is not None and nsp_labels is None):
            return original(self, *args, **kwargs)  # no loss to compute: transformers' own path
        a.pop("self")
        out = _get(self, spec.base)(**a, **extra, return_dict=True)
        seq = out[0]
        rows, targets, _ = ops.gather_masked(seq, labels.to(seq.device))
        dense, norm, decoder = _get(self, spec.dense), _get(self, spec.norm), _get(self, spec.decoder)
        act = spec.act or self.config.hidden_act
        if isinstance(act, str) and act in GELU:
            h = ops.bias_gelu(F.linear(rows, dense.weight), dense.bias, GELU[act])
        else:
            h = _activation(act)(dense(rows))
        h = norm(h)
        loss = ops.linear_cross_entropy(h, decoder.weight, decoder.bias, targets)
        with torch.no_grad():
            logits = F.linear(h, decoder.weight, decoder.bias)
        if spec.nsp is None:
            res = _output_class(self, spec)(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                            attentions=out.attentions)
        else:
            nsp_logits = _get(self, spec.nsp)(out[1])
            loss = loss + F.cross_entropy(nsp_logits.view(-1, 2), nsp_labels.to(nsp_logits.device).view(-1))
            res = _output_class(self, spec)(loss=loss, prediction_logits=logits, seq_relationship_logits=nsp_logits,
                                            hidden_states=out.hidden_states, attentions=out.attentions)
        return res.to_tuple() if return_dict is False else res


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
        for k in ("output_attentions", "output_hidden_states", "use_cache", "encoder_attention_mask",
                  "cache", "past_key_values", "encoder_hidden_states"):
            extra.pop(k, None)
        emb = self.embeddings(input_ids=a.get("input_ids"), token_type_ids=a.get("token_type_ids"),
                              position_ids=a.get("position_ids"), inputs_embeds=a.get("inputs_embeds"))
        if packing.total == 0:  # no real token in the batch: nothing to run
            return _output(self, emb.new_zeros(packing.batch, packing.seqlen, self.config.hidden_size), return_dict)
        x = ops.unpad(emb, packing)                                   # [T, E]
        if getattr(self, "embeddings_project", None) is not None:    # ELECTRA: E -> H on the real rows only
            x = self.embeddings_project(x)
        extra[CU_SEQLENS] = extra["cu_seq_lens_k"] = packing.cu_seqlens
        extra[MAX_SEQLEN] = extra["max_length_k"] = packing.max_seqlen
        packed = self.encoder(x.unsqueeze(0), attention_mask=None, **extra)[0][0]   # [T, H]
        seq = ops.pad(packed, packing)                                # [B, S, H], zeros at padding
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
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or ids is None
            or tuple(mask.shape) != tuple(ids.shape[:2])):
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
        out = ops.varlen_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), scaling,
                                   dropout if module.training else 0.0)
        return out.unsqueeze(0), None  # [1, T, heads, D], as the padded path's transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3))
    probs = ops.masked_softmax(scores, attention_mask, scaling, dropout_p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # bool [B, 1, q, kv] (True = attend) or None


# ---------------------------------------------------------------------------- patch / unpatch

_SUBCLASSES = {}


def _swap(module, mixin, **attrs):
    cls = type(module)
    if getattr(cls, "fastbert_original", None) is not None:  # patched already
        return
    sub = _SUBCLASSES.get((cls, mixin))
    if sub is None:
        body = {"fastbert_original": cls, "__module__": __name__}
        if mixin in (_MaskedLM, _Unpadded):  # keep the original signature visible (Trainer drops dataset columns by it)
            body["forward"] = functools.wraps(cls.forward)(lambda self, *a, _m=mixin, **k: _m.forward(self, *a, **k))
            body["fastbert_signature"] = inspect.signature(cls.forward)  # bound on every call: computed once
        sub = type(f"Fused{cls.__name__}", (mixin, cls), body)
        _SUBCLASSES[(cls, mixin)] = sub
        _register_outputs(module, sub)
    for k, v in attrs.items():
        setattr(module, k, v)
    module.__class__ = sub


def _register_outputs(module, sub):
    """transformers (5.x) finds what a model's ``output_attentions`` / ``output_hidden_states`` record in
    a registry keyed by the model's class name: give the fused subclass its original's entry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    entry = getattr(module, "_can_record_outputs", None)
    if entry is not None:
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(sub), entry)


def _family(model, caller):
    try:
        from transformers import PreTrainedModel
    except ImportError as e:
        raise ImportError(f"fastbert.{caller} needs the `transformers` package") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"fastbert.{caller}: expects a transformers PreTrainedModel (e.g. BertModel), got "
                        f"{type(model).__module__}.{type(model).__name__}")
    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES or kind not in supported():
        raise ValueError(f"fastbert.{caller}: model type {kind!r} is not supported; supported: "
                         f"{', '.join(supported())}")
    return kind, FAMILIES[kind]


def _original_name(module):
    return getattr(type(module), "fastbert_original", type(module)).__name__


def patch(model, *, gelu=True, layernorm=True, attention=True, mlm_loss=True, unpad=True):
    """Patch a built transformers BERT-family model in place (see the module docstring); returns a
    :class:`PatchReport`. Patching a patched model again changes nothing. ``unpad`` (needs
    ``attention``) runs the encoder on the real tokens only (see :class:`_Unpadded`)."""
    kind, fam = _family(model, "patch")
    report = PatchReport(kind)
    config = model.config

    def count(what):
        report.replaced[what] = report.replaced.get(what, 0) + 1

    act, skipped_gelu = config.hidden_act, []
    for name, m in model.named_modules():
        cls = _original_name(m)
        if layernorm and cls in (f"{fam.prefix}SelfOutput", f"{fam.prefix}Output"):
            _swap(m, _AddNorm)
            count("layernorm_residual")
        elif gelu and cls == f"{fam.prefix}Intermediate":
            if isinstance(act, str) and act in GELU:
                _swap(m, _Intermediate, fastbert_approximate=GELU[act])
                count("bias_gelu")
            else:
                skipped_gelu.append(name)
        elif mlm_loss and m is model and cls in fam.mlm:
            _swap(m, _MaskedLM, fastbert_mlm=fam.mlm[cls])
            count("mlm_loss")
    if skipped_gelu:
        report.left_alone.append((f"intermediate x{len(skipped_gelu)}",
                                  f"activation {act!r} is not one of {', '.join(GELU)}"))
    if mlm_loss and _original_name(model) not in fam.mlm:
        report.left_alone.append(("mlm_loss", f"{_original_name(model)} has no MLM loss to fuse"))
    decoder = config.is_decoder or getattr(config, "add_cross_attention", False)
    if attention:
        if decoder:
            report.left_alone.append(("attention", "decoder / cross-attention configs keep their attention"))
        else:
            current = config._attn_implementation
            if current != ATTENTION:
                _register_attention()
                model.fastbert_attn_before = current
                model.set_attn_implementation(ATTENTION)
            count("attention")
    if unpad:
        if decoder:
            report.left_alone.append(("unpad", "decoder / cross-attention configs run padded"))
        elif not attention:
            report.left_alone.append(("unpad", "needs attention=True (the fastbert attention runs packed sequences)"))
        else:
            for m in model.modules():
                if _original_name(m) == f"{fam.prefix}Model":
                    _swap(m, _Unpadded)
                    count("unpad")
            if "unpad" in report.replaced:
                report.notes.append(
                    "unpad: last_hidden_state is zero at padding positions; the pooler reads each row's first real "
                    "token; a row with no real token gives zeros (pooler: tanh(bias)). Batches without padding, and "
                    "calls with no attention_mask, a non-[batch, seq] mask, output_attentions, output_hidden_states, "
                    "encoder_hidden_states or a cache, run the padded path")
            else:
                report.left_alone.append(("unpad", f"no {fam.prefix}Model inside {_original_name(model)}"))
    return report


def unpatch(model):
    """Undo :func:`patch`: every module gets its transformers class back, the attention its
    previous implementation. A model that was not patched is left as it is."""
    _family(model, "unpatch")
    for m in model.modules():
        original = getattr(type(m), "fastbert_original", None)
        if original is not None:
            m.__class__ = original
            for k in ("fastbert_approximate", "fastbert_mlm"):
                m.__dict__.pop(k, None)
    before = model.__dict__.pop("fastbert_attn_before", None)
    if before is not None:
        model.set_attn_implementation(before)
    return model


_POST_INIT = {}


def patch_transformers(**options):
    """Patch every supported model built from now on (``from_pretrained`` included) with
    :func:`patch` (same keyword options). :func:`unpatch_transformers` stops it."""
    from transformers import PreTrainedModel
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"patch_transformers: unknown options {sorted(unknown)}; choose from {OPTIONS}")
    original = _POST_INIT.get("post_init", PreTrainedModel.post_init)

    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self.config, "model_type", None) in supported():
            patch(self, **options)

    _POST_INIT["post_init"] = original
    PreTrainedModel.post_init = post_init


def unpatch_transformers():
    """Models built from now on are transformers' own again (built ones stay patched: see
    :func:`unpatch`)."""
    from transformers import PreTrainedModel
    original = _POST_INIT.pop("post_init", None)
    if original is not None:
        PreTrainedModel.post_init = original
