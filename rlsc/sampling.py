"""The sampling seam: prompts in, Rollouts out. vLLM (on a GPU) can slot in behind `generate_rollouts`.

A small decoding loop of our own over the model's KV cache, instead of `model.generate`, because
the work that dominates on CPU is avoidable there:
- the prompt prefix shared by every prompt (system line and few-shot turns) is prefilled once, and
  each prompt once for its k samples, by expanding the cache instead of recomputing it;
- a sequence that has ended leaves the batch, so nobody pays for padding after EOS;
- every statistic is recorded from the very distribution each token was drawn from, softmax of
  logits / T with no top-k, top-p or penalty, so the recorded log-probs are exactly log p_old:
  no second forward pass is needed for the RLSC weights (the few-row linear layers run on the
  decode kernel here, so they match the scorer's to float rounding: rlsc/decoding.py);
- the KV cache grows in place rather than by concatenation (rlsc/decoding.py);
- for Llama-family models (Llama, Qwen2) the decode step is written out (rlsc/decode_step.py):
  none of transformers' per-layer plumbing, and one copy of a shared prompt's keys and values for
  all k rows instead of one per row;
- each step's draw and statistics take one C pass per row over the vocabulary
  (rlsc/kernels/decode_glue.c; StepRecorder.step), where eager torch made ~10.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlsc import confidence as conf
from rlsc import decode_step
from rlsc.decoding import ReservedCache, decode_kernel


@dataclass
class Rollouts:
    """k completions for each of Q prompts; row q*k + j is sample j of prompt q. Shapes: N = Q*k."""

    k: int
    temperature: float
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] 1 for completion tokens (EOS included)
    stopped: torch.Tensor  # [N] bool: ended with EOS (else truncated at max_new_tokens)
    token_logprobs: torch.Tensor  # [N, C] log p_T(sampled token), 0 at padding
    token_entropy: torch.Tensor  # [N, C]
    token_max_prob: torch.Tensor  # [N, C]
    token_self_certainty: torch.Tensor  # [N, C]
    token_agreement: torch.Tensor  # [Q] mean over positions of sum_v pbar(v)^2 across the k samples
    texts: list[str]
    seconds: float = 0.0

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.k

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def seq_logprobs(self) -> torch.Tensor:
        """log p_old(y|x) of each sample, summed over its completion tokens."""
        return conf.sequence_logprob(self.token_logprobs, self.completion_mask)

    def rows(self, q: int) -> slice:
        return slice(q * self.k, (q + 1) * self.k)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def completion_mask(completion_ids: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [N, C] covering tokens up to and including the first EOS, stopped [N] bool)."""
    is_eos = torch.isin(completion_ids, torch.tensor(sorted(eos_ids), device=completion_ids.device))
    stopped = is_eos.any(-1)
    first_eos = torch.where(stopped, is_eos.int().argmax(-1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), stopped


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    limit = min(len(s) for s in sequences) - 1
    n = 0
    while n < limit and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def forward_with_cache(model, input_ids, attention_mask, cache):
    """Logits of the last position, extending `cache`; positions skip every masked column."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def prefill(model, prompt_tokens: list[list[int]], pad_id: int, device, reserve: int = 0):
    """(next-token logits [Q, V], cache, attention mask) after reading every prompt once; the
    cache keeps room for `reserve` more positions (the tokens to be decoded).

    The common prefix goes through the model once; each prompt's remainder is then read against
    copies of that cache, left-padded *after* the prefix (masked columns in the middle are fine:
    positions come from the mask, so they match an unpadded forward).
    """
    shared = common_prefix_length(prompt_tokens) if len(prompt_tokens) > 1 else len(prompt_tokens[0]) - 1
    longest = max(len(t) for t in prompt_tokens)
    cache = ReservedCache(reserve=longest - shared + reserve)
    prefix_mask = torch.ones(1, shared, dtype=torch.long, device=device)
    if shared:
        forward_with_cache(model, torch.tensor([prompt_tokens[0][:shared]], device=device), prefix_mask, cache)
        cache.batch_repeat_interleave(len(prompt_tokens))
    ids, mask = left_pad([t[shared:] for t in prompt_tokens], pad_id)
    mask = torch.cat([prefix_mask.expand(len(prompt_tokens), -1), mask.to(device)], dim=1)
    logits = forward_with_cache(model, ids.to(device), mask, cache)
    return logits, cache, mask


def sample_from(logp: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row drawn from exp(logp) (`probs`, where the caller has it), by inverse CDF:
    one uniform per row, a float64 cumulative sum and a binary search (exact, and ~10x cheaper than
    torch.multinomial over a 151,936-token vocabulary on CPU)."""
    cdf = (logp.exp() if probs is None else probs).double().cumsum(-1)
    u = torch.rand(logp.shape[0], 1, dtype=torch.float64, device=logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logp.shape[-1] - 1)


class StepRecorder:
    """Per-position statistics, scattered into [N, C] tables by each active row's original index."""

    def __init__(self, n: int, n_prompts: int, k: int, width: int, pad_id: int):
        self.k = k
        self.tokens = torch.full((n, width), pad_id, dtype=torch.long)
        self.tables = {name: torch.zeros(n, width) for name in
                       ("token_logprobs", "token_entropy", "token_max_prob", "token_self_certainty")}
        self.agreement = torch.full((n_prompts, width), float("nan"))

    def step(self, t: int, rows: torch.Tensor, logits: torch.Tensor, temperature: float, greedy: bool) -> torch.Tensor:
        """Draw step t's token of each row from softmax(logits / temperature) (greedy: its argmax)
        and record the statistics; the draws consume the generator as sample_from does. On CPU,
        in fp32, decode_glue.c does it in one pass over each row (6.6 ms a step at SmolLM2's
        vocabulary in torch, 21 ms at Qwen's; ad hoc, stop 18); elsewhere, torch."""
        glue = decode_step.native_glue()
        if glue is None or logits.device.type != "cpu" or logits.dtype != torch.float32:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            probs = logp.exp()
            chosen = logp.argmax(-1) if greedy else sample_from(logp, probs)
            self.record(t, rows, logp, probs, chosen)
            return chosen
        uniforms = None if greedy else torch.rand(logits.shape[0], dtype=torch.float64)
        chosen, values, agreement = glue.step_statistics(logits, temperature, uniforms, rows // self.k,
                                                         self.agreement.shape[0])
        self.tokens[rows, t] = chosen
        for name, v in values.items():
            self.tables[name][rows, t] = v
        self.agreement[:, t] = agreement  # NaN for a prompt with no row left, as record leaves it
        return chosen

    def record(self, t: int, rows: torch.Tensor, logp: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """Row statistics of step t from the log-probabilities `logp` and probs = exp(logp) (one
        vocabulary-wide exp a step serves the sampler, the entropy and the agreement)."""
        rows_cpu = rows.cpu()
        self.tokens[rows_cpu, t] = chosen.cpu()
        values = {
            "token_logprobs": logp.gather(-1, chosen[:, None]).squeeze(-1),
            "token_entropy": conf.token_entropy(logp, probs),
            "token_max_prob": conf.max_prob(logp),
            "token_self_certainty": conf.self_certainty(logp),
        }
        for name, v in values.items():
            self.tables[name][rows_cpu, t] = v.float().cpu()
        groups = rows // self.k
        summed = torch.zeros(self.agreement.shape[0], logp.shape[-1], device=logp.device)
        summed.index_add_(0, groups, probs)
        counts = torch.bincount(groups, minlength=self.agreement.shape[0]).to(summed.dtype)
        present = counts > 0
        pbar = summed[present] / counts[present, None]
        self.agreement[present.cpu(), t] = (pbar * pbar).sum(-1).cpu()


class ForwardStep:
    """Decode state over the model's own forward and cache (any architecture): the same interface
    as rlsc.decode_step.DecodeStep, which writes the step out for Llama-family models."""

    def __init__(self, model, cache: ReservedCache, prompt_mask: torch.Tensor, k: int):
        if k > 1:
            cache.batch_repeat_interleave(k)
        self.model, self.cache, self.mask = model, cache, prompt_mask.repeat_interleave(k, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return forward_with_cache(self.model, tokens[:, None], self.mask, self.cache)


def decode(model, prompt_tokens: list[list[int]], pad_id: int, eos: torch.Tensor, *, k: int, temperature: float,
           max_new_tokens: int, greedy: bool) -> StepRecorder:
    """The decoding loop: prefill once, expand to k rows per prompt, draw a token per row per step
    and record its statistics; a row that drew EOS leaves the batch."""
    device = eos.device
    written_out = decode_step.supports(model)
    logits, cache, mask = prefill(model, prompt_tokens, pad_id, device, reserve=0 if written_out else max_new_tokens)
    state = (decode_step.DecodeStep(model, cache, mask, k, reserve=max_new_tokens) if written_out
             else ForwardStep(model, cache, mask, k))
    logits = logits.repeat_interleave(k, dim=0)
    n = len(prompt_tokens) * k
    recorder = StepRecorder(n, len(prompt_tokens), k, max_new_tokens, pad_id)
    active = torch.arange(n, device=device)  # original row index of each row still decoding
    for t in range(max_new_tokens):
        chosen = recorder.step(t, active, logits, temperature, greedy)
        running = ~torch.isin(chosen, eos)
        if t == max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # finished rows leave the batch and its cache
            keep = running.nonzero().squeeze(-1)
            state.keep(keep)
            active, chosen = active[keep], chosen[keep]
        logits = state.step(chosen)
    return recorder


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    greedy: bool = False,
    precision: str = "fp32",
) -> Rollouts:
    """Sample k completions per prompt at `temperature` (or one greedy completion, recorded at T=1),
    the linear layers' products in `precision` (SamplingConfig.precision)."""
    if greedy and k != 1:
        raise ValueError("greedy decoding gives one completion per prompt: use k=1")
    temperature = 1.0 if greedy else temperature
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    pad_id = tokenizer.pad_token_id
    prompt_tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    was_training = model.training
    model.eval()
    start = time.perf_counter()

    with decode_kernel(model, precision):
        recorder = decode(model, prompt_tokens, pad_id, eos, k=k, temperature=temperature,
                          max_new_tokens=max_new_tokens, greedy=greedy)
    seconds = time.perf_counter() - start
    model.train(was_training)
    completion_ids = recorder.tokens
    cmask, stopped = completion_mask(completion_ids, set(eos.tolist()))
    completion_ids = torch.where(cmask.bool(), completion_ids, pad_id)
    prompt_ids, prompt_mask = left_pad(prompt_tokens, pad_id)
    return Rollouts(
        k=k,
        temperature=temperature,
        prompt_ids=prompt_ids.repeat_interleave(k, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(k, dim=0),
        completion_ids=completion_ids,
        completion_mask=cmask,
        stopped=stopped,
        token_agreement=recorder.agreement.nanmean(dim=1),
        texts=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        seconds=seconds,
        **{name: table * cmask for name, table in recorder.tables.items()},
    )


# ---------------------------------------------------------------- rollouts as a file (one row per sample)

ROLLOUT_COLUMNS = (
    "slot", "question_id", "sample", "prompt", "completion", "extracted", "seq_logprob", "p_old", "token_confidence",
    "entropy", "self_certainty", "agreement", "majority_share", "length", "stopped", "temperature",
    "completion_ids", "token_logprobs", "token_entropy", "token_max_prob", "token_self_certainty",
)
_TOKEN_TABLES = ("token_logprobs", "token_entropy", "token_max_prob", "token_self_certainty")


def select_prompts(rollouts: Rollouts, prompt_indices: list[int]) -> Rollouts:
    """The rollouts of some prompts only (all k samples of each), in the given order."""
    rows = torch.cat([torch.arange(q * rollouts.k, (q + 1) * rollouts.k) for q in prompt_indices])
    tensors = {name: getattr(rollouts, name)[rows] for name in
               ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "stopped", *_TOKEN_TABLES)}
    return Rollouts(k=rollouts.k, temperature=rollouts.temperature,
                    token_agreement=rollouts.token_agreement[prompt_indices],
                    texts=[rollouts.texts[i] for i in rows.tolist()], seconds=rollouts.seconds, **tensors)


def rollouts_frame(rollouts: Rollouts, question_ids: list[str], prompts: list[str], answers: list[str | None]):
    """A pandas DataFrame with one row per sample: texts, per-sample confidence and token arrays."""
    import pandas as pd

    from rlsc.answers import canonical_answer

    mask = rollouts.completion_mask
    lengths = rollouts.lengths.tolist()
    seq = rollouts.seq_logprobs.tolist()
    confidence = conf.mean_token_prob(rollouts.token_logprobs, mask).tolist()
    entropy = conf.masked_mean(rollouts.token_entropy, mask, dim=-1).tolist()
    certainty = conf.masked_mean(rollouts.token_self_certainty, mask, dim=-1).tolist()
    rows = []
    for q, qid in enumerate(question_ids):
        keys = [canonical_answer(a) for a in answers[rollouts.rows(q)]]
        _, share = conf.majority_answer(keys)
        for j in range(rollouts.k):
            i = q * rollouts.k + j
            n = lengths[i]
            rows.append({
                "slot": q, "question_id": qid, "sample": j, "prompt": prompts[q], "completion": rollouts.texts[i],
                "extracted": answers[i], "seq_logprob": seq[i], "p_old": float(torch.tensor(seq[i]).exp()),
                "token_confidence": confidence[i], "entropy": entropy[i], "self_certainty": certainty[i],
                "agreement": float(rollouts.token_agreement[q]), "majority_share": share, "length": n,
                "stopped": bool(rollouts.stopped[i]), "temperature": rollouts.temperature,
                "completion_ids": rollouts.completion_ids[i, :n].tolist(),
                **{name: getattr(rollouts, name)[i, :n].tolist() for name in _TOKEN_TABLES},
            })
    return pd.DataFrame(rows, columns=list(ROLLOUT_COLUMNS))


def write_rollouts(path, frame) -> None:
    """Parquet, atomically (temp file, then rename)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def rollouts_from_frame(frame, tokenizer) -> tuple[Rollouts, list[str], list[str | None]]:
    """(Rollouts, question ids, extracted answers) rebuilt from a rollouts file's rows.

    Completion ids and per-token values are stored, so nothing is re-tokenised but the prompt text
    (tokenised exactly as the sampler did).
    """
    # a round may ask the same question twice, so prompts are keyed by their slot in the file
    k = int(frame.groupby("slot", sort=False).size().iloc[0])
    firsts = frame.groupby("slot", sort=True).first()
    question_ids, prompts = firsts["question_id"].tolist(), firsts["prompt"].tolist()
    prompt_ids, prompt_mask = left_pad(
        [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id
    )
    width = max(1, int(frame["length"].max()))

    def table(column, fill, dtype):
        out = torch.full((len(frame), width), fill, dtype=dtype)
        for i, values in enumerate(frame[column]):
            out[i, : len(values)] = torch.tensor(list(values), dtype=dtype)
        return out

    lengths = torch.tensor(frame["length"].tolist())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    rollouts = Rollouts(
        k=k, temperature=float(frame["temperature"].iloc[0]),
        prompt_ids=prompt_ids.repeat_interleave(k, dim=0), prompt_mask=prompt_mask.repeat_interleave(k, dim=0),
        completion_ids=table("completion_ids", tokenizer.pad_token_id, torch.long), completion_mask=mask,
        stopped=torch.tensor(frame["stopped"].tolist()),
        token_agreement=torch.tensor(firsts["agreement"].tolist(), dtype=torch.float32),
        texts=frame["completion"].tolist(),
        **{name: table(name, 0.0, torch.float32) for name in _TOKEN_TABLES},
    )
    extracted = [a if isinstance(a, str) else None for a in frame["extracted"].tolist()]  # NaN/None -> None
    return rollouts, question_ids, extracted
