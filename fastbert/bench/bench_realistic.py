"""A realistic fine-tuning workload (``--ops realistic``): BERT sentence classification on batches of
variable-length sentences, padded to the longest in the batch, as a tokenizer and a data loader give them.

Workload: ``BertForSequenceClassification`` (``num_labels`` 2), BERT-base (L=12, H=768, A=12,
intermediate 3072, vocab 30522) by default, batch 32, fp32, dropout 0.1, AdamW (lr 1e-4). Sentence
lengths (in tokens, [CLS] and [SEP] included) are drawn from a log-normal distribution, median 45,
sigma 0.44, rounded and clamped to 8..128 (:data:`LENGTHS`). Sigma is calibrated so that a batch of
32 padded to its longest sentence is ~54% padding on average (54.0% over 40,000 simulated batches);
the one batch timed comes from a fixed seed (:data:`SEED`), picked so that its own padding fraction
(54.2%: 1613 real tokens in 32 x 110) and median (46) sit at the distribution's typical values.
Right padding, ``[CLS]`` first, ``[SEP]`` last, random word ids, ``token_type_ids`` 0, random labels.
The rows name the distribution and the measured padding fraction in their ``params``.

Two cases per dtype, op ``bert_realistic``, shape ``(batch, max length, hidden, layers)`` (the max
length is the clamp, 128; the padded length of the batch is ``params["padded_len"]``):

* pass ``step``: ``zero_grad``, forward with ``labels=``, ``loss.backward()``, ``optimizer.step()``,
  training mode. Candidates:

  - ``eager``: ``transformers.BertForSequenceClassification``, ``attn_implementation="eager"``;
  - ``sdpa``: the same with ``attn_implementation="sdpa"`` (transformers' default for BERT);
  - ``patched``: the eager model after ``fastbert.patch(model, unpad=True)``;
  - ``fastbert``: ``fastbert.models.BertForSequenceClassification`` (``unpad`` at its default, True);
  - ``patched-nopad``, ``fastbert-nopad``: the same two models (and optimizers) on the *no padding*
    batch: the batch's real-token count arranged as ``batch`` equal-length sequences of
    ``round(tokens / batch)`` tokens each, no padding (``params["nopad_len"]``). ``patched`` over
    ``patched-nopad`` (and ``fastbert`` over ``fastbert-nopad``) is the **padding overhead**: 1.0
    when padding costs nothing. (``x eager`` of the nopad rows is against eager on the padded batch.)

* pass ``fwd``: inference, ``model.eval()`` under ``torch.no_grad()``, the padded batch, no labels
  (the logits): ``eager``, ``sdpa``, ``patched``, ``fastbert``.

**bf16** (dtype ``bfloat16``, ``params["autocast"]`` ``bf16``): both cases in mixed precision (fp32
parameters and AdamW state; forward and loss under ``torch.autocast(<device>, dtype=torch.bfloat16)``,
backward and ``optimizer.step()`` outside), candidates as above under autocast, without the nopad ones;
``step`` adds ``eager-fp32``: transformers eager without autocast, the fp32 baseline (``eager``, under
the same autocast, is ``x eager``'s); :func:`summary` prints the speed-ups over both. Without
``--dtype``, a ``--quick`` run on CPU has the fp32 cases only (a bf16 BERT-base step on a CPU without
native bf16 takes several fp32 ones); ``--dtype bf16``, ``--full`` or CUDA add bf16 (:func:`case_dtypes`).

Every model has the same weights: the transformers models are built after ``torch.manual_seed(0)``
and fastbert's model gets theirs (:func:`fastbert.models.checkpoint.from_hf`); nothing is downloaded.
Without ``transformers`` only the fastbert candidates run (no ``x eager``). Until fastbert's unpadded
path exists (``BertConfig.unpad``, ``fastbert.patch(..., unpad=)``) the fastbert candidates run the
padded one, and setup says so on stderr.

Repeats: each BERT-base step takes seconds on a small CPU, so the cases fix their own budget
(:data:`QUICK_BUDGET`: 1 warm-up call each, then 3 interleaved rounds; ``--full``: 1 warm-up, 7
rounds) instead of the run's adaptive one, and ``--quick`` does not measure peak memory (``--full``
does: bench_bert's :func:`~fastbert.bench.bench_bert.step_peak_memory` for the step, activations and
temporaries above the training state). n < 6 gives no median CI: ``fastbert.bench.compare`` then uses
the p20-p80 spread as the noise.

Smaller models for smoke tests: ``fastbert bench --ops realistic --preset tiny`` (or ``--shapes
32x128x128x2``: batch x max length x hidden x layers, by bench_bert's :func:`config_for`), or
``python -m fastbert.bench.bench_realistic --preset tiny`` (the tables and the padding summary, no
results files).
"""

