"""BERT on fastbert's fused ops: ``BertModel`` and the pretraining, masked-LM and classification
models, named as Hugging Face's so that its checkpoints load (fastbert/models/checkpoint.py).

The MLM output contract (``BertForMaskedLM``, ``BertForPreTraining``; the same as ``fastbert.patch``'s):

* training mode with ``labels``: the loss runs on the labelled tokens only (``gather_masked`` picks
  their rows, the head's transform runs on those, and ``linear_cross_entropy`` scores them against the
  (tied) decoder without materialising the ``[M, vocab]`` logits); ``logits`` / ``prediction_logits``
  is None. ``return_logits=True`` also returns the labelled rows' logits ``[M, vocab]`` (``M`` labelled
  tokens at real positions, row-major order: ``full_logits[labels != -100]``), one more matmul;
* eval mode with ``labels``: the loss and the full ``[batch, seq, vocab]`` logits (the loss is computed
  from them, as Hugging Face's);
* without ``labels`` (either mode): the full ``[batch, seq, vocab]`` logits;
* ``return_logits=False`` with ``labels``: no logits in either mode, the fused loss only (cheap
  evaluation loops).

MLM accuracy needs the arg-max of the logits, which the fused loss never holds: it is computed
(under no_grad, chunk by chunk) when ``with_accuracy`` is true, by default only in eval mode.

Unpadded execution (``BertConfig.unpad``, on by default): given an ``attention_mask``, ``BertModel``
selects the real tokens once (:func:`fastbert.ops.packing`: token, position and token-type ids are
picked before the embeddings, positions as the padded path numbers them), and the embeddings, every
encoder layer, the MLM gather and head run on those ``T`` tokens only; attention sees each sequence's
own tokens (a batch without padding runs the padded path, with no mask). ``last_hidden_state`` is
rebuilt as ``[B, S, H]`` with zeros at padding positions (:func:`fastbert.ops.pad`), and the pooler
reads each sequence's first real token (its ``[CLS]``, also under left padding). ``unpad=False``
computes every position (the padded path, whose padding positions hold what Hugging Face's BERT
computes there). On both paths MLM labels at padding positions (``attention_mask`` 0) are ignored.

A fully masked row (``attention_mask`` all zeros) has no real token, and every path -- padded or
unpadded, ``fused`` or not, ``attention="fused"`` or ``"sdpa"``, ``unpad_attention="varlen"`` or
``"pad"`` -- gives it the same result: its hidden states are zeros and its pooled output is the pooler
of a zero vector (``tanh(pooler.dense.bias)``), never NaN; it leaves the other rows unchanged, and the
losses agree across paths (its MLM labels are ignored, all its positions being padding; the NSP and
classification losses see its pooled output). Inside the encoder its attention output is zero
(fastbert/models/layers.py), not the uniform attention over the padding that a softmax over an
all-``finfo.min`` mask gives (Hugging Face's eager and SDPA BERT do that).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.models import checkpoint
from fastbert.models.config import BertConfig
from fastbert.models.layers import Embeddings, Encoder, MLMTransform, Pooler, compute_dtype

IGNORE = -100


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    packed: Optional[torch.Tensor] = None  # unpadded path: the real tokens' hidden states [T, H]
    packing: Optional[ops.Packing] = None  # ... and where they sit in [B, S]


@dataclass
class PreTrainingOutput:
    loss: Optional[torch.Tensor] = None  # mlm_loss + nsp_loss
    mlm_loss: Optional[torch.Tensor] = None
    nsp_loss: Optional[torch.Tensor] = None
    mlm_accuracy: Optional[torch.Tensor] = None
    nsp_accuracy: Optional[torch.Tensor] = None
    prediction_logits: Optional[torch.Tensor] = None  # see the module docstring's MLM output contract
    seq_relationship_logits: Optional[torch.Tensor] = None


@dataclass
class MaskedLMOutput:
    loss: Optional[torch.Tensor] = None
    accuracy: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # see the module docstring's MLM output contract


@dataclass
class SequenceClassifierOutput:
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    accuracy: Optional[torch.Tensor] = None


def count_parameters(model):
    """Trainable parameters, each tensor once (the tied decoder is the word embedding)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class BertPreTrainedModel(nn.Module):
    """Initialisation (normal(0, initializer_range) weights, zero biases, LayerNorm 1/0) and the
    Hugging Face checkpoint methods shared by every model."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"{type(self).__name__}: config must be a fastbert BertConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, MLMHead):
                nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, path, output_loading_info=False, **config_overrides):
        """A Hugging Face BERT checkpoint directory (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``); see :func:`fastbert.models.checkpoint.load`. Weights the checkpoint
        lacks keep their initialisation and unused ones are dropped, each with a warning; with
        ``output_loading_info=True`` it returns ``(model, {"missing_keys": [...], "unexpected_keys":
        [...]})`` instead of warning, as ``transformers`` does."""
        return checkpoint.load(cls, path, output_loading_info, **config_overrides)

    def save_pretrained(self, path):
        """``config.json`` + ``model.safetensors`` in the layout ``transformers`` loads."""
        checkpoint.save(self, path)


class BertModel(BertPreTrainedModel):
    """The encoder: ``last_hidden_state [B, S, H]`` and, with the pooler, ``pooler_output [B, H]``.
    A row whose ``attention_mask`` is all zeros gets zero hidden states and ``tanh(pooler.dense.bias)``
    on every path (see the module docstring)."""

    hf_prefix = ""

    def __init__(self, config, add_pooling_layer=True, init=True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        if init:  # False inside a model with heads, which initialises everything once
            self.init_weights()

    def check_inputs(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"BERT: input_ids must be an integer tensor [batch, seq], got "
                f"{getattr(input_ids, 'dtype', type(input_ids))} {list(getattr(input_ids, 'shape', []))}"
            )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"BERT: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{c.max_position_embeddings}"
            )
        ranges = [
            (name, t, limit)
            for name, t, limit in (
                ("input_ids", input_ids, c.vocab_size),
                ("token_type_ids", token_type_ids, c.type_vocab_size),
            )
            if t is not None and t.numel()
        ]
        for name, t, _ in ranges:
            if t.shape != input_ids.shape:
                raise ValueError(f"BERT: {name} must have shape {list(input_ids.shape)}, got {list(t.shape)}")
        if ranges and not torch.compiler.is_compiling() and input_ids.device.type != "cpu":
            for name, t, limit in ranges:  # no host read on GPUs (cudagraph-safe): an asynchronous device assert
                torch._assert_async(((t >= 0) & (t < limit)).all(), f"BERT: {name} must be in [0, {limit})")
        elif ranges and not torch.compiler.is_compiling():
            bad = torch.stack([((t < 0) | (t >= limit)).any() for _, t, limit in ranges]).tolist()  # one sync
            for (name, t, limit), b in zip(ranges, bad):
                if b:
                    raise ValueError(
                        f"BERT: {name} must be in [0, {limit}), got values in [{t.min().item()}, {t.max().item()}]"
                    )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"BERT: attention_mask must have shape {list(input_ids.shape)} (1 = attend, 0 = "
                f"padding), got {list(attention_mask.shape)}"
            )

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if self.config.unpad and attention_mask is not None:
            return self.forward_unpadded(input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids)
        key_mask = additive = None
        if attention_mask is not None:
            key_mask, additive = self.masks(attention_mask, x)
        hidden = self.encoder(x, key_mask, additive)
        if key_mask is not None:  # a row with no real token: zeros, as on the unpadded path
            hidden = torch.where(key_mask.any(1)[:, None, None], hidden, hidden.new_zeros(()))
        return EncoderOutput(hidden, self.pooler(hidden[:, 0]) if self.pooler is not None else None)

    @staticmethod
    def masks(attention_mask, x):
        """The bool key-padding mask ``[B, S]`` and its additive ``[B, 1, 1, S]`` form for eager/SDPA."""
        key_mask = attention_mask.bool()
        dtype = compute_dtype(x)
        additive = torch.zeros(key_mask.shape, dtype=dtype, device=x.device).masked_fill_(
            ~key_mask, torch.finfo(dtype).min
        )[:, None, None, :]
        return key_mask, additive

    def forward_unpadded(self, input_ids, attention_mask, token_type_ids):
        """The encoder on the real tokens only (see the module docstring)."""
        p = ops.packing(attention_mask)
        if p.total == p.batch * p.seqlen:  # no padding: the padded path, without a mask
            return self.forward(input_ids, None, token_type_ids)
        idx = p.indices
        x = self.embeddings(input_ids.reshape(-1)[idx], token_type_ids.reshape(-1)[idx], idx % p.seqlen)
        key_mask = additive = None
        if self.config.attention_for_unpadded(input_ids.device.type) == "pad":  # pad-attend-unpad: masks
            key_mask, additive = self.masks(p.slot.view(p.batch, p.seqlen) >= 0, x)
        x = self.encoder(x, key_mask, additive, p)
        pooled = None
        if self.pooler is not None:
            first = p.cu_seqlens[:-1].long()
            nonempty = (p.cu_seqlens[1:] > p.cu_seqlens[:-1])[:, None]
            cls = x[first.clamp(max=max(p.total - 1, 0))] if p.total else x.new_zeros((p.batch, x.shape[-1]))
            pooled = self.pooler(torch.where(nonempty, cls, torch.zeros((), dtype=cls.dtype, device=cls.device)))
        return EncoderOutput(ops.pad(x, p), pooled, x, p)


class MLMHead(nn.Module):
    """HF's BertLMPredictionHead: transform, then the decoder (weight tied to the word embeddings
    unless ``tie_word_embeddings`` is False) plus ``bias``."""

    def __init__(self, config, word_embeddings):
        super().__init__()
        self.transform = MLMTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.fused = config.fuses("mlm_loss")

    def logits(self, hidden):
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)

    def loss(self, hidden, labels, with_accuracy, labelled_logits=False):
        """``(mean MLM loss over the labelled tokens, accuracy or None, logits or None)``: the logits of
        the labelled rows ``[M, vocab]`` (row-major order) when ``labelled_logits``, else None."""
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"BERT: labels must have shape {list(hidden.shape[:-1])}, got {list(labels.shape)}")
        if not self.fused:
            logits = self.logits(hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
            sel = labels != IGNORE
            acc = (logits.detach()[sel].argmax(-1) == labels[sel]).float().mean() if with_accuracy else None
            return loss, acc, (logits[sel] if labelled_logits else None)
        rows, targets, _ = ops.gather_masked(hidden, labels, ignore_index=IGNORE)
        x = self.transform(rows)
        loss = ops.linear_cross_entropy(x, self.decoder.weight, targets, self.bias, ignore_index=IGNORE)
        logits = F.linear(x, self.decoder.weight, self.bias) if labelled_logits else None
        return loss, (self.accuracy(x.detach(), targets) if with_accuracy else None), logits

    def scored(self, hidden, labels, with_accuracy):
        """``(loss, accuracy or None, logits)`` from the logits of every row of ``hidden`` (eval mode):
        the mean over the labelled tokens, 0 when there are none (as the fused loss)."""
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"BERT: labels must have shape {list(hidden.shape[:-1])}, got {list(labels.shape)}")
        logits = self.logits(hidden)
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        n = (targets != IGNORE).sum().clamp(min=1)
        loss = F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="sum") / n
        acc = None
        if with_accuracy:
            sel = targets != IGNORE
            acc = (flat.detach()[sel].argmax(-1) == targets[sel]).sum().float() / n
        return loss, acc, logits

    @torch.no_grad()
    def accuracy(self, x, targets, chunk=1024):
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        for s in range(0, x.shape[0], chunk):
            logits = F.linear(x[s : s + chunk], self.decoder.weight.to(x.dtype), self.bias.to(x.dtype))
            correct += (logits.argmax(-1) == targets[s : s + chunk]).sum()
        return correct.float() / max(x.shape[0], 1)


def _mlm_rows(out, labels, attention_mask):
    """``(hidden, labels)`` for the MLM loss: the packed rows and their labels when unpadded; padded,
    the labels at padding positions ignored (as unpadded)."""
    p = out.packing
    if p is None:
        if attention_mask is not None and labels.shape == attention_mask.shape:
            labels = labels.masked_fill(attention_mask == 0, IGNORE)
        return out.last_hidden_state, labels
    if labels.shape != (p.batch, p.seqlen):
        raise ValueError(f"BERT: labels must have shape {[p.batch, p.seqlen]}, got {list(labels.shape)}")
    return out.packed, labels.reshape(-1)[p.indices]


def _full_logits(head, out):
    """``[B, S, vocab]`` logits; unpadded, computed on the real tokens (zeros at padding)."""
    if out.packing is None:
        return head.logits(out.last_hidden_state)
    return ops.pad(head.logits(out.packed), out.packing)


def _mlm(head, out, labels, attention_mask, training, with_accuracy, return_logits):
    """``(loss, accuracy or None, logits or None)`` of the MLM head under the module docstring's contract."""
    if return_logits not in (None, True, False):
        raise ValueError(f"BERT: return_logits must be None, True or False, got {return_logits!r}")
    hidden, labels = _mlm_rows(out, labels, attention_mask)
    if training or return_logits is False:
        return head.loss(hidden, labels, with_accuracy, labelled_logits=training and return_logits is True)
    loss, acc, logits = head.scored(hidden, labels, with_accuracy)  # eval mode: the full logits
    return loss, acc, (logits if out.packing is None else ops.pad(logits, out.packing))


