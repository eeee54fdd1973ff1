"""Training checkpoints that are never half-written.

A checkpoint is a directory ``<out>/step-<N>/`` holding the model as a Hugging Face checkpoint
(``config.json`` + ``model.safetensors``, so ``from_pretrained`` and ``transformers`` read it) and
``trainer_state.pt``: the step, the optimizer and scheduler states, torch's CPU (and CUDA) RNG
states and whatever the caller adds (the data position, the masking collator's generator).
Everything is written into a temporary sibling directory, each file flushed and fsync'ed, then the
directory is renamed into place and ``<out>/latest`` (a one-line file naming it) is replaced by an
atomic rename. A crash at any point leaves either the previous checkpoint or the new one, never a
partial one; a leftover temporary directory is ignored (and removed by the next save).

Reading checks what it reads: ``latest`` must name a ``step-N`` folder inside the run folder, and
``trainer_state.pt`` must hold the keys and types written here, with the step of its folder's
name; anything else is a ``ValueError`` naming the file. ``trainer_state.pt`` is read with
``weights_only=True`` (tensors and plain containers; no pickled code runs).
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from fastbert.models import checkpoint as hf

STATE = "trainer_state.pt"
STEP_DIR = re.compile(r"step-(\d+)")
# what save_checkpoint writes: key -> accepted types
_STATE_TYPES = {
    "step": (int,),
    "optimizer": (dict,),
    "scheduler": (dict, type(None)),
    "rng_cpu": (torch.Tensor,),
    "rng_cuda": (list, tuple, type(None)),
    "extra": (dict,),
}


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
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "extra": extra or {},
        }
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
    steps = sorted(
        (p for p in Path(out_dir).glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    for old in steps[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir):
    """The directory ``<out_dir>/latest`` names, or None when there is none. ``ValueError`` when
    ``latest`` is unreadable, empty, or names anything but an existing ``step-N`` folder directly
    inside ``out_dir`` (never a path into another run)."""
    out = Path(out_dir)
    pointer = out / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"fastbert: cannot read {pointer}: {e}") from None
    if not name:
        raise ValueError(f"fastbert: {pointer} is empty; it should name a checkpoint folder step-N of {out}")
    if not STEP_DIR.fullmatch(name):
        raise ValueError(f"fastbert: {pointer} names {name[:200]!r}, not a checkpoint folder step-N of {out}")
    path = out / name
    if not path.is_dir():
        raise ValueError(f"fastbert: {pointer} names {path.name}, which does not exist")
    if path.resolve().parent != out.resolve():
        raise ValueError(f"fastbert: {pointer} names {path.name}, which leads outside {out} (to {path.resolve()})")
    return path


def _check_state(state, path):
    """The structure :func:`save_checkpoint` writes, and the step of the folder's name."""
    where = path / STATE
    if not isinstance(state, dict):
        raise ValueError(f"fastbert: {where} holds a {type(state).__name__}, not a fastbert trainer state")
    missing = [k for k in _STATE_TYPES if k not in state]
    if missing:
        raise ValueError(f"fastbert: {where} lacks {', '.join(missing)} (corrupted or not a fastbert checkpoint)")
    for key, types in _STATE_TYPES.items():
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise ValueError(
                f"fastbert: {where}: {key} is a {type(state[key]).__name__}, expected "
                f"{' or '.join(t.__name__ for t in types)}"
            )
    step = state["step"]
    if step < 0:
        raise ValueError(f"fastbert: {where}: step {step} is negative")
    m = STEP_DIR.fullmatch(path.name)
    if m and int(m.group(1)) != step:
        raise ValueError(f"fastbert: {where} says step {step} but its folder is {path.name} (edited or moved)")


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
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"fastbert: cannot read {path / STATE} (corrupted or not a fastbert checkpoint): {e}") from e
    _check_state(state, path)
    step = state["step"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [
        k for k in missing if not (model.config.tie_word_embeddings and k.endswith("predictions.decoder.weight"))
    ]
    if missing or unexpected:
        raise ValueError(
            f"fastbert: checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if restore_rng:
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
    except Exception as e:  # a state of the wrong shape (edited, or of another model)
        raise ValueError(
            f"fastbert: {path / STATE} does not fit the optimizer or scheduler ({type(e).__name__}: {e})"
        ) from None
    return {"step": step, "extra": state["extra"]}
