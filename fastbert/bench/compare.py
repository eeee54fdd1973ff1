"""Compare two results files row by row: ``python -m fastbert.bench.compare NEW.json OLD.json
[--fail-if-regression PCT]`` (``python -m fastbert.bench.run --compare OLD.json`` does it after a run).

Rows are matched on the case (``harness.KEY``, with derived ``*_bytes`` params left out) and the
candidate. Per row: new/old ratio of the p50 and its noise, the relative half-width of the ratio's
95% CI, from the two rows' ``median_ci_rel`` in quadrature (a row without one, n < 6, counts its
whole (p80 - p20) / p50 spread instead). A row is ``slower`` when the ratio exceeds 1 + noise,
``faster`` when it is under 1 / (1 + noise), else ``within noise``. Rows flagged busy in either
file are marked and never count as regressions; rows in one file only are ``added`` / ``removed``.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from fastbert.bench.harness import KEY, SCHEMA

SLOWER, FASTER, SAME, ADDED, REMOVED, UNKNOWN = "slower", "faster", "within noise", "added", "removed", "n/a"


def load(path):
    """``(meta, rows)`` of a results file; exits with a message if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read results file {path}: {e}")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or "rows" not in doc:
        sys.exit(f"{path}: not a benchmarks results file of schema {SCHEMA}")
    return doc.get("meta", {}), doc["rows"]


def identity_params(params):
    """The params that identify a case: ``params`` without derived byte counts (``*_bytes=``)."""
    return ",".join(p for p in (params or "").split(",") if p and not p.split("=")[0].endswith("_bytes"))


def row_key(row):
    """(op, shape, dtype, pass, identity params, candidate): what matches rows across files."""
    return tuple(row.get(k) for k in KEY[:-1]) + (identity_params(row.get("params")), row.get("candidate"))


def _num(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def row_noise(row):
    """Relative half-width of the 95% CI of the row's median: ``median_ci_rel``, or the whole
    (p80 - p20) / p50 spread when it is missing; inf when neither is known."""
    ci = _num(row.get("median_ci_rel"))
    if ci is not None:
        return ci
    p20, p50, p80 = (_num(row.get(k)) for k in ("p20_ms", "p50_ms", "p80_ms"))
    return (p80 - p20) / p50 if None not in (p20, p50, p80) and p50 > 0 else math.inf


def compare(new_rows, old_rows):
    """One entry per row of either file (new file's order, then rows only in the old one):
    ``{key, new, old, ratio, noise, status, busy}``; ratio = new p50 / old p50."""
    old = {row_key(r): r for r in old_rows}
    new = {row_key(r): r for r in new_rows}
    out = []
    for key, n in new.items():
        o = old.get(key)
        e = {
            "key": key,
            "new": n,
            "old": o,
            "ratio": None,
            "noise": None,
            "busy": bool(n.get("busy") or (o or {}).get("busy")),
            "status": ADDED,
        }
        if o is not None:
            a, b = _num(n.get("p50_ms")), _num(o.get("p50_ms"))
            e["noise"] = math.hypot(row_noise(n), row_noise(o))
            if a is None or not b:
                e["status"] = UNKNOWN
            else:
                e["ratio"] = a / b
                e["status"] = (
                    SLOWER if e["ratio"] > 1 + e["noise"] else FASTER if e["ratio"] * (1 + e["noise"]) < 1 else SAME
                )
        out.append(e)
    out += [
        {"key": k, "new": None, "old": o, "ratio": None, "noise": None, "busy": bool(o.get("busy")), "status": REMOVED}
        for k, o in old.items()
        if k not in new
    ]
    return out


def regressions(entries, pct):
    """Entries slower beyond their noise and by more than ``pct`` percent, busy ones excepted."""
    return [e for e in entries if e["status"] == SLOWER and not e["busy"] and (e["ratio"] - 1) * 100 > pct]


def _pct(v):
    return "-" if v is None else "inf" if math.isinf(v) else f"{100 * v:+.1f}%"


def _ms(row):
    v = _num((row or {}).get("p50_ms"))
    return "-" if v is None else format(v, ".1f" if v >= 100 else "#.3g")


def describe(key):
    return " ".join(str(k) for k in key if k)


def format_comparison(entries):
    """Terminal table: per row old and new p50 (ms), new/old, change, noise (+-), verdict."""
    head = [
        "op",
        "shape",
        "dtype",
        "pass",
        "params",
        "candidate",
        "old p50",
        "new p50",
        "new/old",
        "change",
        "noise",
        "verdict",
    ]
    lines = [
        [str(k or "") for k in e["key"]]
        + [
            _ms(e["old"]),
            _ms(e["new"]),
            "-" if e["ratio"] is None else f"{e['ratio']:.3f}",
            "-" if e["ratio"] is None else _pct(e["ratio"] - 1),
            "-" if e["noise"] is None else "inf" if math.isinf(e["noise"]) else f"+-{100 * e['noise']:.1f}%",
            e["status"] + (" (busy)" if e["busy"] else ""),
        ]
        for e in entries
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))

    def count(s):
        return sum(e["status"] == s for e in entries)

    out.append(
        f"\n{len(entries)} rows: {count(FASTER)} faster, {count(SLOWER)} slower, {count(SAME)} "
        f"within noise, {count(ADDED)} added, {count(REMOVED)} removed, {count(UNKNOWN)} without "
        f"a p50; {sum(e['busy'] for e in entries)} busy (never counted as regressions)"
    )
    return "\n".join(out)


def _source(label, path, meta):
    return (
        f"{label}: {path} ({meta.get('host_kind')}, {meta.get('device_name')}; commit "
        f"{meta.get('git_commit')}, {meta.get('timestamp')})"
    )


def report(entries, fail_pct=None, out=print):
    """Print the comparison (and the regression verdict); return the exit status: 1 when
    ``fail_pct`` is set and some row regressed by more than it, else 0."""
    out(format_comparison(entries))
    if fail_pct is None:
        return 0
    bad = regressions(entries, fail_pct)
    if not bad:
        out(f"no regression: no row slower by more than {fail_pct:g}% beyond its noise")
        return 0
    out(f"REGRESSION: {len(bad)} row(s) slower by more than {fail_pct:g}% beyond noise:")
    for e in bad:
        out(
            f"  {describe(e['key'])}: {_ms(e['old'])} -> {_ms(e['new'])} ms ({_pct(e['ratio'] - 1)}, "
            f"noise +-{100 * e['noise']:.1f}%)"
        )
    return 1


def compare_files(new_path, old_path, fail_pct=None, out=print):
    """Compare two results files, print the result; the exit status (see :func:`report`)."""
    (new_meta, new_rows), (old_meta, old_rows) = load(new_path), load(old_path)
    out(_source("new", new_path, new_meta))
    out(_source("old", old_path, old_meta))
    if new_meta.get("host_kind") != old_meta.get("host_kind"):
        out("note: the files come from different kinds of machine")
    return report(compare(new_rows, old_rows), fail_pct, out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbert.bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("new", help="results JSON of the new run")
    p.add_argument("old", help="results JSON to compare against")
    p.add_argument(
        "--fail-if-regression",
        type=float,
        metavar="PCT",
        help="exit 1 when a row (not busy) is slower by more than PCT percent and beyond its noise",
    )
    args = p.parse_args(argv)
    return compare_files(args.new, args.old, args.fail_if_regression)


if __name__ == "__main__":
    sys.exit(main())
