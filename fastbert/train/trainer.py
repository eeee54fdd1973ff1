"""The pretraining loop: AdamW (BERT's decay exclusions), warmup/decay schedule, gradient
accumulation and clipping, optional bf16 autocast, a tqdm bar, metrics as JSON lines, and atomic
checkpoints from which ``resume=True`` continues exactly (the resumed losses equal an uninterrupted
run's).

Interruption: Ctrl-C (SIGINT) or SIGTERM during a step rolls the data position and the masking
generator back to the step's start and saves the last finished step before the
``KeyboardInterrupt`` propagates, so resuming reproduces the uninterrupted run; a signal during the
optimizer update is held until the update is done. Any other exception saves the same way (when a
step was finished since the start), then propagates; except a loss that becomes NaN or infinite,
which stops training before the update with :class:`NonFiniteLoss` (a ``ValueError``) and saves
nothing. Metrics are standard JSON (a non-finite value is ``null``).

Data order: the examples are visited in a permutation drawn from ``seed`` (a new one each epoch);
the position in that stream is part of the checkpoint, as is the collator's generator. Dropout
draws from torch's generator, seeded at every step from (seed, step, rank).

Multi-process (``torchrun``, see :mod:`fastbert.train.distributed`): with a process group
initialised the model runs under DistributedDataParallel. ``batch_size`` is the global micro-batch:
every rank draws and masks the same global micro-batch and trains on its own ``1/world_size`` of
the rows (a distinct shard), and the MLM loss of each rank is weighted by its share of the global
masked tokens, so the gradients - and the losses - equal a single process's with the same
``batch_size`` (up to summation order and dropout). Rank 0 logs and writes checkpoints.
"""

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fastbert._optional import require
from fastbert.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from fastbert.train.distributed import world
from fastbert.train.metrics import dumps
from fastbert.train.optim import make_optimizer
from fastbert.train.schedule import make_scheduler, resolve_warmup

IGNORE = -100
MAX_SEED = 2**32 - 1  # step_seed() of a larger seed overflows torch.manual_seed


