"""Evaluation: greedy pass@1 (the headline), maj@k and pass@k from k samples, confidence and length,
every accuracy with a 95% interval; and the paired comparison of two runs on the same problems.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlsc import confidence as conf
from rlsc.answers import canonical_answer, extract_answer, is_equivalent
from rlsc.config import Config
from rlsc.errors import RlscError
from rlsc.problems import Problem
from rlsc.prompts import render_prompt
from rlsc.sampling import generate_rollouts

Z95 = 1.959963984540054


# ---------------------------------------------------------------- statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # product form of the binomial ratio: stable for large n
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0% and 100%)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, not rounding noise
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_interval(values: list[float], samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (items resampled with replacement)."""
    if not values:
        return (float("nan"), float("nan"))
    data = np.asarray(values, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(data), size=(samples, len(data)))
    means = data[rows].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def accuracy_summary(correct: list[bool]) -> dict[str, float]:
    n, c = len(correct), sum(correct)
    lo, hi = wilson_interval(c, n)
    return {"value": c / n if n else float("nan"), "correct": c, "n": n, "ci_low": lo, "ci_high": hi}


# ---------------------------------------------------------------- running a model on problems


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_records(model, tokenizer, problems: list[Problem], prompts: list[str], cfg: Config, progress: bool,
                   checkpoint: EvalCheckpoint | None = None):
    """One greedy completion per problem, graded, with its confidence (mean token probability at T=1)."""
    e = cfg.eval
    records = []
    bar = tqdm(total=len(problems), desc="evaluate (greedy)", disable=not progress, dynamic_ncols=True)
    for batch in _batches(list(zip(problems, prompts)), e.batch_size):
        done = checkpoint.get("greedy", [p.id for p, _ in batch]) if checkpoint else None
        if done is not None:
            records += done
            bar.update(len(batch))
            continue
        r = generate_rollouts(model, tokenizer, [p for _, p in batch], k=1, temperature=1.0,
                              max_new_tokens=e.max_new_tokens, greedy=True)
        token_prob = conf.mean_token_prob(r.token_logprobs, r.completion_mask)
        for i, (problem, _) in enumerate(batch):
            extracted = extract_answer(r.texts[i])
            records.append({
                "id": problem.id, "question": problem.question, "gold": problem.answer, "source": problem.source,
                "completion": r.texts[i], "extracted": extracted, "correct": is_equivalent(extracted, problem.answer),
                "confidence": float(token_prob[i]), "seq_logprob": float(r.seq_logprobs[i]),
                "length": int(r.lengths[i]), "truncated": not bool(r.stopped[i]),
            })
        if checkpoint:
            checkpoint.put("greedy", records[-len(batch):])
        bar.update(len(batch))
    bar.close()
    return records