import argparse
import dataclasses
import functools
import gc
import inspect
import math
import sys

import torch

from fastbert.bench import harness
from fastbert.bench.bench_bert import (
    BF16,
    EAGER_FP32,
    LR,
    PRESETS,
    Step,
    autocast_ctx,
    case_dtypes,
    config_for,
    input_device_type,
    step_peak_memory,
    transformers,
)
from fastbert.bench.harness import EAGER, Budget, Case

OP = "bert_realistic"
BATCH = 32
PRESET = "base"
NUM_LABELS = 2
MEDIAN, SIGMA, MIN_LEN, MAX_LEN = 45, 0.44, 8, 128
SEED = 178  # the batch's lengths (see the module docstring); 1 + SEED: its token ids and labels


def lengths_name(median=MEDIAN, sigma=SIGMA, lo=MIN_LEN, hi=MAX_LEN, seed=SEED):
    """The length distribution as the rows' ``params["lengths"]`` names it (no commas: params are
    ``k=v,k=v``)."""
    return f"lognormal-median{median}-sigma{sigma}-clamp{lo}..{hi}-seed{seed}"


LENGTHS = lengths_name()
SDPA, PATCHED, FASTBERT = "sdpa", "patched", "fastbert"
NOPAD = "-nopad"
PATCHED_NOPAD, FASTBERT_NOPAD = PATCHED + NOPAD, FASTBERT + NOPAD
STEP_CANDIDATES = (EAGER, SDPA, PATCHED, FASTBERT, PATCHED_NOPAD, FASTBERT_NOPAD)
FWD_CANDIDATES = (EAGER, SDPA, PATCHED, FASTBERT)
# the bf16 autocast cases: every candidate under autocast but eager-fp32 (transformers eager in fp32)
BF16_STEP_CANDIDATES = (EAGER, EAGER_FP32, SDPA, PATCHED, FASTBERT)
BF16_FWD_CANDIDATES = FWD_CANDIDATES
CANDIDATES = (*STEP_CANDIDATES, EAGER_FP32)  # every name (--backends); per case: case_candidates
QUICK_BUDGET = Budget(min_rounds=3, max_rounds=3, time_s=0.0, rel_ci=0.0, warmup_calls=1, warmup_s=0.0)
FULL_BUDGET = Budget(min_rounds=7, max_rounds=7, time_s=0.0, rel_ci=0.0, warmup_calls=1, warmup_s=0.0)


# ------------------------------------------------------------------------------------ the batch


def sentence_lengths(batch=BATCH, median=MEDIAN, sigma=SIGMA, lo=MIN_LEN, hi=MAX_LEN, seed=SEED):
    """``batch`` sentence lengths (int64): ``exp(log(median) + sigma * N(0, 1))`` rounded, clamped
    to ``lo..hi``, from a CPU generator seeded with ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(batch, generator=g, dtype=torch.float64)
    return torch.exp(math.log(median) + sigma * z).round().clamp(lo, hi).long()


def padding_fraction(lengths):
    """Fraction of the padded batch ``[len(lengths), max(lengths)]`` that is padding."""
    return 1.0 - lengths.sum().item() / (len(lengths) * lengths.max().item())


def special_ids(vocab_size):
    """``(cls, sep, first word id)``: BERT's uncased vocabulary ids, or small ones for test vocabularies."""
    return (101, 102, 1000) if vocab_size > 2000 else (1, 2, 3)


