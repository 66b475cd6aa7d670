"""The `rlsc` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rlsc.errors import RlscError


def _config(args):
    from rlsc.config import load_config

    return load_config(args.config, args.set or [])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML file in the shape of params.yaml")
    p.add_argument("--set", "-s", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.lr=1e-5")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def cmd_fetch_model(args) -> int:
    from rlsc.models import load_policy, resolve_model_path

    cfg = _config(args)
    path = resolve_model_path(cfg.model, cfg.paths.cache_dir)
    if args.check:
        model, _ = load_policy(cfg.model, cfg.paths.cache_dir, trainable=False)
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {type(model).__name__} with {n / 1e6:.0f}M parameters", file=sys.stderr)
    print(path)
    return 0


def cmd_prepare(args) -> int:
    from rlsc.stages import prepare_data

    train_path, eval_path = prepare_data(_config(args))
    print(train_path)
    print(eval_path)
    return 0


def cmd_train(args) -> int:
    from rlsc.stages import train_stage, work_path

    cfg = _config(args)
    out = args.out or work_path(cfg, "train")
    result = train_stage(cfg, args.problems or cfg.data.train, out, resume=args.resume, progress=not args.quiet,
                         first_round=args.first_round)
    print(f"trained {result.steps_done} steps ({result.skipped_steps} skipped) -> {result.final_dir}",
          file=sys.stderr)
    if result.guard_fired:
        print(f"collapse guard ended training at step {result.guard_fired['step']}: "
              f"{result.guard_fired['reason']}", file=sys.stderr)
    print(result.final_dir)
    return 0


def cmd_sample(args) -> int:
    from rlsc.stages import sample_and_score_stage, work_path

    cfg = _config(args)
    out = args.out or work_path(cfg, "rollouts", "samples.parquet")
    summary = sample_and_score_stage(cfg, args.problems or work_path(cfg, "data", "train.jsonl"), out,
                                     trained=args.trained, round_index=args.round)
    print(json.dumps(summary, indent=2))
    print(f"rollouts -> {out}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from rlsc.stages import evaluate_stage, work_path

    cfg = _config(args)
    out = args.out or work_path(cfg, "eval", "trained" if args.trained else "base")
    metrics = evaluate_stage(cfg, args.problems or cfg.data.eval, out, trained=args.trained,
                             progress=not args.quiet)
    acc = metrics["pass@1"]
    print(f"pass@1 {acc['correct']}/{acc['n']} = {100 * acc['value']:.1f}% "
          f"[{100 * acc['ci_low']:.1f}, {100 * acc['ci_high']:.1f}] -> {out}/metrics.json", file=sys.stderr)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_compare(args) -> int:
    from rlsc.evaluate import compare, read_records

    result = compare(read_records(args.a), read_records(args.b), samples=args.bootstrap, seed=args.seed)
    print(json.dumps(result, indent=2))
    print(f"B - A = {100 * result['difference']:+.1f} pts, 95% paired bootstrap "
          f"[{100 * result['ci_low']:+.1f}, {100 * result['ci_high']:+.1f}] on {result['n']} problems",
          file=sys.stderr)
    return 0


def cmd_grade(args) -> int:
    from rlsc.answers import grade

    path = Path(args.file)
    if not path.is_file():
        raise RlscError(f"file not found: {path}")
    total = correct = 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlscError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "prediction" not in record or "gold" not in record:
            raise RlscError(f"{path}:{line_no}: each record needs 'prediction' and 'gold'")
        gold = None if record["gold"] is None else str(record["gold"])
        record["extracted"], record["correct"] = grade(str(record["prediction"]), gold)
        total += 1
        correct += record["correct"]
        print(json.dumps(record, ensure_ascii=False))
    share = 100 * correct / total if total else 0.0
    print(f"graded {total} records: {correct} correct ({share:.1f}%)", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from rlsc.stages import check_data_stage, check_rollouts_stage, work_path

    cfg = _config(args)
    if args.rollouts:
        check_rollouts_stage(cfg, args.rollouts)
        print(f"rollouts contract passed: {args.rollouts}", file=sys.stderr)
        return 0
    report = check_data_stage(cfg, args.train or work_path(cfg, "data", "train.jsonl"),
                              args.eval or work_path(cfg, "data", "eval.jsonl"))
    print(f"data contracts passed -> {report}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from rlsc.stages import report_from_files

    path = report_from_files(_config(args))
    print(path.read_text())
    return 0


def cmd_register(args) -> int:
    from rlsc.stages import register_stage

    decision = register_stage(_config(args))
    print(json.dumps(decision, indent=2, default=str))
    print(f"version {decision['version']}: {decision['decision']} ({decision['reason']})", file=sys.stderr)
    return 0


def cmd_registry_list(args) -> int:
    from rlsc.tracking import list_versions

    for v in list_versions(_config(args)):
        print(json.dumps(v, default=str))
    return 0


def cmd_registry_promote(args) -> int:
    import getpass

    from rlsc.tracking import promote

    cfg = _config(args)
    if args.name:
        cfg.registry.model_name = args.name
    promote(cfg, args.version, who=args.who or getpass.getuser(), why=args.why)
    print(f"{cfg.registry.model_name} v{args.version} is now champion", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from rlsc.stages import run_all

    report, table = run_all(_config(args), progress=not args.quiet)
    print(table)
    print(f"\nreport: {report}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsc", description="Label-free RL fine-tuning from self-confidence (RLSC).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="assemble/download the configured model and print its folder")
    _add_config_args(p)
    p.add_argument("--check", action="store_true", help="also load it once")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("prepare", help="write the train questions and held-out eval problems")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="RLSC-train the configured model on unlabeled questions")
    _add_config_args(p)
    p.add_argument("--problems", help="problem source (default: data.train)")
    p.add_argument("--out", help="output folder (default: <work_dir>/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--first-round", help="round 0's rollouts from `rlsc sample --round 0` (not sampled again)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample-and-score: k samples per question -> rollouts Parquet")
    _add_config_args(p)
    p.add_argument("--problems", help="problem file (default: <work_dir>/data/train.jsonl)")
    p.add_argument("--trained", help="a trained folder; default: the base model")
    p.add_argument("--out", help="Parquet file (default: <work_dir>/rollouts/samples.parquet)")
    p.add_argument("--round", type=int, help="sample the questions of this training round (for train --first-round)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="greedy pass@1 (and maj@k, pass@k with eval.k) on problems with gold")
    _add_config_args(p)
    p.add_argument("--problems", help="problem source (default: data.eval)")
    p.add_argument("--trained", help="a trained folder (train's final/); default: the base model")
    p.add_argument("--out", help="output folder for metrics.json and problems.jsonl")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="paired difference B - A of two per-problem files, bootstrap 95%% CI")
    p.add_argument("a", help="per-problem JSONL of run A (e.g. the base model)")
    p.add_argument("b", help="per-problem JSONL of run B")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("grade", help="grade JSONL records with 'prediction' and 'gold'; JSONL to stdout")
    p.add_argument("file")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("check", help="data contracts (Great Expectations) on the problem files or a rollouts file")
    _add_config_args(p)
    p.add_argument("--train", help="train problems (default: <work_dir>/data/train.jsonl)")
    p.add_argument("--eval", help="eval problems (default: <work_dir>/data/eval.jsonl)")
    p.add_argument("--rollouts", help="check this rollouts Parquet file instead")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="before/after report from the eval folders")
    _add_config_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("register", help="log the run to MLflow and register the model behind the promotion gate")
    _add_config_args(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("registry", help="the MLflow model registry: list versions, promote by hand")
    registry = p.add_subparsers(dest="registry_command", required=True)
    q = registry.add_parser("list", help="versions with their aliases and gate evidence")
    _add_config_args(q)
    q.set_defaults(func=cmd_registry_list)
    q = registry.add_parser("promote", help="move the champion alias to NAME VERSION, recording who and why")
    _add_config_args(q)
    q.add_argument("name", help="registered model name")
    q.add_argument("version", help="version to promote")
    q.add_argument("--why", required=True, help="reason, recorded as a tag")
    q.add_argument("--who", help="who promotes (default: the login name)")
    q.set_defaults(func=cmd_registry_promote)

    p = sub.add_parser("run", help="the main job: prepare, evaluate base, train, evaluate, compare, report")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # dozens of INFO lines per suite
    try:
        return args.func(args)
    except RlscError as e:
        print(f"rlsc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
