"""Data contracts (rlsc.checks): valid files pass, each kind of bad input fails under its named
expectation, in the DataCheckError message and in data_checks.json; reports are always written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from rlsc.checks import (
    LEAKAGE_EXPECTATION,
    TTT_ALLOWED,
    DataCheckError,
    gold_is_parseable,
    leakage,
    normalise_question,
    problems_frame,
    run_data_checks,
    validate_problem_file,
    validate_rollouts_file,
)
from rlsc.config import ChecksConfig
from rlsc.data import load_problems
from rlsc.errors import RlscError
from rlsc.problems import Problem, write_problems

CFG = ChecksConfig()
LENGTH_RULE = f"question length within [{CFG.min_question_chars}, {CFG.max_question_chars}]"
K = 4


def train_problems() -> list[Problem]:
    return [
        Problem(f"t{i}", f"Sam has {i} apples and buys {i + 3} more. How many apples now?", None, "synthetic")
        for i in range(1, 6)
    ]


def eval_problems() -> list[Problem]:
    questions = [
        ("What is 7 times 8, written as a number?", "56"),
        ("Simplify the fraction two over four.", "\\frac{1}{2}"),
        ("Write the difference of p and q.", "p - q"),
        ("How many dollars is 1234 cents plus 66 cents?", "$13"),
    ]
    return [Problem(f"e{i}", q, a, "bench") for i, (q, a) in enumerate(questions, start=1)]


def record(ident: str, question: str | None, answer: str | None = None) -> dict:
    fields = {"id": ident, "answer": answer, "source": "test", "meta": {}}
    return fields if question is None else {**fields, "question": question}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def base_train_records() -> list[dict]:
    return [json.loads(p.to_json()) for p in train_problems()]


def base_eval_records() -> list[dict]:
    return [json.loads(p.to_json()) for p in eval_problems()]


def check_files(tmp_path: Path, train: list[dict], evals: list[dict], cfg: ChecksConfig = CFG):
    """run_data_checks over the given records: (reports or the DataCheckError, data_checks.json)."""
    train_path = write_records(tmp_path / "train.jsonl", train)
    eval_path = write_records(tmp_path / "eval.jsonl", evals)
    try:
        outcome = run_data_checks(train_path, eval_path, cfg, tmp_path / "reports")
    except DataCheckError as exc:
        outcome = exc
    summary = json.loads((tmp_path / "reports" / "data_checks.json").read_text())
    return outcome, summary


def failed_names(summary: dict) -> set[str]:
    return {f["expectation"] for r in summary["reports"] for f in r["failures"]}


def assert_rejected(tmp_path: Path, train: list[dict], evals: list[dict], expectation: str) -> str:
    outcome, summary = check_files(tmp_path, train, evals)
    assert isinstance(outcome, DataCheckError), f"expected {expectation!r} to fail"
    assert repr(expectation) in str(outcome)
    assert expectation in failed_names(summary)
    assert summary["success"] is False
    return str(outcome)


# ---------------------------------------------------------------- problem files


def test_valid_train_and_eval_files_pass(tmp_path):
    train = write_problems(tmp_path / "train.jsonl", train_problems())
    evals = write_problems(tmp_path / "eval.jsonl", eval_problems())
    reports = run_data_checks(train, evals, CFG, tmp_path / "reports")
    assert [r.success for r in reports] == [True, True, True]
    assert "gold answer parseable" in reports[1].expectations
    assert "gold answer parseable" not in reports[0].expectations  # train data may be unlabeled
    summary = json.loads((tmp_path / "reports" / "data_checks.json").read_text())
    assert summary["success"] is True
    assert (tmp_path / "reports" / "data_checks.md").read_text().startswith("# Data checks: PASS")


@pytest.mark.parametrize(
    ("bad_record", "expectation"),
    [
        (record("t9", None), "question present"),
        (record("t9", "   \n "), "question not empty"),
        (record("t1", "A different question about pears and plums?"), "ids unique"),
        (record("t9", "  SAM has 1 apples, and buys 4 more... how many APPLES now"), "questions unique (normalised text)"),
        (record("t9", "x" * (CFG.max_question_chars + 1)), LENGTH_RULE),
        (record("t9", "Too short"), LENGTH_RULE),
    ],
    ids=["missing-question", "empty-question", "duplicate-id", "duplicate-question", "too-long", "too-short"],
)
def test_bad_train_record_is_rejected(tmp_path, bad_record, expectation):
    message = assert_rejected(tmp_path, [*base_train_records(), bad_record], base_eval_records(), expectation)
    assert "train.jsonl:6" in message  # the bad record is the sixth line


@pytest.mark.parametrize(
    ("answer", "expectation"),
    [("", "gold answer parseable"), (None, "gold answer present"), ("\\frac{", "gold answer parseable")],
    ids=["empty", "none", "broken-latex"],
)
def test_unparseable_eval_gold_is_rejected(tmp_path, answer, expectation):
    bad = record("e9", "What is the value of the broken fraction here?", answer)
    message = assert_rejected(tmp_path, base_train_records(), [*base_eval_records(), bad], expectation)
    assert "eval.jsonl:5" in message and "'e9'" in message


def test_malformed_json_line_is_named_by_line(tmp_path):
    lines = [json.dumps(r) for r in base_train_records()]
    lines.insert(2, '{"id": "t9", "question": "unterminated')
    write_lines(tmp_path / "train.jsonl", lines)
    write_records(tmp_path / "eval.jsonl", base_eval_records())
    with pytest.raises(DataCheckError) as caught:
        run_data_checks(tmp_path / "train.jsonl", tmp_path / "eval.jsonl", CFG, tmp_path / "reports")
    message = str(caught.value)
    assert "'every line is a JSON object'" in message and "train.jsonl:3" in message
    assert "malformed JSON" in message and "id=None" in message
    summary = json.loads((tmp_path / "reports" / "data_checks.json").read_text())
    # Field rules skip the line that did not parse, so it fails exactly one expectation.
    assert failed_names(summary) == {"every line is a JSON object"}


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    lines = [json.dumps(r) for r in base_train_records()]
    path = write_lines(tmp_path / "train.jsonl", [lines[0], "", "   ", *lines[1:]])
    frame = problems_frame(path)
    assert len(frame) == len(lines)
    assert frame["line"].tolist() == [1, 4, 5, 6, 7]
    assert validate_problem_file(path, "train", CFG).success


def test_empty_file_fails_row_count(tmp_path):
    path = write_lines(tmp_path / "eval.jsonl", [])
    report = validate_problem_file(path, "eval", CFG)
    assert not report.success
    assert [f["expectation"] for f in report.failures] == ["file has at least one problem"]


def test_missing_file_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(RlscError, match="nowhere.jsonl"):
        problems_frame(missing)
    with pytest.raises(DataCheckError, match="'file exists'"):
        run_data_checks(missing, write_problems(tmp_path / "e.jsonl", eval_problems()), CFG, tmp_path / "r")
    assert (tmp_path / "r" / "data_checks.json").is_file()


def test_problems_frame_columns(tmp_path):
    path = write_problems(tmp_path / "eval.jsonl", eval_problems())
    frame = problems_frame(path)
    assert {"line", "parsed", "id", "question", "answer", "question_chars", "question_norm", "gold_parseable"} <= set(
        frame.columns
    )
    assert frame["gold_parseable"].tolist() == [True, True, True, True]
    assert frame["question_chars"].iloc[0] == len(eval_problems()[0].question)
    assert frame["question_norm"].iloc[0] == "what is 7 times 8 written as a number"


@pytest.mark.parametrize(
    ("answer", "parseable"),
    [
        ("18", True), ("-1,234.5", True), ("\\frac{3}{4}", True), ("x^2 + 1", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", True), ("\\text{(C)}", True),
        ("-2,1", True), ("69,84", True), ("t(0,4]", True), ("E_{1},E_{2}", True),
        (None, False), ("", False), ("  ", False), ("\\frac{", False), ("\\sqrt{", False), ("}{", False),
        ("1..5", False), ("3.4.5%", False),
    ],
)
def test_gold_is_parseable(answer, parseable):
    assert gold_is_parseable(answer) is parseable


def test_normalise_question_collapses_case_punctuation_and_space():
    assert normalise_question("  What IS 2+2,\n exactly?? ") == normalise_question("what is 2 + 2 exactly")
    assert normalise_question("?!") is None


# ---------------------------------------------------------------- leakage


def leaking_eval_records() -> list[dict]:
    first, second = train_problems()[0].question, train_problems()[1].question
    return [
        *base_eval_records(),
        record("e8", first, "4"),  # exact copy of train line 1
        record("e9", "  " + second.upper().replace("?", " ?!"), "6"),  # same text after normalisation
    ]


def test_train_eval_overlap_fails_without_opt_in(tmp_path):
    outcome, summary = check_files(tmp_path, base_train_records(), leaking_eval_records())
    assert isinstance(outcome, DataCheckError)
    assert repr(LEAKAGE_EXPECTATION) in str(outcome)
    assert "train.jsonl:1" in str(outcome) and "eval.jsonl:5" in str(outcome)
    leak = summary["reports"][2]
    assert leak["success"] is False and leak["failures"][0]["ge_type"] is None
    assert [e["kind"] for e in leak["failures"][0]["examples"]] == ["exact", "normalised"]


def test_train_eval_overlap_passes_with_test_time_training_and_is_listed(tmp_path):
    cfg = ChecksConfig(allow_test_time_training=True)
    outcome, summary = check_files(tmp_path, base_train_records(), leaking_eval_records(), cfg)
    assert not isinstance(outcome, Exception)
    leak = summary["reports"][2]
    assert leak["success"] is True and leak["failures"] == []
    assert leak["allowed"][0]["unexpected_count"] == 2
    assert leak["allowed"][0]["observed"] == TTT_ALLOWED
    assert TTT_ALLOWED in (tmp_path / "reports" / "data_checks.md").read_text()


def test_leakage_pairs(tmp_path):
    train = problems_frame(write_records(tmp_path / "train.jsonl", base_train_records()))
    evals = problems_frame(write_records(tmp_path / "eval.jsonl", leaking_eval_records()))
    pairs = leakage(train, evals)
    assert [(p["kind"], p["train_id"], p["eval_id"], p["eval_line"]) for p in pairs] == [
        ("exact", "t1", "e8", 5),
        ("normalised", "t2", "e9", 6),
    ]
    assert len(pairs[0]["question"]) <= 120


# ---------------------------------------------------------------- rollout files


def rollouts(k: int = K, questions: tuple[str, ...] = ("q1", "q2")) -> pd.DataFrame:
    rows = []
    for qid in questions:
        for sample in range(k):
            logprob = -1.5 - sample
            rows.append({
                "question_id": qid, "sample": sample, "completion": f"... so the answer is {sample}.",
                "extracted": str(sample) if sample else None, "seq_logprob": logprob, "p_old": math.exp(logprob),
                "token_confidence": 0.8, "entropy": 0.5, "self_certainty": 1.2, "agreement": 0.75,
                "majority_share": 0.75, "length": 12, "stopped": True,
            })
    return pd.DataFrame(rows)


def check_rollouts(tmp_path: Path, frame: pd.DataFrame):
    path = tmp_path / "rollouts.parquet"
    frame.to_parquet(path)
    return validate_rollouts_file(path, K)


def test_valid_rollouts_pass(tmp_path):
    report = check_rollouts(tmp_path, rollouts())
    assert report.success, report.failures
    assert report.rows == 2 * K


def _set(frame: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize(
    ("corrupt", "expectation"),
    [
        (lambda f: f.drop(index=5), f"exactly {K} rows per question"),
        (lambda f: _set(f, 1, "seq_logprob", 0.25), "seq_logprob <= 0"),
        (lambda f: _set(f, 1, "seq_logprob", float("nan")), "seq_logprob finite"),
        (lambda f: _set(f, 1, "seq_logprob", float("-inf")), "seq_logprob finite"),
        (lambda f: _set(f, 1, "p_old", 1.5), "p_old within [0, 1]"),
        (lambda f: _set(f, 1, "sample", 0), "sample indices unique per question"),
        (lambda f: _set(f, 1, "sample", K), f"sample index within [0, {K - 1}]"),
        (lambda f: f.drop(columns=["p_old"]), "required columns present"),
    ],
    ids=["3-rows", "positive-logprob", "nan-logprob", "inf-logprob", "p_old-1.5", "dup-sample", "sample-k",
         "missing-column"],
)
def test_bad_rollouts_are_rejected(tmp_path, corrupt, expectation):
    report = check_rollouts(tmp_path, corrupt(rollouts()))
    assert not report.success
    failure = next(f for f in report.failures if f["expectation"] == expectation)
    if failure["examples"]:
        assert failure["examples"][0]["where"].startswith("rollouts.parquet:")
        assert failure["examples"][0]["id"] in ("q1", "q2")


def test_nan_logprob_example_shows_the_value(tmp_path):
    report = check_rollouts(tmp_path, _set(rollouts(), 2, "seq_logprob", float("nan")))
    failure = next(f for f in report.failures if f["expectation"] == "seq_logprob finite")
    assert failure["examples"] == [{"where": "rollouts.parquet:3", "line": 3, "id": "q1", "value": "nan"}]
    json.dumps(report.to_dict(), allow_nan=False)  # the report is strict JSON


def test_missing_rollouts_file_raises(tmp_path):
    with pytest.raises(RlscError, match="gone.parquet"):
        validate_rollouts_file(tmp_path / "gone.parquet", K)


# ---------------------------------------------------------------- report files


def test_reports_written_on_failure_without_temp_files(tmp_path):
    outcome, summary = check_files(tmp_path, [*base_train_records(), record("t1", None)], base_eval_records())
    assert isinstance(outcome, DataCheckError)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["data_checks.json", "data_checks.md"]
    markdown = (tmp_path / "reports" / "data_checks.md").read_text()
    assert markdown.startswith("# Data checks: FAIL")
    assert "question present" in markdown and "ids unique" in markdown
    assert [r["success"] for r in summary["reports"]] == [False, True, True]


def test_message_shows_at_most_three_examples(tmp_path):
    bad = [record(f"t{i}", "   ") for i in range(10, 16)]
    message = assert_rejected(tmp_path, [*base_train_records(), *bad], base_eval_records(), "question not empty")
    block = next(b for b in message.split("\n- ") if "'question not empty'" in b)
    assert "6 rows" in block
    assert block.count("    train.jsonl:") == 3


# ---------------------------------------------------------------- real data


def test_real_gsm8k_eval_passes(tmp_path, shared_data):
    source = shared_data / "gsm8k" / "test.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    path = write_problems(tmp_path / "gsm8k.jsonl", load_problems(source)[:200])
    report = validate_problem_file(path, "eval", CFG)
    assert report.success, report.failures
    assert report.rows == 200


def test_every_real_benchmark_gold_is_parseable(shared_data):
    files = sorted(shared_data.glob("*/test.jsonl"))
    if not files:
        pytest.skip(f"no */test.jsonl benchmark files under {shared_data}")
    unparseable = {
        f.parent.name: bad
        for f in files
        if (bad := [p.answer for p in load_problems(f) if not gold_is_parseable(p.answer)])
    }
    assert unparseable == {}


def test_checks_run_off_the_main_thread(tmp_path):
    # Prefect runs tasks in worker threads, where math_verify's SIGALRM timeout is unavailable.
    from concurrent.futures import ThreadPoolExecutor

    path = write_problems(tmp_path / "eval.jsonl", eval_problems())
    with ThreadPoolExecutor(max_workers=2) as pool:
        parse_verdict = pool.submit(gold_is_parseable, "\\frac{")
        report = pool.submit(validate_problem_file, path, "eval", CFG)
        assert parse_verdict.result() is False
        assert report.result().success
