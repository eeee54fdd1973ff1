"""BERT's learning-rate schedule: linear warmup from 0 to the peak over ``warmup_steps``, then
linear decay to 0 at ``total_steps`` (and 0 after it)."""

import torch


def linear_warmup_decay(step, warmup_steps, total_steps):
    """The multiplier of the peak learning rate at ``step`` (0-based: the rate of the optimizer
    step taken after ``step`` scheduler steps)."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def resolve_warmup(total_steps, warmup_steps=None, warmup_ratio=None):
    """Warmup steps from ``warmup_steps`` or ``warmup_ratio`` (a fraction of ``total_steps``)."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"schedule: total_steps must be a positive int, got {total_steps!r}")
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("schedule: give warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"schedule: warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
        warmup_steps = round(warmup_ratio * total_steps)
    warmup_steps = 0 if warmup_steps is None else warmup_steps
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"schedule: warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    return warmup_steps


def make_scheduler(optimizer, total_steps, warmup_steps=None, warmup_ratio=None):
    """A ``LambdaLR`` over the optimizer's learning rates (their peaks) with this schedule."""
    warmup = resolve_warmup(total_steps, warmup_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, total_steps))
