"""The RLSC estimator and the peer objectives against independent computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlsc.objectives import (
    confidence_reward_coefficients,
    entropy_loss,
    majority_vote_coefficients,
    normalized_advantages,
    rlsc_loss,
    rlsc_weights,
)
from rlsc.sampling import generate_rollouts
from rlsc.scoring import completion_token_logprobs
from tests.conftest import build_tiny_model


def test_l1_and_l2_equal_a_hand_computation():
    s = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    # L1 = -sum e^{s_i} s_i = 0.367879 + 2*0.135335 + 0.5*0.606531
    assert rlsc_loss(s, alpha=0.0).item() == pytest.approx(0.367879 + 0.270671 + 0.303265, abs=1e-5)
    l2 = rlsc_loss(s, alpha=0.1)
    assert l2.item() == pytest.approx(0.467879 + 0.470671 + 0.353265, abs=1e-5)
    l2.backward()
    # the weights are detached: dL2/ds_i = -(e^{s_i} + alpha), no derivative through the weight
    assert s.grad.tolist() == pytest.approx([-0.467879, -0.235335, -0.706531], abs=1e-5)


def test_off_policy_weights_come_from_the_old_policy():
    s = torch.tensor([-1.0, -3.0], requires_grad=True)
    old = torch.tensor([-0.5, -0.25])
    rlsc_loss(s, alpha=0.0, old_seq_logprobs=old).backward()
    assert s.grad.tolist() == pytest.approx([-math.exp(-0.5), -math.exp(-0.25)])


def test_signal_preserving_weightings():
    old = torch.tensor([-40.0, -42.0, -44.0])
    lengths = torch.tensor([200, 210, 220])
    token_mean = rlsc_weights(old, weighting="token_mean", lengths=lengths)
    assert token_mean.tolist() == pytest.approx([math.exp(-0.2), math.exp(-0.2), math.exp(-0.2)], rel=1e-5)
    normalized = rlsc_weights(old, weighting="normalized")
    z = 1 + math.exp(-2) + math.exp(-4)
    assert normalized.tolist() == pytest.approx([1 / z, math.exp(-2) / z, math.exp(-4) / z], rel=1e-5)
    assert rlsc_weights(old, alpha=0.1).tolist() == pytest.approx([0.1, 0.1, 0.1])  # p_old underflows
    with pytest.raises(ValueError):
        rlsc_weights(old, weighting="token_mean")


def test_confidence_reward_is_normalised_over_the_samples():
    old = torch.log(torch.tensor([0.5, 0.1, 0.1, 0.3]))
    valid = torch.tensor([True, True, False, True])
    c = confidence_reward_coefficients(old, valid, alpha=0.2)
    rewards = [0.7, 0.3, -0.1, 0.5]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    assert c.tolist() == pytest.approx([(r - mean) / (std + 1e-6) / 4 for r in rewards], rel=1e-5)
    assert normalized_advantages(torch.tensor([0.2, 0.2])).tolist() == [0.0, 0.0]


def test_majority_vote_rewards_confidence_of_majority_samples_only():
    old = torch.log(torch.tensor([0.5, 0.2, 0.1]))
    c = majority_vote_coefficients(old, torch.tensor([True, False, True]))
    assert c.tolist() == pytest.approx([0.5, 0.0, 0.1])


def test_entropy_loss_is_the_mean_over_completion_tokens():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert entropy_loss(entropy, mask).item() == pytest.approx(2.0)
    assert entropy_loss(entropy, mask, total_tokens=6).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- the estimator's expectation

VOCAB = 4  # 0 pad, 1 eos, 2 and 3 ordinary tokens
MAX_NEW = 3
TEMPERATURE = 0.7


class _Tok:
    """The two fields generate_rollouts needs from a tokenizer, for a 4-token toy vocabulary."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, prompt, **_):
        return {"input_ids": [2, 3, 2]}

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def every_completion() -> list[list[int]]:
    """All completions of at most MAX_NEW tokens: EOS ends a completion, pad (0) is an ordinary token."""
    ordinary = [0, 2, 3]
    out = []
    for n in range(MAX_NEW):
        out += [list(prefix) + [1] for prefix in itertools.product(ordinary, repeat=n)]
    out += [list(seq) for seq in itertools.product(ordinary, repeat=MAX_NEW)]  # truncated
    return out


def seq_logprobs_of(model, completions: list[list[int]]) -> torch.Tensor:
    width = max(len(c) for c in completions)
    ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    prompt = torch.tensor([[2, 3, 2]] * len(completions))
    logp, _ = completion_token_logprobs(model, prompt, torch.ones_like(prompt), ids, mask, TEMPERATURE)
    return logp.sum(-1)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_enumeration_covers_the_whole_distribution():
    model = build_tiny_model(VOCAB, seed=3, hidden=16, layers=1)
    total = seq_logprobs_of(model, every_completion()).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_expected_rlsc_gradient_matches_exact_gradient_of_sum_p_squared():
    """E[grad L1] over k samples from p equals -(k/2) grad sum_y p(y)^2, computed by enumeration."""
    torch.manual_seed(0)
    model = build_tiny_model(VOCAB, seed=3, hidden=16, layers=1)
    model.generation_config.eos_token_id = 1

    model.zero_grad()
    exact_f = seq_logprobs_of(model, every_completion()).mul(2).exp().sum()  # sum_y p(y)^2
    exact_f.backward()
    exact = flat_grad(model).clone()

    k, questions, rounds = 4, 1000, 6
    model.zero_grad()
    total_questions = 0
    for _ in range(rounds):
        r = generate_rollouts(model, _Tok(), ["q"] * questions, k=k, temperature=TEMPERATURE, max_new_tokens=MAX_NEW)
        logp, _ = completion_token_logprobs(
            model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, TEMPERATURE
        )
        seq = logp.sum(-1).view(questions, k)
        sum(rlsc_loss(seq[q], alpha=0.0) for q in range(questions)).backward()
        total_questions += questions
    estimate = flat_grad(model) / total_questions
    expected = -(k / 2) * exact

    cosine = torch.nn.functional.cosine_similarity(estimate, expected, dim=0).item()
    ratio = (estimate.norm() / expected.norm()).item()
    assert cosine > 0.97, cosine
    assert ratio == pytest.approx(1.0, abs=0.1)

    # the check has power: the unweighted log-likelihood of the same samples points elsewhere
    model.zero_grad()
    r = generate_rollouts(model, _Tok(), ["q"] * questions, k=k, temperature=TEMPERATURE, max_new_tokens=MAX_NEW)
    logp, _ = completion_token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                        TEMPERATURE)
    (-logp.sum() / questions).backward()
    assert torch.nn.functional.cosine_similarity(flat_grad(model), expected, dim=0).item() < 0.9
