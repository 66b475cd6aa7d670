"""The scheduled retraining flow: prepare -> data checks -> evaluate base -> sample-and-score ->
train -> evaluate -> register behind the promotion gate. Each task is a few lines calling a stage
function of `rlsc.stages`; stages exchange files, so a retried task redoes only its own work
(training resumes from its last checkpoint).

    python -m flows.retrain                                  # one run (local ephemeral Prefect API)
    python -m flows.retrain --set train.steps=4              # with config overrides
    python -m flows.retrain --serve --cron "0 3 * * 1"       # serve it on a schedule
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from rlsc import stages
from rlsc.config import Config, load_config


@task(retries=2, retry_delay_seconds=5)
def prepare(cfg: Config) -> tuple[Path, Path]:
    return stages.prepare_data(cfg)


@task  # no retries: a failed data contract is not transient
def check_data(cfg: Config, train_path: Path, eval_path: Path) -> Path:
    return stages.check_data_stage(cfg, train_path, eval_path)


@task(retries=1, retry_delay_seconds=5)
def evaluate(cfg: Config, eval_path: Path, label: str, trained: Path | None = None) -> dict:
    return stages.evaluate_stage(cfg, eval_path, stages.work_path(cfg, "eval", label), trained=trained)


@task(retries=1, retry_delay_seconds=5)
def sample_and_score(cfg: Config, train_path: Path) -> Path:
    """Round 0 of training, sampled from the base policy and checked against the rollouts contract."""
    out = stages.work_path(cfg, "rollouts", "round-000000.parquet")
    stages.sample_and_score_stage(cfg, train_path, out, round_index=0)
    stages.check_rollouts_stage(cfg, out)
    return out


@task(retries=1, retry_delay_seconds=5)
def train(cfg: Config, train_path: Path, first_round: Path) -> Path:
    # resume=True: a retry continues from the last checkpoint instead of starting over
    return stages.train_stage(cfg, train_path, stages.work_path(cfg, "train"), resume=True,
                              first_round=first_round).final_dir


@task
def register(cfg: Config) -> dict:
    return stages.register_stage(cfg)


@flow(name="rlsc-retrain", log_prints=True)
def retrain(config: str | None = "params.yaml", overrides: list[str] | None = None) -> dict:
    """One retraining run with the parameters of `config` (params.yaml) and `overrides`."""
    cfg = load_config(config, overrides or [])
    train_path, eval_path = prepare(cfg)
    check_data(cfg, train_path, eval_path)
    base = evaluate(cfg, eval_path, "base")
    first_round = sample_and_score(cfg, train_path)
    final_dir = train(cfg, train_path, first_round)
    trained = evaluate(cfg, eval_path, "trained", final_dir)
    decision = register(cfg)
    report = stages.report_from_files(cfg)
    create_markdown_artifact(
        key="rlsc-retrain-report",
        markdown=report.read_text() + f"\n\n## Promotion\n\n{decision['decision']}: {decision['reason']}\n"
        + (f"\n{decision['guard']}\n" if decision.get("guard") else ""),
        description="before/after table and the promotion decision",
    )
    print(report.read_text())
    return {"base": base["pass@1"], "trained": trained["pass@1"], "decision": decision, "report": str(report)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--serve", action="store_true", help="serve the flow on a schedule instead of one run")
    parser.add_argument("--cron", default="0 3 * * 1", help="schedule for --serve (default: Mondays 03:00)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    if args.serve:
        retrain.serve(name="rlsc-retrain-scheduled", cron=args.cron,
                      parameters={"config": args.config, "overrides": args.set})
    else:
        result = retrain(config=args.config, overrides=args.set)
        print(Path(result["report"]).read_text())
        print(f"promotion: {result['decision']['decision']} (version {result['decision']['version']}): "
              f"{result['decision']['reason']}")
        if result["decision"].get("guard"):
            print(result["decision"]["guard"])


if __name__ == "__main__":
    main()
