"""The `rlsc` command end to end on a tiny model: train, evaluate, compare, grade, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlsc.cli import main
from rlsc.problems import Problem, write_problems


def _tiny_args(model_dir, work):
    return [
        "--set", f"model.name={model_dir}", "--set", f"paths.work_dir={work}", "--set", "sampling.k=4",
        "--set", "sampling.max_new_tokens=8", "--set", "eval.max_new_tokens=8", "--set", "train.steps=2",
        "--set", "model.lora.r=4", "--set", "prompt.few_shot=[]", "--quiet",
    ]


def test_train_then_evaluate_then_compare(tiny_model_dir, tmp_path, capsys):
    args = _tiny_args(tiny_model_dir, tmp_path)
    assert main(["prepare", *args, "--set", "data.train=synthetic:3:1", "--set", "data.eval=synthetic:6:2"]) == 0
    train_file, eval_file = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "eval.jsonl"
    assert all(json.loads(line)["answer"] is None for line in train_file.read_text().splitlines())
    assert main(["sample", *args, "--out", str(tmp_path / "samples.parquet")]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "samples.parquet")) == 3 * 4
    assert main(["train", *args, "--problems", str(train_file)]) == 0
    final = tmp_path / "train" / "final"
    assert (final / "adapter_config.json").is_file() and (tmp_path / "train" / "training.png").is_file()
    assert len((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()) == 2

    assert main(["evaluate", *args, "--problems", str(eval_file), "--out", str(tmp_path / "base")]) == 0
    assert main(["evaluate", *args, "--problems", str(eval_file), "--trained", str(final),
                 "--set", "eval.k=3", "--out", str(tmp_path / "after")]) == 0
    metrics = json.loads((tmp_path / "after" / "metrics.json").read_text())
    assert metrics["n"] == 6 and {"pass@1", "maj@3", "pass@3", "mean_confidence", "truncated_share"} <= metrics.keys()
    assert metrics["pass@1"]["ci_low"] <= metrics["pass@1"]["value"] <= metrics["pass@1"]["ci_high"]
    record = json.loads((tmp_path / "after" / "problems.jsonl").read_text().splitlines()[0])
    assert {"question", "gold", "completion", "extracted", "correct", "confidence", "samples"} <= record.keys()

    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base" / "problems.jsonl"), str(tmp_path / "after" / "problems.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["ci_low"] - 1e-9 <= result["difference"] <= result["ci_high"] + 1e-9


def test_grade_adds_extracted_and_correct(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    rows = [{"prediction": "so it is \\boxed{1,234}", "gold": "1234"},
            {"prediction": "The answer is 7.", "gold": "8", "id": "x"},
            {"prediction": "half: 0.5", "gold": "\\frac{1}{2}"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["grade", str(path)]) == 0
    out, err = capsys.readouterr()
    graded = [json.loads(line) for line in out.splitlines()]
    assert [(g["extracted"], g["correct"]) for g in graded] == [("1,234", True), ("7", False), ("0.5", True)]
    assert graded[1]["id"] == "x" and "graded 3 records: 2 correct" in err


@pytest.mark.parametrize("content,message", [
    ('{"prediction": "1"}\n', "needs 'prediction' and 'gold'"),
    ('{"prediction": "1", "gold": "1"}\nnot json\n', ":2: not valid JSON"),
])
def test_grade_names_the_bad_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["grade", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_and_missing_model_are_one_clear_error(tmp_path, capsys):
    assert main(["train", "--set", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
    write_problems(tmp_path / "q.jsonl", [Problem("a", "What is 1+1?", None, "t")])
    assert main(["train", "--problems", str(tmp_path / "q.jsonl"), "--set", f"model.name={tmp_path}/nomodel",
                 "--set", f"paths.work_dir={tmp_path}"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["evaluate", "--problems", str(tmp_path / "q.jsonl"), "--set", f"paths.work_dir={tmp_path}"]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fetch-model", "prepare", "sample", "train", "evaluate", "compare", "grade",
                                     "run"])
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "rlsc.cli", command, "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "usage: rlsc" in out.stdout
