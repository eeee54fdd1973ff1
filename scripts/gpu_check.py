"""The Python stages of scripts/gpu_check.sh (one GPU, no network).

``python scripts/gpu_check.py sanitize --backend cuda [triton]``
    Every op forward and backward once, on small odd shapes with dropout on, fp32 and fp16, on one
    backend: the short run that ``compute-sanitizer --tool memcheck|racecheck`` watches. Prints one
    ``ok`` line per op; a wrong result (vs the reference backend, same seeds) exits 1.
``python scripts/gpu_check.py bert-step --out FILE.json [--preset base] [--steps 10]``
    One BERT pretraining step (MLM + NSP, AdamW) eager, under ``torch.compile`` and under
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); per mode the median step time, the
    first steps' losses (dropout off: the modes must agree) and the reasons Inductor gave for not
    using CUDA graphs. Runs on CPU too (``--device cpu --preset tiny``: what CI can check).
``python scripts/gpu_check.py tests --shards 6 [PYTEST_ARGS...]``
    ``pytest -m gpu`` split round-robin by test id over parallel pytest processes (the Triton JIT
    compiles of each process run on their own cores); the shards' outputs one after another.
``python scripts/gpu_check.py summarize OUT [--bench FILE] [--bert FILE]``
    ``OUT/results.json`` from the stage lines of ``OUT/summary.txt`` and the stages' outputs.
"""

import argparse
import json
import logging
import os
import re
import signal
import statistics
import sys
import time

import torch

import fastbert
from fastbert import ops

OPS = (
    "bias_gelu",
    "layernorm_residual",
    "masked_softmax",
    "gather_masked",
    "linear_cross_entropy",
    "varlen_attention",
    "unpad",
)


def _op_cases(device, dtype):
    """``{op: fn()}``: each fn runs the op forward and backward and returns the tensors to compare."""

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    def grads(out, *inputs):
        g = torch.randn_like(out)
        return [out] + list(torch.autograd.grad(out, inputs, g))

    def bias_gelu():
        x, b = leaf(37, 200), leaf(200)
        return grads(ops.bias_gelu(x, b), x, b)

    def layernorm_residual():
        x, r, w, b = leaf(37, 200), leaf(37, 200), leaf(200), leaf(200)
        y = ops.layernorm_residual(x, r, w, b, eps=1e-12, dropout_p=0.1, training=True)
        return grads(y, x, r, w, b)

    def masked_softmax():
        s = leaf(3, 4, 37, 37)
        mask = torch.rand(3, 1, 1, 37, device=device) > 0.2
        return grads(ops.masked_softmax(s, mask, scale=0.125, dropout_p=0.1, training=True), s)

    def gather_masked():
        h = leaf(5 * 37, 200)
        labels = torch.where(
            torch.rand(5 * 37, device=device) < 0.15, torch.randint(0, 100, (5 * 37,), device=device), -100
        )
        rows, _, _ = ops.gather_masked(h, labels)
        return grads(rows, h)

    def linear_cross_entropy():
        r, w, b = leaf(67, 96), leaf(1000, 96, scale=0.1), leaf(1000)
        t = torch.randint(0, 1000, (67,), device=device)
        t[::7] = -100
        return grads(ops.linear_cross_entropy(r, w, t, b, chunk_size=32), r, w, b)

    def varlen_attention():
        lens = torch.tensor([37, 1, 64, 13], device=device)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        q, k, v = (leaf(int(lens.sum()), 4, 64) for _ in range(3))
        return grads(ops.varlen_attention(q, k, v, cu, 64, dropout_p=0.1), q, k, v)

    def unpad():
        mask = torch.rand(4, 37, device=device) > 0.3
        x = leaf(4, 37, 200)
        p = ops.packing(mask)
        return grads(ops.pad(ops.unpad(x, p) * 2, p), x)

    return {name: fn for name, fn in locals().items() if name in OPS}


