"""Pipeline stages as library functions: each reads and writes files with a schema, so that the CLI,
the Prefect flows and the DVC stages are a few lines each, and any stage can be rerun alone.

Layout under `paths.work_dir` (default `outputs/`):
  data/train.jsonl, data/eval.jsonl        problems (train questions carry no answer: label-free)
  eval/<label>/metrics.json, problems.jsonl  one evaluation
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


def load_model(cfg: Config, trained: str | Path | None = None):
    """The base policy (LoRA attached if configured) or, with `trained`, the trained weights on it."""
    from rlsc.models import load_policy

    return load_policy(cfg.model, cfg.paths.cache_dir, adapter=str(trained) if trained else None)


def evaluate_stage(cfg: Config, problems_path: str | Path, out_dir: str | Path, *,
                   trained: str | Path | None = None, model=None, tokenizer=None,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate the base model (or `trained`) on a problem file; writes metrics.json and problems.jsonl."""
    from rlsc.evaluate import evaluate, write_json, write_records

    problems = load_problems(problems_path, require_answer=True)
    if model is None:
        model, tokenizer = load_model(cfg, trained)
    start = time.perf_counter()
    metrics, records = evaluate(model, tokenizer, problems, cfg, progress=progress)
    metrics["seconds"] = time.perf_counter() - start
    metrics["model"] = str(trained) if trained else cfg.model.name
    out_dir = Path(out_dir)
    write_records(out_dir / "problems.jsonl", records)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def train_stage(cfg: Config, train_path: str | Path, out_dir: str | Path, *, resume: bool = False,
                model=None, tokenizer=None, progress: bool = True):
    """Train on the questions of a problem file; writes metrics.jsonl, checkpoints/ and final/."""
    from rlsc.report import plot_training
    from rlsc.trainer import train

    problems = load_problems(train_path)
    out_dir = Path(out_dir)
    result = train(cfg, problems, out_dir, model=model, tokenizer=tokenizer, resume=resume, progress=progress)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    plot_training(result.metrics_path, out_dir / "training.png")
    return result


def compare_stage(before_dir: str | Path, after_dir: str | Path, cfg: Config) -> dict[str, Any]:
    from rlsc.evaluate import compare, read_records

    return compare(read_records(Path(before_dir) / "problems.jsonl"),
                   read_records(Path(after_dir) / "problems.jsonl"),
                   samples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)


def report_stage(cfg: Config, before: dict, after: dict, paired: dict, training_png: Path | None) -> Path:
    """Write report/report.md with the before/after table and the plots; returns its path."""
    from rlsc.evaluate import write_json
    from rlsc.report import before_after_table, plot_eval

    out = work_path(cfg, "report")
    out.mkdir(parents=True, exist_ok=True)
    plot_eval(before, after, out / "eval.png")
    write_json(out / "paired.json", paired)
    table = before_after_table(before, after, paired)
    lines = [
        "# RLSC run report", "",
        f"model `{cfg.model.name}`, objective `{cfg.train.objective}` (alpha {cfg.train.alpha}, "
        f"weighting {cfg.train.weighting}), k {cfg.sampling.k}, T {cfg.sampling.temperature}, "
        f"{cfg.train.steps} steps at lr {cfg.train.lr}, {'LoRA r' + str(cfg.model.lora.r) if cfg.model.lora.enabled else 'full fine-tuning'}",
        "", table, "", "![eval](eval.png)",
    ]
    if training_png is not None:
        lines += ["", f"![training]({Path('..') / training_png.relative_to(work_path(cfg))})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_all(cfg: Config, progress: bool = True) -> tuple[Path, str]:
    """The main job: prepare data, evaluate the base model, train, evaluate again, compare, report."""
    train_path, eval_path = prepare_data(cfg)
    log.info("data: %s, %s", train_path, eval_path)
    model, tokenizer = load_model(cfg)
    base = evaluate_stage(cfg, eval_path, work_path(cfg, "eval", "base"), model=model, tokenizer=tokenizer,
                          progress=progress)
    result = train_stage(cfg, train_path, work_path(cfg, "train"), model=model, tokenizer=tokenizer,
                         progress=progress)
    trained = evaluate_stage(cfg, eval_path, work_path(cfg, "eval", "trained"), model=model,
                             tokenizer=tokenizer, progress=progress)
    trained["model"] = str(result.final_dir)
    paired = compare_stage(work_path(cfg, "eval", "base"), work_path(cfg, "eval", "trained"), cfg)
    report = report_stage(cfg, base, trained, paired, result.output_dir / "training.png")
    from rlsc.report import before_after_table

    return report, before_after_table(base, trained, paired)
