"""Data contracts: Great Expectations suites over problem files and rollout files, run before training.

Each file becomes a pandas frame with one row per record plus derived columns (line number, whether
the line parsed, normalised question text, whether the gold parses), so that every rule is a stock GE
expectation over a column. Every expectation carries a human name in `meta["name"]`; reports and
errors speak in those names, and examples point at `file:line` (a Parquet file's 1-based row).

The train/eval leakage check is a join of two files, not a GE expectation; its report says so
(`ge_type` None). `run_data_checks` writes `data_checks.json` and `data_checks.md`, then raises
`DataCheckError` if anything failed.

Great Expectations (3.5 s to import) and pandas are imported on first use; one ephemeral context
serves the whole process: nothing is written to disk, no data docs, no progress bars.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlsc.answers import normalize_number
from rlsc.config import ChecksConfig
from rlsc.errors import RlscError

if TYPE_CHECKING:
    import pandas as pd

ProblemKind = Literal["train", "eval"]

PROBLEM_COLUMNS = (
    "line", "parsed", "parse_error", "id", "question", "answer",
    "question_chars", "question_norm", "gold_parseable",
)
ROLLOUT_COLUMNS = (
    "question_id", "sample", "completion", "extracted", "seq_logprob", "p_old", "token_confidence",
    "entropy", "self_certainty", "agreement", "majority_share", "length", "stopped",
)
# Derived or flag columns say little on their own; an example shows the column behind them instead.
EXAMPLE_VALUE_COLUMN = {
    "parsed": "parse_error",
    "gold_parseable": "answer",
    "seq_logprob_finite": "seq_logprob",
}
EXAMPLES_SHOWN = 3
VALUE_CHARS = 120
LEAKAGE_EXPECTATION = "no train question appears in the eval set"
TTT_ALLOWED = "allowed: test-time training"

# A gold that is one number-like token ("18", "-3.5", "$3", "12%") must parse as a number: "1..5" is a
# typo. Commas stay out: "69,84" is a list answer (OlympiadBench), "1,234" parses either way.
_NUMBER_LIKE_RE = re.compile(r"[+-]?\$?[\d.]*\d[\d.]*%?")
_NOT_WORD_RE = re.compile(r"[\W_]+")


class DataCheckError(RlscError):
    """A data contract failed; the message names each failed expectation with example rows."""


@dataclass
class CheckReport:
    """The verdict of one check (a file's suite, or the leakage join).

    `failures` and `allowed` hold dicts {expectation, ge_type, column, unexpected_count, observed,
    examples}; `allowed` lists findings the config accepts (train/eval overlap under test-time
    training), which do not fail the check. `expectations` names everything that was evaluated.
    """

    name: str
    success: bool
    source: str
    rows: int
    expectations: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    allowed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_markdown(self) -> str:
        verdict = "PASS" if self.success else "FAIL"
        lines = [
            f"## {self.name}: {verdict}",
            "",
            f"Source: `{self.source}`, {_rows(self.rows)}, {len(self.expectations)} expectations.",
            "",
        ]
        lines += _findings_markdown("Failed", self.failures)
        lines += _findings_markdown("Allowed", self.allowed)
        return "\n".join(lines)


# ---------------------------------------------------------------- Great Expectations plumbing


# The shared context's stores are plain dicts; one validation at a time keeps them consistent.
_VALIDATION_LOCK = threading.Lock()
_CONTEXT_LOCK = threading.Lock()


def _context() -> tuple[Any, Any]:
    """The process's ephemeral GE context and its whole-dataframe batch definition."""
    # functools.cache alone lets two threads each build one; suites would then attach to the wrong one.
    with _CONTEXT_LOCK:
        return _build_context()


@functools.cache
def _build_context() -> tuple[Any, Any]:
    # Slow (GE import and setup), so once per process.
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In-memory stores and no data docs site: checks leave nothing on disk but our own reports.
    stores = InMemoryStoreBackendDefaults(init_temp_docs_sites=False)
    config = DataContextConfig(store_backend_defaults=stores, analytics_enabled=False)
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("rlsc-checks").add_dataframe_asset("frame")
    return context, asset.add_batch_definition_whole_dataframe("whole-frame")


def _expectations() -> Any:
    _context()  # suites attach to the current context, so it must exist first
    import great_expectations.expectations as gxe

    return gxe


def _new_suite(label: str) -> Any:
    import great_expectations as gx

    # Unique names: the context lives for the whole process and may hold several suites at once.
    return gx.ExpectationSuite(name=f"rlsc-{label}-{uuid.uuid4().hex[:8]}")


def _run_suite(suite: Any, frame: pd.DataFrame) -> Any:
    """Validate `frame` against `suite`; the suite and its validation definition leave the context after."""
    import great_expectations as gx

    context, batch_definition = _context()
    with _VALIDATION_LOCK:
        added = context.suites.add(suite)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=added)
        )
        try:
            return definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
        finally:
            context.validation_definitions.delete(definition.name)
            context.suites.delete(suite.name)


