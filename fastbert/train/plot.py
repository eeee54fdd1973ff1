"""Loss curves: a PNG (matplotlib, no display needed) and a few text lines for the terminal."""

from pathlib import Path

from fastbert._optional import require


def smooth(values, window):
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_png(history, path, title="fastbert pretrain", held_out=()):
    """Plot ``loss``, ``mlm_loss`` and ``nsp_loss`` (raw and smoothed) against the step, with the
    learning rate on a second axis, and, given ``held_out`` rows (``step``, ``mlm_accuracy``,
    ``nsp_accuracy``: ``held_out.jsonl``), the held-out accuracies per checkpoint in a second panel;
    returns the path."""
    matplotlib = require("matplotlib", "train", "fastbert's loss-curve plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    window = max(1, len(history) // 25)
    if held_out:
        fig, (ax, acc) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        at = [r["step"] for r in held_out]
        for key, color in (("mlm_accuracy", "tab:blue"), ("nsp_accuracy", "tab:orange")):
            acc.plot(at, [r[key] for r in held_out], color=color, marker="o", label=f"held-out {key}")
        acc.set_xlabel("optimizer step (checkpoints)")
        acc.set_ylabel("accuracy")
        acc.set_ylim(0, 1)
        acc.grid(alpha=0.3)
        acc.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for key, color in (("loss", "black"), ("mlm_loss", "tab:blue"), ("nsp_loss", "tab:orange")):
        values = [h[key] for h in history if key in h]
        if len(values) != len(steps):
            continue
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color=color, label=f"{key} (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if all("lr" in h for h in history):
        lr = ax.twinx()
        lr.plot(steps, [h["lr"] for h in history], color="tab:green", linestyle=":", label="learning rate")
        lr.set_ylabel("learning rate")
        lr.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_table(history, rows=10, keys=("loss", "mlm_loss", "nsp_loss")):
    """The curve as text: ``rows`` evenly spaced steps, each the mean over its stretch of steps."""
    if not history:
        return "(no steps)"
    n = len(history)
    rows = min(rows, n)
    lines = ["   steps      " + "".join(f"{k:>10}" for k in keys) + "   tokens/s"]
    for r in range(rows):
        part = history[r * n // rows : (r + 1) * n // rows]
        means = [sum(h[k] for h in part) / len(part) for k in keys]
        tps = sum(h["tokens_per_s"] for h in part) / len(part) if "tokens_per_s" in part[0] else float("nan")
        lines.append(
            f"{part[0]['step']:>6}-{part[-1]['step']:<6} " + "".join(f"{m:>10.3f}" for m in means) + f"{tps:>11.0f}"
        )
    return "\n".join(lines)


def finetune_png(summary, path):
    """The fine-tuning comparison of ``fastbert finetune`` (its ``results.json`` as a dict): held-out
    accuracy after each epoch per arm (one thin line per seed, the mean bold), and the final accuracy
    per arm as mean ± std (point and whiskers on an axis fitted to the data) with each seed's point;
    returns the path."""
    matplotlib = require("matplotlib", "train", "fastbert's fine-tuning plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ("pretrained", "scratch") if a in summary]
    colors = {"pretrained": "tab:blue", "scratch": "tab:gray"}
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    for i, arm in enumerate(arms):
        rows = summary[arm]["seeds"]
        for r in rows:
            curve.plot(
                [e["step"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], color=colors[arm], alpha=0.3
            )
        longest = max(rows, key=lambda r: len(r["evals"]))
        means = [
            sum(r["evals"][k]["accuracy"] for r in rows if k < len(r["evals"])) / sum(k < len(r["evals"]) for r in rows)
            for k in range(len(longest["evals"]))
        ]
        curve.plot([e["step"] for e in longest["evals"]], means, color=colors[arm], marker="o", label=f"{arm} (mean)")
        std = summary[arm].get("accuracy_std") or 0.0
        # mean ± std as a point with whiskers, not a bar from 0: the axis fits the data, so close arms stay apart
        bars.errorbar(i, summary[arm]["accuracy"], yerr=std, fmt="o", ms=9, color=colors[arm], capsize=8)
        bars.scatter([i + 0.12] * len(rows), [r["accuracy"] for r in rows], color="black", s=12, zorder=3)
    curve.set_xlabel("fine-tuning step")
    curve.set_ylabel("held-out accuracy")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    bars.set_xticks(range(len(arms)), arms)
    bars.set_xlim(-0.6, len(arms) - 0.4)
    bars.margins(y=0.25)
    bars.set_ylabel("final held-out accuracy (mean ± std, seeds as dots)")
    bars.grid(alpha=0.3, axis="y")
    fraction = summary.get("train_fraction", 1.0)
    fig.suptitle(
        f"fastbert finetune, task {summary.get('task', 'novel')}: {len(summary['seeds'])} seed(s), "
        f"{fraction:.0%} of {summary['train']} labelled passages"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
