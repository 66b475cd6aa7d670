"""MLflow tracking and the model registry: runs with the config and lineage, training and evaluation
metrics, the trained policy as a pyfunc model, and a promotion gate on paired-bootstrap evidence.

Without a configured tracking URI everything lives under `<work_dir>/mlflow` (a sqlite database and
an artifact folder), so it works offline. mlflow is imported inside the functions: importing it
takes seconds, and most commands never track anything.

The gate: a new registered version becomes `champion` only if the lower bound of the 95% interval
of (candidate - target) greedy accuracy on the same problems is above `registry.margin`; the target
is the current champion (its per-problem file is downloaded from its run) or, with no champion yet,
the base model. Otherwise the version is the `challenger`. Every decision is kept as version tags.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rlsc.config import Config, PromptConfig
from rlsc.errors import RlscError
from rlsc.models import sha256_file

CHAMPION, CHALLENGER = "champion", "challenger"
CANDIDATE_PREFIX = "trained"  # the evaluation of the trained model; the gate reads it from runs
POLICY_ARTIFACT = "policy"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000  # and on a tag value
TABLE_COLUMNS = ("id", "question", "gold", "completion", "extracted", "correct", "confidence")
# Models from code: the logged model is this script, not a pickle (which MLflow can be set to refuse).
MODEL_CODE = "import mlflow\nfrom rlsc.tracking import RlscPolicy\n\nmlflow.models.set_model(RlscPolicy())\n"
MODEL_REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "pandas")


def problems_artifact(prefix: str) -> str:
    """Run-relative path of the per-problem records of one evaluation."""
    return f"eval/{prefix}/problems.jsonl"


# ---------------------------------------------------------------- connection


def _mlflow():
    # Telemetry would try the network on every process start; the user can still turn it on.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def _default_store(cfg: Config) -> Path:
    return Path(cfg.paths.work_dir).expanduser().resolve() / "mlflow"


def _default_uri(cfg: Config) -> str:
    return f"sqlite:///{_default_store(cfg) / 'mlflow.db'}"


def resolve_tracking_uri(cfg: Config) -> str:
    """registry.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite in <work_dir>/mlflow."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return _default_uri(cfg)


def _connect(cfg: Config):
    """(mlflow, client) pointed at the tracking URI; the model registry lives in the same store."""
    mlflow = _mlflow()
    uri = resolve_tracking_uri(cfg)
    if uri == _default_uri(cfg):
        _default_store(cfg).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(cfg: Config, client) -> str:
    """The experiment's id, creating it; our own sqlite store keeps artifacts next to the database
    (the sqlite default would be ./mlruns in whatever folder the process started from)."""
    name = cfg.registry.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if resolve_tracking_uri(cfg) == _default_uri(cfg):
        artifacts = _default_store(cfg) / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    return client.create_experiment(name, artifact_location=location)


# ---------------------------------------------------------------- runs


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _tag_value(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text[:MAX_TAG_CHARS]


@contextmanager
def start_run(cfg: Config, run_name: str, tags: dict[str, Any]) -> Iterator[Any]:
    """An active MLflow run in the configured experiment, with the flattened config as params."""
    mlflow, client = _connect(cfg)
    experiment_id = _experiment_id(cfg, client)
    mlflow.set_experiment(experiment_id=experiment_id)
    run_tags = {k: _tag_value(v) for k, v in tags.items()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
        params = {k: _param_value(v) for k, v in cfg.flat().items()}
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        yield run


# ---------------------------------------------------------------- lineage


def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _normalise(question: Any) -> str:
    text = question if isinstance(question, str) else getattr(question, "question", str(question))
    return " ".join(text.split())


def lineage_tags(repo_dir: str | Path, data_files: list[Path], train_questions: Iterable[Any],
                 eval_questions: Iterable[Any], test_time_training: bool) -> dict[str, str]:
    """Run tags that say what produced a run: code commit, DVC lock, data hashes, train/eval overlap."""
    repo_dir = Path(repo_dir)
    commit = _git(repo_dir, "rev-parse", "HEAD")
    status = _git(repo_dir, "status", "--porcelain") if commit is not None else None
    lock = repo_dir / "dvc.lock"
    tags = {
        "git_commit": commit.strip() if commit else "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
        "dvc_lock_sha256": sha256_file(lock) if lock.is_file() else "none",
        "test_time_training": str(bool(test_time_training)).lower(),
    }
    for path in map(Path, data_files):
        tags[f"data.{_sanitize(path.name)}.sha256"] = sha256_file(path)
    overlap = {_normalise(q) for q in train_questions} & {_normalise(q) for q in eval_questions}
    tags["train_eval_overlap"] = str(len(overlap))
    return tags


# ---------------------------------------------------------------- metrics


def _sanitize(name: str) -> str:
    """A metric or tag name MLflow accepts: '@' spelt out, other odd characters to '_', '/' kept."""
    name = re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))
    return re.sub(r"/+", "/", name).strip("/") or "_"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _log_metric_batch(metrics: list[tuple[str, float, int]]) -> None:
    """One database round trip per 1000 metrics instead of one per value."""
    mlflow = _mlflow()
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    entities = [Metric(key=k, value=v, timestamp=now, step=s) for k, v, s in metrics]
    for i in range(0, len(entities), 1000):
        client.log_batch(run_id, metrics=entities[i : i + 1000])


