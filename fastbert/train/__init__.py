"""Training pieces: BERT's learning-rate schedule, AdamW with its weight-decay exclusions, and
atomic, exactly resumable checkpoints, the pretraining loop (single process or torchrun/DDP),
its evaluation, fixed local attention heads for short pretraining runs
(fastbert.train.local_attention), and the fine-tuning loop (fastbert.train.finetune)."""

from fastbert.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastbert.train.finetune import FinetuneConfig, finetune
from fastbert.train.local_attention import PinnedLocalAttention, local_attention_init
from fastbert.train.optim import decay_groups, make_optimizer
from fastbert.train.schedule import linear_warmup_decay, make_scheduler
from fastbert.train.trainer import TrainConfig, evaluate_pretraining, pretrain

__all__ = [
    "FinetuneConfig",
    "finetune",
    "decay_groups",
    "evaluate_pretraining",
    "latest_checkpoint",
    "linear_warmup_decay",
    "local_attention_init",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "PinnedLocalAttention",
    "pretrain",
    "save_checkpoint",
    "TrainConfig",
]
