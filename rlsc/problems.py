"""The Problem record: the unit of data every stage reads and writes (one JSONL line each)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One question. `answer` is the gold final answer (None for unlabeled training data)."""

    id: str
    question: str
    answer: str | None
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def write_problems(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write problems as JSONL atomically (temp file, then rename), so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(p.to_json() + "\n")
    tmp.replace(path)
    return path
