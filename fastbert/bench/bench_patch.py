"""One training step of ``transformers.BertForPreTraining``, unpatched vs ``fastbert.patch`` (``--ops patch``).

A case is op ``hf_patch_step``, shape ``(batch, seq, hidden, layers)``, pass ``step``: exactly
bench_bert's step (:class:`fastbert.bench.bench_bert.Step`): ``optimizer.zero_grad(set_to_none=True)``,
the forward with ``labels=`` (MLM, 15% of the attended tokens labelled, the rest -100) and
``next_sentence_label=``, ``loss.backward()``, ``optimizer.step()`` (``torch.optim.AdamW``, lr 1e-4,
its defaults otherwise), in training mode (dropout 0.1), on bench_bert's inputs
(:func:`fastbert.bench.bench_bert.make_inputs`: random token ids, token types 0/1 by half, every other
sequence's last 16 tokens padded). Candidates, each with its own model and optimizer, both built by
``bench_bert.build_model("eager", ...)``: ``transformers.BertForPreTraining`` with the
``transformers.BertConfig`` equivalent to the preset (``attn_implementation="eager"``), initialised
after ``torch.manual_seed(0)``, so both start from the same weights:

* ``eager``: that model as built;
* ``patched``: that model after ``fastbert.patch(model)`` (all defaults: fused bias+GELU in the
  intermediate layers, fused dropout+residual+LayerNorm in the output sub-layers, attention through
  fastbert's masked_softmax as attention implementation ``"fastbert"``, and the MLM loss through
  gather_masked + linear_cross_entropy on the labelled rows only). The patch is applied in ``setup``,
  outside the timed region.

The speed-up column ("x eager") is the ratio of the median step times. There is no
``torch.compile`` candidate (bench_bert times compiled transformers). No case at all when
``transformers`` is not installed. Quick mode runs the ``mini`` preset (L=4, H=256, A=4,
intermediate 1024, vocab 30522) at batch 8, sequence 128, fp32; ``--full`` adds ``base`` (L=12,
H=768, A=12, intermediate 3072), the shape of the target: patched >= 1.3x faster than eager and
<= 0.6x its activation memory. Other ``--shapes BxSxHxL`` as in bench_bert (:func:`config_for`);
fp32 only; GB/s is not reported (compute-bound).

**Peak memory** ("peak MB") is bench_bert's (:func:`fastbert.bench.bench_bert.step_peak_memory`): the
step's peak minus the parameters, gradients and AdamW state held between steps, i.e. activations
saved for backward plus autograd and optimizer temporaries (the gradients are freed before the
measured step and their bytes subtracted; CPU: torch's CPU allocator events from the profiler;
CUDA: max_memory_allocated). ``params["state_bytes"]`` is that state (4 x the parameter bytes).

``python -m fastbert.bench.bench_patch [--preset mini base]`` (not part of ``make bench``) prints what
``fastbert.patch`` replaced, the case table and, per shape, patched vs eager against the targets;
it writes no results files (``python -m fastbert.bench.run --ops patch`` does).
"""

import argparse
import dataclasses
import sys

import torch

from fastbert.bench import harness
from fastbert.bench.bench_bert import (
    BATCH,
    EAGER,
    PRESETS,
    SEQ,
    Step,
    build_model,
    make_inputs,
    step_cases,
    transformers,
)

OP = "hf_patch_step"
PATCHED = "patched"
CANDIDATES = (EAGER, PATCHED)
SPEEDUP_TARGET, MEMORY_TARGET = 1.3, 0.6  # on BERT-base: patched vs eager step time, activation memory


def build_patched(cfg, device="cpu"):
    """``(model, report)``: the eager candidate's model (same seed, same weights) after ``fastbert.patch``."""
    import fastbert

    model = build_model(EAGER, cfg, device)
    report = fastbert.patch(model)
    return model, report


