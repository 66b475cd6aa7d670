"""The RLSC training loop, readable top to bottom.

Training runs in rounds. A round samples k completions for each question of its steps from the
current policy, which is the old policy p_old for the whole round (p_old recorded while sampling),
and writes them to rollouts/round-NNNNNN.parquet. Each step of the round turns its questions'
samples into per-sample coefficients (the objective), runs forward/backward in micro-batches,
clips, and takes one AdamW step. One step per round is the paper's on-policy form.
Checkpoints carry the trainable weights, the optimizer and the RNG state; with the round's
rollouts file they let `resume` continue bit-for-bit on CPU.
After each step the collapse guard (rlsc/guard.py) computes label-free collapse signals and applies
the rules of `cfg.guard`: a warning is logged; a stop ends training with the current weights; a
rollback ends it with the weights of the last round whose samples passed (healthy.safetensors).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlsc import confidence as conf
from rlsc.allocator import retain_freed_memory
from rlsc.answers import canonical_answer, extract_answer, last_boxed
from rlsc.config import Config, TrainConfig
from rlsc.decoding import decode_kernel
from rlsc.errors import RlscError
from rlsc.guard import Firing, GuardState, collapse_signals, decisive, evaluate_rules, reference_drift
from rlsc.objectives import entropy_loss, kl_penalty, policy_gradient_loss, sample_coefficients
from rlsc.problems import Problem
from rlsc.prompts import render_prompt
from rlsc.sampling import (
    Rollouts,
    generate_rollouts,
    rollouts_frame,
    rollouts_from_frame,
    select_prompts,
    write_rollouts,
)
from rlsc.scoring import completion_logits, completion_token_logprobs

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- which questions each step


def questions_for_step(step: int, n_questions: int, per_step: int, seed: int) -> list[int]:
    """Question indices of one step: consecutive slices of a seeded permutation per epoch.

    Stateless (a function of the step), so a resumed run sees the same questions.
    """
    indices = []
    for slot in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(slot, n_questions)
        order = torch.randperm(n_questions, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        indices.append(int(order[position]))
    return indices


# ---------------------------------------------------------------- checkpoints


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def write_trainable(model, path: Path) -> None:
    """The trainable weights to `path`, atomically (a temp file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: p.detach().contiguous() for n, p in trainable_parameters(model).items()}, tmp)
    os.replace(tmp, path)


