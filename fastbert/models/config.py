"""BERT configuration: sizes, presets, and Hugging Face ``config.json`` round trips.

Field names are Hugging Face's (``hidden_size``, ``num_hidden_layers``, ...), so a ``config.json``
reads and writes as it is. fastbert's own fields: ``fused`` (``True``: every fused op; ``False``:
eager PyTorch; or a collection of op names to fuse, the others eager) and ``attention``
(``"fused"``: ``masked_softmax`` between two matmuls; ``"sdpa"``: ``F.scaled_dot_product_attention``),
``unpad`` (``True``, the default: with an ``attention_mask``, only the real tokens are computed, see
fastbert/models/bert.py; ``False``: every position, padding included) and ``unpad_attention``
(``"varlen"``: :func:`fastbert.ops.varlen_attention` on the packed tokens; ``"pad"``: re-pad Q/K/V,
attend as the padded path does, unpad the context; ``"auto"``: the faster one measured for the device,
:data:`UNPAD_ATTENTION`).
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

# hidden_act name -> fastbert's GELU approximation ("none" = exact erf)
HIDDEN_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh"}
FUSABLE = ("bias_gelu", "layernorm_residual", "masked_softmax", "mlm_loss")
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
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"BertConfig: hidden_act must be one of {', '.join(HIDDEN_ACTS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"BertConfig: attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.unpad_attention not in UNPAD_ATTENTION_CHOICES:
            raise ValueError(f"BertConfig: unpad_attention must be one of {UNPAD_ATTENTION_CHOICES}, got "
                             f"{self.unpad_attention!r}")
        if not isinstance(self.unpad, bool):
            raise ValueError(f"BertConfig: unpad must be True or False, got {self.unpad!r}")
        if not isinstance(self.fused, bool):
            self.fused = tuple(self.fused)
            unknown = set(self.fused) - set(FUSABLE)
            if unknown:
                raise ValueError(f"BertConfig: fused ops must be among {FUSABLE}, got {sorted(unknown)}")

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
        """Whether ``op`` (one of ``FUSABLE``) runs on fastbert's fused kernel."""
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
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"BertConfig: config.json is for model_type {d['model_type']!r}, not 'bert'")
        names = {f.name for f in dataclasses.fields(cls)} - set(FASTBERT_FIELDS)
        known = {k: v for k, v in d.items() if k in names}
        if "id2label" in d and "num_labels" not in d:
            known["num_labels"] = len(d["id2label"])
        if known.get("classifier_dropout") is None:
            known.pop("classifier_dropout", None)
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**{**known, **overrides}, extra=extra)

    def to_hf_dict(self):
        d = {k: v for k, v in self.extra.items() if k not in ("transformers_version",)}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in FASTBERT_FIELDS + ("num_labels",)})
        d["model_type"] = "bert"
        labels = self.extra.get("id2label")
        d["id2label"] = labels if labels and len(labels) == self.num_labels else {
            str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    @classmethod
    def from_json_file(cls, path, **overrides):
        return cls.from_hf_dict(json.loads(Path(path).read_text()), **overrides)

    def to_json_file(self, path, architectures=None):
        d = self.to_hf_dict()
        if architectures:
            d["architectures"] = list(architectures)
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
