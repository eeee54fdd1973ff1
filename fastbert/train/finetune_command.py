"""``fastbert finetune``: its flags and the command (``fastbert.train.commands`` runs it)."""

import math
import sys
import time
import warnings
from pathlib import Path

import torch

from fastbert._optional import require
from fastbert.train.commands import (
    BF16_SLOW,
    MAX_SEED,
    _int,
    bf16_is_slow,
    check_device,
    load_documents,
    padding_line,
    padding_summary,
)


def add_finetune_arguments(p):
    a = p.add_argument
    a(
        "--from",
        dest="source",
        default="runs/pretrain",
        help="a `fastbert pretrain` output folder: its latest checkpoint and tokenizer (default runs/pretrain)",
    )
    a("--scratch", action="store_true", help="start from random weights (same config and tokenizer)")
    a("--compare", action="store_true", help="run from the checkpoint and from scratch, report both")
    a("--corpus", help="folder of .txt files, one class each (default: the bundled Austen novels)")
    a("--seq-len", type=int, default=128, help="passage length in tokens (default 128)")
    a("--epochs", type=int, default=2)
    a("--batch", type=int, default=32)
    a("--lr", type=float, default=1e-4)
    a("--max-steps", type=int, help="stop after this many steps")
    a("--seed", type=int, default=0)
    a("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    a("--bf16", action="store_true", help="bf16 autocast (the fused ops run in bf16; weights stay fp32)")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--no-progress", dest="progress", action="store_false")


def finetune_command(args):
    from fastbert.data import WordPieceTokenizer
    from fastbert.data.novels import novel_passages
    from fastbert.models import BertConfig, BertForSequenceClassification
    from fastbert.train import latest_checkpoint
    from fastbert.train.finetune import FinetuneConfig, finetune
    from fastbert.train.metrics import dumps

    for module in ("tqdm", "safetensors"):  # the rest of what it needs from [train]: fail now, not mid-run
        require(module, "train", "fastbert finetune")

    src, out = Path(args.source), Path(args.out)
    check_finetune_flags(args)
    device = torch.device(check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.bf16 and bf16_is_slow(device):
        print(BF16_SLOW, file=sys.stderr)
    tok_dir = src / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise ValueError(f"finetune: {src} has no tokenizer/ (run `fastbert pretrain --out {src}` first)")
    tok = WordPieceTokenizer.load(tok_dir)
    ckpt = latest_checkpoint(src)
    if ckpt is None:
        raise ValueError(f"finetune: {src} has no checkpoint (run `fastbert pretrain --out {src}` first)")
    docs = load_documents(args.corpus)
    positions = BertConfig.from_json_file(ckpt / "config.json").max_position_embeddings
    if args.seq_len > positions:
        raise ValueError(
            f"--seq-len must be at most {positions} ({ckpt} has max_position_embeddings {positions}), "
            f"got {args.seq_len}"
        )
    train, test = novel_passages(docs, tok, max_seq_length=args.seq_len, seed=args.seed)
    runs = ["pretrained", "scratch"] if args.compare else ["scratch" if args.scratch else "pretrained"]
    print(
        f"fastbert finetune: {len(docs)} classes ({', '.join(d.title for d in docs)}), {len(train)} training and "
        f"{len(test)} held-out passages of <= {args.seq_len} tokens; chance {max_class_share(test):.1%}"
    )
    results = {}
    for run in runs:
        torch.manual_seed(args.seed)
        if run == "pretrained":
            with warnings.catch_warnings():  # the new classifier is expected to be missing
                warnings.filterwarnings("ignore", message=".*weights not in.*")
                warnings.filterwarnings("ignore", message=".*checkpoint weights.*")
                model = BertForSequenceClassification.from_pretrained(ckpt, num_labels=len(docs))
        else:
            model = BertForSequenceClassification(BertConfig.from_json_file(ckpt / "config.json", num_labels=len(docs)))
        fc = FinetuneConfig(
            epochs=args.epochs,
            batch_size=args.batch,
            lr=args.lr,
            seed=args.seed,
            max_steps=args.max_steps,
            bf16=args.bf16,
        )
        t0 = time.time()
        res = finetune(model.to(device), train, test, tok.pad_id, fc, out_dir=out / run, progress=args.progress)
        model.save_pretrained(out / run / "model")
        results[run] = {
            "accuracy": res["accuracy"],
            "evals": res["evals"],
            "steps": len(res["history"]),
            "wall_s": round(time.time() - t0, 1),
            "padding": padding_summary(model, [h["padding"] for h in res["history"]]),
        }
        print(padding_line(results[run]["padding"]))
        print(
            f"{run}: held-out accuracy {res['accuracy']:.1%} after {len(res['history'])} steps "
            f"({results[run]['wall_s']:.0f} s)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        dumps(
            {
                "checkpoint": str(ckpt),
                "classes": [d.title for d in docs],
                "train": len(train),
                "test": len(test),
                "bf16": args.bf16,
                **results,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


def check_finetune_flags(args):
    """The fine-tuning flags, checked before anything is read or written."""
    for flag, value, low in (("--seq-len", args.seq_len, 3), ("--epochs", args.epochs, 1), ("--batch", args.batch, 1)):
        if not _int(value) or value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be an int >= 1, got {args.max_steps!r}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an int in [0, 2**32 - 1], got {args.seed!r}")


def max_class_share(passages):
    counts = {}
    for p in passages:
        counts[p.label] = counts.get(p.label, 0) + 1
    return max(counts.values()) / len(passages)
