"""Confidence measures against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlsc import confidence as conf


def test_entropy_max_prob_and_self_certainty_of_known_distributions():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0 + 1e-12], [0.25, 0.25, 0.25, 0.25]])
    logp = p.log()
    assert conf.token_entropy(logp).tolist() == pytest.approx([1.5 * math.log(2), math.log(4)], abs=1e-6)
    assert conf.max_prob(logp).tolist() == pytest.approx([0.5, 0.25])
    # KL(U || p) = sum_v (1/V) log((1/V) / p_v); 0 for the uniform distribution
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    expected = sum(0.25 * math.log(0.25 / v) for v in q.tolist())
    assert conf.self_certainty(q.log()).item() == pytest.approx(expected, abs=1e-6)
    assert conf.self_certainty(logp[1]).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprob_and_mean_token_prob_ignore_padding():
    token_logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.3, 0.4]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert conf.sequence_logprob(token_logprobs, mask).exp().tolist() == pytest.approx([0.25, 0.024])
    assert conf.mean_token_prob(token_logprobs, mask).tolist() == pytest.approx([0.5, 0.3])


def test_token_agreement_is_sum_of_squared_mixture_over_active_samples():
    p1 = torch.tensor([0.5, 0.5, 0.0 + 1e-12])
    p2 = torch.tensor([1.0 - 2e-12, 1e-12, 1e-12])
    p3 = torch.tensor([0.0 + 1e-12, 0.0 + 1e-12, 1.0 - 2e-12])
    logp = torch.stack([p1, p2, p3]).log()[None]  # one group of k = 3
    # only samples 1 and 2 are active: pbar = (0.75, 0.25, 0) -> 0.5625 + 0.0625
    got = conf.token_agreement(logp, torch.tensor([[True, True, False]]))
    assert got.item() == pytest.approx(0.625, abs=1e-6)
    assert math.isnan(conf.token_agreement(logp, torch.tensor([[False, False, False]])).item())


def test_majority_and_distinct_answers():
    answers = ["12", "7", "12", None, "12", "7"]
    assert conf.majority_answer(answers) == ("12", 0.5)
    assert conf.distinct_answers(answers) == 2
    assert conf.majority_answer([None, None]) == (None, 0.0)
