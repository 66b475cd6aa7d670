"""What a user looks at: training-curve, guard-signal and eval plots (PNG) and a before/after table
(markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsc.config import GuardConfig

TRAINING_PANELS = (
    ("loss", "loss"),
    ("weights/mean", "p_old(y) mean"),
    ("confidence/token_prob", "token confidence"),
    ("entropy", "token entropy"),
    ("completions/mean_length", "completion length"),
    ("answers/distinct", "distinct answers / question"),
    ("agreement/majority", "majority agreement"),
    ("grad_norm", "grad norm (pre-clip)"),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_png: str | Path) -> Path:
    """Lay out, write the PNG (making its folder) and free the figure."""
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path:
    """One small panel per per-step metric, against the step."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, (key, title) in zip(axes.flat, TRAINING_PANELS):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("RLSC training (label-free signals)")
    return _save(plt, fig, out_png)


def plot_probe(probe_path: str | Path, out_png: str | Path, title: str = "held-out probe") -> Path:
    """Greedy accuracy on the probe problems against optimizer steps done, with its 95% interval."""
    plt = _pyplot()
    rows = [json.loads(line) for line in Path(probe_path).read_text().splitlines() if line.strip()]
    steps = [r["steps_done"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [100 * r["accuracy"] for r in rows], marker="o")
    ax.fill_between(steps, [100 * r["ci_low"] for r in rows], [100 * r["ci_high"] for r in rows], alpha=0.2)
    ax.set_xlabel("optimizer steps done")
    ax.set_ylabel(f"greedy pass@1 % (n = {rows[0]['n']})")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out_png)


ACTION_COLOURS = {"warn": "tab:orange", "stop": "tab:red", "rollback": "tab:purple"}


def plot_guard(metrics_path: str | Path, out_png: str | Path, guard: GuardConfig) -> Path:
    """The collapse guard's signals per step, each rule's threshold as a dashed line (coloured by its
    action), and the step where a stop or rollback fired as a vertical line: the onset at a glance."""
    from rlsc.config import GUARD_SIGNALS

    plt = _pyplot()
    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fired = [r for r in rows if "guard/fired" in r]
    fig, axes = plt.subplots(3, 3, figsize=(14, 10))
    for ax, name in zip(axes.flat, GUARD_SIGNALS):
        ax.plot(steps, [r.get(f"guard/{name}", float("nan")) for r in rows], marker="o", markersize=3)
        rule = guard.rules.get(name)
        if rule is not None and rule.action != "off":
            ax.axhline(rule.threshold, linestyle="--", color=ACTION_COLOURS[rule.action],
                       label=f"{rule.action} if {rule.direction} {rule.threshold:g}")
            ax.legend(fontsize=8)
        for r in fired:
            ax.axvline(r["step"], color="grey", alpha=0.5)
        ax.set_title(name + (" (fired)" if any(r["guard/fired"] == name for r in fired) else ""))
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.suptitle("Collapse guard signals (label-free)")
    return _save(plt, fig, out_png)


def plot_eval(before: dict, after: dict, out_png: str | Path) -> Path:
    """Accuracy before and after training, with 95% intervals as error bars."""
    plt = _pyplot()
    keys = [k for k in before if isinstance(before[k], dict) and "ci_low" in before[k] and k in after]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 4))
    width = 0.38
    for offset, (label, m) in zip((-width / 2, width / 2), (("base", before), ("trained", after))):
        values = [m[k]["value"] for k in keys]
        errors = [[v - m[k]["ci_low"] for k, v in zip(keys, values)], [m[k]["ci_high"] - v for k, v in zip(keys, values)]]
        ax.bar([i + offset for i in range(len(keys))], values, width, yerr=errors, capsize=4, label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"accuracy (n = {before.get('n')})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _fmt_acc(m: dict) -> str:
    return f"{100 * m['value']:.1f}% [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def before_after_table(before: dict, after: dict, paired: dict | None) -> str:
    """Markdown table: accuracies with intervals, the paired difference, confidence and length."""
    lines = ["| metric | base | trained |", "|---|---|---|"]
    for key, value in before.items():
        if isinstance(value, dict) and "ci_low" in value and key in after:
            c_b, c_a = value.get("correct"), after[key].get("correct")
            counts = f" ({c_b}/{before['n']} → {c_a}/{after['n']})" if c_b is not None else ""
            lines.append(f"| {key}{counts} | {_fmt_acc(value)} | {_fmt_acc(after[key])} |")
    for key, label in (("mean_confidence", "mean confidence"), ("mean_length", "mean length (tokens)"),
                       ("truncated_share", "truncated share")):
        lines.append(f"| {label} | {before[key]:.3f} | {after[key]:.3f} |")
    if paired:
        lines.append(
            f"| paired difference (trained − base), 95% bootstrap | | {100 * paired['difference']:+.1f} pts "
            f"[{100 * paired['ci_low']:+.1f}, {100 * paired['ci_high']:+.1f}] "
            f"({paired['b_only_correct']} gained, {paired['a_only_correct']} lost) |"
        )
    return "\n".join(lines)
