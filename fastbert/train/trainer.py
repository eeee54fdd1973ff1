"""The pretraining loop: AdamW (BERT's decay exclusions), warmup/decay schedule, gradient
accumulation and clipping, optional bf16 autocast, a tqdm bar, metrics as JSON lines, and atomic
checkpoints from which ``resume=True`` continues exactly (the resumed losses equal an uninterrupted
run's). Ctrl-C saves a checkpoint before the ``KeyboardInterrupt`` propagates: of the last finished
step (the unfinished one's data position, masking generator and RNG rolled back), so resuming
reproduces the uninterrupted run. Not yet here: multi-process (torchrun/DDP) training.

Data order: the examples are visited in a permutation drawn from ``seed`` (a new one each epoch);
the position in that stream is part of the checkpoint, as is the collator's generator.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from fastbert.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastbert.train.optim import make_optimizer
from fastbert.train.schedule import make_scheduler


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps
    batch_size: int = 32              # examples per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-4                  # peak learning rate
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0                 # max gradient norm (0: no clipping)
    bf16: bool = False                # torch.autocast to bfloat16
    save_every: int = 0               # checkpoint every N steps (0: only at the end and on Ctrl-C)
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.warmup_steps is not None:
            self.warmup_ratio = None


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
        return [self.examples[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size].tolist()]


def pretrain(model, examples, collate, config, out_dir, resume=False, progress=True):
    """Train ``model`` (a BertForPreTraining) for ``config.steps`` optimizer steps; returns the list
    of per-step metrics (also appended to ``<out_dir>/metrics.jsonl``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    opt = make_optimizer(model, config.lr, config.weight_decay)
    sched = make_scheduler(opt, config.steps, config.warmup_steps, config.warmup_ratio)
    data = DataStream(examples, config.batch_size, config.seed)
    step = 0
    if resume:
        path = latest_checkpoint(out)
        if path is None:
            raise ValueError(f"pretrain: resume=True but {out} has no checkpoint")
        state = load_checkpoint(path, model, opt, sched)
        step, data.position = state["step"], state["extra"]["position"]
        collate.load_state_dict(state["extra"]["collator"])
    log = open(out / "metrics.jsonl", "a" if resume else "w")
    history = []

    def checkpoint():
        save_checkpoint(out, model, opt, sched, step, extra={"position": data.position,
                                                             "collator": collate.state_dict(),
                                                             "config": asdict(config)})

    model.train()
    begun = None
    bar = tqdm(total=config.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        while step < config.steps:
            # the state at the step's start: an interrupted step is saved as not begun
            begun = (data.position, collate.state_dict(), torch.get_rng_state())
            t0, tokens = time.perf_counter(), 0
            sums = {"loss": 0.0, "mlm_loss": 0.0, "nsp_loss": 0.0, "nsp_accuracy": 0.0}
            opt.zero_grad(set_to_none=True)
            for _ in range(config.grad_accum):
                batch = {k: v.to(device) for k, v in collate(data.next()).items()}
                tokens += int(batch["attention_mask"].sum())
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    res = model(**batch)
                (res.loss / config.grad_accum).backward()
                for k in sums:
                    value = getattr(res, k)
                    sums[k] += float(value.detach()) / config.grad_accum if value is not None else float("nan")
            if config.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            lr = opt.param_groups[0]["lr"]
            begun = None  # from here the step counts as done (an interrupt now saves it)
            opt.step()
            sched.step()
            step += 1
            row = {"step": step, **sums, "lr": lr, "tokens_per_s": tokens / (time.perf_counter() - t0)}
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", mlm=f"{sums['mlm_loss']:.3f}", lr=f"{lr:.2e}")
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                checkpoint()
        checkpoint()
    except KeyboardInterrupt:
        if begun is not None:  # roll the data, masks and RNG back to the start of the unfinished step
            data.position = begun[0]
            collate.load_state_dict(begun[1])
            torch.set_rng_state(begun[2])
        checkpoint()  # the last completed step: resume continues from here
        raise
    finally:
        bar.close()
        log.close()
    return history
