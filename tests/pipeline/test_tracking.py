"""MLflow tracking and the promotion gate against a real sqlite store in tmp_path (offline).

The gate tests register a stub model folder (an MLmodel file is all the registry needs); the last
test logs, registers and serves a real LoRA-adapted tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before anything imports mlflow

from rlsc import tracking
from rlsc.config import load_config
from rlsc.errors import RlscError

N = 60
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised empty sqlite store: creating the schema takes ~10 s here, copying it 0.1 s."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def cfg(tmp_path, monkeypatch, empty_store):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # so a stray ./mlruns would show up here
    (tmp_path / "work" / "mlflow").mkdir(parents=True)
    shutil.copy(empty_store, tmp_path / "work" / "mlflow" / "mlflow.db")  # each test: its own store
    return load_config(None, [f"paths.work_dir={tmp_path / 'work'}", "eval.bootstrap_samples=2000"])


def answer(i: int, correct: int) -> str:
    return str(i + 1 if i < correct else 0)


def records(correct: int, n: int = N, prefix: str = "p") -> list[dict]:
    """Per-problem records where the first `correct` problems are right (nested, so comparable)."""
    return [{"id": f"{prefix}{i:03d}", "question": f"What is {i} + 1?", "gold": str(i + 1),
             "completion": f"\\boxed{{{answer(i, correct)}}}", "extracted": answer(i, correct),
             "correct": i < correct, "confidence": 0.5, "length": 8, "truncated": False}
            for i in range(n)]


def summary(recs: list[dict]) -> dict:
    c = sum(r["correct"] for r in recs)
    return {"n": len(recs), "pass@1": {"value": c / len(recs), "correct": c, "n": len(recs),
                                      "ci_low": 0.0, "ci_high": 1.0}, "mean_length": 8.0, "model": "x"}


def candidate(cfg, recs: list[dict]) -> tuple[str, str]:
    """A run with the trained evaluation and a stub model folder: (run_id, model_uri)."""
    import mlflow

    with tracking.start_run(cfg, "candidate", {"kind": "test"}) as run:
        tracking.log_evaluation(summary(recs), "trained", recs, max_rows=5)
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    return run.info.run_id, f"runs:/{run.info.run_id}/model"


def gate(cfg, correct: int, baseline: int = 20, **kw):
    run_id, uri = candidate(cfg, records(correct, **kw))
    return run_id, tracking.register_and_gate(cfg, run_id, uri, records(correct, **kw), records(baseline))


def champion(cfg) -> str:
    import mlflow

    # the sqlite store gives versions as int; rlsc.tracking hands them out as str
    return str(mlflow.MlflowClient().get_model_version_by_alias(cfg.registry.model_name, "champion").version)


def test_first_version_beats_baseline_and_becomes_champion(cfg, tmp_path):
    import mlflow

    run_id, d = gate(cfg, correct=50, baseline=20)
    assert (d.version, d.decision) == ("1", "champion")
    assert d.comparison["difference"] == pytest.approx(0.5) and d.comparison["ci_low"] > 0.3
    client = mlflow.MlflowClient()
    tags = client.get_model_version(cfg.registry.model_name, "1").tags
    assert tags["gate.decision"] == "champion" and tags["gate.compared_to"] == "baseline"
    assert tags["gate.n"] == "60" and float(tags["gate.ci_low"]) == pytest.approx(d.comparison["ci_low"])
    assert "lower bound +0." in tags["gate.reason"] and "n=60" in tags["gate.reason"]
    run = client.get_run(run_id)
    assert run.data.tags["gate.decision"] == "champion"
    assert run.data.metrics["trained/pass_at_1"] == pytest.approx(50 / 60)
    assert run.data.metrics["trained/pass_at_1/ci_high"] == 1.0 and "trained/model" not in run.data.metrics
    # the default store lives under work_dir, not in the working folder
    assert (tmp_path / "work" / "mlflow" / "mlflow.db").is_file()
    assert any((tmp_path / "work" / "mlflow" / "artifacts").rglob("problems.jsonl"))
    assert not (tmp_path / "mlruns").exists()


def test_a_rolled_back_run_registers_its_healthy_weights_and_says_so(cfg):
    import mlflow

    guard = {"step": 3, "signal": "length_ratio", "action": "rollback", "value": 0.41, "threshold": 0.6,
             "reason": "length_ratio = 0.41 is below its threshold 0.6 (rollback: restored the last healthy weights)",
             "restored": {"file": "healthy.safetensors", "step": 1}}
    run_id, uri = candidate(cfg, records(30))
    d = tracking.register_and_gate(cfg, run_id, uri, records(30), records(20), guard)
    assert "rolled back at step 3" in d.guard and "healthy weights from the start of step 1" in d.guard
    client = mlflow.MlflowClient()
    version = client.get_model_version(cfg.registry.model_name, d.version)
    assert version.description == d.guard
    assert version.tags["guard.outcome"] == "rollback" and version.tags["guard.restored_step"] == "1"
    assert version.tags["guard.signal"] == "length_ratio" and version.tags["guard.step"] == "3"
    assert client.get_run(run_id).data.tags["guard.note"] == d.guard
    # a run the guard never stopped says so too
    run_id, uri = candidate(cfg, records(30))
    d = tracking.register_and_gate(cfg, run_id, uri, records(30), records(20))
    assert d.guard is None and client.get_run(run_id).data.tags["guard.outcome"] == "passed"


def test_worse_than_champion_is_challenger_and_champion_stays(cfg):
    gate(cfg, correct=50)
    _, d = gate(cfg, correct=20)
    assert (d.version, d.decision) == ("2", "challenger")
    assert "lower bound -0." in d.reason and "<= margin 0.000 vs champion v1" in d.reason
    assert "diff -0.500" in d.reason and "n=60" in d.reason
    assert champion(cfg) == "1"


def test_better_than_champion_takes_the_alias(cfg):
    gate(cfg, correct=30, baseline=10)
    _, d = gate(cfg, correct=58)
    assert d.decision == "champion" and champion(cfg) == "2"
    assert d.comparison["accuracy_a"] == pytest.approx(0.5)  # compared with v1, not the baseline


def test_candidate_on_different_problems_is_refused(cfg):
    gate(cfg, correct=50)
    _, d = gate(cfg, correct=60, prefix="other")
    assert d.decision == "challenger" and "champion evaluated on different problems" in d.reason
    assert "shared: 0" in d.reason
    assert champion(cfg) == "1"


def test_manual_promotion_and_listing(cfg):
    gate(cfg, correct=50)
    gate(cfg, correct=20)
    assert tracking.promote(cfg, 2, who="alice", why="wins on the new split") == "1"
    versions = tracking.list_versions(cfg)
    assert [v["version"] for v in versions] == ["1", "2"]
    v1, v2 = versions
    assert v2["aliases"] == ["challenger", "champion"]
    assert v1["aliases"] == [] and v1["gate"]["decision"] == "champion"
    assert v2["gate"]["decision"] == "challenger"
    assert v2["tags"]["promoted_by"] == "alice" and v2["tags"]["promoted_reason"] == "wins on the new split"
    assert v2["tags"]["promoted_previous_champion"] == "1" and v2["tags"]["promoted_at"]
    assert v1["run_id"] and v1["created"]
    with pytest.raises(RlscError, match="no version 9"):
        tracking.promote(cfg, 9, who="bob", why="typo")


def test_lineage_tags(tmp_path):
    a, b = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    a.write_text('{"id": 1}\n')
    b.write_text('{"id": 2}\n')
    tags = tracking.lineage_tags(REPO, [a, b], ["What is  1 + 1?", "Two\nlines", "only train"],
                                 ["What is 1 + 1? ", "Two lines", "only eval"], test_time_training=False)
    assert tags["train_eval_overlap"] == "2" and tags["test_time_training"] == "false"
    assert tags["data.train.jsonl.sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert tags["data.eval.jsonl.sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in {"true", "false", "unknown"} and tags["dvc_lock_sha256"]
    outside = tracking.lineage_tags(tmp_path, [], [], [], test_time_training=True)
    assert outside["git_commit"] == "unknown" and outside["dvc_lock_sha256"] == "none"
    assert outside["train_eval_overlap"] == "0" and outside["test_time_training"] == "true"


def test_training_metrics_and_params(cfg, tmp_path):
    import mlflow

    train = tmp_path / "train"
    train.mkdir()
    rows = [{"step": s, "loss": 1.0 / (s + 1), "answers/distinct": 2 + s, "acc@1": 0.1 * s} for s in range(3)]
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (train / "training.png").write_bytes(b"\x89PNG\r\n")
    long = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"instruction": "x" * 7000})})
    with tracking.start_run(long, "train", {"stage": "train", "flag": True}) as run:
        assert tracking.log_training(train / "metrics.jsonl") == 9
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "acc_at_1")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "answers/distinct")] == [0, 1, 2]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "train")} == {
        "train/metrics.jsonl", "train/training.png"}
    data = client.get_run(run.info.run_id).data
    assert len(data.params["prompt.instruction"]) == 6000 and data.params["train.steps"] == "10"
    assert json.loads(data.params["train.betas"]) == [0.9, 0.999]
    assert data.tags["stage"] == "train" and data.tags["flag"] == "true"


def test_log_model_register_and_serve(cfg, tiny_model_dir, tmp_path):
    import mlflow
    import pandas as pd

    from rlsc.config import ModelConfig
    from rlsc.models import load_policy, save_trained

    lora = {"enabled": True, "r": 2, "alpha": 4}
    model, tok = load_policy(ModelConfig(name=str(tiny_model_dir), lora=lora))
    final = save_trained(model, tok, tmp_path / "final")
    recs = records(50)
    with tracking.start_run(cfg, "model", {}) as run:
        tracking.log_evaluation(summary(recs), "trained", recs, max_rows=3)
        uri = tracking.log_model(final, str(tiny_model_dir), ["What is 2 + 3?"],
                                 model_config={"max_new_tokens": 4})
    d = tracking.register_and_gate(cfg, run.info.run_id, uri, recs, records(20))
    assert d.decision == "champion"
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    out = served.predict(pd.DataFrame({"question": ["What is 1 + 1?", "What is 2 + 2?"]}))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert type(served.unwrap_python_model()).__name__ == "RlscPolicy"


def test_log_model_refuses_a_folder_without_weights(cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with tracking.start_run(cfg, "bad", {}), pytest.raises(RlscError, match="not a trained model"):
        tracking.log_model(tmp_path / "empty", "base", ["q"])
