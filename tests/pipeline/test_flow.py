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

    # the registry from the command line (a subprocess: Prefect's log handler holds on to
    # pytest's captured streams, so capsys must not be used around flow runs)
    import subprocess
    import sys

    def rlsc(*args):
        out = subprocess.run([sys.executable, "-m", "rlsc.cli", *args,
                              *[a for o in tiny_cfg_overrides for a in ("--set", o)]],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    listed = rlsc("registry", "list")
    assert listed[-1]["version"] == decision["version"] and "decision" in listed[-1]["gate"]
    rlsc("registry", "promote", "rlsc-policy", decision["version"], "--why", "reviewed", "--who", "ci")
    listed = rlsc("registry", "list")
    assert "champion" in listed[-1]["aliases"] and listed[-1]["tags"]["promoted_by"] == "ci"


def test_the_flow_can_be_served_on_a_cron_schedule():
    from flows.retrain import retrain

    deployment = retrain.to_deployment(name="rlsc-retrain-scheduled", cron="0 3 * * 1",
                                       parameters={"config": "params.yaml", "overrides": []})
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]


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
