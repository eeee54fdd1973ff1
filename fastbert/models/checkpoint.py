"""Hugging Face BERT checkpoints: load into fastbert's models and save what ``transformers`` loads.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
Names map one to one (fastbert's modules are named as Hugging Face's) except:

* attention ``query``/``key``/``value`` Linears <-> fastbert's one ``qkv`` Linear (rows stacked Q, K, V);
* old TensorFlow-converted names ``LayerNorm.gamma``/``beta`` -> ``weight``/``bias``;
* with or without the ``bert.`` prefix: a bare ``BertModel`` checkpoint loads into a model with
  heads (the heads are then reported missing) and a checkpoint with heads loads into ``BertModel``
  (the heads reported unused);
* the tied decoder weight (the word embeddings) is not stored; ``cls.predictions.decoder.bias`` is
  ``cls.predictions.bias``.

Missing weights are listed in a warning (they keep their random initialisation); a weight whose shape
disagrees with the config raises ``ValueError``.
"""

import re
import warnings
from pathlib import Path

import torch

from fastbert.models.config import BertConfig

_QKV = re.compile(r"^(.*attention\.self\.)(query|key|value)\.(weight|bias)$")
_IGNORED = re.compile(r"(^|\.)position_ids$|(^|\.)embeddings\.token_type_ids$")  # buffers of some versions
_HEADS = ("cls.", "classifier.")


def read_state_dict(path):
    path = Path(path)
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"fastbert: no model.safetensors or pytorch_model.bin in {path}")


def from_hf(sd, prefix):
    """Hugging Face names -> fastbert names for a model whose encoder lives under ``prefix``
    (``"bert."`` for the models with heads, ``""`` for BertModel)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key == "cls.predictions.decoder.bias":
            out.setdefault("cls.predictions.bias", value)
            continue
        if prefix and not key.startswith(prefix) and not key.startswith(_HEADS):
            key = prefix + key
        elif not prefix and key.startswith("bert."):
            key = key[len("bert."):]
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (base, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"{base}qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # incomplete: reported as missing qkv
            out.update({f"{base}{name}.{kind}": v for name, v in parts.items()})
    return out


def to_hf(model, tensors=None):
    """fastbert's state dict (or ``tensors``, e.g. gradients by parameter name) in Hugging Face's
    names: Q/K/V split, no tied decoder weight."""
    out = {}
    tied = model.config.tie_word_embeddings
    for key, value in (model.state_dict() if tensors is None else tensors).items():
        if tied and key.endswith("predictions.decoder.weight"):
            continue
        if key.endswith(("attention.self.qkv.weight", "attention.self.qkv.bias")):
            base, kind = key.rsplit(".qkv.", 1)
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{base}.{name}.{kind}"] = part
        else:
            out[key] = value
    return out


def load(cls, path, **config_overrides):
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"fastbert: no config.json in {path} (a Hugging Face BERT checkpoint directory)")
    config = BertConfig.from_json_file(path / "config.json", **config_overrides)
    model = cls(config)
    sd = from_hf(read_state_dict(path), getattr(cls, "hf_prefix", ""))
    own = model.state_dict()
    if config.tie_word_embeddings:
        own = {k: v for k, v in own.items() if not k.endswith("predictions.decoder.weight")}
        sd.pop("cls.predictions.decoder.weight", None)
    bad = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"fastbert: the checkpoint in {path} does not match its config.json (or the "
                         f"overrides): " + "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    missing = sorted(set(own) - set(sd))
    unused = sorted(k for k in set(sd) - set(own) if not _IGNORED.search(k))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing:
        warnings.warn(f"fastbert: {cls.__name__}.from_pretrained({str(path)!r}): {len(missing)} weights not in "
                      f"the checkpoint keep their random initialisation: {', '.join(missing)}", stacklevel=3)
    if unused:
        warnings.warn(f"fastbert: {cls.__name__}.from_pretrained({str(path)!r}): {len(unused)} checkpoint "
                      f"weights are not used by this model: {', '.join(unused)}", stacklevel=3)
    return model


def save(model, path):
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(path / "config.json", architectures=[type(model).__name__])
    tensors = {k: v.detach().contiguous() for k, v in to_hf(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
