"""Quality: does RLSC help, or does it merely lower the temperature? Base vs trained, with controls.

Protocol (issue 4), on the configured model (default: the embedded Qwen2.5-Coder-0.5B, the main
job's settings from params.yaml):
- train label-free on a seeded subset of GSM8K *train* questions (answers stripped; the leakage
  contract runs against every eval set first);
- eval sets: `generated` (128 held-out generated problems) and `gsm8k` (a seeded subset of the GSM8K
  *test* split, 200 by default);
- base model: greedy pass@1 (the temperature -> 0 control) on each set, and on the first
  `--maj-n` problems 16 samples at the training temperature: sample accuracy, maj@16, pass@16;
- arms, each trained on the same questions for the same steps: the paper's L2 (alpha 0.1), L1,
  a signal-preserving variant (per-token geometric-mean weights) and peer objectives (entropy
  minimisation, the majority-vote reward); each evaluated greedily with the paired bootstrap
  against the base model, and probed on held-out problems every few steps (accuracy per step);
- collapse flags per arm from the label-free signals (entropy and length against the first steps,
  distinct answers, the guard's warnings).

Every stage is skipped when its output exists, so arms can be added one at a time, and an
interrupted evaluation resumes from its finished batches (the base model's k samples on 200 GSM8K
problems take over an hour here):
    python -m bench.quality --arms rlsc-l2                  # then --arms rlsc-l1 ... and --summary-only
    python -m bench.quality --arms rlsc-l2 --maj-n 0 --eval-tokens 384   # the same models, longer answers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"

ARMS = {
    "rlsc-l2": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=sequence"],
    "rlsc-l1": ["train.objective=rlsc", "train.alpha=0.0", "train.weighting=sequence"],
    # weights exp(mean_t log p_old): stay O(1) on long completions, where p_old(y) vanishes
    "rlsc-l2-token-mean": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=token_mean"],
    "entropy": ["train.objective=entropy"],
    "majority-vote": ["train.objective=majority_vote"],
    # the paper's objective on samples as long as the 384-token GSM8K evaluation's answers; micro-batches
    # of 4 (the same gradient): at 8 x 384 tokens the update's vocabulary-wide tensors passed 24 GB
    "rlsc-l2-384": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=sequence", "sampling.max_new_tokens=384",
                    "train.micro_batch=4"],
    # the paper's objective with the update in bf16 mixed precision: does accuracy hold?
    "rlsc-l2-bf16": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=sequence", "train.mixed_precision=bf16"],
    # ... with the training-time sampling on bf16 weights (the AMX decode kernel), the update fp32; then both bf16
    "rlsc-l2-bf16-sampling": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=sequence",
                              "sampling.precision=bf16"],
    "rlsc-l2-all-bf16": ["train.objective=rlsc", "train.alpha=0.1", "train.weighting=sequence",
                         "sampling.precision=bf16", "train.mixed_precision=bf16"],
}


# each eval set, in table order: its file and how many of its problems (None: all), from the arguments
EVAL_SETS = {
    "generated": lambda args: (args.generated, None),
    "gsm8k": lambda args: (str(SHARED_DATA / "gsm8k" / "test.jsonl"), args.gsm8k_n),
}


def eval_sources(args) -> dict[str, tuple[str, int | None]]:
    return {name: source(args) for name, source in EVAL_SETS.items()}


def base_config(args, *extra: str):
    from rlsc.config import load_config

    return load_config(args.config or None, [f"paths.work_dir={args.work}", *args.set, *extra])


def eval_config(args, *extra: str):
    """The configuration an evaluation runs under: --eval-tokens changes the evaluation's length cap
    only, so models trained at the configured length can be evaluated without truncation."""
    return base_config(args, *extra, *([f"eval.max_new_tokens={args.eval_tokens}"] if args.eval_tokens else []))


def set_label(args, name: str) -> str:
    """The folder of an eval set's results: `gsm8k`, or `gsm8k-t384` when evaluated at another length."""
    return f"{name}-t{args.eval_tokens}" if args.eval_tokens else name


def parse_set_label(label: str) -> tuple[str, int | None]:
    """set_label's inverse: ("gsm8k", 384) from `gsm8k-t384`, ("generated", None) from `generated`."""
    name, _, tokens = label.partition("-t")
    return name, int(tokens) if tokens else None


# ---------------------------------------------------------------- stages


