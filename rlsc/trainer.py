"""The RLSC training loop, readable top to bottom.

Training runs in rounds. A round samples k completions for each question of its steps from the
current policy, which is the old policy p_old for the whole round (p_old recorded while sampling),
and writes them to rollouts/round-NNNNNN.parquet. Each step of the round turns its questions'
samples into per-sample coefficients (the objective), runs forward/backward in micro-batches,
clips, and takes one AdamW step. One step per round is the paper's on-policy form.
Checkpoints carry the trainable weights, the optimizer and the RNG state; with the round's
rollouts file they let `resume` continue bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import logging
import math
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
from rlsc.answers import canonical_answer, extract_answer, last_boxed
from rlsc.config import Config, TrainConfig
from rlsc.errors import RlscError
from rlsc.objectives import entropy_loss, policy_gradient_loss, sample_coefficients
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
from rlsc.scoring import completion_token_logprobs

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


def save_checkpoint(folder: Path, step: int, model, optimizer, counters: dict) -> Path:
    """Write checkpoint `step` atomically: a temp folder renamed into place once complete."""
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().contiguous() for n, p in trainable_parameters(model).items()}
    save_file(weights, tmp / "trainable.safetensors")
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
    weights = load_file(path / "trainable.safetensors")
    params = trainable_parameters(model)
    if set(weights) != set(params):
        raise RlscError(f"checkpoint {path} does not match the model being trained (different trainable weights)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
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
    """k samples for each prompt, in generate calls of `questions_per_batch` prompts."""
    s = cfg.sampling
    parts = [
        generate_rollouts(
            model, tokenizer, prompts[i : i + s.questions_per_batch],
            k=s.k, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
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


def backward_on_rollouts(model, rollouts: Rollouts, answers, cfg: Config, backward) -> float:
    """Accumulate the gradient of the step's loss (mean over questions); returns the loss value."""
    train = cfg.train
    total = 0.0
    for q in range(rollouts.num_prompts):
        coefficients = question_coefficients(rollouts, q, answers, train)
        lengths = rollouts.lengths[rollouts.rows(q)]
        # shortest first, so each micro-batch is trimmed to similar lengths (the loss is a sum over samples)
        order = torch.argsort(lengths, stable=True)
        for chunk in torch.split(order, train.micro_batch):
            rows = q * rollouts.k + chunk
            batch = trimmed(rollouts, rows)
            token_logp, entropy = completion_token_logprobs(
                model, **batch, temperature=rollouts.temperature, with_entropy=coefficients is None
            )
            if coefficients is None:
                loss = entropy_loss(entropy, batch["completion_mask"], total_tokens=int(lengths.sum()))
            else:
                loss = policy_gradient_loss(token_logp.sum(-1), coefficients[chunk])
            loss = loss / rollouts.num_prompts
            if not torch.isfinite(loss):
                return float("nan")
            backward(loss)
            total += float(loss.detach())
    return total


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
        "completions/clipped_ratio": float((~rollouts.stopped).float().mean()),
        "completions/tokens": n_tokens,
        "answers/distinct": sum(conf.distinct_answers(k) for k in keys) / len(keys),
        "agreement/majority": sum(conf.majority_answer(k)[1] for k in keys) / len(keys),
        "agreement/token": float(rollouts.token_agreement.nanmean()),
    }


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    metrics_path: Path
    steps_done: int
    skipped_steps: int


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
    optimizer = torch.optim.AdamW(params.values(), lr=t.lr, weight_decay=t.weight_decay, betas=t.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    prompts = [render_prompt(tokenizer, p.question, cfg.prompt) for p in problems]
    ids = [p.id for p in problems]
    first_round = Path(first_round) if first_round else None

    start_step, counters = 0, {"skipped_steps": 0, "nonfinite_streak": 0}
    last = latest_checkpoint(checkpoints) if resume else None
    if resume and last is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", checkpoints)
    if last is not None:
        state = load_checkpoint(last, policy, optimizer)
        start_step = state.pop("step") + 1
        counters = {k: state[k] for k in counters}
    metrics = MetricsLog(output_dir / "metrics.jsonl", keep_before_step=start_step)

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
        q = t.questions_per_step
        mine = list(range(offset * q, (offset + 1) * q))
        rollouts = select_prompts(round_rollouts, mine)
        answers = [a for i in mine for a in round_answers[i * rollouts.k : (i + 1) * rollouts.k]]

        update_start = time.perf_counter()
        model.train()
        loss = backward_on_rollouts(model, rollouts, answers, cfg, accelerator.backward)
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
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            save_checkpoint(checkpoints, step, policy, optimizer, counters)
            prune_checkpoints(checkpoints, keep=2)

    final_dir = save_trained(policy, tokenizer, output_dir / "final")
    return TrainResult(output_dir, final_dir, metrics.path, t.steps, counters["skipped_steps"])
