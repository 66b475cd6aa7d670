"""One typed config: YAML plus --set overrides, refused with the offending key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsc.config import Config, dump_config, load_config
from rlsc.errors import RlscError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_sampling_and_the_main_job():
    cfg = load_config()
    assert (cfg.sampling.k, cfg.sampling.temperature) == (16, 0.5)
    assert cfg.train.objective == "rlsc" and cfg.train.weighting == "sequence"
    assert cfg.train.max_grad_norm == 1.0 and cfg.model.trust_remote_code is False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 3.0e-5\n  steps: 7\nsampling:\n  k: 8\n")
    cfg = load_config(path, ["train.steps=9", "prompt.few_shot=[]", "model.lora.enabled=false"])
    assert (cfg.train.lr, cfg.train.steps, cfg.sampling.k) == (3e-5, 9, 8)
    assert cfg.prompt.few_shot == [] and cfg.model.lora.enabled is False


@pytest.mark.parametrize("override,named", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=-1", "train.lr"),
    ("sampling.k=zero", "sampling.k"),
    ("train.objective=ppo", "train.objective"),
    ("bogus.key=1", "bogus: unknown key"),
    ("model.lora.r=0", "model.lora.r"),
])
def test_bad_keys_and_values_are_refused_by_name(override, named):
    with pytest.raises(RlscError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(RlscError, match="expected section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(RlscError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RlscError, match="not valid YAML"):
        load_config(bad)


def test_params_yaml_is_valid_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "params.yaml")
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert "train.lr" in cfg.flat() and isinstance(Config().flat()["sampling.k"], int)