class PreTrainingHeads(nn.Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = MLMHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the MLM and next-sentence heads. With ``labels`` (MLM, ``-100`` = unlabelled) and
    ``next_sentence_label`` (0 = IsNext, 1 = NotNext) it returns the losses (and accuracies);
    ``prediction_logits`` follow the module docstring's MLM output contract (``return_logits``)."""

    hf_prefix = "bert."

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, init=False)
        self.cls = PreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        next_sentence_label=None,
        *,
        with_accuracy=None,
        return_logits=None,
    ):
        out = self.bert(input_ids, attention_mask, token_type_ids)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)
        with_accuracy = not self.training if with_accuracy is None else with_accuracy
        res = PreTrainingOutput(seq_relationship_logits=nsp_logits)
        if labels is None:
            res.prediction_logits = _full_logits(self.cls.predictions, out)
        else:
            res.mlm_loss, res.mlm_accuracy, res.prediction_logits = _mlm(
                self.cls.predictions, out, labels, attention_mask, self.training, with_accuracy, return_logits
            )
            res.loss = res.mlm_loss
        if next_sentence_label is not None:
            res.nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label.reshape(-1))
            res.nsp_accuracy = (nsp_logits.detach().argmax(-1) == next_sentence_label.reshape(-1)).float().mean()
            res.loss = res.nsp_loss if res.loss is None else res.loss + res.nsp_loss
        return res


