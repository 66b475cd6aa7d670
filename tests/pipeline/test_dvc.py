"""`dvc repro` in a temporary copy of the repository, on the tiny model: all stages run, a second
repro is a no-op, and a changed training parameter reruns only training and what follows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
AFTER_TRAINING = {"train", "evaluate_trained", "report", "register"}
ALL_STAGES = {"prepare", "check", "evaluate_base", "sample"} | AFTER_TRAINING

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None,
                                reason="dvc is not installed in this environment")


def _run(args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _write_params(repo: Path, overrides: list[str]) -> None:
    from rlsc.config import dump_config, load_config

    (repo / "params.yaml").write_text(dump_config(load_config(None, overrides)))


@pytest.fixture()
def repo_copy(tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "dvc.lock").unlink(missing_ok=True)  # the recorded real run is not this tiny one
    _write_params(repo, tiny_overrides(tiny_model_dir, "outputs"))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], repo)
    return repo


def test_repro_runs_all_then_nothing_then_only_from_training(repo_copy, tiny_model_dir):
    first = _run(["dvc", "repro"], repo_copy)
    assert _ran(first) == ALL_STAGES
    assert (repo_copy / "dvc.lock").is_file()
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == ALL_STAGES

    second = _run(["dvc", "repro"], repo_copy)
    assert _ran(second) == set()

    _write_params(repo_copy, [*tiny_overrides(tiny_model_dir, "outputs"), "train.lr=3e-4"])
    third = _run(["dvc", "repro"], repo_copy)
    assert _ran(third) == AFTER_TRAINING

    metrics = _run(["dvc", "metrics", "show"], repo_copy)
    assert "pass@1" in metrics
    _run(["dvc", "push"], repo_copy)
    assert any((repo_copy / ".dvc-storage").rglob("*"))
