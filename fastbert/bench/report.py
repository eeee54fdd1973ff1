"""Results of a run: host facts, the terminal table, ``<host-kind>.json`` and ``.csv`` (the latest
results of the machine) with their dated copies ``<host-kind>-<YYYY-MM-DD>.json`` and ``.csv`` (that
day's results), and the Markdown summary ``<host-kind>.md`` (``python -m fastbert.bench.report
RESULTS.json [candidate]``).

Every row is flat and self-contained (``harness.FIELDS``: the case key, the statistics, the load
seen, the device and versions, a timestamp), so files from different runs can be compared row by
row on ``harness.KEY`` + ``candidate``.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastbert.bench.harness import FIELDS, KEY, SCHEMA
from fastbert.info import cpu_model


def _slug(text):
    text = re.sub(r"\((r|tm)\)|\bcpu @.*|\bprocessor\b|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_commit():
    """Short commit of the source checkout fastbert runs from, ``+dirty`` if tracked code (not
    ``benchmarks/results``) has changes; None for an installed wheel (fastbert's parent folder is
    not the top of a git checkout) or without git."""
    root = Path(__file__).resolve().parent.parent.parent  # <checkout>/fastbert/bench/report.py

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:  # e.g. site-packages inside some other repository
            return None
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def host_info(device):
    """Run-level facts stored in every row; ``host_kind`` names the results files."""
    ncores = os.cpu_count() or 1
    if device == "cuda":
        name = torch.cuda.get_device_name()
        kind = "cuda-" + _slug(name.replace("NVIDIA", ""))
    else:
        name = f"{cpu_model()} ({ncores} cores, {torch.backends.cpu.get_cpu_capability()})"
        kind = f"cpu-{_slug(cpu_model())}-{ncores}c"
    from importlib import metadata

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    try:
        import fastbert

        fb = fastbert.__version__
    except Exception:
        fb = None
    return {
        "device": device,
        "device_name": name,
        "host_kind": kind,
        "ncores": ncores,
        "torch": torch.__version__,
        "triton": triton,
        "fastbert": fb,
        "git_commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_date(meta):
    """``YYYY-MM-DD`` (UTC) of the run: the date of ``meta["timestamp"]``, else today's."""
    stamp = meta.get("timestamp") or datetime.now(timezone.utc).isoformat()
    return stamp[:10]


def results_names(meta):
    """Stems of a run's results files: the latest ``<host_kind>`` and the dated ``<host_kind>-<date>``."""
    return meta["host_kind"], f"{meta['host_kind']}-{run_date(meta)}"


