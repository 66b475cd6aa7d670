"""The profiling script on a tiny model: both phases profiled, grouped by kind of work, rendered."""

from __future__ import annotations

import json

from bench import profile


def test_profile_reports_both_phases_by_kind_of_work(tiny_model_dir, tmp_path):
    assert profile.main(["--model", str(tiny_model_dir), "--k", "3", "--max-new-tokens", "5",
                         "--set", "prompt.few_shot=[]", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("profile-*.json")
    result = json.loads(report.read_text())
    for phase in ("sample", "update"):
        p = result["phases"][phase]
        assert p["wall_s"] > 0 and p["kinds"]["matmul"] > 0
        assert abs(sum(p["kinds"].values()) - p["profiled_s"]) < 1e-9
    assert result["phases"]["sample"]["completion_tokens"] > 0
    assert "### update" in (tmp_path / report.name.replace(".json", ".md")).read_text()


def test_operators_are_grouped_by_kind():
    assert profile.kind_of("aten::mm") == "matmul"
    assert profile.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile.kind_of("aten::cat") == "kv cache / concat"
    assert profile.kind_of("aten::_log_softmax") == "vocabulary statistics"
    assert profile.kind_of("aten::_foreach_add_") == "optimizer"
    assert profile.kind_of("aten::silu") == "other"