def make_candidates(cfg, batch, seq, device="cpu", names=CANDIDATES):
    """``{name: Step}``; the patched Step carries the patch's report as ``patch_report``."""
    if transformers is None:
        raise RuntimeError("bench_patch needs transformers")
    inputs = make_inputs(cfg, batch, seq, device)
    out = {}
    for name in names:
        if name == EAGER:
            model = build_model(EAGER, cfg, device)
            out[name] = Step(model, model, inputs)
        elif name == PATCHED:
            model, report = build_patched(cfg, device)
            out[name] = Step(model, model, inputs)
            out[name].patch_report = report
        else:
            raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    return out


def cases(device="cpu", mode="quick", dtypes=None, shapes=None):
    """The unpatched-vs-patched step cases (bench_bert's shapes and presets); none without transformers."""
    if transformers is None:
        return []
    return step_cases(OP, lambda cfg, b, s: lambda: make_candidates(cfg, b, s, device), mode, dtypes, shapes)


# ------------------------------------------------------------------------------------ standalone


def verdict(rows):
    """One line per case: patched vs eager, speed-up (ratio of medians) and activation-memory ratio,
    against the targets (which the issue sets for BERT-base)."""
    by_case = {}
    for r in rows:
        by_case.setdefault(tuple(r[k] for k in harness.KEY), {})[r["candidate"]] = r
    lines = []
    for key, c in by_case.items():
        if EAGER not in c or PATCHED not in c:
            continue
        e, p = c[EAGER], c[PATCHED]
        speedup = harness.ratio(e["p50_ms"], p["p50_ms"])
        mem = harness.ratio(p["peak_mem_bytes"], e["peak_mem_bytes"])

        def ok(good):
            return "ok" if good else "MISSED"

        lines.append(
            f"{key[1]} ({key[4].split(',')[0]}): patched {p['p50_ms']:.1f} ms (p20-p80 {p['p20_ms']:.1f}-"
            f"{p['p80_ms']:.1f}) vs eager {e['p50_ms']:.1f} ms ({e['p20_ms']:.1f}-{e['p80_ms']:.1f}): "
            f"{speedup:.2f}x faster [base target >= {SPEEDUP_TARGET}x: {ok(speedup >= SPEEDUP_TARGET)}]; "
            + (
                "activation memory unknown"
                if mem is None
                else f"activation memory {p['peak_mem_bytes'] / 2**20:.1f} MB vs {e['peak_mem_bytes'] / 2**20:.1f} MB: "
                f"{mem:.2f}x [base target <= {MEMORY_TARGET}x: {ok(mem <= MEMORY_TARGET)}]"
            )
        )
    return "\n".join(lines)


def main(argv=None):
    from fastbert.bench import report

    p = argparse.ArgumentParser(
        prog="python -m fastbert.bench.bench_patch",
        description="transformers BertForPreTraining training step, eager vs "
        "fastbert.patch: time, activation memory, the targets.",
    )
    p.add_argument("--preset", nargs="+", default=["mini"], choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--seconds", type=float, default=harness.QUICK.time_s, help="timing cap per case")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if transformers is None:
        print("transformers is not installed: nothing to benchmark", file=sys.stderr)
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(args.batch, args.seq, PRESETS[n]["hidden_size"], PRESETS[n]["num_hidden_layers"]) for n in args.preset]
    meta = report.host_info(device)
    budget = dataclasses.replace(harness.QUICK, time_s=args.seconds)
    timer = harness.make_timer(device)
    rows = []
    for case in cases(device, shapes=shapes):
        built = {}

        def setup(setup=case.setup, built=built):
            built.update(setup())
            return built

        rows += harness.run_case(dataclasses.replace(case, setup=setup), meta, budget, timer)
        print(f"{case.shape} ({case.params['preset']}): {built[PATCHED].patch_report}", flush=True)
    print(
        f"{meta['device_name']}; torch {meta['torch']}, transformers {transformers.__version__}, "
        f"{meta['torch_threads']} threads"
    )
    print(report.format_table(rows))
    print(verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
