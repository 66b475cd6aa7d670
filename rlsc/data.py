"""Load problems from a local JSONL file, the embedded synthetic generator, or the Hugging Face hub.

Sources:
  path/to/file.jsonl     one JSON object per line: GSM8K, MATH-500, AIME, AMC, Minerva, OlympiadBench,
                         or this project's own Problem layout (id, question, answer, source, meta)
  synthetic:N[:SEED]     N generated word problems (SEED defaults to 0, so the string alone fixes the data)
  hf:NAME[:CONFIG]       datasets.load_dataset(NAME, CONFIG, split=split or "test")

Every record goes through `record_to_problem`, so a file and the hub give identical Problems.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlsc.errors import RlscError
from rlsc.problems import Problem

QUESTION_KEYS = ("question", "problem")
ID_KEYS = ("id", "unique_id", "idx")
# Fields that become the question, the id or the gold answer; "solution" also stays out of meta
# because it spells out the answer, and meta may travel with the question into training.
CONSUMED_KEYS = {*QUESTION_KEYS, *ID_KEYS, "context", "answer", "final_answer", "solution"}
SOURCE_FORMS = "a .jsonl file, synthetic:N[:SEED] or hf:NAME[:CONFIG]"

# A record, where it came from (for error messages) and the id to use when it has none.
Located = tuple[dict[str, Any], str, str]


def _is_project_layout(record: dict[str, Any]) -> bool:
    # Problem.to_json always writes both; no benchmark layout has a `source` next to a `meta`.
    return "source" in record and "meta" in record


def _question_text(record: dict[str, Any]) -> str:
    key = next((k for k in QUESTION_KEYS if record.get(k) is not None), None)
    if key is None:
        raise RlscError(f"missing question field (expected one of {', '.join(QUESTION_KEYS)})")
    question = record[key]
    if not isinstance(question, str):
        raise RlscError(f"field {key!r} must be a string, got {type(question).__name__}")
    if not question.strip():
        raise RlscError(f"empty question in field {key!r}")
    context = record.get("context")
    # OlympiadBench keeps shared setup in `context`; the question is unanswerable without it.
    if isinstance(context, str) and context.strip():
        return f"{context.strip()}\n\n{question}"
    return question


def _record_id(record: dict[str, Any], fallback_id: str) -> str:
    # `is not None`, not truthiness: Minerva's first row has idx 0.
    value = next((record[k] for k in ID_KEYS if record.get(k) is not None), None)
    return fallback_id if value is None else str(value)


def _scalar_meta(record: dict[str, Any]) -> dict[str, Any]:
    """Small descriptive fields (subject, level, type, url...) worth keeping for slicing results."""
    return {
        k: v
        for k, v in record.items()
        if k not in CONSUMED_KEYS and isinstance(v, (str, int, float, bool)) and v != ""
    }


def _project_problem(record: dict[str, Any], fallback_id: str) -> Problem:
    meta = record["meta"] if record["meta"] is not None else {}
    if not isinstance(meta, dict):
        raise RlscError(f"field 'meta' must be a JSON object, got {type(meta).__name__}")
    answer = record.get("answer")
    return Problem(
        id=_record_id(record, fallback_id),
        question=_question_text(record),
        answer=None if answer is None else str(answer),
        source=str(record["source"]),
        meta=meta,
    )


def record_to_problem(record: dict[str, Any], *, source: str, fallback_id: str) -> Problem:
    """One raw record (benchmark or project layout) as a Problem; RlscError says what is wrong with it."""
    if _is_project_layout(record):
        return _project_problem(record, fallback_id)
    from rlsc.answers import extract_gold  # lazy: answers pulls in the grading stack

    return Problem(
        id=_record_id(record, fallback_id),
        question=_question_text(record),
        answer=extract_gold(record),
        source=source,
        meta=_scalar_meta(record),
    )


def _to_problems(located: Iterable[Located], source: str, require_answer: bool) -> list[Problem]:
    problems = []
    for record, where, fallback_id in located:
        try:
            problem = record_to_problem(record, source=source, fallback_id=fallback_id)
        except RlscError as exc:
            raise RlscError(f"{where}: {exc}") from None
        if require_answer and problem.answer is None:
            raise RlscError(f"{where}: no gold answer found, and this stage needs one")
        problems.append(problem)
    return problems


def _parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """The JSON object on one line, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RlscError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RlscError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RlscError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_records(path: Path) -> Iterator[Located]:
    # Bytes, not text mode: a bad byte is then reported at its own line instead of failing the whole read.
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            record = _parse_line(raw, where)
            if record is not None:
                yield record, where, f"{path.stem}-{line_no}"


def _load_jsonl(path: Path, require_answer: bool) -> list[Problem]:
    if not path.is_file():
        raise RlscError(f"data file not found: {path}")
    source = path.resolve().parent.name or "local"
    return _to_problems(_jsonl_records(path), source, require_answer)


def _load_synthetic(source: str, templates: list[str] | None, exclude: Iterable[str]) -> list[Problem]:
    from rlsc.synthetic import generate_problems

    parts = source.split(":")[1:]
    if len(parts) not in (1, 2) or not all(p.isascii() and p.isdigit() for p in parts):
        raise RlscError(
            f"bad data source {source!r}: expected synthetic:N or synthetic:N:SEED (whole numbers)"
        )
    n = int(parts[0])
    seed = int(parts[1]) if len(parts) == 2 else 0
    return generate_problems(n, seed, templates=templates, exclude=exclude)


def _load_hub(source: str, split: str | None, require_answer: bool) -> list[Problem]:
    name, _, config = source.removeprefix("hf:").partition(":")
    if not name:
        raise RlscError(f"bad data source {source!r}: expected hf:NAME or hf:NAME:CONFIG")
    split = split or "test"
    try:
        import datasets
    except ImportError as exc:
        raise RlscError(f"the {source!r} source needs the 'datasets' package ({exc})") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types (network, 404, config)
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise RlscError(
            f"dataset {name!r} (config {config or None!r}, split {split!r}) could not be loaded: "
            f"{type(exc).__name__}: {str(exc)[:300]}. The Hugging Face hub may be offline or unreachable "
            f"(HF_HUB_OFFLINE={offline}); use a local .jsonl file or synthetic:N instead."
        ) from None
    short = name.rsplit("/", 1)[-1]
    located = ((dict(row), f"{source} row {i}", f"{short}-{i}") for i, row in enumerate(rows, start=1))
    return _to_problems(located, short, require_answer)


def _seeded_subset(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    if limit is None or limit >= len(problems):
        return problems
    if limit < 0:
        raise RlscError(f"limit must be non-negative, got {limit}")
    # Sorted indices keep the file's order, so a subset reads like the original, just shorter.
    keep = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]


def load_problems(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    require_answer: bool = False,
    templates: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[Problem]:
    """Problems from `source` (see the module docstring); `limit` takes a `seed`ed random subset.

    `split` only applies to hf: sources. `require_answer` turns a record without gold into an error.
    `templates` and `exclude` (question texts to avoid) only apply to synthetic: sources.
    """
    text = os.fspath(source)
    if text.startswith("synthetic:"):
        problems = _load_synthetic(text, templates, exclude)
    elif text.startswith("hf:"):
        problems = _load_hub(text, split, require_answer)
    elif text.endswith(".jsonl"):
        problems = _load_jsonl(Path(text), require_answer)
    else:
        raise RlscError(f"unknown data source {text!r}: expected {SOURCE_FORMS}")
    return _seeded_subset(problems, limit, seed)


def read_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """Read a JSONL file this project wrote with `write_problems`."""
    return load_problems(path)