def chunk_seed(seed: int, ids: list[str]) -> int:
    """The sampling seed of a chunk of problems, from the eval seed and the problems' ids: the same
    problems draw the same samples in a longer list, a resumed run or an uninterrupted one."""
    digest = hashlib.sha256(json.dumps([seed, ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes up to 2**63 - 1


def add_sampled(records, model, tokenizer, prompts: list[str], cfg: Config, progress: bool,
                checkpoint: EvalCheckpoint | None = None) -> None:
    """k samples per problem at eval.temperature: their answers, majority vote and correct count."""
    e = cfg.eval
    per_call = max(1, e.batch_size // e.k)
    bar = tqdm(total=len(records), desc=f"evaluate ({e.k} samples)", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(records), per_call):
        chunk = records[start : start + per_call]
        ids = [record["id"] for record in chunk]
        done = checkpoint.get("sampled", ids) if checkpoint else None
        if done is not None:
            for record, fields in zip(chunk, done):
                record.update(fields)
            bar.update(len(chunk))
            continue
        torch.manual_seed(chunk_seed(e.seed, ids))
        r = generate_rollouts(model, tokenizer, prompts[start : start + per_call], k=e.k,
                              temperature=e.temperature, max_new_tokens=e.max_new_tokens)
        results = []
        for q, record in enumerate(chunk):
            texts = r.texts[r.rows(q)]
            extracted = [extract_answer(t) for t in texts]
            correct = [is_equivalent(a, record["gold"]) for a in extracted]
            majority, share = conf.majority_answer([canonical_answer(a) for a in extracted])
            results.append({
                "id": record["id"], "samples": texts, "samples_extracted": extracted, "samples_correct": correct,
                "majority": majority, "majority_share": share,
                "majority_correct": is_equivalent(majority, record["gold"]),
                "samples_confidence": conf.mean_token_prob(r.token_logprobs[r.rows(q)],
                                                           r.completion_mask[r.rows(q)]).tolist(),
            })
            record.update(results[-1])
        if checkpoint:
            checkpoint.put("sampled", results)
        bar.update(len(chunk))
    bar.close()


def summarize(records: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Metrics JSON of one evaluation: every accuracy with its 95% interval and sample size."""
    e = cfg.eval
    n = len(records)
    metrics: dict[str, Any] = {"n": n}
    if n == 0:
        return metrics
    metrics["pass@1"] = accuracy_summary([r["correct"] for r in records])
    metrics["mean_confidence"] = sum(r["confidence"] for r in records) / n
    metrics["mean_length"] = sum(r["length"] for r in records) / n
    metrics["truncated_share"] = sum(r["truncated"] for r in records) / n
    if "samples" in records[0]:
        k = e.k
        metrics[f"maj@{k}"] = accuracy_summary([r["majority_correct"] for r in records])
        passes = [pass_at_k(k, sum(r["samples_correct"]), k) for r in records]
        lo, hi = bootstrap_interval(passes, e.bootstrap_samples, e.seed)
        metrics[f"pass@{k}"] = {"value": sum(passes) / n, "n": n, "ci_low": lo, "ci_high": hi}
        per_sample = [sum(r["samples_correct"]) / k for r in records]
        lo, hi = bootstrap_interval(per_sample, e.bootstrap_samples, e.seed)
        metrics["sample_accuracy"] = {"value": sum(per_sample) / n, "n": n, "ci_low": lo, "ci_high": hi}
    return metrics


def evaluate(model, tokenizer, problems: list[Problem], cfg: Config, progress: bool = True,
             checkpoint: EvalCheckpoint | None = None):
    """(metrics, per-problem records) of a model on problems that all carry a gold answer; with a
    checkpoint, finished batches are kept as they complete and reused on the next call."""
    missing = [p.id for p in problems if not p.answer]
    if missing:
        raise RlscError(f"evaluation needs gold answers; missing for {len(missing)} problems, e.g. {missing[:3]}")
    prompts = [render_prompt(tokenizer, p.question, cfg.prompt) for p in problems]
    records = greedy_records(model, tokenizer, problems, prompts, cfg, progress, checkpoint)
    if cfg.eval.k > 1:
        add_sampled(records, model, tokenizer, prompts, cfg, progress, checkpoint)
    return summarize(records, cfg), records


class EvalCheckpoint:
    """The finished batches of one evaluation, appended as each completes, so that an interrupted
    run resumes where it stopped (GSM8K maj@16 on 200 problems takes over an hour on 2 CPU cores).

    Lines are {"phase", "id", "fields"}; the first line is the settings the batches were made under
    (model, decoding, prompt): a file from other settings is discarded rather than mixed in, and a
    last line torn by a kill is dropped.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.done: dict[tuple[str, str], dict] = {}
        lines = self._read()
        if lines and lines[0] == {"settings": self.settings}:
            self.done = {(x["phase"], x["id"]): x["fields"] for x in lines[1:]}
        elif lines:
            tqdm.write(f"{self.path}: made under other settings; starting over")
        self._rewrite()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn by a kill mid-write: everything after it is lost work, not data
        return lines

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"settings": self.settings}] + [{"phase": ph, "id": i, "fields": f} for (ph, i), f in self.done.items()]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def get(self, phase: str, ids: list[str]) -> list[dict] | None:
        """The finished results of these problems in this phase, or None unless all of them are done."""
        found = [self.done.get((phase, i)) for i in ids]
        return None if any(f is None for f in found) else [dict(f) for f in found]

    def put(self, phase: str, results: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for fields in results:
                self.done[(phase, fields["id"])] = fields
                f.write(json.dumps({"phase": phase, "id": fields["id"], "fields": fields}) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- files


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_records(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise RlscError(f"per-problem file not found: {path}")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlscError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "id" not in record or "correct" not in record:
            raise RlscError(f"{path}:{line_no}: a per-problem record needs 'id' and 'correct'")
        records.append(record)
    return records


# ---------------------------------------------------------------- paired comparison


def compare(records_a: list[dict], records_b: list[dict], *, samples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Paired difference B - A of greedy correctness on the same problems, with a paired-bootstrap
    95% interval (problems resampled with replacement, both runs kept together)."""
    by_id_a = {r["id"]: r for r in records_a}
    by_id_b = {r["id"]: r for r in records_b}
    if set(by_id_a) != set(by_id_b):
        only_a, only_b = set(by_id_a) - set(by_id_b), set(by_id_b) - set(by_id_a)
        raise RlscError(
            f"the two files cover different problems ({len(only_a)} only in A, {len(only_b)} only in B, "
            f"e.g. {sorted(only_a or only_b)[:3]}): a paired comparison needs the same problems"
        )
    ids = sorted(by_id_a)
    diffs = [float(by_id_b[i]["correct"]) - float(by_id_a[i]["correct"]) for i in ids]
    lo, hi = bootstrap_interval(diffs, samples, seed)
    n = len(ids)
    return {
        "n": n,
        "accuracy_a": sum(by_id_a[i]["correct"] for i in ids) / n,
        "accuracy_b": sum(by_id_b[i]["correct"] for i in ids) / n,
        "difference": sum(diffs) / n,
        "ci_low": lo,
        "ci_high": hi,
        "b_only_correct": sum(d > 0 for d in diffs),
        "a_only_correct": sum(d < 0 for d in diffs),
    }