class MLMOnlyHead(nn.Module):
    def __init__(self, config, word_embeddings):
        super().__init__()
        self.predictions = MLMHead(config, word_embeddings)


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with the MLM head only (no pooler, as Hugging Face's); ``logits`` follow the module
    docstring's MLM output contract (``return_logits``)."""

    hf_prefix = "bert."

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False, init=False)
        self.cls = MLMOnlyHead(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        *,
        with_accuracy=None,
        return_logits=None,
    ):
        out = self.bert(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return MaskedLMOutput(logits=_full_logits(self.cls.predictions, out))
        with_accuracy = not self.training if with_accuracy is None else with_accuracy
        return MaskedLMOutput(
            *_mlm(self.cls.predictions, out, labels, attention_mask, self.training, with_accuracy, return_logits)
        )


class BertForSequenceClassification(BertPreTrainedModel):
    """Fine-tuning head: dropout and a linear layer on the pooled [CLS] output. ``num_labels == 1``
    is regression (MSE loss), otherwise cross-entropy over the labels."""

    hf_prefix = "bert."

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, init=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        res = SequenceClassifierOutput(logits=logits)
        if labels is not None:
            if self.num_labels == 1:
                res.loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                res.loss = F.cross_entropy(logits, labels.reshape(-1))
                res.accuracy = (logits.detach().argmax(-1) == labels.reshape(-1)).float().mean()
        return res
