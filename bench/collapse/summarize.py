"""Summarize bench/collapse/run.sh: per run the guard's outcome, held-out accuracy and signals per step.

    python bench/collapse/summarize.py [WORK_DIR]      (default outputs/bench-collapse)

Writes bench/collapse/results.{json,md} and bench/collapse/signals.png (the signals of every run per
step on shared axes, the guard's firing marked), and copies each run's guard.png beside them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"guard-warn": "full FT lr 1e-5, every rule demoted to warn (unguarded)",
        "guard-on": "full FT lr 1e-5, default guard",
        "lora": "LoRA r16 lr 1e-4, default guard"}
PANELS = [("completions/mean_length", "mean completion length"), ("entropy", "mean token entropy"),
          ("weights/mean", "mean p_old(y)"), ("guard/cross_question_identical", "identical across questions"),
          ("guard/length_ratio", "length / first steps"), ("grad_norm", "pre-clip grad norm"),
          ("guard/reference_drift", "drift from the start (nats/token)"), ("answers/distinct", "distinct answers")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def peak_rss_gb(time_file: Path) -> float | None:
    if not time_file.is_file():
        return None
    for line in time_file.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 1024**2
    return None


def wall_seconds(time_file: Path) -> float | None:
    if not time_file.is_file():
        return None
    for line in time_file.read_text().splitlines():
        if "Elapsed (wall clock)" in line:
            parts = [float(x) for x in line.rsplit(" ", 1)[1].split(":")]
            return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    return None


def measured_drift() -> dict[str, dict[int, float]]:
    """drift.py's after-the-fact measurement per run and round (= step here), for runs made before the
    trainer logged guard/reference_drift itself."""
    path = HERE / "drift.json"
    if not path.is_file():
        return {}
    return {run: {r["round"]: r["drift_per_token"] for r in rows} for run, rows in json.loads(path.read_text()).items()}


def summarize(work: Path) -> dict:
    base = json.loads((work / "eval" / "base" / "metrics.json").read_text())
    drift = measured_drift()
    out = {"base": base["pass@1"], "runs": {}}
    for run, what in RUNS.items():
        rows = read_jsonl(work / run / "metrics.jsonl")
        if not rows:
            continue
        guard_file = work / run / "guard.json"
        metrics_file = work / "eval" / run / "metrics.json"
        out["runs"][run] = {
            "what": what, "steps_run": len(rows),
            "guard": json.loads(guard_file.read_text()) if guard_file.is_file() else None,
            "warnings": {r["step"]: r["guard/warnings"] for r in rows if "guard/warnings" in r},
            "eval": json.loads(metrics_file.read_text())["pass@1"] if metrics_file.is_file() else None,
            "eval_length": json.loads(metrics_file.read_text())["mean_length"] if metrics_file.is_file() else None,
            "peak_rss_gb": peak_rss_gb(work / f"{run}.time"), "train_wall_s": wall_seconds(work / f"{run}.time"),
            "per_step": [{key: r.get(key) for key, _ in PANELS} | {"step": r["step"]} for r in rows],
        }
        for step in out["runs"][run]["per_step"]:
            if step["guard/reference_drift"] is None and step["step"] in drift.get(run, {}):
                step["guard/reference_drift"] = drift[run][step["step"]]  # measured by drift.py
    return out


def markdown(summary: dict) -> str:
    b = summary["base"]
    lines = [(f"Held-out: {b['n']} generated problems; base model greedy pass@1 {b['correct']}/{b['n']} "
             f"({100 * b['value']:.1f}% [{100 * b['ci_low']:.1f}, {100 * b['ci_high']:.1f}])."), "",
             "| run | steps run | guard | returned model: held-out pass@1 | eval mean length | train wall | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for run, r in summary["runs"].items():
        g = r["guard"]
        guard = (f"{g['action']} at step {g['step']}: {g['signal']} = {g['value']:.3g} "
                 f"({'below' if g['direction'] == 'below' else 'above'} {g['threshold']:g})"
                 + (f"; weights of step {g['restored']['step']} restored" if g.get("restored") else "")) if g else \
            ("warnings only at steps " + ", ".join(str(s) for s in r["warnings"]) if r["warnings"] else "never fired")
        acc = f"{r['eval']['correct']}/{r['eval']['n']} ({100 * r['eval']['value']:.1f}%)" if r["eval"] else "not run"
        wall = f"{r['train_wall_s'] / 60:.1f} min" if r["train_wall_s"] else "–"
        rss = f"{r['peak_rss_gb']:.1f} GB" if r["peak_rss_gb"] else "–"
        length = f"{r['eval_length']:.1f}" if r["eval_length"] else "–"
        lines.append(f"| {run}: {r['what']} | {r['steps_run']} | {guard} | {acc} | {length} | {wall} | {rss} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_png: Path) -> Path:
    from rlsc.report import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(19, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for run, r in summary["runs"].items():
            steps = [p["step"] for p in r["per_step"]]
            line, = ax.plot(steps, [p[key] if p[key] is not None else float("nan") for p in r["per_step"]],
                            marker="o", markersize=3, label=run)
            if r["guard"]:
                ax.axvline(r["guard"]["step"], color=line.get_color(), linestyle=":", alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Collapse guard on the embedded model: signals per step (dotted line: the guard's firing)")
    return _save(plt, fig, out_png)


def main(argv: list[str]) -> int:
    work = Path(argv[0] if argv else "outputs/bench-collapse")
    summary = summarize(work)
    (HERE / "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (HERE / "results.md").write_text(table)
    plot(summary, HERE / "signals.png")
    for run in summary["runs"]:
        if (work / run / "guard.png").is_file():
            shutil.copy(work / run / "guard.png", HERE / f"guard-{run}.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
