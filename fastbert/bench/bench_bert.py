"""One BERT pretraining step end to end (``--ops bert``): MLM + NSP forward, backward, AdamW.

A case is op ``bert_pretrain``, shape ``(batch, seq, hidden, layers)``, pass ``step``:
``optimizer.zero_grad(set_to_none=True)``, the forward with ``labels=`` (MLM, 15% of the attended
tokens labelled, the rest -100) and ``next_sentence_label=``, ``loss.backward()``,
``optimizer.step()`` (``torch.optim.AdamW``, lr 1e-4, its defaults otherwise), in training mode
(dropout 0.1). Inputs: random token ids, token types 0 for the first half and 1 for the second,
every other sequence's last 16 tokens (S/4 if fewer) padded (``attention_mask`` 0). Candidates, each with its own
randomly initialised model (same config, ``torch.manual_seed(0)`` before each) and optimizer:

* ``fastbert``: ``fastbert.models.BertForPreTraining`` on its fused ops (bias_gelu,
  layernorm_residual, masked_softmax, and the MLM loss on the labelled rows only through
  gather_masked + linear_cross_entropy, never holding the ``[tokens, vocab]`` logits);
* ``fastbert-unfused``: the same model with ``fused=False`` (eager PyTorch ops, full logits);
* ``eager``: ``transformers.BertForPreTraining`` with the equivalent ``transformers.BertConfig``
  (``attn_implementation="eager"``);
* ``torch.compile``: the same transformers model under ``torch.compile(dynamic=False)`` (forward and
  loss compiled, backward through AOTAutograd; zero_grad and AdamW eager), compiled by a first step
  in ``setup``, outside the timed region.

The transformers candidates are left out when ``transformers`` is not installed (no speed-ups then).
Quick mode runs the ``mini`` preset (L=4, H=256, A=4, intermediate 1024, vocab 30522) at batch 8,
sequence 128, fp32; ``--full`` adds ``base`` (L=12, H=768). Other ``--shapes BxSxHxL`` use the
preset with that hidden size and depth, or else a config derived from H (see :func:`config_for`).
GB/s is not reported (compute-bound).

**bf16** (dtype ``bfloat16``, ``params["autocast"]`` ``bf16``): the same step, per shape, in mixed
precision as one would train: fp32 parameters, gradients and AdamW state, the forward and the loss
under ``torch.autocast(<device>, dtype=torch.bfloat16)``, backward and the optimizer step outside it.
Candidates: ``fastbert`` and ``eager`` (transformers) under autocast, so ``x eager`` is against
transformers under the same autocast, and ``eager-fp32``: transformers without autocast, the fp32
baseline; :func:`summary` prints every candidate's speed-up over both under the table. (No
torch.compile candidate here.) Without ``--dtype``, a ``--quick`` run on CPU has the fp32 case only
(bf16 on a CPU without native bf16 is several times slower than fp32); ``--dtype bf16``, ``--full``
or CUDA add the bf16 one (:func:`case_dtypes`).

**Peak memory** ("peak MB"): the step's absolute peak minus what parameters, gradients and AdamW
state hold between steps, i.e. the memory a step needs on top of its training state: activations
saved for backward plus autograd and optimizer temporaries. ``params["state_bytes"]`` is that state,
4 x the parameter bytes (params + grads + exp_avg + exp_avg_sq; AdamW's scalar step counters
ignored): absolute peak = peak MB + ``state_bytes`` (+ the inputs), or subtract it from a peak you
measured yourself. How (:func:`step_peak_memory`): the gradients are freed first (what the step's
``zero_grad(set_to_none=True)`` does anyway), the harness measures the step's peak above that level
(the profiler's CPU allocator events, or CUDA's max_memory_allocated), and the gradients' bytes,
which the step allocates again, are subtracted. Freeing the gradients before the forward lets the
activations use their room, so the number is activations + temporaries minus the gradients not yet
produced at the peak: a little *under* the activations alone, as in a real run. (Measured without
freeing first, the CPU profiler would not see the old gradients' frees, blocks allocated before it
started, while CUDA would: the two would differ by the gradients.)

``python -m fastbert.bench.bench_bert --share [--preset mini]`` (not part of ``make bench``) prints per
candidate (fastbert, fastbert-unfused, eager) the step time, tokens per second, and the share of the
step's self CPU time spent outside matrix multiplications (:func:`matmul_share`).
"""

