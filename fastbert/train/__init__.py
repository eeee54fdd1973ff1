"""Training: the learning-rate schedule (more to come: trainer, checkpoints, DDP)."""

from fastbert.train.schedule import linear_warmup_decay, make_scheduler

__all__ = ["linear_warmup_decay", "make_scheduler"]
