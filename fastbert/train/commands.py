"""``fastbert pretrain`` and ``fastbert finetune``.

``fastbert pretrain`` with no arguments trains BERT-mini (4 layers, hidden 256) with MLM + NSP on
the bundled Austen novels for 400 steps (a few minutes on a 2-core CPU), holding out the last 3% of
every novel to measure MLM/NSP accuracy, and writes to ``runs/pretrain``: the tokenizer,
checkpoints (``step-N``, ``latest``), ``metrics.jsonl``, ``loss_curve.png`` and ``summary.json``.
Under ``torchrun --nproc_per_node N -m fastbert pretrain`` it trains data-parallel (gloo on CPU,
nccl on GPU) with the same global batch.

``fastbert finetune`` fine-tunes ``BertForSequenceClassification`` from that run's latest
checkpoint on "which of the novels is this passage from" and reports held-out accuracy;
``--scratch`` starts from random weights instead and ``--compare`` runs both.
"""

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

PRETRAIN_DEFAULTS = dict(preset="mini", corpus=None, vocab=None, vocab_size=8000, seq_len=128, steps=400, batch=32,
                         grad_accum=1, lr=1e-3, warmup=0.1, whole_word=True, bf16=False, save_every=100, seed=0,
                         eval_fraction=0.03)


