"""The speed benchmark on a tiny model: both workers run a step and the summary has every column.

Timings of the tiny model mean nothing; this only keeps bench/speed.py from rotting.
"""

from __future__ import annotations

import json

import pytest

from bench import speed

pytest.importorskip("trl", reason="the benchmark extra (trl) is part of `make test`'s install")


def test_speed_bench_runs_both_implementations(tiny_model_dir, tmp_path):
    flags = ["--model", str(tiny_model_dir), "--steps", "1", "--warmup", "1", "--k", "4",
             "--max-new-tokens", "6", "--set", "prompt.few_shot=[]"]
    runs = []
    for impl in ("rlsc", "trl"):
        out = tmp_path / f"{impl}.json"
        assert speed.main(["worker", "--impl", impl, "--out", str(out), *flags]) == 0
        run = json.loads(out.read_text())
        run["k"] = 4
        assert len(run["timed"]) == 1 and run["timed"][0]["tokens"] > 0
        assert run["timed"][0]["step_s"] >= run["timed"][0]["sample_s"] > 0
        runs.append(run)
    floors = {"copy_GBps": 20.0, "matmul_GFLOPs": 200.0, "torch_threads": 2}
    summary = speed.summarize(runs, floors)[str(tiny_model_dir)]
    assert summary["ratio_rlsc_over_trl"]["step"] > 0
    table = speed.markdown({str(tiny_model_dir): summary}, floors, speed.versions())
    assert "rlsc / trl" in table and table.count("\n| ") == 4


def test_floor_measurement_is_positive():
    floors = speed.measure_floors(seconds=0.2)
    assert floors["copy_GBps"] > 0 and floors["matmul_GFLOPs"] > 0
