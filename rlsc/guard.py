"""The collapse guard: label-free signals that a policy is maximising its confidence with a useless
output, and the rules that act on them.

Confidence can be maximised by a degenerate output. On the embedded model (../shared/METHOD.md,
"Measured on the embedded model") full fine-tuning collapsed in 4 to 6 steps: every question got
the same garbled copy of the few-shot example and p_old -> 1 on every sample. The signals below are
pure functions of one step's samples (and of a small state carried between steps, `GuardState`);
`evaluate_rules` compares them with the thresholds of `GuardConfig`. The trainer acts on the result.

Every signal is logged as `guard/<name>`; the rule names in the config are the bare `<name>`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rlsc import confidence as conf
from rlsc.answers import canonical_answer
from rlsc.config import GuardConfig

if TYPE_CHECKING:
    import torch

    from rlsc.sampling import Rollouts

PREFIX = "guard/"
SEVERITY = {"warn": 1, "stop": 2, "rollback": 3}  # which firing decides the step when several fire
GRAD_HISTORY = 50  # pre-clip grad norms kept for the median (a JSON list in the checkpoint)
RECENT_STEPS = 4  # steps whose completions cross_question_identical also compares against


# ---------------------------------------------------------------- answers


def distinct_answer_share(per_question_keys: list[list[str | None]]) -> float:
    """mean over questions q of |{distinct non-empty answers of q}| / k_q.

    1/k when all k samples agree, 1 when all differ, 0 when none gave an answer.
    """
    if not per_question_keys:
        return 0.0
    return sum(conf.distinct_answers(keys) / len(keys) for keys in per_question_keys) / len(per_question_keys)


def batch_distinct_share(all_keys: list[str | None]) -> float:
    """|{distinct non-empty answers over the whole batch}| / number of samples."""
    return conf.distinct_answers(all_keys) / len(all_keys) if all_keys else 0.0


# ---------------------------------------------------------------- texts


def _normalised(text: str) -> str:
    return " ".join(text.split())


def cross_question_identical_share(texts: list[str], k: int, question_keys: list[str] | None = None,
                                   recent: list[list[str]] = ()) -> float:
    """Share of samples whose whitespace-normalised text equals a completion of a DIFFERENT question,
    in this step or among `recent` ([question key, normalised text] pairs of the last steps).

    Rows q*k .. q*k+k-1 belong to question q, named question_keys[q] (default: its index). Agreement
    within a question is what the objective rewards; the same text for different questions means
    the prompt is ignored. The recent steps matter with one question per step, where a step alone
    has no other question to compare with; the same question seen again (a new epoch) is not "other".
    """
    if not texts:
        return 0.0
    keys = question_keys or [str(q) for q in range(len(texts) // k)]
    questions_of: dict[str, set[str]] = {}
    for question, text in recent:
        questions_of.setdefault(text, set()).add(question)
    for row, text in enumerate(texts):
        questions_of.setdefault(_normalised(text), set()).add(keys[row // k])
    shared = sum(len(questions_of[_normalised(text)]) > 1 for text in texts)
    return shared / len(texts)


def question_keys(rollouts: Rollouts) -> list[str]:
    """A stable name per question of a step: a digest of its prompt tokens (padding dropped)."""
    keys = []
    for q in range(rollouts.num_prompts):
        row = rollouts.rows(q).start
        ids = rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()]
        keys.append(hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16])
    return keys


def completion_pairs(rollouts: Rollouts) -> list[list[str]]:
    """The step's distinct [question key, normalised text] pairs, as remembered for later steps."""
    keys = question_keys(rollouts)
    pairs = {(keys[row // rollouts.k], _normalised(text)) for row, text in enumerate(rollouts.texts)}
    return [list(pair) for pair in sorted(pairs)]


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def few_shot_copy_rate(texts: list[str], reference_texts: list[str], n: int = 4) -> float:
    """mean over samples of |{sample n-grams found among the few-shot answers' n-grams}| / |sample n-grams|.

    Word n-grams of the lower-cased, whitespace-split text, counted with repetition. A sample with
    fewer than n words counts 0; the rate is 0 without few-shot examples.
    """
    reference = {gram for text in reference_texts for gram in word_ngrams(text, n)}
    if not reference or not texts:
        return 0.0
    rates = []
    for text in texts:
        grams = word_ngrams(text, n)
        rates.append(sum(g in reference for g in grams) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


# ---------------------------------------------------------------- drift from the starting policy


def reference_drift(token_logprobs: torch.Tensor, ref_token_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """mean over completion tokens of log pi(y_t) - log pi_ref(y_t): the sampled estimate of
    KL(pi || pi_ref) on the policy's own samples, both at the sampling temperature.

    Measured on the embedded model (bench/collapse/drift.py): 0.35 to 1.5 nats per token on every
    step of the collapsed full-FT run after the first, 0.008 to 0.125 on the healthy LoRA run.
    """
    m = mask.to(token_logprobs.dtype)
    return float(((token_logprobs - ref_token_logprobs) * m).sum() / m.sum().clamp(min=1))


# ---------------------------------------------------------------- confidence and baselines


def p_old_saturation(seq_logprobs: torch.Tensor, threshold: float = 0.99) -> float:
    """Share of samples with p_old(y|x) = exp(seq_logprob) > threshold."""
    if seq_logprobs.numel() == 0:
        return 0.0
    return float((seq_logprobs.exp() > threshold).float().mean())


def ratio_to_baseline(value: float, baseline: float | None) -> float:
    """value / baseline; 1.0 while there is no baseline or it is not positive (nothing to fall from)."""
    if baseline is None or not baseline > 0:
        return 1.0
    return value / baseline


@dataclass
class RollingBaseline:
    """The mean of a signal over the first `steps` healthy steps it was shown (then frozen)."""

    steps: int
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        if len(self.values) < self.steps and math.isfinite(value):
            self.values.append(value)

    @property
    def value(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


def grad_norm_spike(grad_norm: float, history: list[float]) -> float:
    """grad_norm / median(history): how far this step's pre-clip norm jumps (1.0 with no history)."""
    if not history:
        return 1.0
    median = statistics.median(history)
    return grad_norm / median if median > 0 else 1.0


def mean_token_entropy(rollouts: Rollouts) -> float:
    return float(conf.masked_mean(rollouts.token_entropy, rollouts.completion_mask))


def mean_length(rollouts: Rollouts) -> float:
    return float(rollouts.lengths.float().mean())


# ---------------------------------------------------------------- the state between steps


@dataclass
class GuardState:
    """What the signals remember: baselines and grad norms of healthy steps, and which weights are
    the healthy fallback. Saved in each checkpoint's state.json, so a resumed run judges alike."""

    entropy: RollingBaseline
    length: RollingBaseline
    grad_norms: list[float] = field(default_factory=list)
    healthy_step: int = 0  # healthy weights = the weights at the start of this step
    recent: list[list[list[str]]] = field(default_factory=list)  # per recent step: completion_pairs

    def recent_pairs(self) -> list[list[str]]:
        return [pair for step in self.recent for pair in step]

    @classmethod
    def fresh(cls, baseline_steps: int) -> GuardState:
        return cls(RollingBaseline(baseline_steps), RollingBaseline(baseline_steps))

    def observe_healthy(self, rollouts: Rollouts, grad_norm: float) -> None:
        """Fold in a step that passed the guard (only healthy steps shape the baselines)."""
        self.entropy.add(mean_token_entropy(rollouts))
        self.length.add(mean_length(rollouts))
        if math.isfinite(grad_norm):
            self.grad_norms = [*self.grad_norms, grad_norm][-GRAD_HISTORY:]
        self.recent = [*self.recent, completion_pairs(rollouts)][-RECENT_STEPS:]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, baseline_steps: int) -> GuardState:
        if not data:
            return cls.fresh(baseline_steps)
        return cls(RollingBaseline(**data["entropy"]), RollingBaseline(**data["length"]),
                   list(data["grad_norms"]), int(data["healthy_step"]), list(data.get("recent", [])))


# ---------------------------------------------------------------- all signals of one step


def collapse_signals(rollouts: Rollouts, answers: list[str | None], few_shot_answers: list[str],
                     grad_norm: float, state: GuardState, drift: float | None = None) -> dict[str, float]:
    """Every guard signal of one step, under stable `guard/...` names (the state is not changed).

    `drift` is `reference_drift` of the step's samples, computed by the caller (it needs the
    reference weights); without it the signal is absent and its rule never fires."""
    keys = [[canonical_answer(a) for a in answers[rollouts.rows(q)]] for q in range(rollouts.num_prompts)]
    signals = {
        "distinct_share": distinct_answer_share(keys),
        "batch_distinct_share": batch_distinct_share([key for group in keys for key in group]),
        "cross_question_identical": cross_question_identical_share(rollouts.texts, rollouts.k, question_keys(rollouts),
                                                                   state.recent_pairs()),
        "few_shot_copy": few_shot_copy_rate(rollouts.texts, few_shot_answers),
        "p_old_saturation": p_old_saturation(rollouts.seq_logprobs),
        "entropy_ratio": ratio_to_baseline(mean_token_entropy(rollouts), state.entropy.value),
        "length_ratio": ratio_to_baseline(mean_length(rollouts), state.length.value),
        "grad_norm_spike": grad_norm_spike(grad_norm, state.grad_norms),
    }
    if drift is not None:
        signals["reference_drift"] = drift
    return {PREFIX + name: value for name, value in signals.items()}


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Firing:
    signal: str
    value: float
    threshold: float
    action: str
    direction: str = "above"

    def describe(self) -> str:
        return f"{self.signal} = {self.value:.3g} is {self.direction} its threshold {self.threshold:g}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_rules(signals: dict[str, float], cfg: GuardConfig) -> list[Firing]:
    """The rules that fire on these signals, in the config's order (a missing or NaN signal never fires)."""
    firings = []
    for name, rule in cfg.rules.items():
        value = signals.get(PREFIX + name)
        if rule.action == "off" or value is None or not math.isfinite(value):
            continue
        beyond = value > rule.threshold if rule.direction == "above" else value < rule.threshold
        if beyond:
            firings.append(Firing(name, float(value), rule.threshold, rule.action, rule.direction))
    return firings


def decisive(firings: list[Firing]) -> Firing | None:
    """The firing that ends training (rollback before stop, then the config's order), or None."""
    ending = [f for f in firings if f.action in ("stop", "rollback")]
    return max(ending, key=lambda f: SEVERITY[f.action]) if ending else None
