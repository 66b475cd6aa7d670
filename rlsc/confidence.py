"""Confidence measures: small pure functions of log-probabilities, masks and extracted answers.

Conventions: `logp` is a [..., V] tensor of log-probabilities over the vocabulary at one position
(already temperature-scaled: the distribution that was sampled from); `token_logprobs` and `mask`
are [N, C] tensors over completion positions, with mask 1 for real completion tokens (the EOS
included) and 0 for padding.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def token_entropy(logp: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v), over the last dimension (probs = exp(logp) where the caller has it)."""
    return -((logp.exp() if probs is None else probs) * logp).sum(-1)


def max_prob(logp: torch.Tensor) -> torch.Tensor:
    """max_v p(v): the probability of the most likely next token."""
    return logp.max(-1).values.exp()


def self_certainty(logp: torch.Tensor) -> torch.Tensor:
    """KL(U || p) = -log V - (1/V) sum_v log p(v): Intuitor's self-certainty of one position.

    Equals logsumexp(z) - mean(z) - log V for logits z; 0 for a uniform p, larger when peaked.
    """
    return -math.log(logp.shape[-1]) - logp.mean(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y|x) = sum_t log p(y_t | x, y_<t) over completion tokens only: [N, C] -> [N]."""
    return (token_logprobs * mask.to(token_logprobs.dtype)).sum(-1)


def mean_token_prob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of p(sampled token): [N, C] -> [N]."""
    return masked_mean(token_logprobs.exp(), mask, dim=-1)


def token_agreement(logp: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Per group, sum_v pbar(v)^2 with pbar the mean next-token distribution of the active samples.

    logp: [G, k, V] (G groups of k samples at one position), active: [G, k] bool.
    Returns [G]: the chance that two samples drawn from the group's mixture agree on the next
    token; NaN for a group with no active sample.
    """
    weights = active.to(logp.dtype)
    count = weights.sum(-1, keepdim=True)
    pbar = (logp.exp() * weights.unsqueeze(-1)).sum(1) / count.clamp(min=1)
    agree = (pbar * pbar).sum(-1)
    return torch.where(count.squeeze(-1) > 0, agree, torch.full_like(agree, float("nan")))


def majority_answer(answers: list[str | None]) -> tuple[str | None, float]:
    """(the most common non-empty answer, share of ALL samples that give it); ties: first seen."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None, 0.0
    answer, n = counts.most_common(1)[0]
    return answer, n / len(answers)


def distinct_answers(answers: list[str | None]) -> int:
    """How many different non-empty final answers the samples gave."""
    return len({a for a in answers if a})