import argparse
import contextlib
import math
import sys

import torch

from fastbert.bench import harness
from fastbert.bench.harness import COMPILE, EAGER, Budget, Case, CpuTimer, percentile, time_candidates
from fastbert.models import PRESETS, BertConfig, BertForPreTraining, count_parameters

try:
    import transformers
except ImportError:  # the transformers candidates are skipped
    transformers = None

OP = "bert_pretrain"
BATCH, SEQ = 8, 128
QUICK_PRESETS = ["mini"]
FULL_PRESETS = ["mini", "base"]
LABELLED = 0.15
IGNORE = -100
PAD = 16  # padded tokens at the end of every other sequence
LR = 1e-4
FASTBERT, UNFUSED = "fastbert", "fastbert-unfused"
EAGER_FP32 = "eager-fp32"  # the bf16 cases' fp32 baseline: transformers eager without autocast
FP32_CANDIDATES = (FASTBERT, UNFUSED, EAGER, COMPILE)
BF16_CANDIDATES = (FASTBERT, EAGER, EAGER_FP32)  # under bf16 autocast, but eager-fp32
CANDIDATES = (*FP32_CANDIDATES, EAGER_FP32)  # every name (--backends); per case: case_candidates
BF16 = "bf16"  # params["autocast"] of the bf16 cases
# self CPU time of these ops is "matrix multiplication" (aten::matmul / linear only dispatch to them)
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"})


# ------------------------------------------------------------------------------------ configs


def config_for(hidden, layers, seq=SEQ):
    """``(preset name, BertConfig)`` for a case shape's hidden size and depth: the preset with those
    sizes, else ``"custom"``: BERT's proportions (head dim 64, intermediate 4H, vocab 30522) from
    H >= 128, or a test-size model below (head dim 16, intermediate 2H, vocab 101)."""
    for name, sizes in PRESETS.items():
        if (sizes["hidden_size"], sizes["num_hidden_layers"]) == (hidden, layers):
            return name, BertConfig.from_preset(name, max_position_embeddings=max(512, seq))
    big = hidden >= 128 and hidden % 64 == 0
    return "custom", BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64 if big else max(1, hidden // 16),
        intermediate_size=(4 if big else 2) * hidden,
        vocab_size=30522 if big else 101,
        max_position_embeddings=max(512, seq),
    )


def hf_config(cfg):
    """The ``transformers.BertConfig`` equivalent to a fastbert ``BertConfig``."""
    return transformers.BertConfig(**cfg.to_hf_dict(), attn_implementation="eager")


def parameter_count(cfg):
    """Trainable parameters of ``BertForPreTraining(cfg)`` (tied decoder counted once), counted on
    the meta device: nothing is allocated."""
    with torch.device("meta"):
        return count_parameters(BertForPreTraining(cfg))


def state_bytes(cfg, itemsize=4):
    """Bytes held between steps: parameters, gradients and AdamW's exp_avg and exp_avg_sq."""
    return 4 * parameter_count(cfg) * itemsize


# ------------------------------------------------------------------------------------ inputs