def add_pretrain_arguments(p):
    d = PRETRAIN_DEFAULTS
    a = p.add_argument
    a("--preset", choices=["tiny", "mini", "small", "base", "large"], help=f"model size (default {d['preset']})")
    a("--corpus", help="folder of .txt files, one document each (default: the bundled Austen novels)")
    a("--vocab", help="a BERT vocab.txt or a saved tokenizer folder to use (default: train one on the corpus)")
    a("--vocab-size", type=int, help=f"size of the vocabulary to train (default {d['vocab_size']})")
    a("--seq-len", type=int, help=f"max_seq_length of the NSP pairs (default {d['seq_len']})")
    a("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    a("--batch", type=int, help=f"examples per micro-batch, over all processes (default {d['batch']})")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    a("--warmup", type=float, help=f"warmup: a step count (>= 1) or a fraction of the steps (< 1; default {d['warmup']})")
    a("--no-whole-word", dest="whole_word", action="store_const", const=False, help="mask tokens, not whole words")
    a("--bf16", action="store_const", const=True, help="bf16 autocast")
    a("--save-every", type=int, help=f"checkpoint every N steps (default {d['save_every']}; also at the end and on Ctrl-C)")
    a("--seed", type=int, help="seed of the data order, masks and initialisation (default 0)")
    a("--eval-fraction", type=float, help="the tail of each document held out for evaluation (default 0.03)")
    p.add_argument("--out", default="runs/pretrain", help="output folder (default runs/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_settings(args, out):
    """The run's settings: the defaults overridden by the given flags; on ``--resume`` the saved
    ``run.json``, and a flag that disagrees with it is an error."""
    given = {k: getattr(args, k) for k in PRETRAIN_DEFAULTS if getattr(args, k, None) is not None}
    if not args.resume:
        return {**PRETRAIN_DEFAULTS, **given}
    saved_path = out / "run.json"
    if not saved_path.exists():
        raise ValueError(f"--resume: {saved_path} does not exist (no run to resume in {out})")
    saved = json.loads(saved_path.read_text())
    clash = {k: (v, saved.get(k)) for k, v in given.items() if saved.get(k) != v}
    if clash:
        raise ValueError("--resume continues the run with its saved settings; these flags differ from "
                         f"{saved_path}: " + ", ".join(f"--{k.replace('_', '-')} {v} (run: {s})"
                                                      for k, (v, s) in clash.items()))
    return saved


def split_documents(docs, fraction):
    """Each document's last ``fraction`` of sentences (at least one) go to a held-out copy."""
    from fastbert.data import Document
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"--eval-fraction must be in (0, 0.5), got {fraction}")
    train, held = [], []
    for d in docs:
        k = max(1, round(len(d.sentences) * fraction)) if len(d.sentences) > 1 else 0
        train.append(Document(d.title, d.sentences[:len(d.sentences) - k]))
        held.append(Document(d.title, d.sentences[len(d.sentences) - k:]))
    return train, [d for d in held if d.sentences]


def load_documents(corpus):
    from fastbert.data import default_corpus_documents, read_documents
    return read_documents(corpus) if corpus else default_corpus_documents()


def make_tokenizer(s, out, sentences, env, resume):
    """Load the run's tokenizer (resume), the one given by --vocab, or train one (rank 0, the
    others wait and load it); saved in ``<out>/tokenizer``."""
    from fastbert.data import WordPieceTokenizer
    folder = out / "tokenizer"
    if resume and (folder / "tokenizer.json").exists():
        return WordPieceTokenizer.load(folder)
    if env.main:
        if s["vocab"]:
            v = Path(s["vocab"])
            tok = WordPieceTokenizer.load(v) if v.is_dir() else WordPieceTokenizer.from_vocab(v)
        else:
            tok = WordPieceTokenizer.train_from_texts(sentences, vocab_size=s["vocab_size"])
        tok.save(folder)
    if env.world_size > 1:
        torch.distributed.barrier()
    return WordPieceTokenizer.load(folder)


def pretrain_command(args):
    from fastbert.data import MaskingCollator, nsp_examples
    from fastbert.models import BertConfig, BertForPreTraining
    from fastbert.models.bert import count_parameters
    from fastbert.train import TrainConfig, evaluate_pretraining, latest_checkpoint, pretrain
    from fastbert.train.distributed import init_from_env, shutdown
    from fastbert.train.plot import loss_curve_png, loss_table

    out = Path(args.out)
    s = run_settings(args, out)
    env = init_from_env(args.device)
    say = print if env.main else (lambda *a, **k: None)
    t0 = time.time()
    train_docs, held_docs = split_documents(load_documents(s["corpus"]), s["eval_fraction"])
    tok = make_tokenizer(s, out, [x for d in train_docs for x in d.sentences], env, args.resume)
    examples = nsp_examples(train_docs, tok, max_seq_length=s["seq_len"], seed=s["seed"])
    held = nsp_examples(held_docs, tok, max_seq_length=s["seq_len"], seed=s["seed"] + 1) if len(held_docs) > 1 else []
    torch.manual_seed(s["seed"])
    last = latest_checkpoint(out) if args.resume else None
    if last is not None:
        config = BertConfig.from_json_file(last / "config.json")
    else:
        config = BertConfig.from_preset(s["preset"], vocab_size=tok.vocab_size)
    model = BertForPreTraining(config).to(env.device)
    warm = dict(warmup_steps=int(s["warmup"])) if s["warmup"] >= 1 else dict(warmup_ratio=s["warmup"])
    tc = TrainConfig(steps=s["steps"], batch_size=s["batch"], grad_accum=s["grad_accum"], lr=s["lr"], bf16=s["bf16"],
                     save_every=s["save_every"], seed=s["seed"], **warm)
    collate = MaskingCollator(tok.vocab_size, tok.mask_id, tok.pad_id, tok.special_ids,
                              continuation=tok.continuation_mask, whole_word=s["whole_word"], seed=s["seed"])
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(s, indent=1) + "\n")
    say(f"fastbert pretrain: BERT-{s['preset']} ({count_parameters(model) / 1e6:.1f}M parameters) on "
        f"{s['corpus'] or 'the bundled Austen novels'}: {len(examples)} NSP pairs of <= {s['seq_len']} tokens "
        f"({len(held)} held out), vocabulary {tok.vocab_size}, {s['steps']} steps of {s['batch'] * s['grad_accum']}"
        f" examples, {env.world_size} process(es) on {env.device}; writing to {out}")
    try:
        history = pretrain(model, examples, collate, tc, out, resume=args.resume, progress=args.progress)
    except KeyboardInterrupt:
        say(f"\ninterrupted: saved {latest_checkpoint(out)}; continue with: fastbert pretrain --out {out} --resume")
        return 130
    finally:
        shutdown()
    if not env.main:
        return 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"preset": s["preset"], "parameters": count_parameters(model), "steps": len(history),
               "examples": len(examples), "device": str(env.device), "processes": env.world_size,
               "wall_s": round(time.time() - t0, 1),
               "tokens_per_s_median": sorted(h["tokens_per_s"] for h in history)[len(history) // 2],
               "padding": padding_summary(model, [h.get("padding", 0.0) for h in history]),
               "first_mlm_loss": history[0]["mlm_loss"], "last_mlm_loss_mean10":
                   sum(h["mlm_loss"] for h in history[-10:]) / len(history[-10:])}
    if held:
        eval_collate = MaskingCollator(tok.vocab_size, tok.mask_id, tok.pad_id, tok.special_ids,
                                       continuation=tok.continuation_mask, whole_word=s["whole_word"], seed=12345)
        summary["held_out"] = evaluate_pretraining(model, held, eval_collate)
    png = loss_curve_png(history, out / "loss_curve.png",
                         title=f"fastbert pretrain: BERT-{s['preset']}, {s['corpus'] or 'Austen'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(loss_table(history))
    if held:
        h = summary["held_out"]
        print(f"held out ({h['examples']} pairs, {h['masked_tokens']} masked tokens): MLM loss {h['mlm_loss']:.3f}, "
              f"MLM accuracy {h['mlm_accuracy']:.1%}, NSP accuracy {h['nsp_accuracy']:.1%}")
    print(padding_line(summary["padding"]))
    print(f"median {summary['tokens_per_s_median']:.0f} tokens/s; {summary['wall_s']:.0f} s in all; "
          f"loss curve {png}; checkpoint {latest_checkpoint(out)}")
    return 0


def add_finetune_arguments(p):
    a = p.add_argument
    a("--from", dest="source", default="runs/pretrain",
      help="a `fastbert pretrain` output folder: its latest checkpoint and tokenizer (default runs/pretrain)")
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
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--no-progress", dest="progress", action="store_false")


def finetune_command(args):
    from fastbert.data import WordPieceTokenizer
    from fastbert.data.novels import novel_passages
    from fastbert.models import BertConfig, BertForSequenceClassification
    from fastbert.train import latest_checkpoint
    from fastbert.train.finetune import FinetuneConfig, finetune

    src, out = Path(args.source), Path(args.out)
    tok_dir = src / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise ValueError(f"finetune: {src} has no tokenizer/ (run `fastbert pretrain --out {src}` first)")
    tok = WordPieceTokenizer.load(tok_dir)
    ckpt = latest_checkpoint(src)
    if ckpt is None:
        raise ValueError(f"finetune: {src} has no checkpoint (run `fastbert pretrain --out {src}` first)")
    docs = load_documents(args.corpus)
    train, test = novel_passages(docs, tok, max_seq_length=args.seq_len, seed=args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = ["pretrained", "scratch"] if args.compare else ["scratch" if args.scratch else "pretrained"]
    print(f"fastbert finetune: {len(docs)} classes ({', '.join(d.title for d in docs)}), {len(train)} training and "
          f"{len(test)} held-out passages of <= {args.seq_len} tokens; chance {max_class_share(test):.1%}")
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
        fc = FinetuneConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed,
                            max_steps=args.max_steps)
        t0 = time.time()
        res = finetune(model.to(device), train, test, tok.pad_id, fc, out_dir=out / run, progress=args.progress)
        model.save_pretrained(out / run / "model")
        results[run] = {"accuracy": res["accuracy"], "evals": res["evals"], "steps": len(res["history"]),
                        "wall_s": round(time.time() - t0, 1),
                        "padding": padding_summary(model, [h["padding"] for h in res["history"]])}
        print(padding_line(results[run]["padding"]))
        print(f"{run}: held-out accuracy {res['accuracy']:.1%} after {len(res['history'])} steps "
              f"({results[run]['wall_s']:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoint": str(ckpt), "classes": [d.title for d in docs],
                                                  "train": len(train), "test": len(test), **results}, indent=1) + "\n")
    return 0


def padding_summary(model, fractions):
    """The mean padding fraction of the batches, and whether the model computed the padding."""
    config = getattr(model, "config", None)
    unpadded = bool(getattr(config, "unpad", False))
    mean = sum(fractions) / len(fractions) if fractions else 0.0
    return {"batch_padding": round(mean, 4), "unpadded": unpadded, "computed_padding": 0.0 if unpadded else round(mean, 4)}


def padding_line(p):
    how = ("unpadded execution: only real tokens computed" if p["unpadded"]
           else "padded execution (unpad=False): padding computed too")
    return f"batches were {p['batch_padding']:.1%} padding; {how}"


def max_class_share(passages):
    counts = {}
    for p in passages:
        counts[p.label] = counts.get(p.label, 0) + 1
    return max(counts.values()) / len(passages)


def main(command, args):
    """Run a command; bad input exits 2 with the error message rather than a traceback."""
    try:
        return (pretrain_command if command == "pretrain" else finetune_command)(args)
    except ValueError as e:
        if os.environ.get("FASTBERT_TRACEBACK"):
            raise
        print(f"fastbert {command}: error: {e}", file=sys.stderr)
        return 2