def _require_run():
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        raise RlscError("no active MLflow run: call this inside `with rlsc.tracking.start_run(...)`")
    return mlflow


def log_training(metrics_jsonl_path: str | Path) -> int:
    """Every per-step training metric at its step, plus the plots and the file next to it; returns
    how many values were logged."""
    mlflow = _require_run()
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        raise RlscError(f"training metrics not found: {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    values = []
    for row in rows:
        step = int(row.get("step", 0))
        for key, value in row.items():
            number = _number(value)
            if key != "step" and number is not None:
                values.append((_sanitize(key), number, step))
    _log_metric_batch(values)
    mlflow.log_artifact(str(path), artifact_path="train")
    for png in sorted(path.parent.glob("*.png")):
        mlflow.log_artifact(str(png), artifact_path="train")
    return len(values)


def flatten_eval_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """{'pass@1': {'value', 'ci_low', ...}} -> {'<prefix>/pass_at_1': v, '<prefix>/pass_at_1/ci_low': lo}."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = _sanitize(f"{prefix}/{key}")
        if isinstance(value, dict):
            for sub, inner in value.items():
                number = _number(inner)
                if number is not None:
                    flat[name if sub == "value" else f"{name}/{_sanitize(sub)}"] = number
        elif (number := _number(value)) is not None:
            flat[name] = number
    return flat


def log_evaluation(metrics: dict[str, Any], prefix: str, records: list[dict[str, Any]],
                   max_rows: int) -> None:
    """Scalar eval metrics, a table of sample completions, and the per-problem file the gate reads."""
    mlflow = _require_run()
    mlflow.log_metrics(flatten_eval_metrics(metrics, prefix))
    if records and max_rows > 0:
        rows = records[:max_rows]
        table = {c: [r.get(c) for r in rows] for c in TABLE_COLUMNS}
        mlflow.log_table(table, artifact_file=f"{prefix}_completions.json")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "problems.jsonl"
        file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        mlflow.log_artifact(str(file), artifact_path=str(Path(problems_artifact(prefix)).parent))


# ---------------------------------------------------------------- the model


_POLICY_CLASS = None


def __getattr__(name: str):
    # `rlsc.tracking.RlscPolicy` is built on first access (the logged model code imports it)
    if name == "RlscPolicy":
        return _policy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _policy_class():
    """RlscPolicy subclasses mlflow's PythonModel; it is built on first use so that importing
    rlsc.tracking does not import mlflow."""
    global _POLICY_CLASS
    if _POLICY_CLASS is None:
        from mlflow.pyfunc import PythonModel

        class _RlscPolicy(PythonModel):
            """Greedy completions of the trained policy for a `question` column (or a list of str)."""

            def load_context(self, context):
                from rlsc.config import ModelConfig
                from rlsc.models import load_policy

                self.config = dict(context.model_config or {})
                folder = Path(context.artifacts[POLICY_ARTIFACT])
                if (folder / "adapter_config.json").is_file():
                    base = ModelConfig(name=self.config["base_model"], lora={"enabled": False})
                    self.model, self.tokenizer = load_policy(base, adapter=str(folder), trainable=False)
                else:  # full fine-tuning saved a complete model folder
                    full = ModelConfig(name=str(folder), lora={"enabled": False})
                    self.model, self.tokenizer = load_policy(full, trainable=False)
                import torch

                if torch.cuda.is_available():
                    self.model.to("cuda")
                self.prompt = PromptConfig.model_validate(self.config.get("prompt") or {})

            def predict(self, context, model_input, params=None):
                from rlsc.prompts import render_prompt
                from rlsc.sampling import generate_rollouts

                questions = _questions(model_input)
                max_new = int(self.config.get("max_new_tokens", 128))
                batch = int(self.config.get("batch_size", 8))
                out: list[str] = []
                for i in range(0, len(questions), batch):
                    chunk = questions[i : i + batch]
                    prompts = [render_prompt(self.tokenizer, q, self.prompt) for q in chunk]
                    r = generate_rollouts(self.model, self.tokenizer, prompts, k=1, temperature=1.0,
                                          max_new_tokens=max_new, greedy=True)
                    out.extend(r.texts)
                return out

        # named as the module attribute it is reached by
        _RlscPolicy.__name__ = _RlscPolicy.__qualname__ = "RlscPolicy"
        _RlscPolicy.__module__ = __name__
        _POLICY_CLASS = _RlscPolicy
    return _POLICY_CLASS


def _questions(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        if "question" not in model_input.columns:
            raise RlscError(f"model input needs a 'question' column (got {list(model_input.columns)})")
        return [str(q) for q in model_input["question"]]
    if isinstance(model_input, dict):
        return [str(q) for q in model_input["question"]]
    return [str(q) for q in model_input]


def _pinned(packages: Iterable[str]) -> list[str]:
    """The installed versions, so a served model gets the libraries it was trained with."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(final_dir: str | Path, base_model: str, signature_example: list[str], *,
              prompt: PromptConfig | None = None, model_config: dict[str, Any] | None = None) -> str:
    """Log the trained folder (LoRA adapter or full model) as a pyfunc model of the active run and
    return its model URI. The signature and requirements are explicit: nothing runs the model here."""
    mlflow = _require_run()
    import pandas as pd
    from mlflow.models import infer_signature

    final_dir = Path(final_dir)
    if not ((final_dir / "adapter_config.json").is_file() or any(final_dir.glob("*.safetensors"))):
        raise RlscError(f"{final_dir}: not a trained model folder (no adapter_config.json or .safetensors)")
    examples = list(signature_example) or ["What is 2 + 3?"]
    signature = infer_signature(pd.DataFrame({"question": examples}), [""] * len(examples))
    config = {"base_model": base_model, "max_new_tokens": 128, "batch_size": 8,
              "prompt": (prompt or PromptConfig()).model_dump(mode="json"), **(model_config or {})}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "rlsc_policy.py"
            code.write_text(MODEL_CODE)
            info = mlflow.pyfunc.log_model(
                name="policy", python_model=str(code), artifacts={POLICY_ARTIFACT: str(final_dir)},
                signature=signature, pip_requirements=_pinned(MODEL_REQUIREMENTS), model_config=config,
            )
    except Exception as e:  # anything from MLflow or the artifact store: nothing gets registered
        raise RlscError(f"logging the model from {final_dir} to MLflow failed: "
                        f"{type(e).__name__}: {e}") from e
    return info.model_uri