def make_batch(lengths, vocab_size, seed=SEED + 1, labels=True):
    """A right-padded batch of sentences of ``lengths`` (``[CLS] words [SEP]``, pad id 0):
    ``input_ids``, ``attention_mask``, ``token_type_ids`` (0) and, with ``labels``, random ``labels``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, s = len(lengths), int(lengths.max())
    cls, sep, first = special_ids(vocab_size)
    pos = torch.arange(s)
    mask = pos < lengths[:, None]
    ids = torch.randint(first, vocab_size, (b, s), generator=g)
    ids[:, 0] = cls
    ids[torch.arange(b), lengths - 1] = sep
    out = dict(
        input_ids=torch.where(mask, ids, torch.zeros_like(ids)),
        attention_mask=mask.long(),
        token_type_ids=torch.zeros(b, s, dtype=torch.long),
    )
    if labels:
        out["labels"] = torch.randint(0, NUM_LABELS, (b,), generator=g)
    return out


@dataclasses.dataclass
class Workload:
    """The padded batch and its no-padding counterpart (same batch size, ~the same real tokens)."""

    lengths: torch.Tensor
    padded: dict
    nopad: dict
    name: str = LENGTHS  # the length distribution

    @property
    def tokens(self):
        return int(self.lengths.sum())

    @property
    def padded_len(self):
        return int(self.lengths.max())

    @property
    def nopad_len(self):
        return self.nopad["input_ids"].shape[1]

    @property
    def pad_frac(self):
        return padding_fraction(self.lengths)

    def params(self):
        return {
            "lengths": self.name,
            "pad_frac": round(self.pad_frac, 3),
            "tokens": self.tokens,
            "padded_len": self.padded_len,
            "nopad_len": self.nopad_len,
        }

    def describe(self):
        b = len(self.lengths)
        return (
            f"batch {b}, lengths {self.name} (median {self.lengths.float().median().item():.0f}, "
            f"min {int(self.lengths.min())}, max {self.padded_len}): {self.tokens} real tokens in "
            f"{b} x {self.padded_len} = {b * self.padded_len} padded, {100 * self.pad_frac:.1f}% padding; "
            f"no padding: {b} x {self.nopad_len} = {b * self.nopad_len} tokens"
        )


def make_workload(vocab_size, batch=BATCH, device="cpu", labels=True, **length_kw):
    lengths = sentence_lengths(batch, **length_kw)
    equal = torch.full((batch,), max(2, round(int(lengths.sum()) / batch)), dtype=torch.long)

    def to(d):
        return {k: v.to(device) for k, v in d.items()}

    return Workload(
        lengths,
        to(make_batch(lengths, vocab_size, labels=labels)),
        to(make_batch(equal, vocab_size, labels=labels)),
        lengths_name(**length_kw),
    )


# ------------------------------------------------------------------------------------ models


def fastbert_config(cfg):
    """``cfg`` for this workload: ``num_labels`` 2, ``unpad`` at its default (True) where it exists."""
    cfg = cfg.replace(num_labels=NUM_LABELS)
    return cfg.replace(unpad=True) if has_unpad_config() else cfg


def has_unpad_config():
    from fastbert.models import BertConfig

    return "unpad" in {f.name for f in dataclasses.fields(BertConfig)}


def has_unpad_patch():
    import fastbert

    return "unpad" in inspect.signature(fastbert.patch).parameters


def hf_model(cfg, attn, device="cpu"):
    """transformers' ``BertForSequenceClassification`` equivalent to ``cfg``, built after
    ``torch.manual_seed(0)`` (so every transformers candidate has the same weights)."""
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "unpad"}
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**d, attn_implementation=attn))
    return model.to(device)


def fastbert_model(cfg, weights_from=None, device="cpu"):
    """``fastbert.models.BertForSequenceClassification(cfg)``; with ``weights_from`` (a transformers
    model) its weights, else a random init after ``torch.manual_seed(0)``."""
    from fastbert.models import BertForSequenceClassification
    from fastbert.models.checkpoint import from_hf

    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    if weights_from is not None:
        sd = from_hf(weights_from.state_dict(), model.hf_prefix)
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise RuntimeError(f"bench_realistic: transformers weights lack {', '.join(missing)}")
        model.load_state_dict({k: v for k, v in sd.items() if k in own})
    return model.to(device)


def patch_unpad(model):
    """``fastbert.patch(model, unpad=True)`` (plain ``fastbert.patch`` where ``unpad`` does not exist yet)."""
    import fastbert

    return fastbert.patch(model, unpad=True) if has_unpad_patch() else fastbert.patch(model)


def _warn_padded():
    missing = [
        what
        for what, ok in (
            ("fastbert.models BertConfig.unpad", has_unpad_config()),
            ("fastbert.patch(..., unpad=)", has_unpad_patch()),
        )
        if not ok
    ]
    if missing:
        print(f"bench_realistic: {' and '.join(missing)} not available: those candidates run padded", file=sys.stderr)


class Infer:
    """Inference forward of ``model`` (eval mode, no_grad) on ``inputs``; returns the logits. With
    ``autocast`` (a dtype) under ``torch.autocast`` to it."""

    def __init__(self, model, inputs, autocast=None):
        self.model, self.inputs, self.autocast = model.eval(), inputs, autocast

    def __call__(self):
        with torch.no_grad(), autocast_ctx(input_device_type(self.inputs), self.autocast):
            return self.model(**self.inputs).logits


def make_step_candidates(cfg, batch=BATCH, device="cpu", names=None, max_len=MAX_LEN, autocast=None):
    """``{name: Step}`` of the training-step case (``names`` default: ``STEP_CANDIDATES``, or
    ``BF16_STEP_CANDIDATES`` with ``autocast``); the nopad candidates share their padded
    counterpart's model and optimizer. With ``autocast`` (a dtype) every step but ``eager-fp32``'s
    runs its forward under ``torch.autocast`` to it."""
    gc.collect()
    _warn_padded()
    if names is None:
        names = STEP_CANDIDATES if autocast is None else BF16_STEP_CANDIDATES
    cfg = fastbert_config(cfg)
    work = make_workload(cfg.vocab_size, batch, device, hi=max_len)
    hf = transformers is not None
    names = [n for n in names if hf or n in (FASTBERT, FASTBERT_NOPAD)]
    out, models = {}, {}
    if hf:
        models[EAGER] = hf_model(cfg, "eager", device)
    if EAGER_FP32 in names:
        models[EAGER_FP32] = hf_model(cfg, "eager", device)
    if {SDPA} & set(names):
        models[SDPA] = hf_model(cfg, "sdpa", device)
    if {PATCHED, PATCHED_NOPAD} & set(names):
        models[PATCHED] = hf_model(cfg, "eager", device)
        patch_unpad(models[PATCHED])
    if {FASTBERT, FASTBERT_NOPAD} & set(names):
        models[FASTBERT] = fastbert_model(cfg, models.get(EAGER), device)
    for name in names:
        base = name[: -len(NOPAD)] if name.endswith(NOPAD) else name
        model = models[base].train()
        inputs = work.nopad if name.endswith(NOPAD) else work.padded
        step = Step(model, model, inputs, autocast=None if name == EAGER_FP32 else autocast)
        if base in out:  # the nopad candidate steps the same model with the same optimizer
            step.optimizer = out[base].optimizer
        else:
            step.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        out[name] = step
    return out


def make_fwd_candidates(cfg, batch=BATCH, device="cpu", names=FWD_CANDIDATES, max_len=MAX_LEN, autocast=None):
    """``{name: Infer}`` of the inference case (the padded batch, no labels), under ``torch.autocast``
    to ``autocast`` when given."""
    gc.collect()
    _warn_padded()
    cfg = fastbert_config(cfg)
    work = make_workload(cfg.vocab_size, batch, device, labels=False, hi=max_len)
    hf = transformers is not None
    names = [n for n in names if hf or n == FASTBERT]
    models = {}
    if hf:
        models[EAGER] = hf_model(cfg, "eager", device)
    if SDPA in names:
        models[SDPA] = hf_model(cfg, "sdpa", device)
    if PATCHED in names:
        models[PATCHED] = hf_model(cfg, "eager", device)
        patch_unpad(models[PATCHED])
    if FASTBERT in names:
        models[FASTBERT] = fastbert_model(cfg, models.get(EAGER), device)
    return {name: Infer(models[name], work.padded, autocast) for name in names}


# ------------------------------------------------------------------------------------ cases


def case_candidates(case):
    """The candidate names of ``case`` (what pytest-benchmark names its tests after)."""
    if case.dtype == "bfloat16":
        return BF16_STEP_CANDIDATES if case.pass_ == "step" else BF16_FWD_CANDIDATES
    return STEP_CANDIDATES if case.pass_ == "step" else FWD_CANDIDATES


def _no_peak_memory(fn, device):
    return None


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, preset=None):
    """The realistic cases (step, fwd) per shape and dtype: ``(batch, max length, hidden, layers)``
    shapes (others ignored), default ``(32, 128, <preset>)`` with ``preset`` (default ``base``); fp32
    and bf16 autocast (``params["autocast"]`` ``bf16``, fp32 parameters) as :func:`case_dtypes` says."""
    run_dtypes = case_dtypes(device, mode, dtypes)
    if not run_dtypes:
        return []
    if shapes is None:
        p = PRESETS[preset or PRESET]
        shapes = [(BATCH, MAX_LEN, p["hidden_size"], p["num_hidden_layers"])]
    quick = mode != "full"
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    passes = (("step", make_step_candidates, step_peak_memory), ("fwd", make_fwd_candidates, None))
    out = []
    for shape in shapes:
        if len(shape) != 4 or shape[3] > 64 or not MIN_LEN <= shape[1] <= 512:  # not a (B, S, H, L) shape
            continue
        b, max_len, h, layers = shape
        name, cfg = config_for(h, layers, max_len)
        params = {"preset": name, **make_workload(cfg.vocab_size, b, hi=max_len).params()}
        if name == "custom":
            params.update(heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size)
        for dtype in run_dtypes:
            ac = torch.bfloat16 if dtype == "bfloat16" else None
            kw = dict(params={**params, "autocast": BF16} if ac else params, budget=budget)
            for pass_, make, memory in passes:
                setup = functools.partial(make, cfg, b, device, max_len=max_len, autocast=ac)
                mem = _no_peak_memory if quick else memory
                out.append(Case(OP, tuple(shape), dtype, pass_, None, setup, peak_memory=mem, **kw))
    return out


# ------------------------------------------------------------------------------------ summary


def _ratios(c, base):
    """``["<name> <speed-up over base>x", ...]`` for the candidates of ``c`` but ``base`` (none without it)."""
    e = c.get(base)
    if e is None:
        return []
    return [f"{name} {harness.ratio(e['p50_ms'], r['p50_ms']):.2f}x" for name, r in c.items() if name != base]


def summary(rows):
    """Lines after the table: per case the workload and the speed-ups over eager, per bf16 case also
    over eager-fp32 (transformers eager without autocast), and per step case the padding overhead."""
    by_case = {}
    for r in rows:
        if r["op"] == OP:
            by_case.setdefault(tuple(r[k] for k in harness.KEY), {})[r["candidate"]] = r
    lines = []
    for (op, shape, dtype, pass_, params), c in by_case.items():
        p = dict(kv.split("=", 1) for kv in params.split(",") if "=" in kv)
        b = int(shape.split("x")[0])
        ac = f" {p['autocast']} autocast" if "autocast" in p else ""
        head = (
            f"{op} {shape} {pass_}{ac} ({p.get('preset')}): lengths {p.get('lengths')}, {p.get('tokens')} real "
            f"tokens in {b} x {p.get('padded_len')}, {100 * float(p.get('pad_frac', 'nan')):.1f}% padding"
        )
        same = f" (same {p['autocast']} autocast)" if "autocast" in p else ""
        parts = _ratios(c, EAGER)
        if parts:
            head += f"; vs eager{same}: " + ", ".join(parts)
        lines.append(head)
        parts = _ratios(c, EAGER_FP32)
        if parts:
            lines.append("  vs eager fp32 (transformers eager, no autocast): " + ", ".join(parts))
        over = [
            f"{base} {c[base]['p50_ms'] / c[base + NOPAD]['p50_ms']:.2f}x"
            for base in (PATCHED, FASTBERT)
            if base in c and base + NOPAD in c
        ]
        if over:
            lines.append(
                f"  padding overhead (padded {b} x {p.get('padded_len')} step / no-padding "
                f"{b} x {p.get('nopad_len')} step, p50): " + ", ".join(over) + " (1.00x: padding is free)"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ standalone


def main(argv=None):
    from fastbert.bench import report

    p = argparse.ArgumentParser(
        prog="python -m fastbert.bench.bench_realistic",
        description="BERT sentence classification on variable-length padded batches: "
        "transformers eager / sdpa vs fastbert.patch(unpad=True) vs "
        "fastbert.models; no results files (fastbert bench --ops realistic "
        "writes them).",
    )
    p.add_argument("--preset", default=PRESET, choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--full", action="store_true", help="7 rounds and peak memory (default: 3 rounds)")
    p.add_argument("--pass", dest="passes", nargs="+", default=["step", "fwd"], choices=["step", "fwd"])
    p.add_argument("--dtype", nargs="+", help="float32 and/or bfloat16 (autocast), or fp32/bf16 (default: as bench)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    dtypes = [harness.dtype_name(d) for d in args.dtype] if args.dtype else None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = report.host_info(device)
    pr = PRESETS[args.preset]
    shape = (args.batch, MAX_LEN, pr["hidden_size"], pr["num_hidden_layers"])
    print(
        f"{meta['device_name']}; torch {meta['torch']}, transformers "
        f"{transformers.__version__ if transformers else 'not installed'}, {meta['torch_threads']} threads"
    )
    print(make_workload(config_for(shape[2], shape[3])[1].vocab_size, args.batch).describe(), flush=True)
    rows = []
    for case in cases(device, "full" if args.full else "quick", dtypes, shapes=[shape]):
        if case.pass_ in args.passes:
            rows += harness.run_case(case, meta, timer=harness.make_timer(device))
    print(report.format_table(rows))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
