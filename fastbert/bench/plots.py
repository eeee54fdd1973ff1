"""PNG plots of a results file: ``python -m fastbert.bench.plots RESULTS.json [...]`` (``run.py`` makes
them after every run), written next to it:

* ``<stem>-speedup.png``: per op, grouped bars per case of every candidate other than eager and
  torch.compile: its speed-up over each of the two (ratio of p50s), log scale, 1.0 marked;
* ``<stem>-bandwidth.png``: per op with a byte count (the memory-bound kind), every candidate's
  achieved GB/s per case, labelled with its % of the roof, and the roof: the copy bandwidth
  measured in the run that produced the row (``copy_gbps``).

Small ops share a row of panels. Drawn with matplotlib's Agg renderer (no pyplot, no display);
matplotlib (``pip install 'fastbert[bench]'``) is imported only when a plot is drawn.
"""

import json
import sys
from pathlib import Path

from fastbert._optional import require
from fastbert.bench.compare import identity_params
from fastbert.bench.harness import COMPILE, EAGER

BASES = ((EAGER, "speedup_vs_eager"), (COMPILE, "speedup_vs_compile"))
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def cases_by_op(rows):
    """``{op: {(shape, dtype, pass, params): {candidate: row}}}``, in file order."""
    out = {}
    for r in rows:
        key = (r["shape"], r["dtype"], r["pass"], identity_params(r.get("params")))
        out.setdefault(r["op"], {}).setdefault(key, {})[r["candidate"]] = r
    return out


def case_label(key, rows):
    shape, dtype, pass_, params = key
    busy = "*" if any(r.get("busy") for r in rows.values()) else ""
    if len(params or "") > 30:  # long params (e.g. bench_realistic's): one k=v a line
        params = params.replace(",", "\n")
    return f"{shape}{busy}\n{SHORT.get(dtype, dtype)} {pass_}" + (f"\n{params}" if params else "")


def machine_line(meta, rows):
    dates = sorted({r["timestamp"][:10] for r in rows if r.get("timestamp")})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "?"
    return (
        f"{meta.get('device_name') or meta.get('host_kind')}\n{meta.get('host_kind')}: torch "
        f"{meta.get('torch')}, {meta.get('torch_threads')} threads, measured {when}"
    )


def _pack(panels):
    """Rows of panels, each panel in the first row with room: at most max(widest panel, 8) cases
    (and 0.8 a panel for its axis) to a row."""
    cap = max([8] + [len(cases) for _, cases, _ in panels])
    rows = []
    for p in panels:
        row = next((r for r in rows if sum(len(q[1]) + 0.8 for q in r) + len(p[1]) <= cap + 0.8), None)
        if row is None:
            rows.append(row := [])
        row.append(p)
    return rows, cap


