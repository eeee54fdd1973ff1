"""``fastbert finetune``: its flags and the command (``fastbert.train.commands`` runs it)."""

import math
import sys
import time
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
    a("--compare", action="store_true", help="run from the checkpoint and from scratch, report both and the gain")
    a(
        "--task",
        choices=["order", "novel"],
        default="order",
        help="order: are the passage's words in their original order or shuffled? novel: which document "
        "(novel) is it from? (default order)",
    )
    a("--corpus", help="folder of .txt files, one document each (default: the bundled Austen novels)")
    a("--seq-len", type=int, default=128, help="passage length in tokens (default 128)")
    a("--epochs", type=int, default=2)
    a("--batch", type=int, default=32)
    a(
        "--lr",
        type=float,
        help="peak learning rate (default 1e-3 for a checkpoint of hidden size <= 256, as the tiny and mini "
        "presets, else 1e-4)",
    )
    a("--max-steps", type=int, help="stop after this many steps")
    a("--seed", type=int, default=0, help="the first seed, and the held-out split's (default 0)")
    a(
        "--seeds",
        type=int,
        default=3,
        help="runs per arm, with seeds --seed, --seed+1, ...: initialisation, data order, dropout and the "
        "--train-fraction sample (default 3); reported as mean ± std",
    )
    a(
        "--train-fraction",
        type=float,
        default=1.0,
        help="fine-tune on this fraction of the labelled passages (per class, a sample per seed; default 1)",
    )
    a("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    a("--bf16", action="store_true", help="bf16 autocast (the fused ops run in bf16; weights stay fp32)")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--no-progress", dest="progress", action="store_false")