def prepare(args) -> dict[str, Path]:
    """Train questions (label-free) and the eval sets as files under <work>/data; leakage checked."""
    from rlsc.checks import run_data_checks
    from rlsc.data import load_problems
    from rlsc.problems import write_problems

    cfg = base_config(args)
    data = Path(args.work) / "data"
    train = load_problems(str(SHARED_DATA / "gsm8k" / "train.jsonl"), limit=args.train_n or
                          cfg.train.steps * cfg.train.questions_per_step, seed=args.seed)
    paths = {"train": write_problems(data / "train.jsonl", [dataclasses.replace(p, answer=None) for p in train])}
    for name, (source, limit) in eval_sources(args).items():
        if name not in args.sets:
            continue
        problems = load_problems(source, require_answer=True, limit=limit, seed=args.seed,
                                 exclude={p.question for p in train})
        paths[name] = write_problems(data / f"eval-{name}.jsonl", problems)
        paths[f"{name}-k"] = write_problems(data / f"eval-{name}-k.jsonl", problems[: args.maj_n])
        run_data_checks(paths["train"], paths[name], cfg.checks, Path(args.work) / "checks" / name)
    return paths


def evaluate_once(args, cfg, problems: Path, out: Path, trained: Path | None = None) -> dict:
    from rlsc.stages import evaluate_stage

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    kept = kept_base_result(args, out, problems) if trained is None else None
    if kept is not None:
        return kept
    print(f"[{time.strftime('%H:%M:%S')}] evaluate {trained or 'base'} on {problems.name}", file=sys.stderr)
    return evaluate_stage(cfg, problems, out, trained=trained, progress=not args.quiet)


def kept_base_result(args, out: Path, problems: Path) -> dict | None:
    """The base model's metrics for this evaluation as kept beside the results (results/quality-runs)
    when they were measured on exactly these problems, so a new work folder does not re-run them.
    Only the base model's: a trained arm's evaluation is redone with the arm (its training is)."""
    from rlsc.data import load_problems

    kept = kept_root(args) / out.relative_to(args.work)
    if not (kept / "metrics.json").is_file():
        return None
    wanted = sorted(p.id for p in load_problems(str(problems)))
    if sorted(r["id"] for r in read_records(kept / "problems.jsonl")) != wanted:
        print(f"{kept}: kept on other problems, evaluated again", file=sys.stderr)
        return None
    print(f"[{time.strftime('%H:%M:%S')}] base on {problems.name}: the kept result in {kept}", file=sys.stderr)
    return json.loads((kept / "metrics.json").read_text())


def training_settings(cfg) -> dict:
    """What a trained arm depends on: model, prompt, sampling, training and guard settings (the
    held-out probe only watches training, so its settings are left out)."""
    tree = cfg.model_dump(mode="json")
    settings = {section: tree[section] for section in ("model", "prompt", "sampling", "train", "guard")}
    settings["train"] = {k: v for k, v in settings["train"].items() if not k.startswith("probe_")}
    return settings


def check_trained_as_configured(out: Path, cfg) -> None:
    """Stop where a finished arm was trained under other settings than asked for now (an edited arm,
    another --set): reusing it would report one model under another's name."""
    from rlsc.config import load_config

    saved = out / "config.yaml"
    if not saved.is_file():
        return
    before, now = training_settings(load_config(saved)), training_settings(cfg)
    changed = [f"{section}.{key}" for section in now for key in sorted(set(now[section]) | set(before[section]))
               if now[section].get(key) != before[section].get(key)]
    if changed:
        raise SystemExit(f"{out} was trained with other settings ({', '.join(changed)} differ from this run's): "
                         "delete that folder to retrain it, or give another --work")


def train_arm(args, arm: str, paths: dict[str, Path]) -> Path:
    from rlsc.stages import train_stage

    out = Path(args.work) / "train" / arm
    probe = paths.get("generated")
    cfg = base_config(args, *ARMS[arm], *([f"train.probe_problems={probe}", f"train.probe_every={args.probe_every}",
                                           f"train.probe_limit={args.probe_n}"] if probe and args.probe_every else []))
    if (out / "final" / ".done").is_file():
        check_trained_as_configured(out, cfg)
        return out / "final"
    print(f"[{time.strftime('%H:%M:%S')}] train {arm}", file=sys.stderr)
    result = train_stage(cfg, paths["train"], out, progress=not args.quiet)
    (result.final_dir / ".done").touch()
    return result.final_dir