# ---------------------------------------------------------------- registry and gate


@dataclass
class GateDecision:
    version: str
    decision: str  # "champion" or "challenger"
    reason: str
    comparison: dict[str, Any] = field(default_factory=dict)
    guard: str | None = None  # what the collapse guard did to the weights registered, when it acted


def guard_note(summary: dict[str, Any] | None) -> str | None:
    """One sentence on what the collapse guard did (train/guard.json), or None when it never ended training."""
    if not summary:
        return None
    restored = summary.get("restored")
    if restored:
        return (f"collapse guard rolled back at step {summary['step']} ({summary['reason']}): this version holds "
                f"the healthy weights from the start of step {restored['step']}, not the collapsed ones")
    return f"collapse guard stopped training at step {summary['step']} ({summary['reason']}): current weights kept"


def guard_tags(summary: dict[str, Any] | None) -> dict[str, str]:
    """guard.* tags for the run and the model version: outcome, signal, value, threshold, step, restored step."""
    if not summary:
        return {"guard.outcome": "passed"}
    tags = {"guard.outcome": summary["action"], "guard.signal": summary["signal"],
            "guard.value": f"{summary['value']:.4g}", "guard.threshold": f"{summary['threshold']:g}",
            "guard.step": str(summary["step"]), "guard.note": guard_note(summary)}
    if summary.get("restored"):
        tags["guard.restored_step"] = str(summary["restored"]["step"])
    return tags


def _aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _champion_records(client, mv) -> list[dict[str, Any]] | str:
    """The champion's per-problem records, downloaded from its run, or why they cannot be had."""
    from mlflow.exceptions import MlflowException

    from rlsc.evaluate import read_records

    missing = f"champion v{mv.version} has no {problems_artifact(CANDIDATE_PREFIX)} in its run"
    if not mv.run_id:
        return missing
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(mv.run_id, problems_artifact(CANDIDATE_PREFIX), tmp)
        except (MlflowException, OSError) as e:  # without the champion's records the gate cannot compare
            return f"{missing} ({type(e).__name__})"
        return read_records(local)


def _fmt(x: float) -> str:
    return f"{x:+.3f}"


def _refuse(reason: str) -> GateDecision:
    return GateDecision("", CHALLENGER, f"not promoted: {reason}", {})


