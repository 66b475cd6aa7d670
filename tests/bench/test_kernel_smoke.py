"""The kernel micro-benchmark on a tiny model's shapes: every layer and row count measured and rendered."""

from __future__ import annotations

import json
from types import SimpleNamespace

from bench import kernel


def test_layer_shapes_follow_the_config_incl_grouped_query_attention():
    config = SimpleNamespace(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936)
    shapes = kernel.layer_shapes(config)
    assert shapes["k_proj / v_proj"] == (128, 896)  # 2 kv heads x 64
    assert shapes["down_proj"] == (896, 4864) and shapes["lm_head"] == (151936, 896)


def test_kernel_bench_runs_on_a_tiny_model(tiny_model_dir, tmp_path, skinny_kernel):
    assert kernel.main(["--model", str(tiny_model_dir), "--rows", "1,5", "--pool-mb", "1", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("kernel-*.json")
    results = json.loads(report.read_text())["results"]
    assert len(results) == 6 * 2
    assert all(r["kernel_s"] > 0 and r["torch_s"] > 0 and r["max_rel_error"] < 1e-4 for r in results)
    assert "| lm_head |" in report.with_suffix(".md").read_text()


def test_kernel_bench_times_an_earlier_revision_alongside(tiny_model_dir, tmp_path, skinny_kernel):
    assert kernel.main(["--model", str(tiny_model_dir), "--rows", "4", "--pool-mb", "1", "--against", "HEAD",
                        "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("kernel-*.json")
    data = json.loads(report.read_text())
    assert data["against"] == "HEAD"
    assert all(r["other_s"] > 0 for r in data["results"])
    assert "kernel@HEAD GB/s" in report.with_suffix(".md").read_text()


def test_the_kernel_is_judged_against_the_machines_fma_peak(skinny_kernel):
    # 2 FLOPs per weight per row, 4 bytes per weight: 8 GB/s at 16 rows is 64 GFLOP/s
    assert kernel.kernel_gflops({"kernel_GBps": 8.0, "rows": 16}) == 64.0
    peak = kernel.fma_peak_gflops(1, iterations=2_000_000)
    assert peak is not None and 1 < peak < 1000  # one core: a few GHz x 32 (AVX2) or 64 (AVX-512) FLOPs per cycle at most
