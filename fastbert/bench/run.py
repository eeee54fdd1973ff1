"""Run the op benchmarks: ``fastbert bench [--quick|--full] [--ops gelu] [--dtype ...] [--out DIR]``
(or ``python -m fastbert.bench.run``, the same flags).

Discovers the ``fastbert.bench.bench_<op>`` modules (each defines ``cases(device, mode, dtypes, shapes)``),
measures the machine's copy bandwidth once, runs every case (candidates interleaved; only those
named by ``--backends`` when given), prints the table and writes ``<out>/<host-kind>.json`` and
``.csv`` (the latest results) and their dated copies ``<out>/<host-kind>-<YYYY-MM-DD>.json`` and
``.csv``, and the plots ``<host-kind>-speedup.png`` and ``-bandwidth.png`` (``fastbert.bench.plots``).
``<out>`` is ``--out``, default ``./fastbert-bench-results`` in the current directory (a source
checkout's committed results: ``--out benchmarks/results``, as ``make bench`` does).
``--compare OLD.json`` then compares this run's rows with OLD's rows of the ops (dtypes, shapes,
backends) selected (``fastbert.bench.compare``); ``--fail-if-regression PCT`` makes a regression beyond
noise and PCT percent exit 1. tqdm, and matplotlib for the plots, come with ``pip install 'fastbert[bench]'``.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import time
from pathlib import Path

import fastbert.bench
from fastbert._optional import require
from fastbert.bench import compare, harness, report

OUT = "fastbert-bench-results"  # the default --out: relative, so under the current directory


def discover():
    """``{op: module}`` for every ``fastbert.bench.bench_<op>`` module."""
    return {
        m.name[len("bench_") :]: importlib.import_module(f"fastbert.bench.{m.name}")
        for m in pkgutil.iter_modules(fastbert.bench.__path__)
        if m.name.startswith("bench_")
    }


def _split(values):
    return [v for value in values or [] for v in value.split(",") if v]


def parse_args(argv=None):
    from fastbert.models.config import PRESETS

    p = argparse.ArgumentParser(prog="fastbert bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="default: the main shapes, adaptive repeats capped per case (< 10 min on 2 cores)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="more variants (e.g. tanh GELU), more repeats, tighter medians",
    )
    p.add_argument("--ops", nargs="+", help="ops to run (bench_<op>.py names), default all")
    p.add_argument("--dtype", nargs="+", help="float32, bfloat16, float16 (or fp32/bf16/fp16)")
    p.add_argument("--shapes", nargs="+", help="override the shapes, e.g. 4096x3072")
    p.add_argument(
        "--backends",
        nargs="+",
        metavar="NAME",
        help="candidates to time, e.g. eager fastbert-cpu (default all); without eager the x eager ratios are blank",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="model preset of the cases that take one (realistic: default base; tiny for a smoke test)",
    )
    p.add_argument(
        "--out", default=OUT, help=f"results directory (default ./{OUT}, in the current directory; created if missing)"
    )
    p.add_argument("--case-seconds", type=float, help="time cap per case (overrides the mode's)")
    p.add_argument("--copy-mib", type=int, default=256, help="buffer size of the copy-bandwidth probe")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU), default torch's")
    p.add_argument("--gpu-timer", default="events", choices=["events", "do_bench"])
    p.add_argument("--busy-threshold", type=float, help="other load (cores) that flags a row busy")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each case wait up to S seconds for a 1 s window without other load (default 0)",
    )
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="overwrite the results files instead of replacing only the cases that were run",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--compare", metavar="OLD.json", help="compare this run's rows with a results file")
    p.add_argument(
        "--fail-if-regression",
        type=float,
        metavar="PCT",
        help="with --compare: exit 1 when a row (not busy) is slower by more than PCT percent and beyond its noise",
    )
    p.set_defaults(mode="quick")
    args = p.parse_args(argv)
    if args.fail_if_regression is not None and not args.compare:
        p.error("--fail-if-regression needs --compare OLD.json")
    return args


def main(argv=None):
    """Run the benchmarks as ``argv`` says; the exit status. A missing optional dependency (tqdm;
    matplotlib unless ``--no-plots``) raises ``fastbert._optional.MissingExtra`` before anything runs."""
    args = parse_args(argv)
    tqdm = require("tqdm", "bench", "fastbert bench").tqdm
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:  # fail now, not after the run
        require("matplotlib", "bench", "fastbert bench's plots (or run with --no-plots)")
    wall0 = time.perf_counter()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = discover()
    ops = _split(args.ops) or sorted(modules)
    unknown = sorted(set(ops) - set(modules))
    if unknown:
        sys.exit(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(sorted(modules))}")
    backends = _split(args.backends) or None
    known = harness.known_candidates(modules.values())
    if set(backends or ()) - set(known):
        sys.exit(
            f"unknown backend(s) {', '.join(sorted(set(backends) - set(known)))}; known candidates: {', '.join(known)}"
        )
    dtypes = [harness.dtype_name(d) for d in _split(args.dtype)] or None
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in _split(args.shapes)] or None
    old = compare.load(args.compare)[1] if args.compare else None  # before the run overwrites it
    budget = harness.FULL if args.mode == "full" else harness.QUICK
    if args.case_seconds is not None:
        budget = dataclasses.replace(budget, time_s=args.case_seconds)

    meta = report.host_info(device)
    timer = harness.make_timer(device, args.gpu_timer)

    def quiet():
        return args.wait_quiet > 0 and harness.wait_quiet(args.wait_quiet, meta["ncores"], args.busy_threshold)

    quiet()
    copy = harness.measure_copy_bandwidth(device, args.copy_mib, timer=timer)
    copy["copy_busy"] = harness.is_busy(copy, meta["ncores"], args.busy_threshold)
    meta.update(mode=args.mode, budget=dataclasses.asdict(budget), wait_quiet=args.wait_quiet, **copy)
    print(
        f"{meta['host_kind']}: {meta['device_name']}; torch {meta['torch']}, "
        f"{meta['torch_threads']} threads; copy bandwidth {copy['copy_gbps']:.1f} GB/s "
        f"(other load {report.fmt(copy['other_load_cores'], '.2f')} cores, "
        f"loadavg {copy['loadavg_1m']:.2f}{', BUSY' if copy['copy_busy'] else ''})",
        flush=True,
    )

    cases = []
    for op in ops:
        kw = dict(device=device, mode=args.mode, dtypes=dtypes, shapes=shapes)
        if args.preset and "preset" in inspect.signature(modules[op].cases).parameters:
            kw["preset"] = args.preset
        if (
            backends
            and harness.COMPILE not in backends
            and "use_compile" in inspect.signature(modules[op].cases).parameters
        ):
            kw["use_compile"] = False  # no compilation for a candidate that is not timed
        cases += modules[op].cases(**kw)
    rows = []
    with tqdm(cases, unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_postfix_str(" ".join(case.key()).strip())
            quiet()
            rows += harness.run_case(
                case, meta, budget, timer, copy["copy_gbps"], args.busy_threshold, backends=backends
            )
    wall = time.perf_counter() - wall0
    absent = [b for b in backends or () if not any(r["candidate"] == b for r in rows)]
    if absent:
        print(f"no case has the candidate(s) {', '.join(absent)} here", file=sys.stderr)
    if not rows:
        print(f"\n{len(cases)} cases, no rows; nothing written")
        return 0
    print(report.format_table(rows))
    for op in ops:  # what a bench module adds below the table (e.g. realistic: the padding overhead)
        text = getattr(modules[op], "summary", lambda rows: "")(rows)
        if text:
            print(text)
    json_path, csv_path = report.write_results(
        rows, meta, args.out, merge=not args.no_merge, by_candidate=backends is not None
    )
    dated = Path(args.out) / report.results_names(meta)[1]
    busy = sum(1 for r in rows if r["busy"])
    loads = [r["other_load_cores"] for r in rows if r["other_load_cores"] is not None]
    print(
        f"\n{len(cases)} cases, {len(rows)} rows in {wall:.0f} s; other load seen "
        f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f} cores, "
        f"{busy} rows flagged busy (*); wrote {json_path} and {csv_path}, and the dated "
        f"copies {dated}.json and .csv"
    )
    print(
        f"wrote {report.write_markdown(json_path)} (python -m fastbert.bench.report {json_path} --readme README.md "
        "puts it in the README)"
    )
    if not args.no_plots:
        try:
            from fastbert.bench import plots  # imports matplotlib only to draw

            print("wrote " + (" and ".join(map(str, plots.write_plots(json_path))) or "no plot: nothing to plot"))
        except Exception as e:  # the results are written; a plot must not fail the run
            print(f"plots not written: {type(e).__name__}: {e}", file=sys.stderr)
    if old is None:
        return 0

    def keep(r):
        return (
            r.get("op") in ops
            and (dtypes is None or r.get("dtype") in dtypes)
            and (shapes is None or r.get("shape") in {harness.shape_str(s) for s in shapes})
            and (backends is None or r.get("candidate") in backends)
        )

    print(
        f"\ncompared with {args.compare} as it was before this run (its rows of the ops, dtypes, shapes"
        f"{', backends' if backends else ''} run):"
    )
    return compare.report(compare.compare(rows, [r for r in old if keep(r)]), args.fail_if_regression)


if __name__ == "__main__":
    sys.exit(main())
