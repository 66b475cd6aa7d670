"""Pipeline stages as library functions: each reads and writes files with a schema, so that the CLI,
the Prefect flows and the DVC stages are a few lines each, and any stage can be rerun alone.

Layout under `paths.work_dir` (default `outputs/`):
  data/train.jsonl, data/eval.jsonl        problems (train questions carry no answer: label-free)
  eval/<label>/metrics.json, problems.jsonl  one evaluation (progress.jsonl while it runs: resumes it)
  train/metrics.jsonl, checkpoints/, final/  one training run
  report/report.md, *.png                  the before/after table and plots
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from rlsc.config import Config, dump_config
from rlsc.data import load_problems
from rlsc.problems import write_problems

log = logging.getLogger(__name__)


def work_path(cfg: Config, *parts: str) -> Path:
    return Path(cfg.paths.work_dir).joinpath(*parts)


def prepare_data(cfg: Config) -> tuple[Path, Path]:
    """Write the train questions (answers removed) and the held-out eval problems.

    A synthetic eval set is drawn excluding every train question, so the two never overlap.
    """
    d = cfg.data
    train = load_problems(d.train, split=d.train_split, limit=d.train_limit, seed=d.subset_seed,
                          templates=d.train_templates)
    held_out = load_problems(d.eval, split=d.eval_split, limit=d.eval_limit, seed=d.subset_seed,
                             require_answer=True, templates=d.eval_templates,
                             exclude={p.question for p in train})
    unlabeled = [dataclasses.replace(p, answer=None) for p in train]
    return (write_problems(work_path(cfg, "data", "train.jsonl"), unlabeled),
            write_problems(work_path(cfg, "data", "eval.jsonl"), held_out))


def load_model(cfg: Config, trained: str | Path | None = None, *, trainable: bool = True):
    """The base policy (LoRA attached if configured) or, with `trained`, the trained weights on it;
    `trainable=False` for evaluation (see `load_policy`)."""
    from rlsc.models import load_policy

    return load_policy(cfg.model, cfg.paths.cache_dir, adapter=str(trained) if trained else None,
                       trainable=trainable)


def evaluate_stage(cfg: Config, problems_path: str | Path, out_dir: str | Path, *,
                   trained: str | Path | None = None, model=None, tokenizer=None,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate the base model (or `trained`) on a problem file; writes metrics.json and problems.jsonl."""
    from rlsc.evaluate import EvalCheckpoint, evaluate, write_json, write_records

    problems = load_problems(problems_path, require_answer=True)
    if model is None:
        model, tokenizer = load_model(cfg, trained, trainable=False)
    out_dir = Path(out_dir)
    # an interrupted evaluation resumes from its finished batches (removed once the files are written)
    checkpoint = EvalCheckpoint(out_dir / "progress.jsonl", {
        "model": cfg.model.model_dump(), "trained": str(trained) if trained else None,
        "eval": cfg.eval.model_dump(), "prompt": cfg.prompt.model_dump()})
    resumed = len(checkpoint.done)
    start = time.perf_counter()
    metrics, records = evaluate(model, tokenizer, problems, cfg, progress=progress, checkpoint=checkpoint)
    metrics["seconds"] = time.perf_counter() - start  # of this call: a resumed run's earlier part is not in it
    if resumed:
        metrics["resumed_results"] = resumed
    metrics["model"] = str(trained) if trained else cfg.model.name
    write_records(out_dir / "problems.jsonl", records)
    write_json(out_dir / "metrics.json", metrics)
    checkpoint.remove()
    return metrics


def sample_and_score_stage(cfg: Config, problems_path: str | Path, out_path: str | Path, *,
                           trained: str | Path | None = None, model=None, tokenizer=None,
                           round_index: int | None = None) -> dict[str, Any]:
    """k samples per question from the current policy, one Parquet row per sample with its completion,
    extracted answer, sequence log-prob, p_old, token confidence, entropy, self-certainty, agreement.

    With `round_index`, the questions (and seed) of that training round: the trainer then trains
    on this file instead of sampling the round again (`train_stage(first_round=...)`).
    """
    from rlsc.answers import extract_answer
    from rlsc.prompts import render_prompt
    from rlsc.sampling import rollouts_frame, write_rollouts
    from rlsc.trainer import rollout_metrics, sample_and_score_round, sample_questions

    problems = load_problems(problems_path)
    if model is None:
        model, tokenizer = load_model(cfg, trained)
    prompts = [render_prompt(tokenizer, p.question, cfg.prompt) for p in problems]
    if round_index is not None:
        rollouts, answers = sample_and_score_round(model, tokenizer, cfg, round_index, [p.id for p in problems],
                                                   prompts, Path(out_path))
        return rollout_metrics(rollouts, answers)
    rollouts = sample_questions(model, tokenizer, prompts, cfg)
    answers = [extract_answer(t) for t in rollouts.texts]
    write_rollouts(out_path, rollouts_frame(rollouts, [p.id for p in problems], prompts, answers))
    return rollout_metrics(rollouts, answers)