def run(args) -> None:
    """Base greedy first, then each arm, then the base model's k samples: the headline comparison is
    complete earliest if a run has to be cut short (every finished stage is kept)."""
    paths = prepare(args)
    cfg = eval_config(args)
    for name in args.sets:
        evaluate_once(args, cfg, paths[name], Path(args.work) / "eval" / "base" / set_label(args, name))
    for arm in args.arms:
        final = train_arm(args, arm, paths)
        for name in args.sets:
            evaluate_once(args, eval_config(args, *ARMS[arm]), paths[name],
                          Path(args.work) / "eval" / arm / set_label(args, name), trained=final)
    for name in args.sets if args.maj_n else ():
        sampled = eval_config(args, f"eval.k={args.k}")
        evaluate_once(args, sampled, paths[f"{name}-k"], sampled_dir(args, set_label(args, name), args.maj_n))


def sampled_dir(args, name: str, n: int) -> Path:
    """Where the base model's k samples on the first n problems of a set go (n in the name, so a
    larger subset is a new run, not a stale reuse of a smaller one)."""
    return Path(args.work) / "eval" / f"base-k{args.k}-n{n}" / name


def largest_sampled_run(args, name: str) -> Path | None:
    runs = [p for root in run_roots(args) for p in (root / "eval").glob(f"base-k{args.k}-n*/{name}/metrics.json")]
    return max(runs, key=lambda p: int(p.parent.parent.name.rsplit("-n", 1)[1]), default=None)


# ---------------------------------------------------------------- kept runs

CARRIED_MARK = "(earlier run)"
CARRIED_NOTE = ("carried over from the previous summary: its per-problem records were not kept, so it is not "
                "recomputed here (re-run its command to rebuild it).")
KEPT = "quality-runs"  # under --out: what the tables are computed from, kept with them
DROPPED_FIELDS = ("samples",)  # the k samples' texts (16x a record's size); their answers are kept


def run_roots(args) -> list[Path]:
    """Where a run's files are looked for: the work folder first, then the copy kept beside the
    results, so a fresh checkout rebuilds the tables (and new runs add to them) without the work folder."""
    return [Path(args.work), kept_root(args)]


def kept_root(args) -> Path:
    """The copy of the runs kept beside the results (<out>/quality-runs)."""
    return Path(args.out) / KEPT


def locate(args, relative: str) -> Path | None:
    return next((root / relative for root in run_roots(args) if (root / relative).is_file()), None)


def keep_runs(args) -> None:
    """Copy every evaluation's metrics and per-problem records (less DROPPED_FIELDS) and every training
    run's metrics and probe from the work folder into <out>/quality-runs."""
    work, kept = Path(args.work), kept_root(args)
    for metrics in sorted(work.glob("eval/*/*/metrics.json")):
        target = kept / metrics.parent.relative_to(work)
        target.mkdir(parents=True, exist_ok=True)
        records = [{k: v for k, v in r.items() if k not in DROPPED_FIELDS}
                   for r in read_records(metrics.with_name("problems.jsonl"))]
        _write_whole(target / "problems.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        _write_whole(target / "metrics.json", metrics.read_text())
    for run_dir in sorted(p.parent for p in work.glob("train/*/metrics.jsonl")):
        target = kept / run_dir.relative_to(work)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "probe.jsonl"):
            if (run_dir / name).is_file():
                _write_whole(target / name, (run_dir / name).read_text())


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")  # a killed copy never leaves half a file
    partial.write_text(text)
    partial.replace(path)


def read_records(path: Path) -> list[dict]:
    from rlsc.evaluate import read_records as read

    return read(path)


def against_majority(records: list[dict], subset: list[dict]) -> dict:
    """Greedy correct on the problems the base model was sampled on, and its paired difference to the
    base model's majority vote there: RLSC pass@1 against base maj@k (does training internalise
    majority voting?)."""
    from rlsc.evaluate import compare

    ids = {r["id"] for r in subset}
    greedy = [r for r in records if r["id"] in ids]
    majority = [{"id": r["id"], "correct": r["majority_correct"]} for r in subset]
    paired = compare(majority, greedy, seed=0)
    return {"correct": sum(bool(r["correct"]) for r in greedy), "n": len(greedy),
            "difference": paired["difference"], "ci_low": paired["ci_low"], "ci_high": paired["ci_high"]}


# ---------------------------------------------------------------- the summary


