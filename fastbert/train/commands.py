"""``fastbert pretrain`` and ``fastbert finetune``.

``fastbert pretrain`` with no arguments trains BERT-tiny (2 layers, hidden 128) with MLM + NSP and
fixed local attention heads (``--local-attention``) on the bundled Austen novels for 4,000 steps
(about 14 minutes on a 2-core CPU), holding out the last 3% of every novel to measure MLM/NSP
accuracy, and writes to ``runs/pretrain``: the tokenizer,
checkpoints (``step-N``, ``latest``), ``metrics.jsonl``, ``held_out.jsonl`` (held-out MLM/NSP loss and
accuracy at every checkpoint), ``loss_curve.png`` and ``summary.json``.
Under ``torchrun --nproc_per_node N -m fastbert pretrain`` it trains data-parallel (gloo on CPU,
nccl on GPU) with the same global batch.

``fastbert finetune`` fine-tunes ``BertForSequenceClassification`` from that run's latest
checkpoint on "are this passage's words in their original order or shuffled" (``--task order``,
the default) or "which of the novels is this passage from" (``--task novel``) and reports held-out
accuracy;
``--scratch`` starts from random weights instead and ``--compare`` runs both, each over ``--seeds``
seeds (mean ± std, default 3); ``--train-fraction`` fine-tunes on a sample of the labels.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from fastbert._optional import MissingExtra, require

PRETRAIN_DEFAULTS = dict(
    preset="tiny",
    corpus=None,
    vocab=None,
    vocab_size=8000,
    seq_len=128,
    steps=4000,
    batch=32,
    grad_accum=1,
    lr=2e-3,
    warmup=0.1,
    whole_word=True,
    local_attention=True,
    bf16=False,
    save_every=100,
    seed=0,
    eval_fraction=0.03,
)


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
    a(
        "--warmup",
        type=float,
        help=f"warmup: a step count (>= 1) or a fraction of the steps (< 1; default {d['warmup']})",
    )
    a("--no-whole-word", dest="whole_word", action="store_const", const=False, help="mask tokens, not whole words")
    a(
        "--local-attention",
        action="store_const",
        const=True,
        help="fixed previous/next-token attention heads while pretraining (the default; see "
        "fastbert.train.local_attention)",
    )
    a(
        "--no-local-attention",
        dest="local_attention",
        action="store_const",
        const=False,
        help="all heads free from the start (BERT's usual pretraining)",
    )
    a("--bf16", action="store_const", const=True, help="bf16 autocast")
    a(
        "--save-every",
        type=int,
        help=f"checkpoint every N steps (default {d['save_every']}; also at the end and on Ctrl-C)",
    )
    a("--seed", type=int, help="seed of the data order, masks and initialisation (default 0)")
    a("--eval-fraction", type=float, help="the tail of each document held out for evaluation (default 0.03)")
    p.add_argument("--out", default="runs/pretrain", help="output folder (default runs/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


PRESETS = ("tiny", "mini", "small", "base", "large")
MAX_SEED = 2**32 - 1


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_settings(s, where=None):
    """Every pretraining setting checked before anything is read or written; a ``ValueError`` names
    the flag (or, with ``where``, the field of that saved ``run.json``)."""

    def bad(key, want):
        name = f"{where}: {key}" if where else f"--{key.replace('_', '-')}"
        raise ValueError(f"{name} must be {want}, got {s[key]!r}")

    if s["preset"] not in PRESETS:
        bad("preset", "one of " + ", ".join(PRESETS))
    for key, low in (
        ("vocab_size", 6),
        ("seq_len", 5),
        ("steps", 1),
        ("batch", 1),
        ("grad_accum", 1),
        ("save_every", 0),
    ):
        if not _int(s[key]) or s[key] < low:
            bad(key, f"an int >= {low}")
    if not _int(s["seed"]) or not 0 <= s["seed"] <= MAX_SEED:
        bad("seed", "an int in [0, 2**32 - 1]")
    if not _real(s["lr"]) or not math.isfinite(s["lr"]) or s["lr"] <= 0:
        bad("lr", "a finite number > 0")
    w = s["warmup"]
    if not _real(w) or not math.isfinite(w) or w < 0 or (w >= 1 and w != int(w)):
        bad("warmup", "a step count (a whole number >= 1) or a fraction of the steps in [0, 1)")
    if w >= 1 and w > s["steps"]:
        bad("warmup", f"at most the {s['steps']} steps")
    if not _real(s["eval_fraction"]) or not 0.0 < s["eval_fraction"] < 0.5:
        bad("eval_fraction", "in (0, 0.5)")
    for key in ("whole_word", "local_attention", "bf16"):
        if not isinstance(s[key], bool):
            bad(key, "true or false")
    for key in ("corpus", "vocab"):
        if s[key] is not None and not isinstance(s[key], str):
            bad(key, "a path")
    from fastbert.models import BertConfig

    positions = BertConfig.from_preset(s["preset"]).max_position_embeddings
    if s["seq_len"] > positions:
        bad("seq_len", f"at most {positions} (BERT-{s['preset']} has max_position_embeddings {positions})")
    return s


def check_device(device):
    """``--device``: None (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` of a GPU that is there."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                "use --device cpu"
            )
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def run_settings(args, out):
    """The run's settings, checked: the defaults overridden by the given flags; on ``--resume`` the
    saved ``run.json``, and a flag that disagrees with it is an error."""
    given = {k: getattr(args, k) for k in PRETRAIN_DEFAULTS if getattr(args, k, None) is not None}
    if not args.resume:
        return check_settings({**PRETRAIN_DEFAULTS, **given})
    saved_path = out / "run.json"
    if not saved_path.exists():
        raise ValueError(f"--resume: {saved_path} does not exist (no run to resume in {out})")
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {saved_path} is not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {saved_path} holds a JSON {type(saved).__name__}, not the run's settings")
    saved.setdefault("local_attention", False)  # a run.json from before the flag existed
    missing = [k for k in PRETRAIN_DEFAULTS if k not in saved]
    if missing:
        raise ValueError(f"--resume: {saved_path} lacks the setting(s) {', '.join(missing)} (damaged or edited)")
    saved = check_settings({k: saved[k] for k in PRETRAIN_DEFAULTS}, where=saved_path)
    clash = {k: (v, saved.get(k)) for k, v in given.items() if saved.get(k) != v}
    if clash:
        raise ValueError(
            "--resume continues the run with its saved settings; these flags differ from "
            f"{saved_path}: " + ", ".join(f"--{k.replace('_', '-')} {v} (run: {s})" for k, (v, s) in clash.items())
        )
    return saved


def split_documents(docs, fraction):
    """Each document's last ``fraction`` of sentences (at least one) go to a held-out copy."""
    from fastbert.data import Document

    if not 0.0 < fraction < 0.5:
        raise ValueError(f"--eval-fraction must be in (0, 0.5), got {fraction}")
    train, held = [], []
    for d in docs:
        k = max(1, round(len(d.sentences) * fraction)) if len(d.sentences) > 1 else 0
        train.append(Document(d.title, d.sentences[: len(d.sentences) - k]))
        held.append(Document(d.title, d.sentences[len(d.sentences) - k :]))
    return train, [d for d in held if d.sentences]


def load_documents(corpus):
    from fastbert.data import default_corpus_documents, read_documents

    return read_documents(corpus) if corpus else default_corpus_documents()


def make_tokenizer(s, out, sentences, env, resume):
    """The run's tokenizer, in memory: on resume the saved ``<out>/tokenizer``, else the one given
    by --vocab or one trained on the corpus (by rank 0; the others receive it). Nothing is written
    here: the caller saves it once every check has passed."""
    from fastbert.data import WordPieceTokenizer  # MissingExtra without tokenizers
    from fastbert.data.tokenizer import Tokenizer

    folder = out / "tokenizer"
    if resume:
        if not (folder / "tokenizer.json").exists():
            raise ValueError(f"--resume: {folder} has no tokenizer.json (the checkpoints' token ids need it)")
        return WordPieceTokenizer.load(folder)
    text = None
    if env.main:
        if s["vocab"]:
            v = Path(s["vocab"])
            tok = WordPieceTokenizer.load(v) if v.is_dir() else WordPieceTokenizer.from_vocab(v)
        else:
            tok = WordPieceTokenizer.train_from_texts(sentences, vocab_size=s["vocab_size"])
        text = tok.backend_tokenizer.to_str()
    if env.world_size > 1:
        box = [text]
        torch.distributed.broadcast_object_list(box, src=0)
        text = box[0]
    return WordPieceTokenizer(Tokenizer.from_str(text))


def pretrain_command(args):
    from fastbert.data import MaskingCollator, nsp_examples
    from fastbert.models import BertConfig, BertForPreTraining
    from fastbert.models.bert import count_parameters
    from fastbert.train import TrainConfig, evaluate_pretraining, latest_checkpoint, pretrain
    from fastbert.train.distributed import init_from_env, shutdown
    from fastbert.train.local_attention import PinnedLocalAttention, local_attention_init
    from fastbert.train.metrics import dumps
    from fastbert.train.plot import loss_curve_png, loss_table
    from fastbert.train.trainer import check_setup

    for module in ("tqdm", "safetensors", "matplotlib"):  # the rest of [train]: fail now, not mid-run
        require(module, "train", "fastbert pretrain")

    out = Path(args.out)
    s = run_settings(args, out)  # every flag checked before anything is read or written
    env = init_from_env(check_device(args.device))
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
    model = BertForPreTraining(config)
    if s["local_attention"] and last is None:
        local_attention_init(model, seed=s["seed"])  # a resumed run pins its checkpoint's rows (pretrain's pin=)
    model = model.to(env.device)
    if s["bf16"] and bf16_is_slow(env.device):
        say(BF16_SLOW, file=sys.stderr)
    warm = dict(warmup_steps=int(s["warmup"])) if s["warmup"] >= 1 else dict(warmup_ratio=s["warmup"])
    tc = TrainConfig(
        steps=s["steps"],
        batch_size=s["batch"],
        grad_accum=s["grad_accum"],
        lr=s["lr"],
        bf16=s["bf16"],
        save_every=s["save_every"],
        seed=s["seed"],
        **warm,
    )

    def masking(seed):
        return MaskingCollator(
            tok.vocab_size,
            tok.mask_id,
            tok.pad_id,
            tok.special_ids,
            continuation=tok.continuation_mask,
            whole_word=s["whole_word"],
            seed=seed,
        )

    def held_out(m):  # the same masks at every checkpoint: a fresh collator of a fixed seed
        return evaluate_pretraining(m, held, masking(12345))

    collate = masking(s["seed"])
    check_setup(model, examples, collate, tc)  # the data fit the model and the batch: only now write
    if env.main and not args.resume:  # a resumed run keeps its tokenizer and settings as they are
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out / "tokenizer")
        (out / "run.json").write_text(json.dumps(s, indent=1) + "\n")
    say(
        f"fastbert pretrain: BERT-{s['preset']} ({count_parameters(model) / 1e6:.1f}M parameters) on "
        f"{s['corpus'] or 'the bundled Austen novels'}: {len(examples)} NSP pairs of <= {s['seq_len']} tokens "
        f"({len(held)} held out), vocabulary {tok.vocab_size}, {s['steps']} steps of {s['batch'] * s['grad_accum']}"
        f" examples, {env.world_size} process(es) on {env.device}; writing to {out}"
    )
    try:
        evaluate = held_out if held else None
        pin = PinnedLocalAttention if s["local_attention"] else None
        history = pretrain(model, examples, collate, tc, out, args.resume, args.progress, evaluate, pin)
    except KeyboardInterrupt:
        say(f"\ninterrupted: saved {latest_checkpoint(out)}; continue with: fastbert pretrain --out {out} --resume")
        return 130
    finally:
        shutdown()
    if not env.main:
        return 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "preset": s["preset"],
        "parameters": count_parameters(model),
        "steps": len(history),
        "examples": len(examples),
        "device": str(env.device),
        "processes": env.world_size,
        "wall_s": round(time.time() - t0, 1),
        "tokens_per_s_median": sorted(h["tokens_per_s"] for h in history)[len(history) // 2],
        "padding": padding_summary(model, [h.get("padding", 0.0) for h in history]),
        "first_mlm_loss": history[0]["mlm_loss"],
        "last_mlm_loss_mean10": sum(h["mlm_loss"] for h in history[-10:]) / len(history[-10:]),
    }
    curve = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()] if held else []
    if curve:
        summary["held_out"] = curve[-1]  # the final checkpoint's
        summary["held_out_curve"] = [
            {k: r[k] for k in ("step", "mlm_loss", "mlm_accuracy", "nsp_accuracy")} for r in curve
        ]
    title = f"fastbert pretrain: BERT-{s['preset']}, {s['corpus'] or 'Austen'}"
    png = loss_curve_png(history, out / "loss_curve.png", title=title, held_out=curve)
    (out / "summary.json").write_text(dumps(summary, indent=1) + "\n")
    print(loss_table(history))
    if curve:
        h = summary["held_out"]
        print("held-out MLM accuracy by step: " + ", ".join(f"{r['step']}: {r['mlm_accuracy']:.1%}" for r in curve))
        print(
            f"held out ({h['examples']} pairs, {h['masked_tokens']} masked tokens): MLM loss {h['mlm_loss']:.3f}, "
            f"MLM accuracy {h['mlm_accuracy']:.1%}, NSP accuracy {h['nsp_accuracy']:.1%}"
        )
    print(padding_line(summary["padding"]))
    print(
        f"median {summary['tokens_per_s_median']:.0f} tokens/s; {summary['wall_s']:.0f} s in all; "
        f"loss curve {png}; checkpoint {latest_checkpoint(out)}"
    )
    return 0


BF16_SLOW = (
    "note: this CPU has no bf16 instructions (AVX512-BF16): torch's bf16 matrix products run 7x to 100x "
    "slower than fp32 here (on an AVX2 EPYC), so --bf16 saves memory, not time"
)


def bf16_is_slow(device):
    """Whether bf16 autocast on ``device`` runs slower than fp32: a CPU without bf16 instructions."""
    from fastbert import _ext, backends

    return torch.device(device).type == "cpu" and _ext.C is not None and not backends.cpu_has_bf16()


def padding_summary(model, fractions):
    """The mean padding fraction of the batches, and whether the model computed the padding."""
    config = getattr(model, "config", None)
    unpadded = bool(getattr(config, "unpad", False))
    mean = sum(fractions) / len(fractions) if fractions else 0.0
    return {
        "batch_padding": round(mean, 4),
        "unpadded": unpadded,
        "computed_padding": 0.0 if unpadded else round(mean, 4),
    }


def padding_line(p):
    how = (
        "unpadded execution: only real tokens computed"
        if p["unpadded"]
        else "padded execution (unpad=False): padding computed too"
    )
    return f"batches were {p['batch_padding']:.1%} padding; {how}"


def main(command, args):
    """Run a command; bad input, a file that cannot be read or written and a missing optional package
    (:class:`~fastbert._optional.MissingExtra`: its one line names the pip command) exit 2 with the
    error message rather than a traceback (FASTBERT_TRACEBACK=1 shows it)."""
    try:
        if command == "pretrain":
            return pretrain_command(args)
        from fastbert.train.finetune_command import finetune_command

        return finetune_command(args)
    except (ValueError, OSError, MissingExtra) as e:
        if os.environ.get("FASTBERT_TRACEBACK"):
            raise
        print(f"fastbert {command}: error: {e}", file=sys.stderr)
        return 2