def train_stage(cfg: Config, train_path: str | Path, out_dir: str | Path, *, resume: bool = False,
                model=None, tokenizer=None, progress: bool = True, first_round: str | Path | None = None):
    """Train on the questions of a problem file; writes metrics.jsonl, checkpoints/ and final/, the
    training curves and (guard on) the collapse-guard signals as PNGs."""
    from rlsc.report import plot_guard, plot_probe, plot_training
    from rlsc.trainer import PROBE_FILE, train

    problems = load_problems(train_path)
    out_dir = Path(out_dir)
    result = train(cfg, problems, out_dir, model=model, tokenizer=tokenizer, resume=resume, progress=progress,
                   first_round=first_round)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    plot_training(result.metrics_path, out_dir / "training.png")
    if cfg.guard.enabled:
        plot_guard(result.metrics_path, out_dir / "guard.png", cfg.guard)
    if (out_dir / PROBE_FILE).is_file():
        plot_probe(out_dir / PROBE_FILE, out_dir / "probe.png")
    return result


def compare_stage(before_dir: str | Path, after_dir: str | Path, cfg: Config) -> dict[str, Any]:
    from rlsc.evaluate import compare, read_records

    return compare(read_records(Path(before_dir) / "problems.jsonl"),
                   read_records(Path(after_dir) / "problems.jsonl"),
                   samples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)