def _named(expectation_class: Any, name: str, **kwargs: Any) -> Any:
    return expectation_class(meta={"name": name}, **kwargs)


# ---------------------------------------------------------------- problem files


def normalise_question(question: str | None) -> str | None:
    """Case-folded text with punctuation and whitespace runs collapsed to one space (for duplicates)."""
    if question is None:
        return None
    text = _NOT_WORD_RE.sub(" ", unicodedata.normalize("NFKC", question).casefold()).strip()
    return text or None


def _latex_parses(text: str) -> bool:
    """Whether math_verify turns `text` into a math object (its string fallback does not count)."""
    # answers owns the math_verify import and its version-dependent timeout keyword.
    from rlsc.answers import _math_verify

    parse, _, timeout_exc, parse_kw, _ = _math_verify()
    # Its timeout uses SIGALRM, which only the main thread may set (Prefect runs tasks in threads).
    in_main = threading.current_thread() is threading.main_thread()
    options = {} if in_main or parse_kw is None else {parse_kw: None}
    try:
        parsed = parse(f"${text.strip('$')}$", **options)
    except (Exception, timeout_exc):  # noqa: BLE001 - any failure inside the library means "does not parse"
        return False
    return any(not isinstance(item, str) for item in parsed)


def _braces_balanced(text: str) -> bool:
    depth, i = 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2  # \{ and \} are literal braces, not groups
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return False
        i += 1
    return depth == 0


def gold_is_parseable(answer: str | None) -> bool:
    """A gold answer the grader can use: non-empty; a number if it looks like one; otherwise well-formed
    LaTeX (balanced braces) or something math_verify reads as math.

    Balanced braces suffice because grading tries an exact match before math_verify, and math_verify
    rejects real golds ("t(0,4]", "E_{1},E_{2}", "m_{\\max }=n^{2}-n-1" in OlympiadBench and Minerva).
    """
    if answer is None or not answer.strip():
        return False
    text = answer.strip()
    if normalize_number(text) is not None:
        return True
    if _NUMBER_LIKE_RE.fullmatch(text):
        return False
    # The cheap test first; math_verify (sympy) only for what it could still rescue.
    return _braces_balanced(text) or _latex_parses(text)


def _decode_record(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object on the line, None) or (None, why it is not one)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _problem_row(line: int, raw: bytes) -> dict[str, Any]:
    record, error = _decode_record(raw)
    if record is None:
        # Every column spelled out: a key left missing would read back as NaN, not None.
        return {**dict.fromkeys(PROBLEM_COLUMNS), "line": line, "parsed": False, "parse_error": error,
                "gold_parseable": False}
    question = record.get("question")
    question = question if isinstance(question, str) else None  # a non-string question is no question
    answer = _text_or_none(record.get("answer"))
    return {
        "line": line,
        "parsed": True,
        "parse_error": None,
        "id": _text_or_none(record.get("id")),
        "question": question,
        "answer": answer,
        "question_chars": None if question is None else len(question),
        "question_norm": normalise_question(question),
        "gold_parseable": gold_is_parseable(answer),
    }