def make_inputs(cfg, batch, seq, device="cpu", seed=0):
    """The keyword arguments of one pretraining step (the same for every candidate)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    token_type_ids[:, seq // 2 :] = 1
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1::2, seq - min(PAD, seq // 4) :] = 0  # every other sequence ends in padding
    labelled = (torch.rand(batch, seq, generator=g) < LABELLED) & attention_mask.bool()
    labelled[0, 1] = True  # at least one MLM target at any size
    labels = torch.where(
        labelled, torch.randint(0, cfg.vocab_size, (batch, seq), generator=g), torch.full_like(input_ids, IGNORE)
    )
    nsp = torch.randint(0, 2, (batch,), generator=g)
    out = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        labels=labels,
        next_sentence_label=nsp,
    )
    return {k: v.to(device) for k, v in out.items()}


# ------------------------------------------------------------------------------------ candidates


def autocast_ctx(device_type, dtype):
    """``torch.autocast(device_type, dtype=dtype)``, or a no-op context for ``dtype`` None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def input_device_type(inputs):
    """The device type (``"cpu"``, ``"cuda"``) of a dict of input tensors."""
    return next(iter(inputs.values())).device.type


class Step:
    """One training step of ``model`` (called as ``fn(**inputs)``, e.g. a compiled model) with its
    own AdamW; returns nothing. ``last_loss`` is the detached loss of the latest step. With
    ``autocast`` (a dtype, e.g. ``torch.bfloat16``) the forward and the loss run under
    ``torch.autocast`` (mixed precision: the parameters stay as they are), the backward and the
    optimizer step outside it, as PyTorch recommends."""

    def __init__(self, model, fn, inputs, autocast=None):
        self.model, self.fn, self.inputs, self.autocast = model, fn, inputs, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        self.last_loss = None

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_ctx(input_device_type(self.inputs), self.autocast):
            loss = self.fn(**self.inputs).loss  # drop the output object (HF's holds the logits)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()


def build_model(name, cfg, device="cpu"):
    """The (training-mode) model of candidate ``name``, initialised after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    if name == FASTBERT:
        model = BertForPreTraining(cfg)
    elif name == UNFUSED:
        model = BertForPreTraining(cfg.replace(fused=False))
    elif name in (EAGER, EAGER_FP32, COMPILE):
        if transformers is None:
            raise RuntimeError(f"candidate {name!r} needs transformers")
        model = transformers.BertForPreTraining(hf_config(cfg))
    else:
        raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    return model.to(device).train()


def make_candidates(cfg, batch, seq, device="cpu", use_compile=True, names=None, autocast=None):
    """``{name: Step}`` for the candidates that can run here (``names`` default: ``FP32_CANDIDATES``,
    or ``BF16_CANDIDATES`` with ``autocast``); ``torch.compile`` is compiled here (its first step; the
    harness warms every candidate up before timing). With ``autocast`` (a dtype) every step but
    ``eager-fp32``'s runs its forward under ``torch.autocast`` to that dtype (fp32 parameters)."""
    if names is None:
        names = FP32_CANDIDATES if autocast is None else BF16_CANDIDATES
    hf_only = (EAGER, EAGER_FP32, COMPILE)
    names = [n for n in names if (n != COMPILE or use_compile) and (transformers or n not in hf_only)]
    inputs = make_inputs(cfg, batch, seq, device)
    out = {}
    for name in names:
        model = build_model(name, cfg, device)
        fn = model
        if name == COMPILE:
            torch._dynamo.reset()  # one compilation per case
            fn = torch.compile(model, dynamic=False)
        out[name] = Step(model, fn, inputs, autocast=None if name == EAGER_FP32 else autocast)
    if COMPILE in out:
        out[COMPILE]()
    return out


def step_peak_memory(step, device):
    """Peak bytes of one ``Step`` above its training state (parameters, gradients, AdamW state); see
    the module docstring."""
    step.optimizer.zero_grad(set_to_none=True)
    peak = harness.peak_memory(step, device)
    grads = {id(p): p.grad.nbytes for p in step.model.parameters() if p.grad is not None}
    return None if peak is None else peak - sum(grads.values())


def make_setup(cfg, batch, seq, device, use_compile, autocast=None):
    def setup():
        return make_candidates(cfg, batch, seq, device, use_compile and autocast is None, autocast=autocast)

    return setup


