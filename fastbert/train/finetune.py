"""The fine-tuning loop for sequence classification (e.g. :func:`fastbert.data.novels.novel_passages`).

    model = BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_labels=6))
    result = finetune(model, train, test, tok.pad_id, FinetuneConfig(epochs=2), out_dir="runs/novels")
    result["accuracy"]                      # test accuracy after the last epoch

AdamW (BERT's decay exclusions), linear warmup then decay to 0 over the run's steps, gradient
clipping, a seeded shuffle per epoch (the last batch of an epoch may be smaller), an evaluation
on the test set after every epoch (and when ``max_steps`` stops the run early), a tqdm bar, and
metrics as JSON lines (standard JSON; a loss that becomes NaN or infinite stops the run with a
``ValueError``). The model stays on its device; batches go to the device of its parameters.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastbert._optional import require
from fastbert.train.metrics import dumps
from fastbert.train.optim import make_optimizer
from fastbert.train.schedule import make_scheduler


@dataclass
class FinetuneConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4  # peak learning rate
    warmup_ratio: float = 0.1  # fraction of the run's steps
    weight_decay: float = 0.01
    clip: float = 1.0  # max gradient norm (0: no clipping)
    seed: int = 0  # shuffling and dropout
    max_steps: Optional[int] = None  # stop after this many steps (the schedule spans the capped run)
    eval_batch_size: int = 64
    bf16: bool = False  # forward and loss under torch.autocast to bfloat16 (training and evaluation)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FinetuneConfig: {name} must be a positive int, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"FinetuneConfig: max_steps must be None or a positive int, got {self.max_steps!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"FinetuneConfig: lr must be > 0 and finite, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"FinetuneConfig: warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if not self.clip >= 0 or not math.isfinite(self.clip):
            raise ValueError(f"FinetuneConfig: clip must be >= 0 (0: no clipping) and finite, got {self.clip!r}")
        if not self.weight_decay >= 0 or not math.isfinite(self.weight_decay):
            raise ValueError(f"FinetuneConfig: weight_decay must be >= 0 and finite, got {self.weight_decay!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"FinetuneConfig: bf16 must be a bool, got {self.bf16!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"FinetuneConfig: seed must be an int in [0, 2**63), got {self.seed!r}")


def collate_passages(passages, pad_id):
    """A batch of ``(input_ids, label)`` passages as ``int64`` tensors, padded with ``pad_id`` to the
    longest: ``input_ids`` and ``attention_mask`` (1 = token, 0 = padding) ``[B, L]``,
    ``token_type_ids`` (zeros) ``[B, L]``, ``labels`` ``[B]``."""
    if not len(passages):
        raise ValueError("collate_passages: no passages")
    length = max(len(p[0]) for p in passages)
    input_ids = torch.full((len(passages), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(passages), length), dtype=torch.long)
    for i, (ids, _) in enumerate(passages):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([p[1] for p in passages], dtype=torch.long),
    }


def _check_labels(passages, num_labels, what):
    bad = [p[1] for p in passages if not 0 <= p[1] < num_labels]
    if bad:
        raise ValueError(f"{what} has label {bad[0]} outside [0, {num_labels}) (the model's num_labels)")


def evaluate(model, passages, pad_id, batch_size=64, bf16=False):
    """``{"accuracy", "loss", "per_class"}`` of ``model`` on ``passages``: accuracy and mean
    cross-entropy over all passages, and the accuracy of each label ``0 .. num_labels-1`` (``None``
    for a label with no passages). Runs in eval mode under ``no_grad`` (and bf16 autocast with
    ``bf16``); the model's previous train/eval mode is restored."""
    if not len(passages):
        raise ValueError("evaluate: no passages")
    _check_labels(passages, model.num_labels, "evaluate: a passage")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(model.num_labels, dtype=torch.long)
    total = torch.zeros(model.num_labels, dtype=torch.long)
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(passages), batch_size):
                batch = collate_passages(passages[start : start + batch_size], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    res = model(**batch)
                labels = batch["labels"].cpu()
                hit = (res.logits.argmax(-1).cpu() == labels).long()
                correct.index_add_(0, labels, hit)
                total.index_add_(0, labels, torch.ones_like(labels))
                loss_sum += float(res.loss) * len(labels)
    finally:
        model.train(was_training)
    per_class = [c / t if t else None for c, t in zip(correct.tolist(), total.tolist())]
    return {"accuracy": int(correct.sum()) / len(passages), "loss": loss_sum / len(passages), "per_class": per_class}


def finetune(model, train, test, pad_id, config=None, out_dir=None, progress=True):
    """Fine-tune ``model`` (a ``BertForSequenceClassification``) on ``train`` passages, evaluating on
    ``test`` after each epoch (and at ``config.max_steps`` if it ends the run mid-epoch).

    Returns ``{"history": [{"step", "epoch", "loss", "accuracy", "lr", "padding"}, ...] (one per step;
    ``lr`` is the rate the step used, ``padding`` the batch's fraction of padding positions),
    "evals": [{"epoch", "step", "accuracy", "loss", "per_class"}, ...], "accuracy": the last
    evaluation's test accuracy}``. With ``out_dir``, every step and evaluation
    is also appended to ``<out_dir>/finetune_metrics.jsonl`` (a ``"kind"`` field: ``"train"`` or
    ``"eval"``). Seeds the global torch RNG with ``config.seed`` (dropout); the model ends in the
    train/eval mode it started in."""
    tqdm = require("tqdm", "train", "fastbert.train.finetune (its progress bar)").tqdm
    config = FinetuneConfig() if config is None else config
    if not len(train):
        raise ValueError("finetune: the training set is empty")
    if not len(test):
        raise ValueError("finetune: the test set is empty")
    _check_labels(train, model.num_labels, "finetune: the training set")
    _check_labels(test, model.num_labels, "finetune: the test set")
    device = next(model.parameters()).device
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    torch.manual_seed(config.seed)
    opt = make_optimizer(model, config.lr, config.weight_decay)
    sched = make_scheduler(opt, total, warmup_ratio=config.warmup_ratio)
    log = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(out_dir) / "finetune_metrics.jsonl", "a")
    history, evals, step = [], [], 0
    was_training = model.training
    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True)

    def record(kind, row):
        if log is not None:
            log.write(dumps({"kind": kind, **row}) + "\n")
            log.flush()

    try:
        for epoch in range(1, config.epochs + 1):
            if step == total:
                break
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
            model.train()
            for start in range(0, len(train), config.batch_size):
                if step == total:
                    break
                batch = collate_passages([train[i] for i in order[start : start + config.batch_size]], pad_id)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    res = model(**{k: v.to(device) for k, v in batch.items()})
                if not torch.isfinite(res.loss.detach()):
                    raise ValueError(
                        f"finetune: the loss is {float(res.loss.detach())} at step {step + 1}: training diverged "
                        f"(lower the learning rate, now {config.lr})"
                    )
                opt.zero_grad(set_to_none=True)
                res.loss.backward()
                if config.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                mask = batch["attention_mask"]
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(res.loss.detach()),
                    "accuracy": float(res.accuracy),
                    "lr": lr,
                    "padding": 1.0 - int(mask.sum()) / max(mask.numel(), 1),
                }
                history.append(row)
                record("train", row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", lr=f"{lr:.2e}")
            ev = {"epoch": epoch, "step": step, **evaluate(model, test, pad_id, config.eval_batch_size, config.bf16)}
            evals.append(ev)
            record("eval", ev)
            if progress:
                bar.write(f"epoch {epoch}: test accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
        model.train(was_training)
    return {"history": history, "evals": evals, "accuracy": evals[-1]["accuracy"]}


def mean_std(values):
    """``(mean, sample standard deviation)`` of a list of numbers; the std is ``None`` for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare_arms(pretrained, scratch):
    """The gain of the pretrained arm over the scratch arm, from per-seed rows ``{"seed", "accuracy"}``:
    ``{"mean": mean accuracy difference, "paired": [difference per seed (both arms ran it)],
    "in_std": mean / the larger of the two arms' seed std (``None`` with one seed or no spread)}``.
    ``in_std > 2`` is the "more than 2 standard deviations" bar."""
    pre, scr = ([r["accuracy"] for r in rows] for rows in (pretrained, scratch))
    (mp, sp), (ms, ss) = mean_std(pre), mean_std(scr)
    by_seed = {r["seed"]: r["accuracy"] for r in scratch}
    paired = [r["accuracy"] - by_seed[r["seed"]] for r in pretrained if r["seed"] in by_seed]
    spread = max(sp or 0.0, ss or 0.0)
    return {"mean": mp - ms, "paired": paired, "in_std": (mp - ms) / spread if spread > 0 else None}
