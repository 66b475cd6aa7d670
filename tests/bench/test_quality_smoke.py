"""The quality protocol on a tiny model: every stage runs, the summary and plots are written.

The tiny model's accuracy means nothing; this keeps bench/quality.py from rotting.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from bench import quality


def test_quality_protocol_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "results"
    argv = ["--config", "", "--arms", "rlsc-l2,entropy", "--gsm8k-n", "4", "--generated", "synthetic:4:2",
            "--maj-n", "2", "--k", "3", "--probe-every", "1", "--probe-n", "2", "--train-n", "2",
            "--work", str(tmp_path / "work"), "--out", str(out), "--quiet",
            *[arg for item in (f"model.name={tiny_model_dir}", "model.lora.r=4", "sampling.k=3",
                               "sampling.max_new_tokens=4", "eval.max_new_tokens=4", "eval.bootstrap_samples=200",
                               "train.steps=2", "train.questions_per_step=1", "prompt.few_shot=[]")
              for arg in ("--set", item)]]
    assert quality.main(argv) == 0
    summary = json.loads((out / "quality.json").read_text())
    assert set(summary["sets"]) == {"generated", "gsm8k"}
    for entry in summary["sets"].values():
        assert set(entry["arms"]) == {"rlsc-l2", "entropy"}
        assert entry["base_sampled"]["maj@3"]["n"] == 2
        assert entry["arms"]["rlsc-l2"]["greedy_on_sampled"]["n"] == 2  # the same 2 problems, greedy
    assert [p["steps_done"] for p in summary["arms"]["rlsc-l2"]["probe"]] == [0, 1, 2]
    assert (out / "quality-per-step.png").stat().st_size > 0 and (out / "quality-accuracy.png").stat().st_size > 0
    table = (out / "quality.md").read_text()
    assert "| rlsc-l2 |" in table and "maj@3" in table
    # a second call finds every stage done and only summarizes again
    assert quality.main(argv) == 0
    # at another evaluation length: the trained arm is reused, results go beside the others
    longer = [*argv, "--eval-tokens", "6", "--arms", "rlsc-l2", "--maj-n", "0"]
    assert quality.main(longer) == 0
    summary = json.loads((out / "quality.json").read_text())
    assert list(summary["sets"]) == ["generated", "generated-t6", "gsm8k", "gsm8k-t6"]
    assert set(summary["sets"]["gsm8k-t6"]["arms"]) == {"rlsc-l2"}
    assert summary["sets"]["gsm8k"]["arms"]["entropy"]  # the earlier results are still summarized
    assert "### gsm8k, 6 new tokens (n = 4)" in (out / "quality.md").read_text()
    # the runs kept beside the results rebuild the same summary without the work folder
    kept = out / quality.KEPT
    assert (kept / "eval" / "base" / "gsm8k" / "problems.jsonl").is_file()
    assert all("samples" not in json.loads(line) for line in
               (kept / "eval" / "base-k3-n2" / "gsm8k" / "problems.jsonl").read_text().splitlines())
    shutil.rmtree(tmp_path / "work")
    assert quality.main([*argv, "--summary-only"]) == 0
    assert json.loads((out / "quality.json").read_text()) == summary


def _metrics_entry(correct: int, n: int) -> dict:
    return {"pass@1": {"value": correct / n, "correct": correct, "n": n, "ci_low": 0.0, "ci_high": 1.0},
            "mean_confidence": 0.5, "mean_length": 10.0, "truncated_share": 0.0}


def test_an_earlier_summary_is_carried_over_where_nothing_recomputes_it():
    arm = {"metrics": _metrics_entry(3, 4), "paired": {"difference": 0.25, "ci_low": 0.0, "ci_high": 0.5},
           "greedy_on_sampled": {"correct": 1, "n": 2, "difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}}
    earlier = {"sets": {"gsm8k": {"base": _metrics_entry(2, 4), "arms": {"rlsc-l1": arm}},
                        "generated": {"base": _metrics_entry(2, 4), "arms": {"rlsc-l1": arm, "entropy": arm}}},
               "arms": {"rlsc-l1": {"overrides": [], "flags": [], "probe": []}}}
    now = {"sets": {"gsm8k-t384": {"base": _metrics_entry(3, 4), "arms": {}},
                    "generated": {"base": _metrics_entry(2, 4), "base_sampled": {"n": 4}, "arms": {"entropy": {}}}},
           "arms": {}}
    merged = quality.carry_over(now, earlier)
    assert merged["sets"]["gsm8k"]["carried_over"]  # nothing recomputed it: kept whole, marked
    assert list(merged["sets"]) == ["generated", "gsm8k", "gsm8k-t384"]  # each set before its longer-answer run
    generated = merged["sets"]["generated"]
    assert generated["arms"]["entropy"] == {}  # recomputed now: the new result wins
    # the same base: the earlier arm's paired figures hold; its subset score (2 problems, not 4) is dropped
    assert generated["arms"]["rlsc-l1"]["carried_over"] and "greedy_on_sampled" not in generated["arms"]["rlsc-l1"]
    assert merged["arms"]["rlsc-l1"]["carried_over"]
    # a base that scores differently now: the earlier arms are not mixed in
    now = {"sets": {"generated": {"base": _metrics_entry(3, 4), "arms": {}}}, "arms": {}}
    assert quality.carry_over(now, earlier)["sets"]["generated"]["arms"] == {}


def test_a_set_label_parses_back_to_its_set_and_eval_length():
    for tokens in (None, 384):
        label = quality.set_label(argparse.Namespace(eval_tokens=tokens), "gsm8k")
        assert quality.parse_set_label(label) == ("gsm8k", tokens)
    assert list(quality.eval_sources(argparse.Namespace(generated="g.jsonl", gsm8k_n=200))) == list(quality.EVAL_SETS)


def test_the_largest_sampled_subset_is_summarized_and_scored_on_the_same_problems(tmp_path):
    import argparse

    args = argparse.Namespace(work=str(tmp_path), out=str(tmp_path / "results"), k=16)
    for n in (16, 32, 4):
        quality.sampled_dir(args, "gsm8k", n).mkdir(parents=True)
        (quality.sampled_dir(args, "gsm8k", n) / "metrics.json").write_text("{}")
    assert quality.largest_sampled_run(args, "gsm8k") == quality.sampled_dir(args, "gsm8k", 32) / "metrics.json"
    assert quality.largest_sampled_run(args, "generated") is None
    greedy = [{"id": i, "correct": c} for i, c in [("a", True), ("b", False), ("c", True), ("d", True)]]
    sampled = [{"id": i, "majority_correct": c} for i, c in [("a", False), ("b", False), ("d", True)]]
    against = quality.against_majority(greedy, sampled)
    assert (against["correct"], against["n"]) == (2, 3)
    assert against["difference"] == pytest.approx((1 - 0) / 3)  # a: greedy right, vote wrong; b, d agree
    assert against["ci_low"] <= against["difference"] <= against["ci_high"]


def _write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_collapse_flags_catch_the_measured_entropy_minimisation_collapse(tmp_path):
    """The entropy arm as measured (bench/RESULTS.md): entropy 0.185 -> 0.091, every sample at the
    128-token cap, probe 16/32 -> 5/32; the L1 arm: length 96 -> 34, probe 16/32 -> 12/32 (noise)."""
    from bench.quality import collapse_flags

    def row(entropy, length, clipped):
        return {"entropy": entropy, "completions/mean_length": length, "completions/clipped_ratio": clipped}

    def probe(*correct):
        return [{"steps_done": 2 * i, "correct": c, "n": 32, "accuracy": c / 32} for i, c in enumerate(correct)]

    entropy_arm = _write_metrics(tmp_path / "entropy.jsonl", [row(0.185, 96, 0.56), row(0.091, 128, 1.0)])
    flags = collapse_flags(entropy_arm, probe(16, 10, 5))
    assert any(f.startswith("entropy 0.185 -> 0.091") for f in flags)
    assert any("length cap" in f for f in flags)
    assert "probe accuracy fell 16/32 -> 5/32" in flags

    l1_arm = _write_metrics(tmp_path / "l1.jsonl", [row(0.185, 96, 0.56), row(0.139, 34, 0.0)])
    assert collapse_flags(l1_arm, probe(16, 17, 12)) == ["length 96 -> 34"]  # 4/32 is within 2 SE

    healthy = _write_metrics(tmp_path / "healthy.jsonl", [row(0.185, 96, 0.56), row(0.17, 78, 0.3)])
    assert collapse_flags(healthy, probe(16, 16, 19)) == []


def test_a_finished_arm_is_reused_only_under_the_settings_it_was_trained_with(tmp_path):
    from rlsc.config import dump_config, load_config

    trained = load_config(None, ["train.steps=4", "train.probe_every=2"])
    (tmp_path / "config.yaml").write_text(dump_config(trained))
    quality.check_trained_as_configured(tmp_path, load_config(None, ["train.steps=4", "train.probe_every=0"]))
    with pytest.raises(SystemExit, match=r"train\.steps"):
        quality.check_trained_as_configured(tmp_path, load_config(None, ["train.steps=5", "train.probe_every=2"]))
    with pytest.raises(SystemExit, match=r"sampling\.max_new_tokens"):
        quality.check_trained_as_configured(tmp_path, load_config(None, ["train.steps=4", *quality.ARMS["rlsc-l2-384"]]))


def test_the_base_models_kept_result_is_reused_only_on_the_same_problems(tmp_path):
    from rlsc.problems import Problem, write_problems

    args = argparse.Namespace(work=str(tmp_path / "work"), out=str(tmp_path / "results"))
    out = tmp_path / "work" / "eval" / "base" / "gsm8k"
    kept = tmp_path / "results" / quality.KEPT / "eval" / "base" / "gsm8k"
    kept.mkdir(parents=True)
    (kept / "metrics.json").write_text(json.dumps({"n": 2}))
    (kept / "problems.jsonl").write_text("".join(json.dumps({"id": i, "correct": True}) + "\n" for i in ("a", "b")))
    same = write_problems(tmp_path / "same.jsonl", [Problem(id=i, question="q", answer="1", source="test") for i in ("b", "a")])
    other = write_problems(tmp_path / "other.jsonl", [Problem(id=i, question="q", answer="1", source="test") for i in ("a", "c")])
    assert quality.kept_base_result(args, out, same) == {"n": 2}
    assert quality.kept_base_result(args, out, other) is None