def write_results(rows, meta, out_dir, merge=True, by_candidate=False):
    """Write ``<host_kind>.json`` and ``.csv`` (the latest results) and the dated copies
    ``<host_kind>-<YYYY-MM-DD>.json`` and ``.csv`` (the run's date, UTC). With ``merge``, each file
    keeps the rows of its old version that this run did not measure: the cases not run, or with
    ``by_candidate`` (a run of some candidates only) the case x candidate rows not run. Returns the
    paths of the latest ``.json`` and ``.csv``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: _finite(r.get(k)) for k in FIELDS} for r in rows]
    paths = [_write(out_dir / f"{name}.json", rows, meta, merge, by_candidate) for name in results_names(meta)]
    return paths[0]


def _write(path, rows, meta, merge, by_candidate):
    fields = KEY + ("candidate",) if by_candidate else KEY

    def key(r):
        return tuple(r.get(k) for k in fields)

    if merge and path.exists():
        old = json.loads(path.read_text())
        if old.get("schema") == SCHEMA:
            new = {key(r) for r in rows}
            rows = [r for r in old["rows"] if key(r) not in new] + rows
    head = {"schema": SCHEMA, "host_kind": meta["host_kind"], "meta": meta, "fields": FIELDS}

    def dump(v, **kw):
        return json.dumps(v, default=str, allow_nan=False, **kw)

    # one row a line: small diffs between runs, and a file a person can read
    text = dump(head, indent=1)[:-2] + ',\n "rows": [\n' + ",\n".join("  " + dump(r) for r in rows) + "\n ]\n}\n"
    path.write_text(text)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: _csv_value(r.get(k)) for k in FIELDS} for r in rows)
    return path, path.with_suffix(".csv")


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.6g}")
    return "" if v is None else v


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_table(rows):
    """Terminal table, one line per case x candidate; '*' marks rows measured on a busy machine."""
    head = [
        "op",
        "shape",
        "dtype",
        "pass",
        "params",
        "candidate",
        "p50 ms",
        "p20-p80 ms",
        "GB/s",
        "copy%",
        "x eager",
        "x compile",
        "peak MB",
        "other",
        "n",
    ]
    lines, last = [], None
    for r in rows:
        key = tuple(r.get(k) for k in KEY)
        case = ["", "", "", "", ""] if key == last else [str(r.get(k) or "") for k in KEY]
        last = key
        lines.append(
            case
            + [
                r["candidate"],
                fmt(r["p50_ms"], ".3f"),
                f"{fmt(r['p20_ms'], '.3f')}-{fmt(r['p80_ms'], '.3f')}",
                fmt(r["gbps"], ".1f"),
                fmt(r["frac_copy_bw"] and 100 * r["frac_copy_bw"], ".0f"),
                fmt(r["speedup_vs_eager"], ".2f"),
                fmt(r["speedup_vs_compile"], ".2f"),
                fmt(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".1f"),
                fmt(r["other_load_cores"], ".2f") + ("*" if r["busy"] else ""),
                str(r["n"]),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def fmt_ms(v):
    """Milliseconds to three significant digits (one decimal from 100 ms)."""
    return "-" if v is None else format(v, ".1f" if v >= 100 else ".3g")


def markdown_table(rows, fused="fastbert-cpu"):
    """A Markdown table of one results file's rows: per case, eager and torch.compile p50, the
    fastbert candidate's p50 (p20-p80), its speed-ups, fraction of the copy bandwidth, and the peak
    memory of eager and fastbert (MB above the pre-call level). ``fused``: the fastbert candidate's
    name, or names tried in order per case (cases with none of them are left out)."""
    names = (fused,) if isinstance(fused, str) else tuple(fused)
    cases = {}
    for r in rows:
        cases.setdefault(tuple(r[k] for k in KEY), {})[r["candidate"]] = r
    out = [
        "| op | shape | dtype | pass | params | eager | torch.compile | fastbert | x eager | x compile | % copy bw "
        "| peak MB eager / fastbert |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (op, shape, dtype, pass_, params), c in cases.items():
        fused = next((n for n in names if n in c), None)
        if fused is None:
            continue
        f = c[fused]

        def p50(name):
            return fmt_ms(c[name]["p50_ms"]) if name in c else "-"

        def mb(name):
            return fmt(c[name]["peak_mem_bytes"] and c[name]["peak_mem_bytes"] / 2**20, ".1f") if name in c else "-"

        out.append(
            f"| {op} | {shape} | {dtype} | {pass_} | {params or '-'} | {p50('eager')} | "
            f"{p50('torch.compile')} | {fmt_ms(f['p50_ms'])} ({fmt_ms(f['p20_ms'])}-{fmt_ms(f['p80_ms'])}) | "
            f"{fmt(f['speedup_vs_eager'], '.2f')} | {fmt(f['speedup_vs_compile'], '.2f')} | "
            f"{fmt(100 * f['frac_copy_bw'] if f['frac_copy_bw'] else None, '.0f')} | "
            f"{mb('eager')} / {mb(fused)} |"
        )
    return "\n".join(out)


def markdown_summary(doc, name="results", fused=None):
    """Markdown for a results file ``doc`` (named ``name``): the machine, dates, commits, versions,
    copy bandwidth and load seen, then :func:`markdown_table` (``fused`` default: the candidate
    ``fastbert-<device>``, else ``fastbert``)."""
    meta, rows = doc.get("meta", {}), doc["rows"]
    fused = fused or (f"fastbert-{meta.get('device', 'cpu')}", "fastbert", "patched")

    def seen(k):
        return ", ".join(sorted({str(r[k]) for r in rows if r.get(k) is not None}) or [str(meta.get(k, "-"))])

    dates = sorted({r["timestamp"][:10] for r in rows if r.get("timestamp")})
    loads = [r["other_load_cores"] for r in rows if r.get("other_load_cores") is not None]
    copy = sorted({f"{r['copy_gbps']:.1f}" for r in rows if r.get("copy_gbps")}, key=float) or ["-"]
    return "\n".join(
        [
            f"# Benchmarks: {meta.get('device_name') or meta.get('host_kind')}",
            "",
            f"`{name}` (`{meta.get('host_kind')}`): {len(rows)} rows, measured "
            f"{' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else '-'}, commit {seen('git_commit')}; "
            f"torch {seen('torch')}, triton {seen('triton')}, fastbert {seen('fastbert')}; "
            f"{seen('torch_threads')} threads; measured copy bandwidth {'-'.join(dict.fromkeys([copy[0], copy[-1]]))} "
            f"GB/s; mode {meta.get('mode', '-')} (latest run); other load during the runs <= "
            f"{fmt(max(loads, default=None), '.2f')} cores, {sum(bool(r.get('busy')) for r in rows)} rows flagged "
            "busy.",
            "",
            f"p50 in ms (p20-p80 for fastbert: `{'`, else `'.join((fused,) if isinstance(fused, str) else fused)}`); "
            f"regenerate with `python -m fastbert.bench.report {name}`.",
            "",
            markdown_table(rows, fused),
            "",
        ]
    )


def write_markdown(results_path, fused=None):
    """Write ``<results-stem>.md`` (:func:`markdown_summary`) next to a results file; its path."""
    path = Path(results_path)
    out = path.with_suffix(".md")
    out.write_text(markdown_summary(json.loads(path.read_text()), path.as_posix(), fused))
    return out


BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def update_readme(readme, summary):
    """Replace the text between the ``BEGIN`` / ``END`` markers of ``readme`` with ``summary``
    (its ``#`` title line dropped); ``ValueError`` when the markers are missing."""
    path = Path(readme)
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{path}: needs one {BEGIN} ... {END} block")
    body = "\n".join(summary.splitlines()[1:]).strip()
    head, rest = text.split(BEGIN)
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")
    return path


if __name__ == "__main__":  # python -m fastbert.bench.report results/<host>.json [--candidate C] [--readme README.md]
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fastbert.bench.report", description="Markdown summary of a results file"
    )
    p.add_argument("results")
    p.add_argument("--candidate", help="the fastbert candidate of the table (default fastbert-<device>, else fastbert)")
    p.add_argument("--readme", help="also put the summary between the benchmark markers of this README")
    args = p.parse_args()
    md = write_markdown(args.results, args.candidate)
    print(md.read_text(), end="")
    print(f"wrote {md}", file=sys.stderr)
    if args.readme:
        print(f"updated {update_readme(args.readme, md.read_text())}", file=sys.stderr)
