"""The Prefect retrain flow end to end on a tiny model, against a real (test-harness) Prefect API."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("prefect")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_retrain_flow_runs_every_stage_and_leaves_its_files(prefect_api, tiny_cfg_overrides, tmp_path):
    from flows.retrain import retrain

    result = retrain(config=None, overrides=tiny_cfg_overrides)
    work = tmp_path / "work"
    for path in ["data/train.jsonl", "data/eval.jsonl", "checks/data_checks.json", "eval/base/metrics.json",
                 "rollouts/round-000000.parquet", "train/rollouts/round-000000.parquet", "train/metrics.jsonl", "train/final/adapter_config.json",
                 "eval/trained/problems.jsonl", "report/report.md", "registry/decision.json"]:
        assert (work / path).exists(), path
    decision = json.loads((work / "registry" / "decision.json").read_text())
    assert decision["decision"] in ("champion", "challenger") and result["decision"]["version"]


def test_a_failed_data_check_stops_the_flow_before_training(prefect_api, tiny_cfg_overrides, tmp_path):
    from flows.retrain import retrain
    from rlsc.checks import DataCheckError
    from rlsc.problems import write_problems
    from rlsc.synthetic import generate_problems

    # the eval file holds the train questions themselves: overlap without the test-time-training opt-in
    eval_file = write_problems(tmp_path / "leaky_eval.jsonl", generate_problems(4, 1))
    overrides = [*tiny_cfg_overrides, f"data.eval={eval_file}"]
    with pytest.raises(DataCheckError):
        retrain(config=None, overrides=overrides)
    work = tmp_path / "work"
    assert (work / "checks" / "data_checks.json").is_file()
    assert not (work / "train").exists() and not (work / "registry").exists()