def report_stage(cfg: Config, before: dict, after: dict, paired: dict) -> Path:
    """Write report/report.md with the before/after table, the guard's outcome and the plots (those of
    the train stage that exist); returns its path."""
    from rlsc.evaluate import write_json
    from rlsc.report import before_after_table, plot_eval

    out = work_path(cfg, "report")
    out.mkdir(parents=True, exist_ok=True)
    plot_eval(before, after, out / "eval.png")
    write_json(out / "paired.json", paired)
    table = before_after_table(before, after, paired)
    tuning = f"LoRA r{cfg.model.lora.r}" if cfg.model.lora.enabled else "full fine-tuning"
    setup = (f"model `{cfg.model.name}`, objective `{cfg.train.objective}` (alpha {cfg.train.alpha}, "
             f"weighting {cfg.train.weighting}), k {cfg.sampling.k}, T {cfg.sampling.temperature}, "
             f"{cfg.train.steps} steps at lr {cfg.train.lr}, {tuning}")
    lines = ["# RLSC run report", "", setup, "", table, "", "![eval](eval.png)"]
    guard_file = work_path(cfg, "train", "guard.json")
    if guard_file.is_file():
        from rlsc.tracking import guard_note

        lines += ["", f"**{guard_note(_read_json(guard_file))}.**"]
    train_dir = work_path(cfg, "train")
    for figure in ("training", "guard", "probe"):
        if (train_dir / f"{figure}.png").is_file():
            lines += ["", f"![{figure}](../train/{figure}.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report_from_files(cfg: Config) -> Path:
    """The before/after report from the files of the evaluate and train stages."""
    import json

    before = json.loads(work_path(cfg, "eval", "base", "metrics.json").read_text())
    after = json.loads(work_path(cfg, "eval", "trained", "metrics.json").read_text())
    paired = compare_stage(work_path(cfg, "eval", "base"), work_path(cfg, "eval", "trained"), cfg)
    _write_dvc_plots(cfg, before, after)
    return report_stage(cfg, before, after, paired)


def _write_dvc_plots(cfg: Config, before: dict, after: dict) -> None:
    """Plot data in the shapes `dvc plots` reads: per-step training curves and accuracy before/after."""
    from rlsc.evaluate import write_json
    from rlsc.report import read_metrics

    metrics_path = work_path(cfg, "train", "metrics.jsonl")
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    curves = [{"step": r["step"], "loss": r["loss"], "p_old": r["weights/mean"],
               "token_confidence": r["confidence/token_prob"], "entropy": r["entropy"],
               "length": r["completions/mean_length"]} for r in rows]
    write_json(work_path(cfg, "plots", "training.json"), curves)
    write_json(work_path(cfg, "plots", "accuracy.json"),
               [{"model": label, "pass@1": m["pass@1"]["value"]} for label, m in (("base", before), ("trained", after))])


def check_data_stage(cfg: Config, train_path: str | Path, eval_path: str | Path) -> Path:
    """Run the data contracts; raises DataCheckError (nothing trained) if any fails."""
    from rlsc.checks import run_data_checks

    out = work_path(cfg, "checks")
    run_data_checks(Path(train_path), Path(eval_path), cfg.checks, out)
    return out / "data_checks.json"


def check_rollouts_stage(cfg: Config, rollouts_path: str | Path) -> None:
    """Run the rollouts contract on a sample-and-score file; raises DataCheckError if it fails."""
    from rlsc.checks import DataCheckError, failure_message, validate_rollouts_file

    report = validate_rollouts_file(Path(rollouts_path), cfg.sampling.k)
    if not report.success:
        raise DataCheckError(failure_message([report]))


def register_stage(cfg: Config) -> dict[str, Any]:
    """Log the run to MLflow (config, lineage, per-step and eval metrics, completions, plots, model)
    and register the trained model behind the promotion gate; writes registry/decision.json."""
    import dataclasses as dc

    from rlsc import tracking
    from rlsc.evaluate import read_records, write_json
    from rlsc.models import resolve_model_path

    data = [work_path(cfg, "data", "train.jsonl"), work_path(cfg, "data", "eval.jsonl")]
    train_q = [p.question for p in load_problems(data[0])]
    eval_q = [p.question for p in load_problems(data[1])]
    tags = tracking.lineage_tags(Path.cwd(), data, train_q, eval_q, cfg.checks.allow_test_time_training)
    records = {label: read_records(work_path(cfg, "eval", label, "problems.jsonl")) for label in ("base", "trained")}
    with tracking.start_run(cfg, "retrain", tags) as run:
        tracking.log_training(work_path(cfg, "train", "metrics.jsonl"))
        for label, recs in records.items():
            metrics = _read_json(work_path(cfg, "eval", label, "metrics.json"))
            tracking.log_evaluation(metrics, label, recs, cfg.registry.completions_logged)
        report = work_path(cfg, "report")
        if report.is_dir():
            import mlflow

            mlflow.log_artifacts(str(report), artifact_path="report")
        uri = tracking.log_model(work_path(cfg, "train", "final"), resolve_model_path(cfg.model, cfg.paths.cache_dir),
                                 eval_q[:2])
        guard_file = work_path(cfg, "train", "guard.json")
        guard_summary = _read_json(guard_file) if guard_file.is_file() else None
        decision = tracking.register_and_gate(cfg, run.info.run_id, uri, records["trained"], records["base"],
                                              guard_summary)
    result = dc.asdict(decision)
    write_json(work_path(cfg, "registry", "decision.json"), result)
    return result


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def run_all(cfg: Config, progress: bool = True) -> tuple[Path, str]:
    """The main job: prepare data, evaluate the base model, train, evaluate again, compare, report."""
    train_path, eval_path = prepare_data(cfg)
    log.info("data: %s, %s", train_path, eval_path)
    model, tokenizer = load_model(cfg)
    base = evaluate_stage(cfg, eval_path, work_path(cfg, "eval", "base"), model=model, tokenizer=tokenizer,
                          progress=progress)
    train_stage(cfg, train_path, work_path(cfg, "train"), model=model, tokenizer=tokenizer, progress=progress)
    trained = evaluate_stage(cfg, eval_path, work_path(cfg, "eval", "trained"), model=model,
                             tokenizer=tokenizer, progress=progress)
    report = report_from_files(cfg)
    paired = _read_json(work_path(cfg, "report", "paired.json"))
    from rlsc.report import before_after_table

    return report, before_after_table(base, trained, paired)