def load_trainable(model, path: Path) -> None:
    weights = load_file(path)
    params = trainable_parameters(model)
    if set(weights) != set(params):
        raise RlscError(f"{path} does not match the model being trained (different trainable weights)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def make_optimizer(params: dict[str, torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: one pass over each parameter, where the default CPU
    path allocates full-size temporaries per op (sqrt, div) — about 20 s of every Qwen-0.5B full-FT
    step at one thread (bench/profile.py)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params.values())
    return torch.optim.AdamW(params.values(), lr=train.lr, weight_decay=train.weight_decay, betas=train.betas,
                             fused=fused)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (the files are replaced, never rewritten in place)."""
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(folder: Path, step: int, model, optimizer, counters: dict,
                    extra_files: tuple[Path, ...] = ()) -> Path:
    """Write checkpoint `step` atomically: a temp folder renamed into place once complete.

    `extra_files` (the guard's healthy weights) are kept in it too, so a resume restores them."""
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_trainable(model, tmp / "trainable.safetensors")
    for extra in extra_files:
        if extra.is_file():
            link_or_copy(extra, tmp / extra.name)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    state = {"step": step, "python_random": _jsonable_random_state(), **counters}
    (tmp / "state.json").write_text(json.dumps(state))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _jsonable_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    load_trainable(model, path / "trainable.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state.pop("python_random")
    random.setstate((version, tuple(internal), gauss))
    return state


def prune_checkpoints(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    for old in done[:-keep]:
        shutil.rmtree(old)


# ---------------------------------------------------------------- metrics file


class MetricsLog:
    """Per-step metrics as JSONL; on resume, lines from steps at or after the restart are dropped."""

    def __init__(self, path: Path, keep_before_step: int = 0):
        self.path = path
        kept = []
        if path.exists() and keep_before_step > 0:
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < keep_before_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- one step


def sample_questions(model, tokenizer, prompts: list[str], cfg: Config) -> Rollouts:
    """k samples for each prompt, in generate calls of `questions_per_batch` prompts (one set of
    decode-time weights for all: with bf16 sampling, one cast of the weights per round)."""
    s = cfg.sampling
    with decode_kernel(model, s.precision):
        parts = [
            generate_rollouts(
                model, tokenizer, prompts[i : i + s.questions_per_batch],
                k=s.k, temperature=s.temperature, max_new_tokens=s.max_new_tokens, precision=s.precision,
            )
            for i in range(0, len(prompts), s.questions_per_batch)
        ]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, tokenizer.pad_token_id)


def round_question_indices(round_index: int, n_questions: int, train: TrainConfig) -> list[int]:
    """The questions of every step of one round, in step order."""
    first = round_index * train.steps_per_round
    return [i for step in range(first, first + train.steps_per_round)
            for i in questions_for_step(step, n_questions, train.questions_per_step, train.seed)]


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of one round: sampling needs no RNG state carried between rounds, so a
    round sampled by the pipeline's sample-and-score stage equals the one the trainer would draw."""
    return seed * 1_000_003 + round_index


def sample_and_score_round(policy, tokenizer, cfg: Config, round_index: int, ids: list[str], prompts: list[str],
                           path: Path) -> tuple[Rollouts, list[str | None]]:
    """Sample (and score) the questions of one round with the current policy, the round's p_old,
    and write them to `path` (one Parquet row per sample)."""
    chosen = round_question_indices(round_index, len(prompts), cfg.train)
    with torch.random.fork_rng():
        torch.manual_seed(round_seed(cfg.train.seed, round_index))
        rollouts = sample_questions(policy, tokenizer, [prompts[i] for i in chosen], cfg)
    answers = [extract_answer(text) for text in rollouts.texts]
    write_rollouts(path, rollouts_frame(rollouts, [ids[i] for i in chosen], [prompts[i] for i in chosen], answers))
    return rollouts, answers


def read_round(path: Path, tokenizer) -> tuple[Rollouts, list[str | None]]:
    import pandas as pd

    rollouts, _, answers = rollouts_from_frame(pd.read_parquet(path), tokenizer)
    return rollouts, answers


def round_rollouts_for(policy, tokenizer, cfg: Config, round_index: int, ids, prompts, folder: Path,
                       *, resume: bool, first_round: Path | None) -> tuple[Rollouts, list[str | None]]:
    """A round's samples: read back when a resumed run (or, for round 0, the pipeline's
    sample-and-score stage) already drew them, so training sees exactly those samples."""
    path = folder / f"round-{round_index:06d}.parquet"
    if resume and path.is_file():
        return read_round(path, tokenizer)
    if round_index == 0 and first_round is not None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first_round, path)
        return read_round(path, tokenizer)
    return sample_and_score_round(policy, tokenizer, cfg, round_index, ids, prompts, path)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack rollouts of separate generate calls (pads prompts on the left, completions on the right)."""
    def pad(tensors, value, left):
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            extra = t.new_full((t.shape[0], width - t.shape[1]), value)
            padded.append(torch.cat([extra, t] if left else [t, extra], dim=1))
        return torch.cat(padded)

    fields = {}
    for name in ("prompt_ids", "prompt_mask"):
        fields[name] = pad([getattr(p, name) for p in parts], pad_id if name == "prompt_ids" else 0, left=True)
    for name in ("completion_ids", "completion_mask", "token_logprobs", "token_entropy", "token_max_prob",
                 "token_self_certainty"):
        fields[name] = pad([getattr(p, name) for p in parts], pad_id if name == "completion_ids" else 0, left=False)
    return Rollouts(
        k=parts[0].k, temperature=parts[0].temperature,
        stopped=torch.cat([p.stopped for p in parts]),
        token_agreement=torch.cat([p.token_agreement for p in parts]),
        texts=[t for p in parts for t in p.texts], seconds=sum(p.seconds for p in parts), **fields,
    )


def trimmed(rollouts: Rollouts, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of a micro-batch, without columns that are padding in every one of them."""
    prompt_mask = rollouts.prompt_mask[rows]
    completion_mask = rollouts.completion_mask[rows]
    first = int((prompt_mask.sum(0) > 0).int().argmax())
    last = int(completion_mask.sum(-1).max())
    return {
        "prompt_ids": rollouts.prompt_ids[rows, first:],
        "prompt_mask": prompt_mask[:, first:],
        "completion_ids": rollouts.completion_ids[rows, :last],
        "completion_mask": completion_mask[:, :last],
    }


def question_coefficients(rollouts: Rollouts, q: int, answers: list[str | None], train: TrainConfig):
    rows = rollouts.rows(q)
    keys = [canonical_answer(a) for a in answers[rows]]
    majority, _ = conf.majority_answer(keys)
    return sample_coefficients(
        train.objective,
        rollouts.seq_logprobs[rows],
        alpha=train.alpha,
        weighting=train.weighting,
        lengths=rollouts.lengths[rows],
        valid_format=torch.tensor([last_boxed(t) is not None for t in rollouts.texts[rows]]),
        agrees_with_majority=torch.tensor([k is not None and k == majority for k in keys]),
    )


def policy_and_reference_logprobs(model, batch: dict[str, torch.Tensor], temperature: float):
    """Tempered log-softmax over the vocabulary at each completion position [n, C, V]: the policy's
    (with gradient) and the initial policy's, from the same micro-batch with the LoRA adapter
    disabled (no second copy of the weights). completion_token_logprobs returns only the
    sampled tokens' log-probs, so its full-row logits function is used directly."""
    device = next(model.parameters()).device
    batch = {name: t.to(device) for name, t in batch.items()}
    logp = torch.log_softmax(completion_logits(model, **batch).float() / temperature, dim=-1)
    with torch.no_grad(), model.disable_adapter():
        ref_logp = torch.log_softmax(completion_logits(model, **batch).float() / temperature, dim=-1)
    return logp, ref_logp


def micro_batch_loss(model, batch, coefficients, n_tokens: int, temperature: float,
                     kl_beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The objective's loss on one micro-batch (coefficients None: entropy minimisation), plus, with
    kl_beta > 0, kl_beta times this micro-batch's share of the question's mean token KL; and that KL."""
    mask = batch["completion_mask"]
    kl = None
    if kl_beta > 0:
        logp, ref_logp = policy_and_reference_logprobs(model, batch, temperature)
        mask = mask.to(logp.device)
        token_logp = logp.gather(-1, batch["completion_ids"].to(logp.device)[..., None]).squeeze(-1) * mask
        entropy = conf.token_entropy(logp) * mask
        kl = kl_penalty(logp, ref_logp, mask, total_tokens=n_tokens)
    else:
        token_logp, entropy = completion_token_logprobs(model, **batch, temperature=temperature,
                                                        with_entropy=coefficients is None)
    if coefficients is None:
        loss = entropy_loss(entropy, mask, total_tokens=n_tokens)
    else:
        loss = policy_gradient_loss(token_logp.sum(-1), coefficients)
    return (loss if kl is None else loss + kl_beta * kl), kl


def update_precision(model, train: TrainConfig):
    """The autocast the update's forward runs under: bf16 matrix products with train.mixed_precision
    = bf16 (autograd runs the backward's products in the same dtype), else none."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=train.mixed_precision == "bf16")


def micro_batches(order: torch.Tensor, lengths: torch.Tensor, max_rows: int, max_positions: int) -> list[torch.Tensor]:
    """`order` (rows, shortest first) cut into consecutive micro-batches of at most max_rows rows and
    max_positions completion positions (rows x the longest, as a padded batch holds them); a row
    longer than max_positions goes alone. The loss is a sum over samples, so the cut changes only
    memory and speed, not the gradient."""
    chunks, current = [], []
    for row in order.tolist():
        if current and (len(current) == max_rows or (len(current) + 1) * int(lengths[row]) > max_positions):
            chunks.append(torch.tensor(current))
            current = []
        current.append(row)
    return chunks + ([torch.tensor(current)] if current else [])


def backward_on_rollouts(model, rollouts: Rollouts, answers, cfg: Config, backward) -> tuple[float, float | None]:
    """Accumulate the gradient of the step's loss (mean over questions); returns the loss value and
    the mean token KL to the initial policy (None without a KL penalty)."""
    train = cfg.train
    total, kl_total = 0.0, 0.0
    for q in range(rollouts.num_prompts):
        coefficients = question_coefficients(rollouts, q, answers, train)
        lengths = rollouts.lengths[rollouts.rows(q)]
        # shortest first, so each micro-batch is trimmed to similar lengths (the loss is a sum over samples)
        order = torch.argsort(lengths, stable=True)
        for chunk in micro_batches(order, lengths, train.micro_batch, train.micro_batch_tokens):
            batch = trimmed(rollouts, q * rollouts.k + chunk)
            with update_precision(model, train):
                loss, kl = micro_batch_loss(model, batch, None if coefficients is None else coefficients[chunk],
                                            int(lengths.sum()), rollouts.temperature, train.kl_beta)
            loss = loss / rollouts.num_prompts
            if not torch.isfinite(loss):
                return float("nan"), None
            backward(loss)
            total += float(loss.detach())
            kl_total += 0.0 if kl is None else float(kl.detach()) / rollouts.num_prompts
    return total, (kl_total if train.kl_beta > 0 else None)


def rollout_metrics(rollouts: Rollouts, answers: list[str | None]) -> dict[str, float]:
    """Label-free statistics of one step's samples, under stable names."""
    mask = rollouts.completion_mask
    seq = rollouts.seq_logprobs
    weights = seq.exp()
    per_question = [answers[rollouts.rows(q)] for q in range(rollouts.num_prompts)]
    keys = [[canonical_answer(a) for a in group] for group in per_question]
    n_tokens = float(mask.sum())
    return {
        "weights/mean": float(weights.mean()),
        "weights/min": float(weights.min()),
        "weights/max": float(weights.max()),
        "weights/mean_log": float(seq.mean()),
        "confidence/token_prob": float(conf.masked_mean(rollouts.token_logprobs.exp(), mask)),
        "confidence/max_prob": float(conf.masked_mean(rollouts.token_max_prob, mask)),
        "confidence/self_certainty": float(conf.masked_mean(rollouts.token_self_certainty, mask)),
        "entropy": float(conf.masked_mean(rollouts.token_entropy, mask)),
        "completions/mean_length": float(rollouts.lengths.float().mean()),
        "completions/max_length": int(rollouts.lengths.max()),
        "completions/clipped_ratio": float((~rollouts.stopped).float().mean()),
        "completions/tokens": n_tokens,
        "answers/distinct": sum(conf.distinct_answers(k) for k in keys) / len(keys),
        "agreement/majority": sum(conf.majority_answer(k)[1] for k in keys) / len(keys),
        "agreement/token": float(rollouts.token_agreement.nanmean()),
    }


# ---------------------------------------------------------------- the collapse guard in the loop

HEALTHY = "healthy.safetensors"
ROUND_START = "round-start.safetensors"
REFERENCE = "reference.safetensors"  # full fine-tuning only: the starting weights, for reference_drift


class LoopGuard:
    """The collapse guard's part of the loop: every step's signals and rules, and the healthy weights.

    healthy.safetensors holds the trainable weights at the start of the last round all of whose steps
    passed: those weights drew samples that passed, whereas the weights after a passing step are not
    judged until their own samples are (the next round). round-start.safetensors holds the current
    round's weights until the round passes. Before any round has passed both hold the starting
    weights, so a rollback in the first round returns the run to where it began.
    """

    def __init__(self, cfg: Config, output_dir: Path, saved_state: dict | None):
        self.cfg = cfg.guard
        self.few_shot_answers = [example.answer for example in cfg.prompt.few_shot]
        self.state = GuardState.from_dict(saved_state, cfg.guard.baseline_steps)
        self.output_dir = output_dir
        self.healthy, self.round_start = output_dir / HEALTHY, output_dir / ROUND_START
        self.signals: dict[str, float] = {}
        self.firings: list[Firing] = []
        drift_rule = cfg.guard.rules.get("reference_drift")
        self.wants_drift = drift_rule is not None and drift_rule.action != "off"
        self.reference_model = None  # full FT: a frozen copy of the starting weights (LoRA: adapter off)
        self.reference_file = output_dir / REFERENCE

    @property
    def files(self) -> tuple[Path, ...]:
        extra = (self.reference_file,) if self.reference_model is not None else ()
        return self.healthy, self.round_start, *extra

    def begin(self, policy, start_step: int, checkpoint: Path | None, resumed_state: bool) -> None:
        """The fallback weights: a resumed checkpoint's copies, else the weights training starts from;
        and the reference policy of reference_drift."""
        full_ft_reference = self.wants_drift and not hasattr(policy, "disable_adapter")
        if checkpoint is not None and resumed_state and (checkpoint / HEALTHY).is_file():
            for name in (HEALTHY, ROUND_START, REFERENCE):
                if (checkpoint / name).is_file():
                    link_or_copy(checkpoint / name, self.output_dir / name)
        else:
            self.state.healthy_step = start_step
            write_trainable(policy, self.healthy)
            write_trainable(policy, self.round_start)
            if full_ft_reference:
                write_trainable(policy, self.reference_file)
        if full_ft_reference:
            # one more copy of the weights in memory (no optimizer state): the price of the signal
            # without LoRA; set guard.rules.reference_drift.action=off to save it
            reference = copy.deepcopy(policy)
            if start_step > 0 and self.reference_file.is_file():  # a resumed run's weights have moved
                load_trainable(reference, self.reference_file)
            elif start_step > 0:
                log.warning("no %s in the checkpoint: reference_drift is measured from the resumed weights",
                            REFERENCE)
            self.reference_model = reference.requires_grad_(False).eval()

    def drift(self, policy, rollouts: Rollouts) -> float | None:
        """reference_drift of the step's samples: their sampled log-probs against the starting policy's."""
        if not self.wants_drift:
            return None
        # one question at a time: its k samples share the prompt, which is then run once (KV expanded)
        per_question = [select_prompts(rollouts, [q]) for q in range(rollouts.num_prompts)]
        with torch.no_grad():
            refs = [self._reference_logprobs(policy, r) for r in per_question]
        width = max(ref.shape[1] for ref in refs)
        ref = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in refs])
        return reference_drift(rollouts.token_logprobs[:, :width], ref, rollouts.completion_mask[:, :width])

    def _reference_logprobs(self, policy, rollouts: Rollouts) -> torch.Tensor:
        args = (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask,
                rollouts.temperature)
        if self.reference_model is not None:
            return completion_token_logprobs(self.reference_model, *args)[0].cpu()
        with policy.disable_adapter():
            return completion_token_logprobs(policy, *args)[0].cpu()

    def round_begins(self, policy) -> None:
        write_trainable(policy, self.round_start)

    def check(self, step: int, record: dict[str, Any], rollouts: Rollouts, answers, grad_norm: float,
              policy) -> Firing | None:
        """Merge the step's signals into its metrics record and log warnings; returns the firing that
        ends training (stop or rollback), or None."""
        self.signals = collapse_signals(rollouts, answers, self.few_shot_answers, grad_norm, self.state,
                                        drift=self.drift(policy, rollouts))
        self.firings = evaluate_rules(self.signals, self.cfg)
        record.update(self.signals)
        warnings = [f for f in self.firings if f.action == "warn"]
        for f in warnings:
            log.warning("step %d: collapse guard warning: %s", step, f.describe())
        if warnings:
            record["guard/warnings"] = ",".join(f.signal for f in warnings)
        ending = decisive(self.firings)
        if ending is not None:
            record.update({"guard/fired": ending.signal, "guard/action": ending.action,
                           "guard/value": ending.value, "guard/threshold": ending.threshold})
            if ending.action == "rollback":
                record["guard/rolled_back_to_step"] = self.state.healthy_step
        return ending

    def passed(self, rollouts: Rollouts, grad_norm: float, round_first_step: int, round_done: bool) -> None:
        """A step that passed: it shapes the baselines; the round's weights become healthy once every
        step of the round has passed."""
        self.state.observe_healthy(rollouts, grad_norm)
        if round_done:
            os.replace(self.round_start, self.healthy)
            self.state.healthy_step = round_first_step

    def conclude(self, firing: Firing, step: int, policy) -> dict[str, Any]:
        """Act on the firing (rollback: load the healthy weights into `policy`) and write guard.json."""
        restored = None
        if firing.action == "rollback":
            load_trainable(policy, self.healthy)
            restored = {"file": HEALTHY, "step": self.state.healthy_step,
                        "what": f"the trainable weights at the start of step {self.state.healthy_step}, "
                                "the last round whose samples all passed the guard"}
        kept = "restored the last healthy weights" if restored else "kept the current weights"
        summary = {"reason": f"{firing.describe()} ({firing.action}: {kept})", "step": step, **firing.as_dict(),
                   "restored": restored, "firings": [f.as_dict() for f in self.firings], "signals": self.signals}
        (self.output_dir / "guard.json").write_text(json.dumps(summary, indent=1))
        log.warning("step %d: collapse guard %s: %s", step, firing.action, summary["reason"])
        return summary


# ---------------------------------------------------------------- the probe: held-out accuracy during training

PROBE_FILE = "probe.jsonl"


class Probe:
    """Greedy accuracy on a few held-out problems before training and every `train.probe_every` steps.

    A monitor only (the gold answers never reach the objective): it shows when accuracy peaks or
    falls, the question label-free signals cannot answer. One line per probe in probe.jsonl, keyed
    by the number of optimizer steps done; the step's metrics record gets probe/accuracy too.
    """

    def __init__(self, cfg: Config, output_dir: Path):
        from rlsc.data import load_problems

        t = cfg.train
        self.cfg, self.every, self.path = cfg, t.probe_every, output_dir / PROBE_FILE
        self.problems = load_problems(t.probe_problems, require_answer=True, limit=t.probe_limit,
                                      seed=cfg.data.subset_seed)

    def due(self, steps_done: int) -> bool:
        return steps_done % self.every == 0

    def run(self, policy, tokenizer, steps_done: int) -> dict[str, Any]:
        from rlsc.evaluate import evaluate

        metrics, _ = evaluate(policy, tokenizer, self.problems, self.cfg, progress=False)
        acc = metrics["pass@1"]
        line = {"steps_done": steps_done, "accuracy": acc["value"], "correct": acc["correct"], "n": acc["n"],
                "ci_low": acc["ci_low"], "ci_high": acc["ci_high"], "mean_length": metrics["mean_length"]}
        kept = [json.loads(x) for x in self.path.read_text().splitlines()] if self.path.is_file() else []
        kept = [x for x in kept if x["steps_done"] < steps_done]  # a resumed run redoes later probes
        self.path.write_text("".join(json.dumps(x) + "\n" for x in [*kept, line]))
        log.info("probe after %d steps: %d/%d correct", steps_done, acc["correct"], acc["n"])
        return line


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    metrics_path: Path
    steps_done: int
    skipped_steps: int
    guard_fired: dict | None = None  # guard.json's content when a stop or rollback ended training
    rolled_back_to_step: int | None = None  # the final weights are those at the start of this step


def train(
    cfg: Config,
    problems: list[Problem],
    output_dir: str | Path,
    *,
    model=None,
    tokenizer=None,
    resume: bool = False,
    progress: bool = True,
    first_round: str | Path | None = None,
) -> TrainResult:
    """Run RLSC on the questions of `problems` (gold answers are never read) and save the result.

    `first_round`: a rollouts file of round 0 written by the sample-and-score stage, used instead
    of sampling round 0 again.
    """
    from accelerate import Accelerator

    from rlsc.models import load_policy, save_trained

    t = cfg.train
    if not problems:
        raise RlscError("no training questions")
    if t.retain_freed_memory:
        retain_freed_memory()
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    if not resume and output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run never mixes with an older one's files
    output_dir.mkdir(parents=True, exist_ok=True)

    random.seed(t.seed)
    torch.manual_seed(t.seed)
    if model is None:
        model, tokenizer = load_policy(cfg.model, cfg.paths.cache_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, t)
    if t.kl_beta > 0 and not hasattr(model, "disable_adapter"):
        raise RlscError(
            f"train.kl_beta={t.kl_beta} needs a LoRA model (model.lora.enabled=true): the reference policy is "
            "the same model with its adapter disabled; full fine-tuning would need a second copy of the weights"
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    prompts = [render_prompt(tokenizer, p.question, cfg.prompt) for p in problems]
    ids = [p.id for p in problems]
    first_round = Path(first_round) if first_round else None

    start_step, counters = 0, {"skipped_steps": 0, "nonfinite_streak": 0, "guard": None}
    last = latest_checkpoint(checkpoints) if resume else None
    if resume and last is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", checkpoints)
    if last is not None:
        state = load_checkpoint(last, policy, optimizer)
        start_step = state.pop("step") + 1
        counters = {k: state.get(k, default) for k, default in counters.items()}
    metrics = MetricsLog(output_dir / "metrics.jsonl", keep_before_step=start_step)
    guard = LoopGuard(cfg, output_dir, counters["guard"]) if cfg.guard.enabled else None
    if guard is not None:
        guard.begin(policy, start_step, last, resumed_state=counters["guard"] is not None)
    firing = None
    probe = Probe(cfg, output_dir) if t.probe_every and t.probe_problems else None
    if probe is not None and start_step == 0:
        probe.run(policy, tokenizer, steps_done=0)

    bar = tqdm(range(start_step, t.steps), initial=start_step, total=t.steps, desc="rlsc train",
               disable=not progress, dynamic_ncols=True)
    round_rollouts = None
    for step in bar:
        step_start = time.perf_counter()
        round_index, offset = divmod(step, t.steps_per_round)
        sample_seconds = 0.0
        if round_rollouts is None or offset == 0:
            round_rollouts, round_answers = round_rollouts_for(
                policy, tokenizer, cfg, round_index, ids, prompts, output_dir / "rollouts", resume=resume,
                first_round=first_round,
            )
            sample_seconds = time.perf_counter() - step_start
            if guard is not None and offset == 0:
                guard.round_begins(policy)  # the weights that drew this round's samples
        q = t.questions_per_step
        mine = list(range(offset * q, (offset + 1) * q))
        rollouts = select_prompts(round_rollouts, mine)
        answers = [a for i in mine for a in round_answers[i * rollouts.k : (i + 1) * rollouts.k]]

        update_start = time.perf_counter()
        model.train()
        loss, kl = backward_on_rollouts(model, rollouts, answers, cfg, accelerator.backward)
        grad_norm = float(accelerator.clip_grad_norm_(list(params.values()), t.max_grad_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            counters["nonfinite_streak"] = 0
        else:
            counters["skipped_steps"] += 1
            counters["nonfinite_streak"] += 1
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        now = time.perf_counter()

        record = {"step": step, "round": round_index, "loss": loss, "grad_norm": grad_norm, "lr": t.lr,
                  **rollout_metrics(rollouts, answers),
                  "skipped_steps": counters["skipped_steps"], "time/sample": sample_seconds,
                  "time/update": now - update_start, "time/step": now - step_start}
        record["tokens_per_s"] = record["completions/tokens"] / record["time/step"]
        if kl is not None:
            record["kl"] = kl
        if guard is not None:
            guard_start = time.perf_counter()
            firing = guard.check(step, record, rollouts, answers, grad_norm, policy)
            record["time/guard"] = time.perf_counter() - guard_start  # reference_drift's forward, mostly
        if probe is not None and probe.due(step + 1):
            record["probe/accuracy"] = probe.run(policy, tokenizer, steps_done=step + 1)["accuracy"]
        metrics.write(record)
        bar.set_postfix(loss=f"{loss:.3g}", p_old=f"{record['weights/mean']:.2f}",
                        len=f"{record['completions/mean_length']:.0f}", distinct=f"{record['answers/distinct']:.1f}")
        if not finite:
            log.warning("step %d: non-finite loss or gradient, step skipped", step)
            if counters["nonfinite_streak"] >= t.max_nonfinite_steps:
                raise RlscError(
                    f"training aborted at step {step}: {counters['nonfinite_streak']} non-finite losses in a row "
                    f"(try a lower train.lr or model.dtype=float32); metrics in {metrics.path}"
                )
        if firing is not None:
            break  # no checkpoint of a step that fired: a resume redoes it
        if guard is not None:
            # a round cut short by train.steps is never promoted: a longer resumed run must judge alike
            guard.passed(rollouts, grad_norm, round_first_step=step - offset,
                         round_done=offset + 1 == t.steps_per_round)
            counters["guard"] = guard.state.to_dict()
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            save_checkpoint(checkpoints, step, policy, optimizer, counters, guard.files if guard else ())
            prune_checkpoints(checkpoints, keep=2)

    summary = guard.conclude(firing, step, policy) if firing is not None else None  # a rollback loads weights
    final_dir = save_trained(policy, tokenizer, output_dir / "final")
    restored = summary["restored"] if summary else None
    return TrainResult(output_dir, final_dir, metrics.path, step + 1 if summary else t.steps,
                       counters["skipped_steps"], guard_fired=summary,
                       rolled_back_to_step=restored["step"] if restored else None)