def collapse_flags(metrics_path: Path, probe: list[dict] | None = None) -> list[str]:
    """Warning signs over a training run, what a user would want flagged before trusting it: the
    label-free signals (entropy halving, length halving or running to the cap, identical answers
    across questions, the guard) and, when probed, held-out accuracy falling past its noise."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return ["no steps"]
    first, last = rows[0], rows[-1]
    flags = []
    if first.get("entropy") and last["entropy"] < 0.5 * first["entropy"]:
        flags.append(f"entropy {first['entropy']:.3f} -> {last['entropy']:.3f}")
    if last["completions/mean_length"] < 0.5 * first["completions/mean_length"]:
        flags.append(f"length {first['completions/mean_length']:.0f} -> {last['completions/mean_length']:.0f}")
    clipped = (first.get("completions/clipped_ratio", 0.0), last.get("completions/clipped_ratio", 0.0))
    if clipped[1] >= 0.9 > clipped[0]:  # the repetition loops of an over-sharpened policy
        flags.append(f"samples run to the length cap: clipped {clipped[0]:.0%} -> {clipped[1]:.0%}")
    if last.get("guard/cross_question_identical", 0.0) > 0.2:
        flags.append(f"identical completions across questions {last['guard/cross_question_identical']:.2f}")
    warned = sorted({w for r in rows for w in r.get("guard/warnings", "").split(",") if w})
    if warned:
        flags.append("guard warnings: " + ", ".join(warned))
    fired = [r for r in rows if "guard/fired" in r]
    if fired:
        flags.append(f"guard {fired[0]['guard/action']} at step {fired[0]['step']} ({fired[0]['guard/fired']})")
    if probe and len(probe) > 1:
        start, end = probe[0], probe[-1]
        noise = 2 * (start["accuracy"] * (1 - start["accuracy"]) / start["n"]) ** 0.5  # 2 standard errors
        if start["accuracy"] - end["accuracy"] > noise:
            flags.append(f"probe accuracy fell {start['correct']}/{start['n']} -> {end['correct']}/{end['n']}")
    return flags


def evaluated_sets(args) -> list[str]:
    """The set labels the base model has results for: each eval set, then its other-length runs."""
    done = {p.parent.name for root in run_roots(args) for p in (root / "eval" / "base").glob("*/metrics.json")}
    return sorted((x for x in done if parse_set_label(x)[0] in EVAL_SETS), key=set_order)


def set_order(label: str) -> tuple:
    """Where a set's table goes: generated, then gsm8k, each before its other-length runs (gsm8k-t384)."""
    name, tokens = parse_set_label(label)
    return (list(EVAL_SETS).index(name) if name in EVAL_SETS else len(EVAL_SETS), tokens or 0, label)


def _metrics(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None else None


def _eval_run(args, model: str, name: str) -> tuple[dict, list[dict]] | None:
    """An evaluation's metrics and per-problem records, from the work folder or the kept copy."""
    metrics = locate(args, f"eval/{model}/{name}/metrics.json")
    return None if metrics is None else (_metrics(metrics), read_records(metrics.with_name("problems.jsonl")))


def summarize(args) -> dict:
    from rlsc.evaluate import compare

    summary: dict = {"sets": {}, "arms": {}}
    for name in evaluated_sets(args):
        base, base_records = _eval_run(args, "base", name)
        sampled_path = largest_sampled_run(args, name)
        subset = read_records(sampled_path.with_name("problems.jsonl")) if sampled_path else []
        entry = {"base": base, "base_sampled": _metrics(sampled_path), "arms": {}}
        if subset:
            entry["base_greedy_on_sampled"] = against_majority(base_records, subset)
        for arm in ARMS:
            run = _eval_run(args, arm, name)
            if run is None:
                continue
            trained, arm_records = run
            entry["arms"][arm] = {"metrics": trained, "paired": compare(base_records, arm_records, seed=0)}
            if subset:
                entry["arms"][arm]["greedy_on_sampled"] = against_majority(arm_records, subset)
        summary["sets"][name] = entry
    for arm, overrides in ARMS.items():
        metrics = locate(args, f"train/{arm}/metrics.jsonl")
        if metrics is not None:
            probe_file = metrics.with_name("probe.jsonl")
            probe = [json.loads(x) for x in probe_file.read_text().splitlines()] if probe_file.is_file() else []
            summary["arms"][arm] = {"overrides": overrides, "flags": collapse_flags(metrics, probe), "probe": probe}
    return summary


def carry_over(summary: dict, earlier: dict) -> dict:
    """Sets and training runs of an earlier summary that nothing kept can recompute (their per-problem
    records were lost with an old work folder), copied in and marked as such rather than dropped."""
    for name, entry in earlier.get("sets", {}).items():
        if name not in summary["sets"]:
            summary["sets"][name] = {**entry, "carried_over": True}
            continue
        now = summary["sets"][name]
        if _counts(now["base"]) != _counts(entry["base"]):
            continue  # the base model scored differently: the earlier arms' paired figures would not hold
        subset_n = (now.get("base_sampled") or {}).get("n")
        for arm, result in entry["arms"].items():
            if arm not in now["arms"]:
                kept = {k: v for k, v in result.items()
                        if k != "greedy_on_sampled" or v["n"] == subset_n}  # scored on another subset: dropped
                now["arms"][arm] = {**kept, "carried_over": True}
    for arm, info in earlier.get("arms", {}).items():
        if arm not in summary["arms"]:
            summary["arms"][arm] = {**info, "carried_over": True}
    summary["sets"] = dict(sorted(summary["sets"].items(), key=lambda item: set_order(item[0])))
    return summary


def _counts(metrics: dict) -> tuple:
    return metrics["pass@1"]["correct"], metrics["pass@1"]["n"]


def _against(m: dict) -> str:
    return (f"{m['correct']}/{m['n']} ({100 * m['difference']:+.1f} pts [{100 * m['ci_low']:+.1f}, "
            f"{100 * m['ci_high']:+.1f}])")


def _label(arm: str, result: dict) -> str:
    return f"{arm} {CARRIED_MARK}" if result.get("carried_over") else arm


def _pct(m: dict) -> str:
    return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}] ({m.get('correct', '')}/{m['n']})"