def draw(panels, title, ylabel, path, log=False, roof=False):
    """``panels``: ``[(op, cases, series)]``, series ``[(label, get)]`` with ``get(case rows)`` ->
    ``(value, text)`` or None. Bars per case and series, a row of panels per packed group."""
    Figure = require("matplotlib.figure", "bench", "fastbert bench's plots").Figure
    ticker = require("matplotlib.ticker", "bench", "fastbert bench's plots")
    rows, cap = _pack(panels)
    labels = list(dict.fromkeys(label for _, _, series in panels for label, _ in series))
    color = {label: COLORS[i % len(COLORS)] for i, label in enumerate(labels)}
    longest = max(
        len(line) for _, cases, _ in panels for k, v in cases.items() for line in case_label(k, v).split("\n")
    )
    slot = max(1.0, 0.065 * longest + 0.15)  # inches a case needs for its 7-pt tick label
    head = 1.0 + 0.22 * (len(labels) // 5)
    fig = Figure(figsize=(min(1.5 + slot * cap, 30), head + 3.6 * len(rows)), layout="constrained")
    top_fig, *subs = fig.subfigures(len(rows) + 1, 1, height_ratios=[head] + [3.6] * len(rows))
    handles, roofs = {}, set()
    for sub, row in zip(subs, rows):
        ratios = [len(p[1]) + 0.8 for p in row]
        ratios += [cap + 0.8 - sum(ratios)] if cap + 0.8 - sum(ratios) > 0.01 else []
        axes = sub.subplots(1, len(ratios), squeeze=False, width_ratios=ratios)[0]
        for ax in axes[len(row) :]:
            ax.axis("off")
        for ax, (op, cases, series) in zip(axes, row):
            width, top = 0.8 / len(series), 0
            for i, (label, get) in enumerate(series):
                got = [
                    (j + (i - (len(series) - 1) / 2) * width, *v)
                    for j, rows_ in enumerate(cases.values())
                    if (v := get(rows_)) is not None and v[0] is not None
                ]
                if got:
                    xs, ys, texts = zip(*got)
                    bars = ax.bar(xs, ys, width * 0.95, color=color[label], label=label)
                    ax.bar_label(
                        bars,
                        texts,
                        rotation=90,
                        fontsize=6.5,
                        padding=2,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5},
                    )
                    handles[label], top = bars, max(top, *ys)
            if roof:
                for j, rows_ in enumerate(cases.values()):
                    gb = next((r["copy_gbps"] for r in rows_.values() if r.get("copy_gbps")), None)
                    if gb:
                        handles["copy roof"] = ax.hlines(gb, j - 0.45, j + 0.45, color="black", lw=2)
                        top = max(top, gb)
                        roofs.add(gb)
            if log:
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_locator(ticker.LogLocator(base=2))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
                handles["1.0 (as fast)"] = ax.axhline(1.0, color="black", lw=1, ls="--")
                ax.set_ylim(min(0.5, ax.get_ylim()[0]), max(2.0, top) * 1.8)
            else:
                ax.set_ylim(0, top * 1.3)
            ax.set_xticks(range(len(cases)), [case_label(k, v) for k, v in cases.items()], fontsize=7)
            ax.set_xlim(-0.6, len(cases) - 0.4)
            ax.set_title(op, fontsize=10, loc="left", fontweight="bold")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
    top_fig.suptitle(title, fontsize=11)
    if "copy roof" in handles:  # the copy bandwidth measured in the rows' runs
        lo, hi = min(roofs), max(roofs)
        handles[f"copy roof {lo:.1f}" + (f"-{hi:.1f}" if hi > lo * 1.005 else "") + " GB/s"] = handles.pop("copy roof")
    handles = dict(sorted(handles.items(), key=lambda kv: kv[0].startswith(("1.0", "copy roof"))))
    top_fig.legend(
        list(handles.values()), list(handles), loc="lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False
    )
    fig.savefig(path, dpi=100)
    return path


def speedup_panels(rows):
    panels = []
    for op, cases in cases_by_op(rows).items():
        cands = [c for c in dict.fromkeys(c for rs in cases.values() for c in rs) if c not in (EAGER, COMPILE)]
        series = [
            (f"{c} vs {base}", lambda rs, c=c, col=col: _speedup(rs.get(c), col))
            for c in cands
            for base, col in BASES
            if any((rs.get(c) or {}).get(col) for rs in cases.values())
        ]
        if series:
            panels.append((op, cases, series))
    return panels


def _speedup(row, col):
    return None if row is None or row.get(col) is None else (row[col], f"{row[col]:.2f}")


def bandwidth_panels(rows):
    panels = []
    for op, cases in cases_by_op(rows).items():
        cases = {k: rs for k, rs in cases.items() if any(r.get("gbps") for r in rs.values())}
        cands = list(dict.fromkeys(c for rs in cases.values() for c in rs))
        if cases:
            panels.append((op, cases, [(c, lambda rs, c=c: _gbps(rs.get(c))) for c in cands]))
    return panels


def _gbps(row):
    if row is None or not row.get("gbps"):
        return None
    return row["gbps"], f"{100 * row['gbps'] / row['copy_gbps']:.0f}%" if row.get("copy_gbps") else ""


def write_plots(results_path):
    """Write ``<stem>-speedup.png`` and ``<stem>-bandwidth.png`` next to a results file; returns
    the paths written (a plot with nothing to show is skipped; '*' marks a case with a busy row)."""
    path = Path(results_path)
    doc = json.loads(path.read_text())
    meta, rows = doc.get("meta", {}), doc["rows"]
    out = []
    if panels := speedup_panels(rows):
        out.append(
            draw(
                panels,
                f"Speed-up (ratio of p50 times) on {machine_line(meta, rows)}",
                "speed-up",
                path.with_name(f"{path.stem}-speedup.png"),
                log=True,
            )
        )
    if panels := bandwidth_panels(rows):
        out.append(
            draw(
                panels,
                f"Achieved bandwidth vs the measured copy bandwidth on {machine_line(meta, rows)}",
                "GB/s",
                path.with_name(f"{path.stem}-bandwidth.png"),
                roof=True,
            )
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m fastbert.bench.plots RESULTS.json [...]")
    for arg in sys.argv[1:]:
        for p in write_plots(arg):
            print(f"wrote {p}")