def case_dtypes(device="cpu", mode="quick", dtypes=None):
    """The dtypes of the cases with a bf16 autocast variant: those of ``float32`` and ``bfloat16`` in
    ``dtypes``; by default (``dtypes`` None) both, except in a ``--quick`` run on CPU: fp32 only there,
    since a bf16 step on a CPU without native bf16 (AVX2) takes several fp32 ones (it would take
    ``make bench`` past its 10 minutes). ``--dtype bf16`` (or ``--full``, or CUDA) runs them."""
    if dtypes is not None:
        return [d for d in ("float32", "bfloat16") if d in dtypes]
    return ["float32", "bfloat16"] if mode == "full" or device != "cpu" else ["float32"]


def step_cases(op, make_setup, mode="quick", dtypes=None, shapes=None, make_bf16_setup=None, device="cpu"):
    """Training-step cases of op ``op`` (shared with bench_patch): ``(batch, seq, hidden, layers)``
    shapes (others ignored), fp32; ``make_setup(cfg, batch, seq)`` returns a case's ``setup``. With
    ``make_bf16_setup`` (the same, for the bf16 autocast candidates) also a ``bfloat16`` case per
    shape, ``params["autocast"]`` ``bf16``, where :func:`case_dtypes` says."""
    kinds = []
    if dtypes is None or "float32" in dtypes:
        kinds.append(("float32", make_setup, {}))
    if make_bf16_setup is not None and "bfloat16" in case_dtypes(device, mode, dtypes):
        kinds.append(("bfloat16", make_bf16_setup, {"autocast": BF16}))
    if not kinds:
        return []
    if shapes is None:
        shapes = [
            (BATCH, SEQ, PRESETS[p]["hidden_size"], PRESETS[p]["num_hidden_layers"])
            for p in (FULL_PRESETS if mode == "full" else QUICK_PRESETS)
        ]
    out = []
    for shape in shapes:
        if len(shape) != 4 or shape[3] > 64:  # e.g. gather_mlm's (B, S, H, vocab) shapes
            continue
        b, s, h, layers = shape
        name, cfg = config_for(h, layers, s)
        params = {"preset": name, "state_bytes": state_bytes(cfg)}
        if name == "custom":
            params.update(heads=cfg.num_attention_heads, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size)
        for dtype, setup, extra in kinds:
            out.append(
                Case(
                    op,
                    tuple(shape),
                    dtype,
                    "step",
                    None,
                    setup(cfg, b, s),
                    params={**params, **extra},
                    peak_memory=step_peak_memory,
                )
            )
    return out


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    """The pretraining-step cases: ``(batch, seq, hidden, layers)`` shapes (others ignored), fp32
    and bf16 autocast (:func:`case_dtypes`)."""
    return step_cases(
        OP,
        lambda cfg, b, s: make_setup(cfg, b, s, device, use_compile),
        mode,
        dtypes,
        shapes,
        make_bf16_setup=lambda cfg, b, s: make_setup(cfg, b, s, device, False, torch.bfloat16),
        device=device,
    )


def case_candidates(case):
    """The candidate names of ``case`` (what pytest-benchmark names its tests after)."""
    return BF16_CANDIDATES if case.dtype == "bfloat16" else FP32_CANDIDATES


def autocast_summary(rows, op, fp32_name=EAGER_FP32):
    """Per bf16 autocast case of ``op`` in ``rows``: every candidate's speed-up (ratio of p50s)
    over ``eager`` under the same autocast and over ``eager-fp32`` (no autocast), one line each."""
    by_case = {}
    for r in rows:
        if r["op"] == op and "autocast=" in r["params"]:
            by_case.setdefault(tuple(r[k] for k in harness.KEY), {})[r["candidate"]] = r
    lines = []
    for (_, shape, dtype, pass_, _), c in by_case.items():
        parts = []
        for base, label in ((EAGER, "eager (same autocast)"), (fp32_name, "eager fp32 (no autocast)")):
            if base in c:
                ratios = [
                    f"{n} {harness.ratio(c[base]['p50_ms'], r['p50_ms']):.2f}x" for n, r in c.items() if n != base
                ]
                parts.append(f"x {label}: " + ", ".join(ratios))
        if parts:
            lines.append(f"{op} {shape} {pass_} {dtype} autocast: " + "; ".join(parts))
    return lines


