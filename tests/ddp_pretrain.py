"""Worker for tests/test_distributed.py, run under torchrun: pretrains a tiny BERT (no dropout) on
the examples saved by the test and records the input rows each rank trained on."""

import sys
from pathlib import Path

import torch

from fastbert.data import MaskingCollator
from fastbert.models import BertConfig, BertForPreTraining
from fastbert.train import TrainConfig, pretrain
from fastbert.train.distributed import init_from_env, shutdown


def main(data_path, out):
    env = init_from_env("cpu")
    data = torch.load(data_path, weights_only=False)
    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig.from_preset(
            "tiny",
            vocab_size=data["vocab_size"],
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    collate = MaskingCollator(
        data["vocab_size"],
        data["mask_id"],
        data["pad_id"],
        data["special_ids"],
        continuation=data["continuation"],
        whole_word=True,
        seed=1,
    )
    seen = []
    model.bert.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    pretrain(model, data["examples"], collate, TrainConfig(**data["config"]), out, progress=False)
    torch.save(
        {
            "rows": torch.cat([s[:, :8] for s in seen]),
            "world_size": env.world_size,
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
        },
        Path(out) / f"rank{env.rank}.pt",
    )
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