def sanitize(backends, device="cuda"):
    """Run every op on each of ``backends`` and compare with the reference backend (same seeds)."""
    bad = 0
    for backend, dtype in ((b, d) for b in backends for d in (torch.float32, torch.float16)):
        cases = _op_cases(device, dtype)
        for name in OPS:
            results = {}
            for b in (backend, "reference"):
                torch.manual_seed(0)
                with fastbert.backend(b):
                    results[b] = [t.detach().double() for t in cases[name]()]
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            err = max(
                float(((a - r).abs() / (r.abs() + 1)).max()) if a.numel() else 0.0
                for a, r in zip(results[backend], results["reference"])
            )
            ok = err <= tol
            bad += not ok
            print(f"{'ok' if ok else 'MISMATCH'} {name} {backend} {str(dtype)[6:]}: max rel err {err:.2e}", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1 if bad else 0


class _CudagraphSkips(logging.Handler):
    """Collects Inductor's "skipping cudagraphs due to ..." messages."""

    def __init__(self):
        super().__init__()
        self.reasons = []

    def emit(self, record):
        msg = record.getMessage()
        if "skipping cudagraphs" in msg:
            self.reasons.append(msg)


def _batch(cfg, batch, seq, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[::2, seq - seq // 4 :] = 0  # every other sequence padded
    labels = torch.where((torch.rand(batch, seq, generator=g) < 0.15) & (mask > 0), ids, -100)
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    nsp = torch.randint(0, 2, (batch,), generator=g)
    return {
        k: v.to(device)
        for k, v in dict(
            input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp
        ).items()
    }


MODES = ("eager", "default", "reduce-overhead")


def bert_step(preset, device, batch, seq, steps, unpad, modes=MODES):
    """``{mode: {median_ms, p20_ms, p80_ms, losses, cudagraph_skips, error}}`` for eager, compile
    and reduce-overhead, each on its own model from the same initial weights."""
    from fastbert.models import PRESETS, BertConfig, BertForPreTraining

    torch.set_float32_matmul_precision("high")
    cfg = BertConfig(
        **{**PRESETS[preset], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "unpad": unpad}
    )
    data = _batch(cfg, batch, seq, device)
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    torch._logging.set_logs(cudagraphs=True)  # an artifact log, off by default
    handler = _CudagraphSkips()
    cudagraph_utils.cudagraphs_log.addHandler(handler)
    out = {}
    for mode in modes:
        torch.manual_seed(0)
        model = BertForPreTraining(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fwd = model if mode == "eager" else torch.compile(model, mode=mode)
        handler.reasons.clear()
        counters.clear()
        res = dict(losses=[], times_ms=[], error=None)
        try:
            for i in range(steps + 2):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = fwd(**data).loss
                loss.backward()
                opt.step()
                res["losses"].append(loss.item())  # also waits for the step
                if i >= 2:  # the first two steps compile / record the graphs
                    res["times_ms"].append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # report the failure and go on with the next mode
            res["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        t = sorted(res.pop("times_ms"))
        if t:
            q = statistics.quantiles(t, n=5) if len(t) > 1 else [t[0]] * 4
            res.update(median_ms=statistics.median(t), p20_ms=q[0], p80_ms=q[3])
        res["losses"] = res["losses"][:3]
        res["cudagraph_skips"] = sorted(set(handler.reasons))
        res["cudagraph_skip_count"] = int(counters["inductor"]["cudagraph_skips"])
        out[mode] = res
        print(f"{mode}: {json.dumps(res)}", flush=True)
        del model, opt, fwd
        torch._dynamo.reset()
    cudagraph_utils.cudagraphs_log.removeHandler(handler)
    return out


def run_tests(shards, extra):
    """``pytest -m gpu`` over ``shards`` parallel processes; 0 when every shard passed (or had none)."""
    import subprocess
    import tempfile

    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider"]
    listed = subprocess.run(base + [*extra, "--collect-only", "-q"], capture_output=True, text=True)
    ids = [ln for ln in listed.stdout.splitlines() if "::" in ln]
    print(f"{len(ids)} GPU tests in {shards} shards", flush=True)
    if not ids:
        print(listed.stdout[-3000:], listed.stderr[-3000:])
        return 0 if listed.returncode == 5 else 1
    procs = []
    for i in range(shards):
        if ids[i::shards]:
            log = tempfile.TemporaryFile("w+")
            procs.append(
                (subprocess.Popen(base + ["-q", "-rfEs", *ids[i::shards]], stdout=log, stderr=subprocess.STDOUT), log)
            )

    def stop(signum, frame):  # the stage's time limit: take the shards down too
        for proc, _ in procs:
            proc.kill()
        dump()
        sys.exit(124)

    def dump():
        for i, (proc, log) in enumerate(procs):
            log.seek(0)
            print(f"## shard {i}\n{log.read()}", flush=True)

    signal.signal(signal.SIGTERM, stop)
    rc = 0
    for proc, _ in procs:
        rc |= proc.wait() not in (0, 5)
    dump()
    return rc


def _count(pattern, text, default=None):
    m = re.search(pattern, text)
    return int(m.group(1)) if m else default


def summarize(out, bench=None, bert=None):
    """``OUT/results.json``: stages (name, seconds, exit status), test counts, sanitizer error counts,
    the benchmark rows and the BERT step. Exit 1 when a stage failed or a sanitizer found errors."""

    def read(path):
        return open(path, errors="replace").read() if path and os.path.exists(path) else ""

    summary = read(os.path.join(out, "summary.txt"))
    stages = [
        dict(name=m[0], seconds=int(m[1]), status=int(m[2]))
        for m in re.findall(r"^stage (\S+) (\d+) s exit (-?\d+)", summary, re.M)
    ]
    tests = read(os.path.join(out, "tests.log"))
    sanitizer = {}
    for tool, body in re.findall(
        r"^## compute-sanitizer --tool (\w+)\n(.*?)(?=^## |\Z)", read(os.path.join(out, "sanitizer.log")), re.M | re.S
    ):
        sanitizer[tool] = dict(
            errors=_count(r"ERROR SUMMARY: (\d+) error", body), mismatches=len(re.findall(r"^MISMATCH", body, re.M))
        )
    res = dict(
        versions=summary.split("== versions\n", 1)[-1].split("stage ", 1)[0].strip(),
        stages=stages,
        tests={
            k: sum(int(n) for n in re.findall(rf"(\d+) {k}", tests)) for k in ("passed", "failed", "skipped", "error")
        },
        sanitizer=sanitizer,
        bench=json.loads(read(bench)) if read(bench) else None,
        bert_step=json.loads(read(bert)) if read(bert) else None,
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    bad = any(s["status"] for s in stages) or any(v["errors"] or v["mismatches"] for v in sanitizer.values())
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sanitize")
    s.add_argument("--backend", nargs="+", choices=["cuda", "triton", "cpu"], required=True)
    s.add_argument("--device", default="cuda")
    b = sub.add_parser("bert-step")
    b.add_argument("--out", required=True)
    b.add_argument("--preset", default="base")
    b.add_argument("--device", default="cuda")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    b.add_argument(
        "--no-unpad",
        dest="unpad",
        action="store_false",
        help="padded execution (no data-dependent packing in the graph)",
    )
    t = sub.add_parser("tests")
    t.add_argument("--shards", type=int, default=6)
    m = sub.add_parser("summarize")
    m.add_argument("out")
    m.add_argument("--bench", help="the benchmark's results JSON")
    m.add_argument("--bert", help="bert-step's JSON")
    args, extra = p.parse_known_args(argv)
    if args.cmd == "tests":
        return run_tests(args.shards, extra)
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "sanitize":
        return sanitize(args.backend, args.device)
    if args.cmd == "bert-step":
        res = bert_step(args.preset, args.device, args.batch, args.seq, args.steps, args.unpad, args.modes)
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    preset=args.preset,
                    batch=args.batch,
                    seq=args.seq,
                    unpad=args.unpad,
                    device=torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                    modes=res,
                ),
                f,
                indent=1,
            )
        return 1 if any(r["error"] for r in res.values()) else 0
    return summarize(args.out, args.bench, args.bert)


if __name__ == "__main__":
    sys.exit(main())
