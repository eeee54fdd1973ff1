"""torchrun with 2 processes (gloo, CPU) trains as 1 process with the same global batch: each rank
reads a distinct half of every micro-batch, and losses and weights agree within fp32 round-off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert.data import WordPieceTokenizer, default_corpus_documents, nsp_examples

WORKER = Path(__file__).with_name("ddp_pretrain.py")


def run(nproc, data, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(data),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_train_like_one(tmp_path, seed):
    docs = [d for d in default_corpus_documents() if d.title in ("2_northanger_abbey", "3_persuasion")]
    tok = WordPieceTokenizer.train_from_texts([s for d in docs for s in d.sentences], vocab_size=800)
    examples = nsp_examples(docs, tok, max_seq_length=64, seed=seed)
    config = dict(steps=4, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=1, seed=seed)
    torch.save(
        {
            "examples": examples,
            "vocab_size": tok.vocab_size,
            "mask_id": tok.mask_id,
            "pad_id": tok.pad_id,
            "special_ids": tok.special_ids,
            "continuation": tok.continuation_mask,
            "config": config,
        },
        tmp_path / "data.pt",
    )
    one, (r0,) = run(1, tmp_path / "data.pt", tmp_path / "one")
    two, (a, b) = run(2, tmp_path / "data.pt", tmp_path / "two")

    assert a["world_size"] == b["world_size"] == 2 and r0["world_size"] == 1
    # rank 0 took the first half of each global micro-batch, rank 1 the second: distinct shards
    # whose union is exactly what the single process read
    halves = r0["rows"].reshape(-1, 2, 4, 8)
    assert torch.equal(a["rows"].reshape(-1, 4, 8), halves[:, 0]) and torch.equal(
        b["rows"].reshape(-1, 4, 8), halves[:, 1]
    )
    assert not torch.equal(a["rows"], b["rows"])

    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for x, y in zip(one, two):
        for k in ("loss", "mlm_loss", "nsp_loss", "nsp_accuracy"):
            assert y[k] == pytest.approx(x[k], rel=2e-5, abs=1e-6), (k, x, y)
    for k, w in r0["weights"].items():  # the two ranks hold identical weights, equal to one process's
        assert torch.equal(a["weights"][k], b["weights"][k]), k
        torch.testing.assert_close(a["weights"][k], w, rtol=1e-4, atol=1e-5, msg=k)
    assert (tmp_path / "two" / "latest").read_text().strip() == "step-4"
