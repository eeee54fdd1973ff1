"""Training checkpoints that are never half-written.

A checkpoint is a directory ``<out>/step-<N>/`` holding the model as a Hugging Face checkpoint
(``config.json`` + ``model.safetensors``, so ``from_pretrained`` and ``transformers`` read it) and
``trainer_state.pt``: the step, the optimizer and scheduler states, torch's CPU (and CUDA) RNG
states and whatever the caller adds (the data position, the masking collator's generator).
Everything is written into a temporary sibling directory, each file flushed and fsync'ed, then the
directory is renamed into place and ``<out>/latest`` (a one-line file naming it) is replaced by an
atomic rename. A crash at any point leaves either the previous checkpoint or the new one, never a
partial one; a leftover temporary directory is ignored (and removed by the next save).
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastbert.models import checkpoint as hf

STATE = "trainer_state.pt"


def _fsync_tree(path):
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path, text):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def save_checkpoint(out_dir, model, optimizer, scheduler, step, extra=None):
    """Write ``<out_dir>/step-<step>`` atomically and point ``<out_dir>/latest`` at it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = out / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=out))
    try:
        model.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                 "extra": extra or {}}
        torch.save(state, tmp / STATE)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(out / "latest", final.name + "\n")
    return final


def prune_checkpoints(out_dir, keep):
    """Remove all but the newest ``keep`` ``step-N`` folders (never the one ``latest`` names;
    ``keep`` 0 keeps all)."""
    if not keep:
        return
    current = latest_checkpoint(out_dir)
    steps = sorted((p for p in Path(out_dir).glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir):
    """The directory ``<out_dir>/latest`` names, or None when there is none."""
    pointer = Path(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"fastbert: {pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path, model, optimizer=None, scheduler=None, restore_rng=True):
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and the optimizer and
    scheduler); returns its state (``step``, ``extra``). A damaged checkpoint raises ``ValueError``
    naming the file."""
    path = Path(path)
    try:
        weights = hf.from_hf(hf.read_state_dict(path), getattr(type(model), "hf_prefix", ""))
    except Exception as e:  # safetensors' own errors for a truncated or garbled file
        raise ValueError(f"fastbert: cannot read the model weights of checkpoint {path}: {e}") from e
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        step = state["step"]
    except Exception as e:
        raise ValueError(f"fastbert: cannot read {path / STATE} (corrupted or not a fastbert checkpoint): {e}") from e
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k.endswith("predictions.decoder.weight"))]
    if missing or unexpected:
        raise ValueError(f"fastbert: checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {"step": step, "extra": state["extra"]}