class NonFiniteLoss(ValueError):
    """The loss became NaN or infinite: training stops before the update and saves nothing (the
    weights that gave it are not worth a checkpoint; the last saved one stays ``latest``)."""


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per micro-batch, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0  # max gradient norm (0: no clipping)
    bf16: bool = False  # torch.autocast to bfloat16
    save_every: int = 0  # checkpoint every N steps (0: only at the end and on Ctrl-C)
    keep_checkpoints: int = 2  # the newest N step-* folders stay (0: all)
    seed: int = 0

    def __post_init__(self):
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("save_every", 0),
            ("keep_checkpoints", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(
                    f"TrainConfig: {name} must be {'a positive int' if low else 'an int >= 0'}, got {value!r}"
                )
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TrainConfig: seed must be an int in [0, 2**32 - 1], got {self.seed!r}")
        for name, positive in (("lr", True), ("weight_decay", False), ("clip", False)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(
                    f"TrainConfig: {name} must be a finite number {'>' if positive else '>='} 0, got {value!r}"
                )
        if self.warmup_steps is not None:
            self.warmup_ratio = None
        resolve_warmup(self.steps, self.warmup_steps, self.warmup_ratio)  # its ValueError names the problem


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class DataStream:
    """Micro-batches of examples in a seeded permutation per epoch; ``position`` counts micro-batches."""

    def __init__(self, examples, batch_size, seed):
        if len(examples) < batch_size:
            raise ValueError(f"pretrain: {len(examples)} examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.seed, self.position = examples, batch_size, seed, 0
        self.per_epoch = len(examples) // batch_size

    def next(self):
        epoch, k = divmod(self.position, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        self.position += 1
        return [self.examples[i] for i in order[k * self.batch_size : (k + 1) * self.batch_size].tolist()]


class SignalGuard:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, except inside :meth:`critical`, where they
    are held until its end (so an interrupt never lands half-way through an optimizer update).
    Only in the main thread, and not for a signal the process ignores (``nohup``, background
    jobs); the previous handlers come back on exit."""

    def __init__(self):
        self.inside, self.pending, self.saved = False, False, {}

    def _handle(self, signum, frame):
        if self.inside:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal stays ignored (nohup)
                    self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    @contextmanager
    def critical(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def example_length(e):
    return len(e["input_ids"] if isinstance(e, dict) else e[0])


def check_data(model, examples, collate):
    """Clear errors for data the model cannot take (before any work is done)."""
    c = model.config
    longest = max(map(example_length, examples), default=0)
    pad_to = getattr(collate, "pad_to", None) or 0
    if max(longest, pad_to) > c.max_position_embeddings:
        raise ValueError(
            f"pretrain: sequences of up to {max(longest, pad_to)} tokens (max_seq_length) exceed the "
            f"model's max_position_embeddings {c.max_position_embeddings}; make the examples shorter "
            "or the model's positions more"
        )
    vocab = getattr(collate, "vocab_size", c.vocab_size)
    if vocab != c.vocab_size:
        raise ValueError(
            f"pretrain: the collator's vocabulary has {vocab} tokens but the model's has "
            f"{c.vocab_size}; build the model with vocab_size=tokenizer.vocab_size"
        )


def check_setup(model, examples, collate, config):
    """Everything :func:`pretrain` checks before it reads a checkpoint or writes a file (the CLI
    calls it before it writes the run's tokenizer and settings): ``ValueError`` on a problem."""
    size = world()[1]
    if config.batch_size % size:
        raise ValueError(f"pretrain: batch_size {config.batch_size} does not split over {size} processes")
    check_data(model, examples, collate)
    if len(examples) < config.batch_size:
        raise ValueError(f"pretrain: {len(examples)} examples are fewer than one batch of {config.batch_size}")


def resume_state(path, model, opt, sched, collate, config):
    """Load the checkpoint at ``path`` for resuming and check that its metadata agree with it and
    with the run: the step (checked against the folder name by :func:`load_checkpoint`) is within
    the run's steps and the data position is the step's. Returns ``(step, position)``."""
    state = load_checkpoint(path, model, opt, sched, restore_rng=False)
    step, extra, where = state["step"], state["extra"], path / "trainer_state.pt"
    if sched.last_epoch != step:
        raise ValueError(
            f"pretrain: {where}: the scheduler has taken {sched.last_epoch} steps but the state says "
            f"{step} (the checkpoint was edited)"
        )
    if step > config.steps:
        raise ValueError(f"pretrain: {where} is at step {step}, past the run's {config.steps} steps")
    position = extra.get("position")
    if not _is_int(position) or position != step * config.grad_accum:
        raise ValueError(
            f"pretrain: {where}: the data position {position!r} is not step {step} x grad_accum "
            f"{config.grad_accum} (the checkpoint was edited or is not from this run)"
        )
    try:
        collate.load_state_dict(extra["collator"])
    except Exception as e:
        raise ValueError(
            f"pretrain: {where}: cannot restore the masking collator's state ({type(e).__name__}: {e})"
        ) from None
    return step, position


def step_seed(seed, step, rank):
    return (seed * 1_000_003 + step) * 4099 + rank


def pretrain(model, examples, collate, config, out_dir, resume=False, progress=True, evaluate=None, pin=None):
    """Train ``model`` (a BertForPreTraining) for ``config.steps`` optimizer steps; returns the list
    of per-step metrics (also appended to ``<out_dir>/metrics.jsonl`` by rank 0).

    ``evaluate``: optional ``fn(model) -> dict`` of numbers, run by rank 0 in eval mode after each
    periodic and the final checkpoint (not after the save on an interrupt); each result is appended
    with its ``step`` to ``<out_dir>/held_out.jsonl``: the held-out curve. It must not touch the
    global RNG or the model's weights (``evaluate_pretraining`` with its own collator does neither).
    ``pin``: optional ``fn(model)`` called once the model holds its starting weights (a resumed run's
    after loading them), returning an object whose ``restore()`` runs right after every optimizer
    step, e.g. :class:`fastbert.train.local_attention.PinnedLocalAttention`."""
    tqdm = require("tqdm", "train", "fastbert.train.pretrain (its progress bar)").tqdm
    rank, size = world()
    check_setup(model, examples, collate, config)
    out = Path(out_dir)
    device = next(model.parameters()).device
    opt = make_optimizer(model, config.lr, config.weight_decay)
    sched = make_scheduler(opt, config.steps, config.warmup_steps, config.warmup_ratio)
    data = DataStream(examples, config.batch_size, config.seed)
    step = 0
    if resume:
        path = latest_checkpoint(out)
        if path is None:
            raise ValueError(f"pretrain: resume=True but {out} has no checkpoint")
        step, data.position = resume_state(path, model, opt, sched, collate, config)
    pinned = pin(model) if pin is not None else None
    start = step
    net = model
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a" if resume else "w") if rank == 0 else None
    if rank == 0 and evaluate is not None and not resume:
        (out / "held_out.jsonl").write_text("")
    history, share = [], config.batch_size // size

    def held_out():
        if rank == 0 and evaluate is not None:
            model.eval()
            row = {"step": step, **evaluate(model)}
            model.train()
            with open(out / "held_out.jsonl", "a") as f:
                f.write(dumps(row) + "\n")

    def checkpoint():
        if rank == 0:
            save_checkpoint(
                out,
                model,
                opt,
                sched,
                step,
                extra={
                    "position": data.position,
                    "collator": collate.state_dict(),
                    "config": asdict(config),
                    "world_size": size,
                },
            )
            prune_checkpoints(out, config.keep_checkpoints)

    model.train()
    begun = None
    bar = tqdm(total=config.steps, initial=step, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    try:
        with SignalGuard() as guard:
            while step < config.steps:
                begun = (data.position, collate.state_dict())  # an interrupted step is saved as not begun
                torch.manual_seed(step_seed(config.seed, step, rank))
                t0 = time.perf_counter()
                sums = torch.zeros(6, dtype=torch.float64)  # loss, mlm_loss, nsp_loss, nsp_accuracy, tokens, positions
                opt.zero_grad(set_to_none=True)
                for i in range(config.grad_accum):
                    full = collate(data.next())
                    batch = {k: v[rank * share : (rank + 1) * share].to(device) for k, v in full.items()}
                    masked = int((full["labels"] != IGNORE).sum())
                    weight = int((batch["labels"] != IGNORE).sum()) / masked * size if masked else 1.0
                    sync = net.no_sync() if size > 1 and i < config.grad_accum - 1 else nullcontext()
                    with sync:
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                            res = net(**batch)
                        nsp = res.nsp_loss if res.nsp_loss is not None else torch.zeros((), device=device)
                        ((res.mlm_loss * weight + nsp) / config.grad_accum).backward()
                    mlm, nsp = float(res.mlm_loss.detach()) * weight / size, float(nsp.detach()) / size
                    acc = float(res.nsp_accuracy) / size if res.nsp_accuracy is not None else float("nan")
                    for j, value in enumerate((mlm + nsp, mlm, nsp, acc)):
                        sums[j] += value / config.grad_accum
                    sums[4] += int(batch["attention_mask"].sum())
                    sums[5] += batch["attention_mask"].numel()
                if size > 1:
                    dist.all_reduce(sums)
                if not math.isfinite(sums[0]):
                    raise NonFiniteLoss(
                        f"pretrain: the loss is {float(sums[0])} at step {step + 1}: training "
                        f"diverged (lower the learning rate, now {config.lr}); stopped without "
                        "saving, the last checkpoint is the last good one"
                    )
                if config.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                lr = opt.param_groups[0]["lr"]
                with guard.critical():
                    opt.step()
                    if pinned is not None:
                        pinned.restore()
                    sched.step()
                    step += 1
                    begun = None  # the step is done: an interrupt from here on saves it
                loss, mlm, nsp, acc, tokens, positions = sums.tolist()
                row = {
                    "step": step,
                    "loss": loss,
                    "mlm_loss": mlm,
                    "nsp_loss": nsp,
                    "nsp_accuracy": acc,
                    "lr": lr,
                    "tokens_per_s": tokens / (time.perf_counter() - t0),
                    "padding": 1.0 - tokens / positions if positions else 0.0,
                }
                history.append(row)
                if log is not None:
                    log.write(dumps(row) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", mlm=f"{mlm:.3f}", lr=f"{lr:.2e}")
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    checkpoint()
                    held_out()
            checkpoint()
            held_out()
    except BaseException as e:
        if begun is not None:  # roll the data and masks back to the start of the unfinished step
            data.position = begun[0]
            collate.load_state_dict(begun[1])
        if step > start and not isinstance(e, NonFiniteLoss):
            checkpoint()  # the last completed step: resume continues from here
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    if size > 1:
        dist.barrier()  # the final checkpoint is on disk before any rank moves on
    return history


@torch.no_grad()
def evaluate_pretraining(model, examples, collate, batch_size=64):
    """MLM loss and accuracy (over all masked tokens) and NSP loss and accuracy (over examples) of
    ``model`` on ``examples``, masked by ``collate`` (give it a fixed seed for repeatable numbers).
    Runs in eval mode (restored after)."""
    if not examples:
        raise ValueError("evaluate_pretraining: no examples")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tot = dict(mlm_loss=0.0, mlm_accuracy=0.0, nsp_loss=0.0, nsp_accuracy=0.0)
    tokens = 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size]).items()}
            res = model(**batch, with_accuracy=True, return_logits=False)  # the fused loss, no [B, S, vocab] logits
            n, m = batch["input_ids"].shape[0], int((batch["labels"] != IGNORE).sum())
            tokens += m
            tot["mlm_loss"] += float(res.mlm_loss) * m
            tot["mlm_accuracy"] += float(res.mlm_accuracy) * m
            tot["nsp_loss"] += float(res.nsp_loss) * n
            tot["nsp_accuracy"] += float(res.nsp_accuracy) * n
    finally:
        model.train(was_training)
    return {
        "mlm_loss": tot["mlm_loss"] / tokens,
        "mlm_accuracy": tot["mlm_accuracy"] / tokens,
        "nsp_loss": tot["nsp_loss"] / len(examples),
        "nsp_accuracy": tot["nsp_accuracy"] / len(examples),
        "examples": len(examples),
        "masked_tokens": tokens,
    }
