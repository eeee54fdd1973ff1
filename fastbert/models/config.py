"""BERT configuration: sizes, presets, and Hugging Face ``config.json`` round trips.

Field names are Hugging Face's (``hidden_size``, ``num_hidden_layers``, ...), so a ``config.json``
reads and writes as it is. fastbert's own fields: ``fused`` (``True``: every fused op; ``False``:
eager PyTorch; or a collection of switch names among :data:`FUSABLE` to fuse, the others eager: the
names of ``fastbert.patch``'s options and report) and ``attention`` (``"fused"``: ``masked_softmax``
between two matmuls, when ``fused`` includes ``"attention"``; ``"sdpa"``: ``F.scaled_dot_product_attention``),
``unpad`` (``True``, the default: with an ``attention_mask``, only the real tokens are computed, see
fastbert/models/bert.py; ``False``: every position, padding included) and ``unpad_attention``
(``"varlen"``: :func:`fastbert.ops.varlen_attention` on the packed tokens; ``"pad"``: re-pad Q/K/V,
attend as the padded path does, unpad the context; ``"auto"``: the faster one measured for the device,
:data:`UNPAD_ATTENTION`). Every combination of these fields treats a fully masked row
(``attention_mask`` all zeros) alike: zero hidden states, the pooler of a zero vector, the same losses
(see fastbert/models/bert.py).
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

# hidden_act name -> fastbert's GELU approximation ("none" = exact erf)
HIDDEN_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh"}
# The fused switches: one vocabulary for BertConfig.fused, fastbert.patch's options and its PatchReport
# (patch has one more switch, "unpad", which is BertConfig's own field of that name).
FUSABLE = ("bias_gelu", "layernorm_residual", "attention", "mlm_loss")
ATTENTION = ("fused", "sdpa")
UNPAD_ATTENTION_CHOICES = ("auto", "varlen", "pad")
# unpad_attention="auto": per device type, the attention measured faster on unpadded batches
# (benchmarks/bench_bert.py's realistic case; see the README's benchmark table)
UNPAD_ATTENTION = {"cpu": "varlen", "cuda": "varlen"}

FASTBERT_FIELDS = ("fused", "attention", "unpad", "unpad_attention", "extra")  # not in config.json

# Google's BERT sizes (the miniatures of "Well-Read Students Learn Better" for tiny/mini/small)
PRESETS = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    classifier_dropout: Optional[float] = None
    fused: Union[bool, tuple] = True
    attention: str = "fused"
    unpad: bool = True
    unpad_attention: str = "auto"
    extra: dict = field(default_factory=dict, repr=False)  # other config.json entries, kept for saving

    def __post_init__(self):
        def bad(name, what):
            raise ValueError(
                f"BertConfig: {name} must be {what}, got {getattr(self, name)!r} ({type(getattr(self, name)).__name__})"
            )

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        ):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive int")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in HIDDEN_ACTS:
            bad("hidden_act", f"one of {', '.join(HIDDEN_ACTS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        if self.classifier_dropout is not None and (
            not is_number(self.classifier_dropout) or not 0.0 <= self.classifier_dropout < 1.0
        ):
            bad("classifier_dropout", "null or a number in [0, 1)")
        if not is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            bad("layer_norm_eps", "a positive number")
        if not is_number(self.initializer_range) or self.initializer_range < 0:
            bad("initializer_range", "a non-negative number")
        if self.pad_token_id is not None and (
            not is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size
        ):
            bad("pad_token_id", f"null or an int in [0, vocab_size={self.vocab_size})")
        for name in ("tie_word_embeddings", "unpad"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false (a bool)")
        if not isinstance(self.attention, str) or self.attention not in ATTENTION:
            bad("attention", f"one of {ATTENTION}")
        if not isinstance(self.unpad_attention, str) or self.unpad_attention not in UNPAD_ATTENTION_CHOICES:
            bad("unpad_attention", f"one of {UNPAD_ATTENTION_CHOICES}")
        if not isinstance(self.extra, dict):
            bad("extra", "a dict")
        if not isinstance(self.fused, bool):
            if isinstance(self.fused, (str, bytes)) or not hasattr(self.fused, "__iter__"):
                bad("fused", f"true, false or a collection of switch names among {FUSABLE}")
            self.fused = tuple(self.fused)
            unknown = set(map(str, self.fused)) - set(FUSABLE)
            if unknown:
                raise ValueError(f"BertConfig: fused switches must be among {FUSABLE}, got {sorted(unknown)}")

    @property
    def gelu_approximate(self):
        return HIDDEN_ACTS[self.hidden_act]

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def attention_for_unpadded(self, device_type):
        """``"varlen"`` or ``"pad"``: how attention runs on unpadded tokens of this device type."""
        if self.unpad_attention != "auto":
            return self.unpad_attention
        return UNPAD_ATTENTION.get(device_type, "pad")

    def fuses(self, op):
        """Whether the switch ``op`` (one of ``FUSABLE``) runs on fastbert's fused kernels."""
        if op not in FUSABLE:
            raise ValueError(f"BertConfig.fuses: unknown switch {op!r}; choose from {FUSABLE}")
        return self.fused if isinstance(self.fused, bool) else op in self.fused

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name, **overrides):
        """``"tiny"``, ``"mini"``, ``"small"``, ``"base"`` (110M parameters) or ``"large"`` (335M)."""
        if name not in PRESETS:
            raise ValueError(f"BertConfig: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d, **overrides):
        if not isinstance(d, dict):
            raise ValueError(f"BertConfig: a config.json must hold a JSON object of fields, got a {type(d).__name__}")
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"BertConfig: config.json is for model_type {d['model_type']!r}, not 'bert'")
        names = {f.name for f in dataclasses.fields(cls)} - set(FASTBERT_FIELDS)
        known = {k: v for k, v in d.items() if k in names}
        if "id2label" in d and "num_labels" not in d:
            if not isinstance(d["id2label"], dict):
                raise ValueError(
                    f"BertConfig: id2label must be an object (label index -> name), got "
                    f"{d['id2label']!r} ({type(d['id2label']).__name__})"
                )
            known["num_labels"] = len(d["id2label"])
        if known.get("classifier_dropout") is None:
            known.pop("classifier_dropout", None)
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**{**known, **overrides}, extra=extra)

    def to_hf_dict(self):
        d = {k: v for k, v in self.extra.items() if k not in ("transformers_version",)}
        d.update(
            {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in FASTBERT_FIELDS + ("num_labels",)
            }
        )
        d["model_type"] = "bert"
        labels = self.extra.get("id2label")
        d["id2label"] = (
            labels
            if labels and len(labels) == self.num_labels
            else {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        )
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    @classmethod
    def from_json_file(cls, path, **overrides):
        """A ``config.json``; invalid JSON or a field of the wrong type raises ``ValueError`` naming the
        file (and the field)."""
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"BertConfig: {path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from None

    def to_json_file(self, path, architectures=None):
        d = self.to_hf_dict()
        if architectures:
            d["architectures"] = list(architectures)
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