def finetune_command(args):
    from fastbert.data import WordPieceTokenizer
    from fastbert.data.novels import WORD_ORDER_LABELS, novel_passages, take_fraction, word_order_passages
    from fastbert.models import BertConfig, BertForSequenceClassification
    from fastbert.train import latest_checkpoint
    from fastbert.train.finetune import FinetuneConfig, compare_arms, finetune, mean_std
    from fastbert.train.metrics import dumps

    for module in ("tqdm", "safetensors", "matplotlib"):  # the rest of what it needs from [train]: fail now
        require(module, "train", "fastbert finetune")
    from fastbert.train.plot import finetune_png

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
    classes = list(WORD_ORDER_LABELS) if args.task == "order" else [d.title for d in docs]
    config = BertConfig.from_json_file(ckpt / "config.json", num_labels=len(classes))
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq-len must be at most {config.max_position_embeddings} ({ckpt} has max_position_embeddings "
            f"{config.max_position_embeddings}), got {args.seq_len}"
        )
    if config.vocab_size != tok.vocab_size:
        raise ValueError(f"finetune: {ckpt} has vocab_size {config.vocab_size}, its tokenizer {tok.vocab_size}")
    lr = args.lr if args.lr is not None else (1e-3 if config.hidden_size <= 256 else 1e-4)
    train_all, test = novel_passages(docs, tok, max_seq_length=args.seq_len, seed=args.seed)
    if args.task == "order":  # the same passages, half of them shuffled (train and test: different coins)
        train_all, test = word_order_passages(train_all, args.seed), word_order_passages(test, args.seed + 1)
    arms = ["pretrained", "scratch"] if args.compare else ["scratch" if args.scratch else "pretrained"]
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(
        f"fastbert finetune, task {args.task}: {len(classes)} classes ({', '.join(classes)}), "
        f"{len(train_all)} training passages (using {args.train_fraction:.0%} of them) and {len(test)} held-out "
        f"passages of <= {args.seq_len} tokens; chance {max_class_share(test):.1%}; seeds {seeds[0]}..{seeds[-1]}; "
        f"lr {lr:g}"
    )
    results = {arm: {"seeds": []} for arm in arms}
    for seed in seeds:
        train = take_fraction(train_all, args.train_fraction, seed)
        for arm in arms:
            torch.manual_seed(seed)
            if arm == "pretrained":
                model = load_classifier(ckpt, config)
            else:
                model = BertForSequenceClassification(config)
            fc = FinetuneConfig(
                epochs=args.epochs,
                batch_size=args.batch,
                lr=lr,
                seed=seed,
                max_steps=args.max_steps,
                bf16=args.bf16,
            )
            t0 = time.time()
            where = out / arm / f"seed-{seed}"
            res = finetune(model.to(device), train, test, tok.pad_id, fc, out_dir=where, progress=args.progress)
            if seed == seeds[0]:
                model.save_pretrained(out / arm / "model")
            row = {
                "seed": seed,
                "accuracy": res["accuracy"],
                "evals": res["evals"],
                "steps": len(res["history"]),
                "train": len(train),
                "wall_s": round(time.time() - t0, 1),
                "padding": padding_summary(model, [h["padding"] for h in res["history"]]),
            }
            results[arm]["seeds"].append(row)
            print(
                f"{arm}, seed {seed}: held-out accuracy {res['accuracy']:.1%} after {row['steps']} steps on "
                f"{len(train)} passages ({row['wall_s']:.0f} s); {padding_line(row['padding'])}"
            )
    for arm in arms:
        mean, std = mean_std([r["accuracy"] for r in results[arm]["seeds"]])
        results[arm].update(accuracy=mean, accuracy_std=std)
        print(f"{arm}: held-out accuracy {_pm(mean, std)} over {len(seeds)} seed(s)")
    summary = {
        "checkpoint": str(ckpt),
        "task": args.task,
        "classes": classes,
        "train": len(train_all),
        "train_fraction": args.train_fraction,
        "test": len(test),
        "seeds": seeds,
        "bf16": args.bf16,
        "lr": lr,
        "epochs": args.epochs,
        **results,
    }
    if args.compare:
        summary["gain"] = compare_arms(results["pretrained"]["seeds"], results["scratch"]["seeds"])
        g = summary["gain"]
        spread = f" = {g['in_std']:.1f} x the larger seed std" if g["in_std"] is not None else ""
        print(f"gain from pretraining: {100 * g['mean']:+.1f} points{spread}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dumps(summary, indent=1) + "\n")
    png = finetune_png(summary, out / "finetune.png")
    print(f"results {out / 'results.json'}; plot {png}")
    return 0


def _pm(mean, std):
    return f"{mean:.1%}" + ("" if std is None else f" ± {std:.1%}")


def load_classifier(ckpt, config):
    """``BertForSequenceClassification`` from a pretraining checkpoint. Only the new classifier may be
    missing from it and only the pretraining heads unused; anything else is an error, not a warning
    lost in the output (a fine-tune from a silently half-loaded encoder is a scratch run in disguise)."""
    from fastbert.models import BertForSequenceClassification

    model, info = BertForSequenceClassification.from_pretrained(
        ckpt, output_loading_info=True, num_labels=config.num_labels
    )
    lacking = [k for k in info["missing_keys"] if not k.startswith("classifier.")]
    extra = [k for k in info["unexpected_keys"] if not k.startswith("cls.")]
    if lacking:
        raise ValueError(f"finetune: {ckpt} lacks encoder weights ({len(lacking)}): {', '.join(lacking)}")
    if extra:
        raise ValueError(f"finetune: {ckpt} has weights this model does not use ({len(extra)}): {', '.join(extra)}")
    return model


def check_finetune_flags(args):
    """The fine-tuning flags, checked before anything is read or written."""
    for flag, value, low in (("--seq-len", args.seq_len, 3), ("--epochs", args.epochs, 1), ("--batch", args.batch, 1)):
        if not _int(value) or value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be an int >= 1, got {args.max_steps!r}")
    if args.lr is not None and (not math.isfinite(args.lr) or args.lr <= 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an int in [0, 2**32 - 1], got {args.seed!r}")
    if not _int(args.seeds) or not 1 <= args.seeds <= 100 or args.seed + args.seeds - 1 > MAX_SEED:
        raise ValueError(
            f"--seeds must be an int in [1, 100] (and --seed + --seeds - 1 <= 2**32 - 1), got {args.seeds!r}"
        )
    if not (0.0 < args.train_fraction <= 1.0):
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction!r}")


def max_class_share(passages):
    counts = {}
    for p in passages:
        counts[p.label] = counts.get(p.label, 0) + 1
    return max(counts.values()) / len(passages)