def _decide(target: list[dict], candidate: list[dict], target_name: str, cfg: Config) -> GateDecision:
    """Compare on the same problems and apply the margin; the reason carries the numbers."""
    from rlsc.evaluate import compare

    if not candidate:
        return _refuse("the candidate has no evaluation records")
    target_ids, candidate_ids = {r["id"] for r in target}, {r["id"] for r in candidate}
    if target_ids != candidate_ids:
        # a paired comparison on other problems would be meaningless: refuse rather than guess
        kind = target_name.split()[0]
        return _refuse(f"{kind} evaluated on different problems ({target_name}: {len(target_ids)} problems, "
                       f"candidate: {len(candidate_ids)}, shared: {len(target_ids & candidate_ids)})")
    c = compare(target, candidate, samples=cfg.eval.bootstrap_samples, seed=cfg.eval.seed)
    margin = cfg.registry.margin
    passed = c["ci_low"] > margin
    evidence = (f"lower bound {_fmt(c['ci_low'])} {'>' if passed else '<='} margin {margin:.3f} "
                f"vs {target_name} "
                f"(diff {_fmt(c['difference'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}], n={c['n']}; "
                f"accuracy {c['accuracy_b']:.3f} vs {c['accuracy_a']:.3f})")
    return GateDecision("", CHAMPION if passed else CHALLENGER,
                        f"{'promoted' if passed else 'not promoted'}: {evidence}", c)


def _gate_tags(decision: GateDecision, target_name: str, previous: str | None) -> dict[str, str]:
    c = decision.comparison
    tags = {"gate.decision": decision.decision, "gate.reason": decision.reason,
            "gate.compared_to": target_name, "gate.previous_champion": previous or "none"}
    for key in ("difference", "ci_low", "ci_high", "n", "accuracy_a", "accuracy_b"):
        tags[f"gate.{key}"] = str(c.get(key, "n/a"))
    return tags


def register_and_gate(cfg: Config, run_id: str, model_uri: str, candidate_records: list[dict],
                      baseline_records: list[dict], guard_summary: dict[str, Any] | None = None) -> GateDecision:
    """Register a new version and give it `champion` (beats the champion, or the base model when
    there is none, by more than the margin) or `challenger`; the evidence goes on version and run.
    With `guard_summary` (train/guard.json), the guard's outcome is tagged and, for a rollback, the
    version's description says it holds the healthy weights.

    The run should carry its records at eval/trained/problems.jsonl (`log_evaluation(..., "trained",
    ...)`): the next candidate is compared with them if this version becomes the champion."""
    mlflow, client = _connect(cfg)
    name = cfg.registry.model_name
    mv = mlflow.register_model(model_uri, name)
    version = str(mv.version)
    previous = _aliases(client, name).get(CHAMPION)
    if previous is None:
        decision = _decide(baseline_records, candidate_records, "baseline", cfg)
        target_name = "baseline"
    else:
        target_name = f"champion v{previous}"
        target = _champion_records(client, client.get_model_version(name, previous))
        decision = (_refuse(target) if isinstance(target, str)
                    else _decide(target, candidate_records, target_name, cfg))
    decision.version = version
    client.set_registered_model_alias(name, decision.decision, version)
    from mlflow.entities import RunTag

    decision.guard = guard_note(guard_summary)
    if decision.guard:
        client.update_model_version(name, version, description=decision.guard)
    tags = {**_gate_tags(decision, target_name, previous), **guard_tags(guard_summary)}
    for key, value in tags.items():  # the registry has no batch call for version tags
        client.set_model_version_tag(name, version, key, value)
    tags["registry.version"] = f"{name}/{version}"
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return decision


def _iso(ms: int | None) -> str | None:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat() if ms else None


def list_versions(cfg: Config) -> list[dict[str, Any]]:
    """Every version of the registered model, oldest first, with its aliases and gate evidence."""
    _, client = _connect(cfg)
    name = cfg.registry.model_name
    aliases = _aliases(client, name) if client.search_registered_models(f"name='{name}'") else {}
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        version = str(mv.version)
        rows.append({
            "version": version,
            "aliases": sorted(a for a, v in aliases.items() if v == version),
            "run_id": mv.run_id,
            "created": _iso(mv.creation_timestamp),
            "gate": {k.removeprefix("gate."): v for k, v in mv.tags.items() if k.startswith("gate.")},
            "tags": dict(mv.tags),
        })
    return sorted(rows, key=lambda r: int(r["version"]))


def promote(cfg: Config, version: str | int, who: str, why: str) -> str | None:
    """Make a version the champion by hand, recording who, why, when and the champion it replaced
    (returned)."""
    _, client = _connect(cfg)
    from mlflow.exceptions import MlflowException

    name, version = cfg.registry.model_name, str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise RlscError(f"{name} has no version {version}: {e}") from None
    previous = _aliases(client, name).get(CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    tags = {"promoted_by": who, "promoted_reason": why,
            "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "promoted_previous_champion": previous or "none"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, _tag_value(value))
    return previous
