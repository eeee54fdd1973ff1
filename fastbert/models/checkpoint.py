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
disagrees with the config raises ``ValueError`` (:class:`ShapeMismatch`) in one line naming the
checkpoint's tensor, the expected and the found shape; a ``config.json`` field of the wrong type raises
``ValueError`` naming the field (:class:`fastbert.models.BertConfig`).
"""

import re
import warnings
from pathlib import Path

import torch

from fastbert._optional import require
from fastbert.models.config import BertConfig

_QKV = re.compile(r"^(.*attention\.self\.)(query|key|value)\.(weight|bias)$")
_IGNORED = re.compile(r"(^|\.)position_ids$|(^|\.)embeddings\.token_type_ids$")  # buffers of some versions
_HEADS = ("cls.", "classifier.")


def read_state_dict(path):
    path = Path(path)
    if (path / "model.safetensors").exists():
        load_file = require("safetensors.torch", "train", "reading model.safetensors").load_file
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"fastbert: no model.safetensors or pytorch_model.bin in {path}")


def from_hf(sd, prefix, shapes=None):
    """Hugging Face names -> fastbert names for a model whose encoder lives under ``prefix``
    (``"bert."`` for the models with heads, ``""`` for BertModel). ``shapes`` (fastbert name -> the
    model's shape): a tensor of another shape raises :class:`ShapeMismatch`, naming the tensor as the
    checkpoint does, with the expected and found shapes. Without ``shapes``, query/key/value tensors
    of different shapes (no ``qkv`` can hold them) raise it."""
    out, qkv, origin = {}, {}, {}
    for name, value in sd.items():
        key = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key == "cls.predictions.decoder.bias":
            if "cls.predictions.bias" not in out:
                out["cls.predictions.bias"], origin["cls.predictions.bias"] = value, name
            continue
        if prefix and not key.startswith(prefix) and not key.startswith(_HEADS):
            key = prefix + key
        elif not prefix and key.startswith("bert."):
            key = key[len("bert.") :]
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (name, value)
        else:
            out[key], origin[key] = value, name
    bad = [
        _mismatch(origin[k], shapes[k], v.shape)
        for k, v in out.items()
        if shapes is not None and k in shapes and tuple(v.shape) != tuple(shapes[k])
    ]
    for (base, kind), parts in qkv.items():
        whole = shapes.get(f"{base}qkv.{kind}") if shapes is not None else None
        if whole is not None:
            want = (whole[0] // 3, *whole[1:])
            wrong = [_mismatch(n, want, v.shape) for n, v in parts.values() if tuple(v.shape) != want]
        elif len({tuple(v.shape) for _, v in parts.values()}) > 1:
            wrong = [
                "; ".join(f"{n} {list(v.shape)}" for n, v in parts.values()) + " (query, key and value "
                "must have one shape)"
            ]
        else:
            wrong = []
        bad += wrong
        if len(parts) == 3 and not wrong:
            out[f"{base}qkv.{kind}"] = torch.cat([parts[n][1] for n in ("query", "key", "value")])
        else:  # incomplete: reported as missing qkv
            out.update({f"{base}{n}.{kind}": v for n, (_, v) in parts.items()})
    if bad:
        raise ShapeMismatch("; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return out


class ShapeMismatch(ValueError):
    """A checkpoint tensor's shape is not the model's (the message names each, expected and found)."""


def _mismatch(name, expected, found):
    return f"{name}: expected shape {list(expected)}, found {list(found)}"


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


def load(cls, path, output_loading_info=False, **config_overrides):
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"fastbert: no config.json in {path} (a Hugging Face BERT checkpoint directory)")
    config = BertConfig.from_json_file(path / "config.json", **config_overrides)
    model = cls(config)
    own = model.state_dict()
    if config.tie_word_embeddings:
        own = {k: v for k, v in own.items() if not k.endswith("predictions.decoder.weight")}
    try:
        sd = from_hf(read_state_dict(path), getattr(cls, "hf_prefix", ""), {k: v.shape for k, v in own.items()})
    except ShapeMismatch as e:
        raise ShapeMismatch(
            f"fastbert: the checkpoint in {path} does not match its config.json (or the overrides): {e}"
        ) from None
    if config.tie_word_embeddings:
        sd.pop("cls.predictions.decoder.weight", None)
    missing = sorted(set(own) - set(sd))
    unused = sorted(k for k in set(sd) - set(own) if not _IGNORED.search(k))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if output_loading_info:  # the caller judges them: no warnings
        return model, {"missing_keys": missing, "unexpected_keys": unused}
    if missing:
        warnings.warn(
            f"fastbert: {cls.__name__}.from_pretrained({str(path)!r}): {len(missing)} weights not in "
            f"the checkpoint keep their random initialisation: {', '.join(missing)}",
            stacklevel=3,
        )
    if unused:
        warnings.warn(
            f"fastbert: {cls.__name__}.from_pretrained({str(path)!r}): {len(unused)} checkpoint "
            f"weights are not used by this model: {', '.join(unused)}",
            stacklevel=3,
        )
    return model


def save(model, path):
    save_file = require("safetensors.torch", "train", "saving a checkpoint (model.safetensors)").save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(path / "config.json", architectures=[type(model).__name__])
    tensors = {k: v.detach().contiguous() for k, v in to_hf(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
