"""A long evaluation resumes from its finished batches and gives what an uninterrupted run gives."""

from __future__ import annotations

import json

import pytest

from rlsc import evaluate as ev
from rlsc.config import load_config
from rlsc.problems import Problem

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} plus {i}?", answer=str(2 * i), source="test") for i in range(6)]


def _cfg():
    # 2 problems x 3 samples per sampling call, 4 problems per greedy call: several batches of each
    return load_config(None, ["eval.k=3", "eval.batch_size=6", "eval.max_new_tokens=6", "eval.temperature=1.0"])


def _settings():
    return {"model": "tiny", "eval": _cfg().eval.model_dump()}


def test_chunk_seed_depends_on_the_seed_and_the_problems_only():
    assert ev.chunk_seed(0, ["a", "b"]) == ev.chunk_seed(0, ["a", "b"])
    assert len({ev.chunk_seed(0, ["a", "b"]), ev.chunk_seed(1, ["a", "b"]), ev.chunk_seed(0, ["b", "a"]),
                ev.chunk_seed(0, ["a", "c"])}) == 4
    assert 0 <= ev.chunk_seed(7, ["x"]) < 2**63


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(tiny_policy, tmp_path, monkeypatch):
    model, tok = tiny_policy
    cfg = _cfg()
    _, uninterrupted = ev.evaluate(model, tok, PROBLEMS, cfg, progress=False)

    real, calls = ev.generate_rollouts, []

    def dies_on_the_fourth_call(*args, **kwargs):
        calls.append(kwargs.get("k"))
        if len(calls) == 4:  # greedy batches: 1 call (6 problems); sampled: 3 calls of 2 problems
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_rollouts", dies_on_the_fourth_call)
    path = tmp_path / "progress.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, tok, PROBLEMS, cfg, progress=False, checkpoint=ev.EvalCheckpoint(path, _settings()))
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["phase"], x["id"]) for x in kept[1:]] == [("greedy", f"p{i}") for i in range(6)] + [
        ("sampled", f"p{i}") for i in range(4)]

    calls.clear()
    monkeypatch.setattr(ev, "generate_rollouts", lambda *a, **kw: calls.append(kw.get("k")) or real(*a, **kw))
    _, resumed = ev.evaluate(model, tok, PROBLEMS, cfg, progress=False, checkpoint=ev.EvalCheckpoint(path, _settings()))
    assert calls == [3]  # only the last sampling chunk ran again
    assert resumed == uninterrupted


def test_samples_of_a_problem_do_not_depend_on_the_list_it_is_evaluated_in(tiny_policy):
    """Chunks are seeded by their problems: the first 4 of 6 draw what they draw alone, so a larger
    subset extends a smaller one."""
    model, tok = tiny_policy
    _, alone = ev.evaluate(model, tok, PROBLEMS[:4], _cfg(), progress=False)
    _, within = ev.evaluate(model, tok, PROBLEMS, _cfg(), progress=False)
    assert [r["samples"] for r in within[:4]] == [r["samples"] for r in alone]


def test_a_checkpoint_from_other_settings_or_a_torn_line_is_not_reused(tmp_path):
    path = tmp_path / "progress.jsonl"
    first = ev.EvalCheckpoint(path, {"model": "a"})
    first.put("greedy", [{"id": "p0", "correct": True}, {"id": "p1", "correct": False}])
    assert ev.EvalCheckpoint(path, {"model": "a"}).get("greedy", ["p0", "p1"]) == [
        {"id": "p0", "correct": True}, {"id": "p1", "correct": False}]
    with path.open("a") as f:
        f.write('{"phase": "greedy", "id": "p2", "fie')  # killed mid-write
    torn = ev.EvalCheckpoint(path, {"model": "a"})
    assert torn.get("greedy", ["p0"]) is not None and torn.get("greedy", ["p2"]) is None
    torn.put("greedy", [{"id": "p2", "correct": True}])  # appends after the dropped line, not onto it
    assert ev.EvalCheckpoint(path, {"model": "a"}).get("greedy", ["p2"]) == [{"id": "p2", "correct": True}]
    assert ev.EvalCheckpoint(path, {"model": "b"}).get("greedy", ["p0"]) is None
    assert ev.EvalCheckpoint(path, {"model": "a"}).get("greedy", ["p0"]) is None  # "b" started it over
