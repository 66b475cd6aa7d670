"""Problem loading: the six real benchmark layouts, error messages, subsets, synthetic and hub sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rlsc.data import load_problems, read_problems, record_to_problem
from rlsc.errors import RlscError
from rlsc.problems import Problem, write_problems
from rlsc.synthetic import generate_problems

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"benchmark copies not present at {SHARED_DATA} (see shared/data/README.md)",
)

# Hand-read from the first two lines of each file: (file, rows, [(id, question start, gold), ...]).
REAL_FILES = [
    (
        "gsm8k/test.jsonl",
        1319,
        [
            ("test-1", "Janet\u2019s ducks lay 16 eggs per day.", "18"),
            ("test-2", "A robe takes 2 bolts of blue fiber", "3"),
        ],
    ),
    (
        "gsm8k/train.jsonl",
        7473,
        [("train-1", "Natalia sold clips to 48 of her friends in April", "72")],
    ),
    (
        "math500/test.jsonl",
        500,
        [
            (
                "test/precalculus/807.json",
                "Convert the point $(0,3)$ in rectangular",
                r"\left( 3, \frac{\pi}{2} \right)",
            ),
            ("test/intermediate_algebra/1994.json", "Define\n\\[p = \\sum_{k = 1}^\\infty", "p - q"),
        ],
    ),
    (
        "aime24/test.jsonl",
        30,
        [
            ("60", "Every morning Aya goes for a $9$-kilometer-long walk", "204"),
            ("61", "Let $ABC$ be a triangle inscribed in circle $\\omega$.", "113"),
        ],
    ),
    (
        "amc23/test.jsonl",
        40,
        [
            ("0", "Cities $A$ and $B$ are $45$ miles apart.", "27"),
            ("1", "Positive real numbers $x$ and $y$ satisfy", "36"),
        ],
    ),
    (
        "minerva_math/test.jsonl",
        272,
        [
            ("0", "Each of the two Magellan telescopes has a diameter of $6.5", "1.6"),
            ("1", "A white dwarf star has an effective temperature", "4.5e33"),
        ],
    ),
    (
        "olympiadbench/test.jsonl",
        675,
        [
            ("1606", "Xenia and Sergey play the following game.", "2"),
            (
                "1610",
                "Given a positive integer $n$, determine the largest real number $\\mu$",
                "\\frac{1}{2 n+2}",
            ),
        ],
    ),
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@needs_shared_data
@pytest.mark.parametrize("relpath, rows, expected", REAL_FILES, ids=[f[0] for f in REAL_FILES])
def test_real_benchmark_files_load_with_hand_read_questions_and_gold(relpath, rows, expected):
    problems = load_problems(SHARED_DATA / relpath, require_answer=True)
    assert len(problems) == rows
    source = relpath.split("/")[0]
    for problem, (pid, question_start, gold) in zip(problems, expected):
        assert problem.id == pid
        assert problem.question.startswith(question_start)
        assert problem.answer == gold
        assert problem.source == source
        assert "solution" not in problem.meta  # it spells out the answer


@needs_shared_data
def test_benchmark_meta_keeps_small_descriptive_fields():
    math500 = load_problems(SHARED_DATA / "math500/test.jsonl")[0]
    assert math500.meta == {"subject": "Precalculus", "level": 2}


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"question": "1+1?", "answer": "2"}', '{"question": "oops"'])
    with pytest.raises(RlscError, match=r"bad\.jsonl:2: malformed JSON"):
        load_problems(path)


def test_non_object_line_is_rejected(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(RlscError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        load_problems(path)


def test_missing_question_field_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "noq.jsonl", ['{"question": "ok?"}', "", '{"answer": "3"}'])
    # The blank line 2 is skipped but still counted, so the error points at the real line 3.
    with pytest.raises(RlscError, match=r"noq\.jsonl:3: missing question field"):
        load_problems(path)


def test_empty_question_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ['{"question": "   ", "answer": "1"}'])
    with pytest.raises(RlscError, match=r"empty\.jsonl:1: empty question"):
        load_problems(path)


def test_non_string_question_is_rejected(tmp_path):
    path = write_lines(tmp_path / "num.jsonl", ['{"problem": 12}'])
    with pytest.raises(RlscError, match=r"num\.jsonl:1: field 'problem' must be a string"):
        load_problems(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"question": "fine?"}\n{"question": "\xff"}\n')
    with pytest.raises(RlscError, match=r"bytes\.jsonl:2: not valid UTF-8"):
        load_problems(path)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "gone.jsonl"
    with pytest.raises(RlscError, match="data file not found") as info:
        load_problems(missing)
    assert str(missing) in str(info.value)


def test_unknown_source_form_is_rejected():
    with pytest.raises(RlscError, match="unknown data source"):
        load_problems("problems.csv")


def test_require_answer_names_the_line_without_gold(tmp_path):
    path = write_lines(tmp_path / "nogold.jsonl", ['{"question": "a?", "answer": "1"}', '{"question": "b?"}'])
    assert [p.answer for p in load_problems(path)] == ["1", None]
    with pytest.raises(RlscError, match=r"nogold\.jsonl:2: no gold answer"):
        load_problems(path, require_answer=True)


def test_blank_lines_are_skipped_and_fallback_ids_use_line_numbers(tmp_path):
    path = write_lines(tmp_path / "sparse.jsonl", ['{"question": "a?"}', "   ", '{"question": "b?"}'])
    assert [p.id for p in load_problems(path)] == ["sparse-1", "sparse-3"]


def test_source_is_the_parent_folder_name(tmp_path):
    folder = tmp_path / "mybench"
    folder.mkdir()
    path = write_lines(folder / "test.jsonl", ['{"question": "a?", "answer": "#### 4"}'])
    (problem,) = load_problems(path)
    assert (problem.source, problem.answer) == ("mybench", "4")


def test_question_field_priority_context_and_id_keys():
    both = record_to_problem({"question": "Q", "problem": "P", "idx": 0}, source="s", fallback_id="f")
    assert (both.question, both.id) == ("Q", "0")
    only_problem = record_to_problem({"problem": "P", "unique_id": "u/1"}, source="s", fallback_id="f")
    assert (only_problem.question, only_problem.id) == ("P", "u/1")
    with_context = record_to_problem(
        {"context": "A box has 3 balls.", "question": "How many balls?", "final_answer": ["3"]},
        source="s",
        fallback_id="f",
    )
    assert with_context.question == "A box has 3 balls.\n\nHow many balls?"
    assert (with_context.id, with_context.answer) == ("f", "3")


def test_limit_with_seed_is_a_deterministic_ordered_subset(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", [json.dumps({"question": f"q{i}?"}) for i in range(50)])
    everything = load_problems(path)
    first = load_problems(path, limit=10, seed=3)
    assert first == load_problems(path, limit=10, seed=3)
    assert len(first) == 10
    positions = [everything.index(p) for p in first]
    assert positions == sorted(positions)
    assert first != load_problems(path, limit=10, seed=4)
    assert load_problems(path, limit=50) == everything
    assert load_problems(path, limit=500) == everything
    assert load_problems(path, limit=0) == []


def test_negative_limit_is_rejected(tmp_path):
    path = write_lines(tmp_path / "two.jsonl", ['{"question": "a?"}', '{"question": "b?"}'])
    with pytest.raises(RlscError, match="limit"):
        load_problems(path, limit=-1)


def test_synthetic_source():
    problems = load_problems("synthetic:12")
    assert problems == generate_problems(12, 0)
    assert all(p.source == "synthetic" for p in problems)
    assert load_problems("synthetic:12:7") == generate_problems(12, 7)
    assert load_problems("synthetic:12:7", limit=5, seed=1) == load_problems(
        "synthetic:12:7", limit=5, seed=1
    )


@pytest.mark.parametrize("bad", ["synthetic:", "synthetic:ten", "synthetic:5:1:2", "synthetic:-3"])
def test_bad_synthetic_source_is_rejected(bad):
    with pytest.raises(RlscError, match="synthetic:N"):
        load_problems(bad)


def test_write_then_load_roundtrip_preserves_records(tmp_path):
    original = [
        *generate_problems(5, 1),
        Problem("u-1", "Unlabeled question \u2014 with a dash?", None, "gsm8k", {}),
        Problem("m-1", "Nested meta?", "7", "custom", {"level": 3, "tags": ["a", "b"], "nested": {"x": 1.5}}),
    ]
    path = write_problems(tmp_path / "out" / "problems.jsonl", original)
    assert load_problems(path) == original
    assert read_problems(path) == original


def force_hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for hub libraries already imported (they read the variable once, at import);
    without this an earlier import would make the test retry the network for half a minute."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module_name in ("huggingface_hub.constants", "datasets.config"):
        module = sys.modules.get(module_name)
        if module is not None:
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)


def test_hub_source_failure_says_the_hub_may_be_offline(monkeypatch):
    force_hub_offline(monkeypatch)
    with pytest.raises(RlscError, match="could not be loaded") as info:
        load_problems("hf:rlsc-tests/no-such-dataset-7f3c", split="test")
    assert "HF_HUB_OFFLINE=1" in str(info.value)


def test_hub_rows_go_through_the_same_record_mapping(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [
            {"question": "Two plus two?", "answer": "2 + 2 = 4\n#### 4"},
            {"problem": "P?", "answer": 1.0},
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("hf:someone/toy:main")
    assert calls == [("someone/toy", "main", "test")]
    assert [(p.id, p.question, p.answer, p.source) for p in problems] == [
        ("toy-1", "Two plus two?", "4", "toy"),
        ("toy-2", "P?", "1", "toy"),
    ]


def test_hub_rows_with_errors_name_the_row(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config, split: [{"question": "ok?"}, {"text": "x"}]
    )
    with pytest.raises(RlscError, match="hf:toy row 2: missing question field"):
        load_problems("hf:toy", split="train")


def test_empty_hub_name_is_rejected():
    with pytest.raises(RlscError, match="hf:NAME"):
        load_problems("hf:")
