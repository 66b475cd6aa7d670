"""Pipeline fixtures: the tiny model as a config profile, overrides every pipeline test shares."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")


def tiny_overrides(model_dir, work_dir) -> list[str]:
    return [
        f"model.name={model_dir}", f"paths.work_dir={work_dir}", "model.lora.r=4",
        "data.train=synthetic:4:1", "data.eval=synthetic:8:2", "sampling.k=4", "sampling.max_new_tokens=6",
        "eval.max_new_tokens=6", "eval.bootstrap_samples=200", "train.steps=2", "train.questions_per_step=1",
        "prompt.few_shot=[]",
    ]


@pytest.fixture()
def tiny_cfg_overrides(tiny_model_dir, tmp_path):
    return tiny_overrides(tiny_model_dir, tmp_path / "work")