def markdown(summary: dict, args) -> str:
    lines = []
    for name, entry in summary["sets"].items():
        base = entry["base"]
        tokens = f", {name.rsplit('-t', 1)[1]} new tokens" if "-t" in name else ""
        lines += [f"### {name.split('-t')[0]}{tokens} (n = {base['pass@1']['n']})", ""]
        if entry.get("carried_over"):
            lines += [f"{CARRIED_MARK} {CARRIED_NOTE}", ""]
        lines += [("| model | greedy pass@1 % [95% CI] | paired diff vs base, pts [95% CI] | mean confidence | "
                  "mean length | truncated |"), "|---|---|---|---|---|---|",
                  (f"| base | {_pct(base['pass@1'])} | – | {base['mean_confidence']:.3f} | {base['mean_length']:.1f} | "
                  f"{100 * base['truncated_share']:.1f}% |")]
        for arm, result in entry["arms"].items():
            m, d = result["metrics"], result["paired"]
            lines.append(f"| {_label(arm, result)} | {_pct(m['pass@1'])} | {100 * d['difference']:+.1f} [{100 * d['ci_low']:+.1f}, "
                         f"{100 * d['ci_high']:+.1f}] | {m['mean_confidence']:.3f} | {m['mean_length']:.1f} | "
                         f"{100 * m['truncated_share']:.1f}% |")
        sampled = entry.get("base_sampled")
        if sampled:
            k = args.k
            n = sampled['pass@1']['n']
            which = f"all {n}" if n == base['pass@1']['n'] else f"the first {n}"
            lines += ["", (f"Base model, {k} samples at T {eval_config(args).eval.temperature:g} on {which} "
                      f"problems: greedy {_pct(sampled['pass@1'])}, sample accuracy "
                      f"{100 * sampled['sample_accuracy']['value']:.1f}%, maj@{k} {_pct(sampled[f'maj@{k}'])}, "
                      f"pass@{k} {100 * sampled[f'pass@{k}']['value']:.1f}%.")]
            on_subset = [f"{arm} {_against(r['greedy_on_sampled'])}"
                         for arm, r in entry["arms"].items() if "greedy_on_sampled" in r]
            unscored = [arm for arm, r in entry["arms"].items() if "greedy_on_sampled" not in r]
            if "base_greedy_on_sampled" in entry:
                on_subset.insert(0, f"base {_against(entry['base_greedy_on_sampled'])}")
            lines.append(f"Greedy pass@1 on the same problems, and its paired difference to the base model's "
                         f"maj@{k} ({sampled[f'maj@{k}'].get('correct', '')}/{sampled[f'maj@{k}']['n']}): "
                         f"{', '.join(on_subset)}." + (f" Not scored on these problems (records not kept): "
                                                       f"{', '.join(unscored)}." if unscored else ""))
        if any(r.get("carried_over") for r in entry["arms"].values()) and not entry.get("carried_over"):
            lines.append(f"{CARRIED_MARK} {CARRIED_NOTE}")
        lines.append("")
    if summary["arms"]:
        lines += ["### Training runs: collapse flags and the held-out probe", "",
                  "| arm | overrides | probe accuracy by steps done | collapse flags |", "|---|---|---|---|"]
        for arm, info in summary["arms"].items():
            probe = ", ".join(f"{p['steps_done']}: {p['correct']}/{p['n']}" for p in info["probe"]) or "–"
            lines.append(f"| {_label(arm, info)} | `{' '.join(info['overrides'])}` | {probe} | {'; '.join(info['flags']) or 'none'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path) -> list[Path]:
    from rlsc.report import _pyplot, _save

    plt = _pyplot()
    written = []
    probes = {arm: info["probe"] for arm, info in summary["arms"].items() if info["probe"]}
    if probes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, rows in probes.items():
            ax.plot([r["steps_done"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", label=arm)
        ax.set_xlabel("optimizer steps done")
        ax.set_ylabel(f"greedy pass@1 % on the probe (n = {next(iter(probes.values()))[0]['n']})")
        ax.set_title("Held-out accuracy per training step")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(plt, fig, out_dir / "quality-per-step.png"))
    if summary["sets"]:
        fig, axes = plt.subplots(1, len(summary["sets"]), figsize=(6 * len(summary["sets"]), 4.5), squeeze=False)
        for ax, (name, entry) in zip(axes[0], summary["sets"].items()):
            models = {"base": entry["base"]} | {arm: r["metrics"] for arm, r in entry["arms"].items()}
            if entry.get("base_sampled"):
                key, maj = next((k, v) for k, v in entry["base_sampled"].items() if k.startswith("maj@"))
                whole = maj["n"] == entry["base"]["pass@1"]["n"]
                models[f"base {key}" + ("" if whole else f" (first {maj['n']})")] = {"pass@1": maj}
            values = [100 * m["pass@1"]["value"] for m in models.values()]
            low = [v - 100 * m["pass@1"]["ci_low"] for v, m in zip(values, models.values())]
            high = [100 * m["pass@1"]["ci_high"] - v for v, m in zip(values, models.values())]
            ax.bar(range(len(models)), values, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.7)
            ax.set_xticks(range(len(models)), list(models), rotation=20, ha="right")
            ax.set_ylabel("pass@1 % (95% CI)")
            ax.set_title(f"{name} (n = {entry['base']['pass@1']['n']})")
            ax.grid(axis="y", alpha=0.3)
        written.append(_save(plt, fig, out_dir / "quality-accuracy.png"))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE.parent / "params.yaml"), help="base configuration (the main job)")
    p.add_argument("--set", "-s", action="append", default=[], help="config overrides for every run")
    p.add_argument("--arms", default="rlsc-l2", help=f"comma list of {', '.join(ARMS)}; '' = base only")
    p.add_argument("--sets", default="generated,gsm8k", help="eval sets: generated, gsm8k")
    p.add_argument("--generated", default="synthetic:128:2", help="the generated held-out source")
    p.add_argument("--gsm8k-n", type=int, default=200, help="seeded subset of GSM8K test")
    p.add_argument("--train-n", type=int, default=None, help="GSM8K train questions (default steps x per step)")
    p.add_argument("--maj-n", type=int, default=32, help="problems per set for the base model's k samples (0 = none)")
    p.add_argument("--k", type=int, default=16, help="samples for maj@k / pass@k")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="evaluate at this many new tokens instead of the config's (results under <set>-t<N>)")
    p.add_argument("--probe-every", type=int, default=2, help="probe held-out accuracy every N steps (0 = off)")
    p.add_argument("--probe-n", type=int, default=32, help="probe problems (from the generated set)")
    p.add_argument("--seed", type=int, default=0, help="seed of every subset")
    p.add_argument("--work", default="outputs/bench-quality")
    p.add_argument("--out", default=str(HERE / "results"), help="where quality.{json,md} and the PNGs go")
    p.add_argument("--summary-only", action="store_true", help="only summarize what has run")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.sets = [s for s in args.sets.split(",") if s]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if not args.summary_only:
        run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep_runs(args)
    earlier = json.loads((out / "quality.json").read_text()) if (out / "quality.json").is_file() else {}
    summary = carry_over(summarize(args), earlier)
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary, args)
    (out / "quality.md").write_text(table)
    plot(summary, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
