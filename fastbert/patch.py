"""Drop fastbert's fused layers into existing Hugging Face BERT-family models.

    model = transformers.AutoModelForMaskedLM.from_pretrained(...)
    report = fastbert.patch(model)        # in place; print(report) says what was replaced
    ...                                   # train as before (Trainer, torch.compile, your own loop)
    fastbert.unpatch(model)               # back to transformers' own code, bit for bit

    fastbert.patch_transformers()         # or: every supported model built from now on is patched
    model = transformers.AutoModel.from_pretrained(...)
    fastbert.unpatch_transformers()

What is replaced, in every layer of the encoder (each item is one keyword switch of :func:`patch`, named
as in its :class:`PatchReport` and in ``fastbert.models.BertConfig.fused``: :data:`OPTIONS`):

* ``bias_gelu``: the intermediate dense bias + activation -> :func:`fastbert.ops.bias_gelu` (exact for
  ``hidden_act="gelu"``, tanh for ``"gelu_new"`` / ``"gelu_pytorch_tanh"``; any other activation
  is left alone, and the report says so);
* ``layernorm_residual``: ``attention.output`` and ``output``, dense bias + dropout + residual +
  LayerNorm -> :func:`fastbert.ops.layernorm_residual`;
* ``attention``: the model's ``attn_implementation`` becomes ``"fastbert"``, registered with
  transformers' ``AttentionInterface``: ``QK^T`` -> :func:`fastbert.ops.masked_softmax` (scale,
  padding mask, dropout) -> ``@ V`` (left alone for decoders and cross-attention). It returns the
  attention probabilities, so ``output_attentions=True`` works as with ``"eager"``, as a forward
  argument and on the config (``config.output_attentions = True``: registering the attention extends
  transformers' check, which otherwise accepts only ``"eager"``, to ``"fastbert"``);
* ``mlm_loss``: the MLM loss of ``*ForMaskedLM`` / ``BertForPreTraining``, with the output contract of
  ``fastbert.models``. **In training mode with** ``labels`` (and ``next_sentence_label`` for
  pre-training): only the labelled rows go through the head (:func:`fastbert.ops.gather_masked`) and
  the loss through :func:`fastbert.ops.linear_cross_entropy`; no ``[tokens, vocab]`` logits are built,
  so the returned ``logits`` / ``prediction_logits`` are **None** (the loss, and
  ``seq_relationship_logits``, hidden states and attentions when asked for, are returned as usual; a
  ``return_dict=False`` tuple drops the None, as transformers' tuples do). The forward keyword
  ``return_logits=True`` also returns the labelled rows' logits ``[M, vocab]`` (row-major order:
  transformers' full logits at ``labels != -100``), one more matmul. In **eval mode**, or without
  labels, the model runs transformers' own head and loss: full ``[batch, seq, vocab]`` logits, exactly
  transformers' outputs. ``return_logits=False`` with labels: the fused loss and no logits in either
  mode;
* ``unpad``: unpadded execution (the default; needs ``attention``): the encoder model
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

:func:`patch` is an explicit request: it sets the ``"fastbert"`` attention on ``model.config``
whatever it was. :func:`patch_transformers` patches each supported model when it is built, and
respects an attention the caller chose: ``attn_implementation=`` given to ``from_pretrained`` /
``from_config`` / the config, or ``config._attn_implementation`` set, keeps that attention (and the
padded layout; the other layers are fused). Only where the caller chose none (transformers' default,
``"sdpa"``) does it pick ``"fastbert"``, and then on the model's own copy of the config: a config
object the caller passed in (``BertModel(config)``) is never written by fastbert.

How: each patched module's class is swapped for a subclass whose ``forward`` is fastbert's (the
parameters, their names and the state dict are untouched); :func:`unpatch` swaps it back. One
table (:data:`FAMILIES`) describes each model family; a family whose module this transformers
lacks is skipped. The forwards live in :mod:`fastbert._patch_forwards`.
"""

import copy
import functools
import importlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from fastbert._optional import require
from fastbert._patch_forwards import (  # noqa: F401
    ATTENTION,
    CU_SEQLENS,
    GELU,
    MAX_SEQLEN,
    _AddNorm,
    _Intermediate,
    _MaskedLM,
    _Unpadded,
    accept_output_attentions_on_save,
    attention_forward,
    register_attention,
)
from fastbert.models.config import FUSABLE

# the keyword switches of patch / patch_transformers, also the keys of PatchReport.replaced and
# left_alone: BertConfig.fused's names, and "unpad" (BertConfig's field of that name)
OPTIONS = FUSABLE + ("unpad",)


