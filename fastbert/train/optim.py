"""AdamW as BERT trains it: weight decay on the weight matrices and embeddings only, never on
biases or LayerNorm parameters."""

import torch


def decay_groups(model, weight_decay=0.01):
    """Two parameter groups: ``weight_decay`` for the weights, 0 for biases and LayerNorm
    parameters (every 1-D parameter). Shared (tied) parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6):
    """``torch.optim.AdamW`` over :func:`decay_groups` (BERT's betas and eps by default)."""
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