def problems_frame(path: str | Path) -> pd.DataFrame:
    """One row per non-blank line of a problem JSONL file (columns: PROBLEM_COLUMNS).

    A line that is not a JSON object becomes a row with parsed=False, never an exception, so the suite
    can name it. Raises RlscError if the file does not exist.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RlscError(f"problem file not found: {path}")
    # Bytes, not text: a bad byte then fails its own line instead of the whole read.
    with path.open("rb") as f:
        rows = [_problem_row(line, raw) for line, raw in enumerate(f, start=1) if raw.strip()]
    frame = pd.DataFrame.from_records(rows, columns=list(PROBLEM_COLUMNS))
    frame["parsed"] = frame["parsed"].astype(bool)
    frame["gold_parseable"] = frame["gold_parseable"].astype(bool)
    frame["question_chars"] = frame["question_chars"].astype("Int64")
    return frame


def problem_suite(kind: ProblemKind, cfg: ChecksConfig) -> Any:
    """The GE suite a problem file must pass; eval files must also carry a gradable gold answer."""
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    gxe = _expectations()
    from great_expectations.expectations.row_conditions import Column

    # Field rules judge only the lines that parsed (parse_error is null exactly there): a malformed
    # line fails "every line is a JSON object" once, instead of also failing every field rule.
    # (GE conditions accept no booleans as parameters, hence not `parsed == True`.)
    on_records = {"row_condition": Column("parse_error").is_null()}
    low, high = cfg.min_question_chars, cfg.max_question_chars
    expectations = [
        _named(gxe.ExpectTableRowCountToBeBetween, "file has at least one problem", min_value=1),
        _named(gxe.ExpectColumnValuesToBeInSet, "every line is a JSON object", column="parsed", value_set=[True]),
        _named(gxe.ExpectColumnValuesToNotBeNull, "id present", column="id", **on_records),
        _named(gxe.ExpectColumnValuesToBeUnique, "ids unique", column="id", **on_records),
        _named(gxe.ExpectColumnValuesToNotBeNull, "question present", column="question", **on_records),
        _named(
            gxe.ExpectColumnValuesToNotMatchRegex, "question not empty",
            column="question", regex=r"^\s*$", **on_records,
        ),
        _named(
            gxe.ExpectColumnValueLengthsToBeBetween, f"question length within [{low}, {high}]",
            column="question", min_value=low, max_value=high, **on_records,
        ),
        _named(
            gxe.ExpectColumnValuesToBeUnique, "questions unique (normalised text)",
            column="question_norm", **on_records,
        ),
    ]
    if kind == "eval":
        expectations += [
            _named(gxe.ExpectColumnValuesToNotBeNull, "gold answer present", column="answer", **on_records),
            _named(
                gxe.ExpectColumnValuesToBeInSet, "gold answer parseable",
                column="gold_parseable", value_set=[True], **on_records,
            ),
        ]
    return _suite_of(f"{kind}-problems", expectations)


def _suite_of(label: str, expectations: list[Any]) -> Any:
    suite = _new_suite(label)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def validate_problem_file(path: str | Path, kind: ProblemKind, cfg: ChecksConfig) -> CheckReport:
    """Run the `kind` problem suite over `path`; a missing file raises RlscError."""
    return _validate_problems(Path(path), problems_frame(path), kind, cfg)


def _validate_problems(path: Path, frame: pd.DataFrame, kind: ProblemKind, cfg: ChecksConfig) -> CheckReport:
    return _validate(f"{kind} problems", path, frame, problem_suite(kind, cfg), id_column="id")


# ---------------------------------------------------------------- rollout files


def rollouts_frame(path: str | Path) -> pd.DataFrame:
    """The rollouts Parquet file plus `line` (1-based row) and the derived columns the suite checks."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RlscError(f"rollouts file not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a corrupt file
        raise RlscError(f"rollouts file {path} is not readable Parquet: {type(exc).__name__}: {exc}") from None
    return prepare_rollouts(frame)