@dataclass(frozen=True)
class MLMPaths:
    """Where a masked-LM model keeps its pieces (attribute paths from the model)."""

    base: str  # the encoder: "bert"
    dense: str  # the head transform's dense layer
    norm: str  # its LayerNorm
    act: Optional[str]  # the transform's activation; None: config.hidden_act
    decoder: str  # the output projection (weight tied to the word embeddings)
    nsp: Optional[str] = None  # the next-sentence head (BertForPreTraining)
    output: str = "MaskedLMOutput"


@dataclass(frozen=True)
class Family:
    module: str  # transformers.models.<x>.modeling_<x>
    prefix: str  # class-name prefix: Bert -> BertIntermediate, BertOutput, ...
    mlm: Dict[str, MLMPaths] = field(default_factory=dict)


def _roberta_like(module, prefix, base):
    return Family(
        module,
        prefix,
        {f"{prefix}ForMaskedLM": MLMPaths(base, "lm_head.dense", "lm_head.layer_norm", "gelu", "lm_head.decoder")},
    )


_BERT_HEAD = dict(
    base="bert",
    dense="cls.predictions.transform.dense",
    norm="cls.predictions.transform.LayerNorm",
    act=None,
    decoder="cls.predictions.decoder",
)
FAMILIES = {
    "bert": Family(
        "transformers.models.bert.modeling_bert",
        "Bert",
        {
            "BertForMaskedLM": MLMPaths(**_BERT_HEAD),
            "BertForPreTraining": MLMPaths(**_BERT_HEAD, nsp="cls.seq_relationship", output="BertForPreTrainingOutput"),
        },
    ),
    "roberta": _roberta_like("transformers.models.roberta.modeling_roberta", "Roberta", "roberta"),
    "xlm-roberta": _roberta_like("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRoberta", "roberta"),
    "camembert": _roberta_like("transformers.models.camembert.modeling_camembert", "Camembert", "roberta"),
    "electra": Family(
        "transformers.models.electra.modeling_electra",
        "Electra",
        {
            "ElectraForMaskedLM": MLMPaths(
                "electra", "generator_predictions.dense", "generator_predictions.LayerNorm", "gelu", "generator_lm_head"
            )
        },
    ),
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
    replaced: Dict[str, int] = field(default_factory=dict)  # switch (one of OPTIONS) -> how many modules
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (switch, why)
    notes: List[str] = field(default_factory=list)  # how a replacement behaves per call

    def __str__(self):
        lines = [
            f"fastbert.patch ({self.model_type}): replaced "
            + (", ".join(f"{k} x{v}" for k, v in self.replaced.items()) or "nothing")
        ]
        lines += [f"  left alone: {what}: {why}" for what, why in self.left_alone]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


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
    PreTrainedModel = require("transformers", "hf", f"fastbert.{caller}").PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"fastbert.{caller}: expects a transformers PreTrainedModel (e.g. BertModel), got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES or kind not in supported():
        raise ValueError(
            f"fastbert.{caller}: model type {kind!r} is not supported; supported: {', '.join(supported())}"
        )
    return kind, FAMILIES[kind]


def _original_name(module):
    return getattr(type(module), "fastbert_original", type(module)).__name__


def patch(model, *, bias_gelu=True, layernorm_residual=True, attention=True, mlm_loss=True, unpad=True):
    """Patch a built transformers BERT-family model in place (see the module docstring); returns a
    :class:`PatchReport`. Patching a patched model again changes nothing. Each keyword is one switch
    (:data:`OPTIONS`, the names of the report and of ``BertConfig.fused``). ``attention`` sets the
    ``"fastbert"`` attention on ``model.config`` whatever it was; ``unpad`` (needs ``attention``) runs
    the encoder on the real tokens only (see :class:`fastbert._patch_forwards._Unpadded`)."""
    return _patch(
        model,
        dict(
            bias_gelu=bias_gelu,
            layernorm_residual=layernorm_residual,
            attention=attention,
            mlm_loss=mlm_loss,
            unpad=unpad,
        ),
    )


def _patch(model, options, kept=None):
    """:func:`patch` with ``options``; ``kept``: why the model keeps its attention (the caller chose it)."""
    kind, fam = _family(model, "patch")
    gelu, layernorm, mlm_loss, unpad = (
        options.get(k, True) for k in ("bias_gelu", "layernorm_residual", "mlm_loss", "unpad")
    )
    attention = options.get("attention", True) and kept is None
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
        report.left_alone.append(
            (
                "bias_gelu",
                f"{len(skipped_gelu)} intermediate layer(s): activation {act!r} is not one of {', '.join(GELU)}",
            )
        )
    if mlm_loss and _original_name(model) not in fam.mlm:
        report.left_alone.append(("mlm_loss", f"{_original_name(model)} has no MLM loss to fuse"))
    decoder = _decoder(config)
    if kept is not None and options.get("attention", True):
        report.left_alone.append(("attention", kept))
    if attention:
        if decoder:
            report.left_alone.append(("attention", "decoder / cross-attention configs keep their attention"))
        else:
            register_attention()
            current = config._attn_implementation
            if current != ATTENTION:
                model.fastbert_attn_before = current
                model.set_attn_implementation(ATTENTION)
            accept_output_attentions_on_save(model.config)
            count("attention")
    if unpad:
        if decoder:
            report.left_alone.append(("unpad", "decoder / cross-attention configs run padded"))
        elif not attention:
            why = (
                "needs attention=True (the fastbert attention runs packed sequences)"
                if kept is None
                else "needs the fastbert attention, and the caller chose another"
            )
            report.left_alone.append(("unpad", why))
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
                    "encoder_hidden_states or a cache, run the padded path"
                )
            else:
                report.left_alone.append(("unpad", f"no {fam.prefix}Model inside {_original_name(model)}"))
    if "mlm_loss" in report.replaced:
        report.notes.append(
            "mlm_loss: in training mode with labels, logits are None (never built; the loss is "
            "fused; return_logits=True: the labelled rows' [M, vocab]); in eval mode or without "
            "labels, transformers' full [batch, seq, vocab] logits"
        )
    return report


