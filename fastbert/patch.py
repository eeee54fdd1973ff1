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
  Without ``labels`` the model returns its full logits, as before.

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
OPTIONS = ("gelu", "layernorm", "attention", "mlm_loss")


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

    def __str__(self):
        lines = [f"fastbert.patch ({self.model_type}): replaced "
                 + (", ".join(f"{k} x{v}" for k, v in self.replaced.items()) or "nothing")]
        lines += [f"  left alone: {what}: {why}" for what, why in self.left_alone]
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
    with the softmax, mask and dropout in :func:`fastbert.ops.masked_softmax`."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
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
        if mixin is _MaskedLM:  # keep the original signature visible (Trainer drops dataset columns by it)
            body["forward"] = functools.wraps(cls.forward)(lambda self, *a, **k: _MaskedLM.forward(self, *a, **k))
            body["fastbert_signature"] = inspect.signature(cls.forward)  # bound on every call: computed once
        sub = type(f"Fused{cls.__name__}", (mixin, cls), body)
        _SUBCLASSES[(cls, mixin)] = sub
    for k, v in attrs.items():
        setattr(module, k, v)
    module.__class__ = sub


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


def patch(model, *, gelu=True, layernorm=True, attention=True, mlm_loss=True):
    """Patch a built transformers BERT-family model in place (see the module docstring); returns a
    :class:`PatchReport`. Patching a patched model again changes nothing."""
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
    if attention:
        if config.is_decoder or getattr(config, "add_cross_attention", False):
            report.left_alone.append(("attention", "decoder / cross-attention configs keep their attention"))
        else:
            current = config._attn_implementation
            if current != ATTENTION:
                _register_attention()
                model.fastbert_attn_before = current
                model.set_attn_implementation(ATTENTION)
            count("attention")
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