def prepare_rollouts(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns; a missing source column leaves its derived column out (the suite says so)."""
    import numpy as np
    import pandas as pd

    frame = frame.reset_index(drop=True)
    frame["line"] = np.arange(1, len(frame) + 1)
    if "seq_logprob" in frame:
        # NaN and inf slip through range checks (NaN counts as missing), so finiteness is its own column.
        frame["seq_logprob_finite"] = np.isfinite(pd.to_numeric(frame["seq_logprob"], errors="coerce"))
    if "question_id" in frame:
        frame["rows_for_question"] = frame.groupby("question_id", dropna=False)["question_id"].transform("size")
    if "question_id" in frame and "sample" in frame:
        frame["question_sample"] = frame["question_id"].astype(str) + "#" + frame["sample"].astype(str)
    return frame


def rollouts_suite(k: int) -> Any:
    """The GE suite a rollouts file with `k` samples per question must pass."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    gxe = _expectations()
    expectations = [
        _named(
            gxe.ExpectTableColumnsToMatchSet, "required columns present",
            column_set=list(ROLLOUT_COLUMNS), exact_match=False,
        ),
        _named(gxe.ExpectTableRowCountToBeBetween, "file has at least one rollout", min_value=1),
        _named(gxe.ExpectColumnValuesToNotBeNull, "question_id present", column="question_id"),
        _named(gxe.ExpectColumnValuesToNotBeNull, "sample index present", column="sample"),
        _named(
            gxe.ExpectColumnValuesToBeBetween, f"sample index within [0, {k - 1}]",
            column="sample", min_value=0, max_value=k - 1,
        ),
        _named(gxe.ExpectColumnValuesToBeUnique, "sample indices unique per question", column="question_sample"),
        _named(
            gxe.ExpectColumnValuesToBeInSet, f"exactly {k} rows per question",
            column="rows_for_question", value_set=[k],
        ),
        _named(gxe.ExpectColumnValuesToNotBeNull, "seq_logprob present", column="seq_logprob"),
        _named(gxe.ExpectColumnValuesToBeInSet, "seq_logprob finite", column="seq_logprob_finite", value_set=[True]),
        _named(gxe.ExpectColumnValuesToBeBetween, "seq_logprob <= 0", column="seq_logprob", max_value=0),
        _named(gxe.ExpectColumnValuesToNotBeNull, "p_old present", column="p_old"),
        _named(gxe.ExpectColumnValuesToBeBetween, "p_old within [0, 1]", column="p_old", min_value=0, max_value=1),
    ]
    return _suite_of("rollouts", expectations)


def validate_rollouts_file(path: str | Path, k: int) -> CheckReport:
    """Run the rollouts suite over a Parquet file; a missing or unreadable file raises RlscError."""
    frame = rollouts_frame(path)
    return _validate("rollouts", Path(path), frame, rollouts_suite(k), id_column="question_id")


# ---------------------------------------------------------------- results


def _validate(name: str, path: Path, frame: pd.DataFrame, suite: Any, id_column: str) -> CheckReport:
    names = [e.meta["name"] for e in suite.expectations]
    result = _run_suite(suite, frame)
    failures = [
        _failure(r, frame, path.name, id_column) for r in result.results if not r.success
    ]
    return CheckReport(
        name=f"{name} ({path.name})", success=not failures, source=str(path), rows=len(frame),
        expectations=names, failures=failures,
    )


def _failure(result: Any, frame: pd.DataFrame, file_name: str, id_column: str) -> dict[str, Any]:
    config = result.expectation_config
    column = config.kwargs.get("column")
    detail = result.result or {}
    indices = detail.get("partial_unexpected_index_list") or detail.get("unexpected_index_list") or []
    return {
        "expectation": (config.meta or {}).get("name", config.type),
        "ge_type": config.type,
        "column": column,
        "unexpected_count": detail.get("unexpected_count"),
        "observed": _observed(result),
        "examples": [_example(frame, index, column, file_name, id_column) for index in indices[:EXAMPLES_SHOWN]],
    }


def _observed(result: Any) -> Any:
    """What a table-level expectation saw, or why an expectation could not be evaluated."""
    message = _exception_message(result.exception_info)
    if message:
        return f"not evaluated: {message[:300]}"
    detail = result.result or {}
    mismatched = (detail.get("details") or {}).get("mismatched")
    return mismatched if mismatched is not None else detail.get("observed_value")


def _exception_message(info: Any) -> str | None:
    # GE gives one {raised_exception, exception_message} dict, or one per metric it tried.
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    messages = [m for m in map(_exception_message, info.values()) if m]
    return messages[0] if messages else None


def _example(frame: pd.DataFrame, index: Any, column: str | None, file_name: str, id_column: str) -> dict:
    value_column = EXAMPLE_VALUE_COLUMN.get(column, column)
    line = int(frame.at[index, "line"])
    return {
        "where": f"{file_name}:{line}",
        "line": line,
        "id": _jsonable(_value_at(frame, index, id_column)),
        "value": _short(_value_at(frame, index, value_column)),
    }


def _value_at(frame: pd.DataFrame, index: Any, column: str | None) -> Any:
    """The cell, with a missing value as None except in float columns, where NaN is the finding."""
    if column is None or column not in frame:
        return None
    value = frame.at[index, column]
    return None if frame[column].dtype.kind != "f" and _is_missing(value) else value


def _short(value: Any) -> Any:
    value = _jsonable(value)
    if isinstance(value, str) and len(value) > VALUE_CHARS:
        return value[: VALUE_CHARS - 1] + "…"
    return value


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars unwrapped, NaN/inf as text (JSON has no such numbers), pandas NA as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None if _is_missing(value) else str(value)


def _is_missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _findings_markdown(title: str, findings: list[dict[str, Any]]) -> list[str]:
    if not findings:
        return []
    lines = [
        f"{title}:",
        "",
        "| expectation | GE type | column | unexpected | observed | examples |",
        "|---|---|---|---|---|---|",
    ]
    for f in findings:
        examples = "<br>".join(_format_example(e) for e in f["examples"])
        ge_type = f["ge_type"] or "(not GE)"
        cells = [f["expectation"], ge_type, f["column"], f["unexpected_count"], f.get("observed"), examples]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _format_example(example: dict[str, Any]) -> str:
    extras = "".join(
        f", {k}={v!r}" for k, v in example.items() if k not in ("where", "line", "id", "value")
    )
    return f"{example['where']} id={example['id']!r} value={example['value']!r}{extras}"


# ---------------------------------------------------------------- leakage


def _questions_by_norm(frame: pd.DataFrame) -> dict[str, list[tuple[int, Any, str]]]:
    found: dict[str, list[tuple[int, Any, str]]] = {}
    for line, ident, question, norm in frame[["line", "id", "question", "question_norm"]].itertuples(index=False):
        if isinstance(norm, str):  # pandas' str columns hold NaN, not None, where text is missing
            found.setdefault(norm, []).append((int(line), None if _is_missing(ident) else ident, question))
    return found


def leakage(train_frame: pd.DataFrame, eval_frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Train/eval question pairs that are equal exactly or after `normalise_question`."""
    eval_by_norm = _questions_by_norm(eval_frame)
    pairs = []
    for norm, train_rows in _questions_by_norm(train_frame).items():
        for train_line, train_id, question in train_rows:
            for eval_line, eval_id, eval_question in eval_by_norm.get(norm, []):
                pairs.append({
                    "kind": "exact" if question == eval_question else "normalised",
                    "train_line": train_line, "train_id": train_id,
                    "eval_line": eval_line, "eval_id": eval_id,
                    "question": question[:VALUE_CHARS],
                })
    return sorted(pairs, key=lambda p: (p["train_line"], p["eval_line"]))


def _leakage_report(
    train: tuple[Path, pd.DataFrame], evals: tuple[Path, pd.DataFrame], cfg: ChecksConfig
) -> CheckReport:
    (train_path, train_frame), (eval_path, eval_frame) = train, evals
    pairs = leakage(train_frame, eval_frame)
    finding = {
        "expectation": LEAKAGE_EXPECTATION,
        "ge_type": None,  # a join of two files, computed by `leakage`, not a GE expectation
        "column": "question_norm",
        "unexpected_count": len(pairs),
        "observed": TTT_ALLOWED if cfg.allow_test_time_training else None,
        "examples": [_leak_example(p, train_path.name, eval_path.name) for p in pairs[:EXAMPLES_SHOWN]],
    }
    allowed = bool(pairs) and cfg.allow_test_time_training
    return CheckReport(
        name=f"train/eval leakage ({train_path.name} vs {eval_path.name})",
        success=not pairs or allowed,
        source=f"{train_path} vs {eval_path}",
        rows=len(train_frame) + len(eval_frame),
        expectations=[LEAKAGE_EXPECTATION],
        failures=[finding] if pairs and not allowed else [],
        allowed=[finding] if allowed else [],
    )


def _leak_example(pair: dict[str, Any], train_name: str, eval_name: str) -> dict[str, Any]:
    return {
        "where": f"{train_name}:{pair['train_line']}",
        "line": pair["train_line"],
        "id": pair["train_id"],
        "value": pair["question"],
        "kind": pair["kind"],
        "eval_where": f"{eval_name}:{pair['eval_line']}",
        "eval_id": pair["eval_id"],
    }


# ---------------------------------------------------------------- the data-check stage


def _missing_file_report(name: str, path: Path, error: RlscError) -> CheckReport:
    failure = {
        "expectation": "file exists", "ge_type": None, "column": None, "unexpected_count": None,
        "observed": str(error), "examples": [],
    }
    return CheckReport(
        name=f"{name} ({path.name})", success=False, source=str(path), rows=0,
        expectations=["file exists"], failures=[failure],
    )


def _checked_problems(path: Path, kind: ProblemKind, cfg: ChecksConfig) -> tuple[CheckReport, Any]:
    """(the report, the frame) or (a failed "file exists" report, None): the report files always appear."""
    try:
        frame = problems_frame(path)
    except RlscError as exc:
        return _missing_file_report(f"{kind} problems", path, exc), None
    return _validate_problems(path, frame, kind, cfg), frame


def run_data_checks(
    train_path: str | Path, eval_path: str | Path, cfg: ChecksConfig, report_dir: str | Path
) -> list[CheckReport]:
    """Validate the train and eval files and their overlap; write the reports; raise if anything failed.

    Always writes `report_dir/data_checks.json` and `report_dir/data_checks.md` first, so a failed
    run leaves its evidence. Raises DataCheckError naming each failed expectation with examples.
    """
    train_path, eval_path = Path(train_path), Path(eval_path)
    train_report, train_frame = _checked_problems(train_path, "train", cfg)
    eval_report, eval_frame = _checked_problems(eval_path, "eval", cfg)
    reports = [train_report, eval_report]
    if train_frame is not None and eval_frame is not None:
        reports.append(_leakage_report((train_path, train_frame), (eval_path, eval_frame), cfg))
    write_reports(reports, report_dir)
    if not all(r.success for r in reports):
        raise DataCheckError(failure_message(reports))
    return reports


def failure_message(reports: list[CheckReport]) -> str:
    lines = ["data checks failed:"]
    for report in reports:
        for f in report.failures:
            count = "" if f["unexpected_count"] is None else f", {_rows(f['unexpected_count'])}"
            lines.append(f"- {report.name}: {f['expectation']!r} ({f['ge_type'] or 'rlsc check'}{count})")
            lines += [f"    {_format_example(e)}" for e in f["examples"]]
            if not f["examples"] and f.get("observed") is not None:
                lines.append(f"    observed: {f['observed']}")
    return "\n".join(lines)


def reports_markdown(reports: list[CheckReport]) -> str:
    verdict = "PASS" if all(r.success for r in reports) else "FAIL"
    header = [f"# Data checks: {verdict}", "", "| check | result | failed |", "|---|---|---|"]
    header += [f"| {_cell(r.name)} | {'PASS' if r.success else 'FAIL'} | {len(r.failures)} |" for r in reports]
    return "\n".join([*header, "", *(r.to_markdown() for r in reports)]) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    # Temp file then rename: a reader never sees half a report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_reports(reports: list[CheckReport], report_dir: str | Path) -> tuple[Path, Path]:
    """Write data_checks.json and data_checks.md into `report_dir`; returns their paths."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = {"success": all(r.success for r in reports), "reports": [r.to_dict() for r in reports]}
    json_path, md_path = report_dir / "data_checks.json", report_dir / "data_checks.md"
    _write_atomic(json_path, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    _write_atomic(md_path, reports_markdown(reports))
    return json_path, md_path