def _decoder(config):
    return config.is_decoder or getattr(config, "add_cross_attention", False)


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


_HOOKS = {}  # transformers' own PreTrainedModel.__init__ / post_init while hooked
_REQUESTED = weakref.WeakKeyDictionary()  # model -> the attention its config named before transformers chose one
_NONE = object()


def patch_transformers(**options):
    """Patch every supported model built from now on (``from_pretrained`` included) with
    :func:`patch` (same keyword options), except that an attention the caller chose is kept (see the
    module docstring); where fastbert picks the attention, the model gets its own copy of the config.
    :func:`unpatch_transformers` stops it."""
    PreTrainedModel = require("transformers", "hf", "fastbert.patch_transformers").PreTrainedModel
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"patch_transformers: unknown options {sorted(unknown)}; choose from {', '.join(OPTIONS)}")
    init = _HOOKS.get("__init__", PreTrainedModel.__init__)
    post = _HOOKS.get("post_init", PreTrainedModel.post_init)
    if options.get("attention", True):
        register_attention()  # so that attn_implementation="fastbert" is a valid request too

    @functools.wraps(init)
    def __init__(self, config, *args, **kwargs):
        requested = getattr(config, "_attn_implementation", None)  # before transformers picks its default
        init(self, config, *args, **kwargs)
        _REQUESTED[self] = requested

    @functools.wraps(post)
    def post_init(self, *args, **kwargs):
        post(self, *args, **kwargs)
        if getattr(self.config, "model_type", None) in supported():
            _patch_built(self, options)

    _HOOKS.update({"__init__": init, "post_init": post})
    PreTrainedModel.__init__, PreTrainedModel.post_init = __init__, post_init


def _patch_built(model, options):
    """patch_transformers' patch of a model at the end of its ``__init__``. A heads model's encoder
    (``.bert``) is built inside it with the config its parent already resolved: it keeps its attention
    here, and its parent's patch (which walks the encoder too) decides."""
    requested = _REQUESTED.pop(model, _NONE)
    kept = None
    if requested not in (None, _NONE, ATTENTION):
        kept = f"attn_implementation={requested!r} was chosen by the caller (patch_transformers keeps it)"
    elif (
        options.get("attention", True) and model.config._attn_implementation != ATTENTION and not _decoder(model.config)
    ):
        _own_config(model)  # the attention is about to change
    _patch(model, options, kept)


def _own_config(model):
    """Give ``model`` (and its modules that share its config) a copy of the config: the caller may
    still hold the object (``BertModel(config)``), and fastbert must not write into it."""
    old = model.config
    new = copy.deepcopy(old)
    for m in model.modules():
        if m.__dict__.get("config") is old:
            m.config = new


def unpatch_transformers():
    """Models built from now on are transformers' own again (built ones stay patched: see
    :func:`unpatch`)."""
    PreTrainedModel = require("transformers", "hf", "fastbert.unpatch_transformers").PreTrainedModel
    for name in ("__init__", "post_init"):
        original = _HOOKS.pop(name, None)
        if original is not None:
            setattr(PreTrainedModel, name, original)