def summary(rows):
    """Lines after the table: the bf16 step cases' speed-ups over eager bf16 and eager fp32."""
    return "\n".join(autocast_summary(rows, OP))


# ------------------------------------------------------------------------------------ matmul share


def matmul_share(step_fn, steps=2):
    """Fraction of a step's self CPU time spent in matrix multiplications (self time of
    ``MATMUL_OPS``; ``aten::matmul``/``aten::linear`` only dispatch to them), over ``steps`` calls
    under ``torch.profiler`` after one unprofiled warm-up call. Every call runs inside a
    ``record_function`` range, so the denominator (the sum of all self times) is the steps' whole
    time on the calling thread, Python overhead included; backward runs on that thread too on CPU.
    The profiler's per-op overhead counts as time outside the matmuls."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step_fn()
    with harness._QuietStderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("bench_bert.step"):
                step_fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return mm / total if total > 0 else math.nan


def share_report(preset="mini", batch=BATCH, seq=SEQ, seconds=10.0, steps=2, device="cpu"):
    """``[{candidate, p50_ms, tokens_per_s, matmul_share}]`` for fastbert, fastbert-unfused, eager."""
    cfg = BertConfig.from_preset(preset, max_position_embeddings=max(512, seq))
    cands = make_candidates(cfg, batch, seq, device, use_compile=False, names=(FASTBERT, UNFUSED, EAGER))
    budget = Budget(min_rounds=5, max_rounds=200, time_s=seconds, rel_ci=0.02, warmup_calls=1, warmup_s=0.0)
    samples = time_candidates(cands, budget, CpuTimer())
    rows = []
    for name, fn in cands.items():
        p50 = percentile(samples[name], 50)
        rows.append(
            dict(
                candidate=name,
                p50_ms=p50 * 1e3,
                p20_ms=percentile(samples[name], 20) * 1e3,
                p80_ms=percentile(samples[name], 80) * 1e3,
                n=len(samples[name]),
                tokens_per_s=batch * seq / p50,
                matmul_share=matmul_share(fn, steps),
            )
        )
    return rows


def format_share(rows, preset, batch, seq):
    head = [
        "candidate",
        "step p50 ms",
        "p20-p80 ms",
        "tokens/s",
        "matmul %",
        "outside matmul %",
        "outside matmul ms",
        "n",
    ]
    lines = [
        [
            r["candidate"],
            f"{r['p50_ms']:.1f}",
            f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{100 * r['matmul_share']:.1f}",
            f"{100 * (1 - r['matmul_share']):.1f}",
            f"{r['p50_ms'] * (1 - r['matmul_share']):.1f}",
            str(r["n"]),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = [
        f"BERT pretraining step (MLM + NSP, AdamW), preset {preset}, batch {batch}, seq {seq}, fp32, "
        f"{torch.get_num_threads()} threads"
    ]
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + lines]
    out.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fastbert.bench.bench_bert",
        description="Step time and the share of it outside matmuls "
        "(the timed cases run through `python -m fastbert.bench.run --ops bert`).",
    )
    p.add_argument(
        "--share",
        action="store_true",
        required=True,
        help="time fastbert, fastbert-unfused and eager and profile their matmul share",
    )
    p.add_argument("--preset", default="mini", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--seconds", type=float, default=10.0, help="timing cap (all candidates together)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per candidate")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if transformers is None:
        print("transformers is not installed: eager (Hugging Face) skipped", file=sys.stderr)
    rows = share_report(args.preset, args.batch, args.seq, args.seconds, args.steps)
    print(format_share(rows, args.preset, args.batch, args.seq))
    return 0


if __name__ == "__main__":
    sys.exit(main())
