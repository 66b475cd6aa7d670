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
    assert floors["copy_GBps"] > 0 and floors["read_GBps"] > 0 and floors["matmul_GFLOPs"] > 0


def test_phase_floors_reproduce_the_issues_own_estimates():
    """The issue's arithmetic for Qwen 0.5B (630M parameters, 2.5 GB fp32) at 23.5 GB/s and
    260 GFLOP/s: sampling 16 x 128 tokens >= ~14 s, the update of 16 x 160 tokens ~37 s."""
    params, weight_bytes = 630_000_000, 630_000_000 * 4
    floors = {"copy_GBps": 12.0, "read_GBps": 23.5, "matmul_GFLOPs": 260.0}  # weights are read, not copied
    f = speed.phase_floors(params, weight_bytes, prompt_tokens=32, k=16, mean_length=128, decode_steps=128,
                           floors=floors)
    assert f["sample_decode_s"] == pytest.approx(128 * 2.52e9 / 23.5e9)  # 13.7 s: bandwidth bound
    assert f["sample_decode_s"] == pytest.approx(13.7, abs=0.1)
    assert f["sample_prefill_s"] == pytest.approx(2 * 630e6 * 32 / 260e9)  # the prompt, read once
    assert f["sample_s"] == pytest.approx(f["sample_prefill_s"] + f["sample_decode_s"])
    assert f["update_s"] == pytest.approx(6 * 630e6 * 16 * 160 / 260e9)  # 37.2 s
    assert f["update_s"] == pytest.approx(37.2, abs=0.1)
    # the shared prompt counted once: 32 + 16 x 128 tokens instead of 16 x 160
    assert f["update_min_s"] == pytest.approx(f["update_s"] * (32 + 16 * 128) / (16 * 160))


def test_sampling_floor_is_compute_bound_when_many_rows_share_a_decode_step():
    """2 FLOPs per weight per sampled token: with enough rows per step the matmuls, not the weight
    reads, set the floor (a roofline)."""
    floors = {"copy_GBps": 10.0, "matmul_GFLOPs": 100.0}
    f = speed.phase_floors(1_000_000, 4_000_000, prompt_tokens=0, k=1000, mean_length=10, decode_steps=10,
                           floors=floors)
    bandwidth = 10 * 4e6 / 10e9  # 4 ms
    compute = 2 * 1e6 * 1000 * 10 / 100e9  # 200 ms
    assert f["sample_s"] == pytest.approx(max(bandwidth, compute)) == pytest.approx(0.2)  # no prompt
