"""Training objectives, each a small function of the k samples of ONE question.

Every objective here is a policy-gradient loss  L = -sum_i c_i * log p_theta(y_i|x)  with detached
per-sample coefficients c_i, except entropy minimisation, which differentiates the entropy itself.
An optional KL anchor to the initial policy (`kl_penalty`, off by default) can be added to any of them.
`seq_logprobs` are log p_theta(y_i|x): the SUM of temperature-scaled completion-token log-probs,
with gradient. `old_seq_logprobs` are the same under the sampling (old) policy, without gradient.

The RLSC objective (Li et al. 2025, v3) maximises F = sum_y p(y|x)^2 = E_{y~p}[p(y|x)], whose
gradient is 2 E_{y~p}[p(y|x) grad log p(y|x)]. With k samples from p_old = p_theta,
E[grad L1] = -k * E[p grad log p] = -(k/2) grad F: L1 is an unbiased estimator of -(k/2) grad F.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("sequence", "token_mean", "normalized")


def policy_gradient_loss(seq_logprobs: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """L = -sum_i c_i * log p_theta(y_i|x), with the coefficients c_i detached."""
    return -(coefficients.detach() * seq_logprobs).sum()


def rlsc_weights(
    old_seq_logprobs: torch.Tensor,
    *,
    alpha: float = 0.0,
    weighting: str = "sequence",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The coefficients of L1/L2: c_i = w_i + alpha.

    weighting 'sequence' (the paper): w_i = p_old(y_i|x) = exp(sum_t log p_old).
    'token_mean': w_i = exp(mean_t log p_old), the per-token geometric mean, which stays O(1) on long
      answers where p_old(y) underflows (not the paper's objective).
    'normalized': w_i = p_old(y_i) / sum_j p_old(y_j), weights that sum to 1 over the k samples
      (not the paper's objective; scale-free, so L1 keeps a signal when every p_old is tiny).
    """
    old = old_seq_logprobs.detach()
    if weighting == "sequence":
        weights = old.exp()
    elif weighting == "token_mean":
        if lengths is None:
            raise ValueError("token_mean weighting needs the completion lengths")
        weights = (old / lengths.clamp(min=1).to(old.dtype)).exp()
    elif weighting == "normalized":
        weights = torch.softmax(old, dim=-1)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return weights + alpha


def rlsc_loss(
    seq_logprobs: torch.Tensor, alpha: float = 0.0, old_seq_logprobs: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's loss for one question: L = -sum_i (p_old(y_i|x) + alpha) * log p_theta(y_i|x).

    alpha = 0 is L1, alpha > 0 is L2 (0.1 suggested). Without `old_seq_logprobs` the sampling policy
    is the current one (one step per sampling round) and p_old is the detached exp(seq_logprobs):
    no second forward pass. No baseline, no normalisation, no KL.
    """
    old = seq_logprobs.detach() if old_seq_logprobs is None else old_seq_logprobs
    return policy_gradient_loss(seq_logprobs, rlsc_weights(old, alpha=alpha))


def normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r_i - mean r) / (std r + eps) over the k samples; all zero when every reward is equal."""
    centered = rewards - rewards.mean()
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return centered / (rewards.std() + eps)


def confidence_reward_coefficients(
    old_seq_logprobs: torch.Tensor, valid_format: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Reward R(y) = p_old(y|x) + alpha * (+1 if the format is valid else -1), normalised over the
    k samples into advantages; the loss is the policy gradient -sum_i A_i log p_theta(y_i|x) / k."""
    sign = valid_format.to(old_seq_logprobs.dtype) * 2 - 1
    rewards = old_seq_logprobs.detach().exp() + alpha * sign
    return normalized_advantages(rewards) / rewards.numel()


def majority_vote_coefficients(old_seq_logprobs: torch.Tensor, agrees_with_majority: torch.Tensor) -> torch.Tensor:
    """Reward = p_old(y|x) if the sample's final answer is the majority answer, else 0 (TTRL-style
    pseudo-label, weighted by confidence); used unnormalised, like RLSC's own weights."""
    return old_seq_logprobs.detach().exp() * agrees_with_majority.to(old_seq_logprobs.dtype)


def entropy_loss(token_entropy: torch.Tensor, mask: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
    """Entropy minimisation (EM-RL / one-shot EM peer): mean token entropy over completion tokens.

    `total_tokens` is the question's token count when the k samples are split into micro-batches,
    so that the micro-batch losses add up to the question's mean.
    """
    mask = mask.to(token_entropy.dtype)
    denominator = mask.sum().clamp(min=1) if total_tokens is None else max(total_tokens, 1)
    return (token_entropy * mask).sum() / denominator


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) at each position: sum_v pi(v) (log pi(v) - log pi_ref(v)), over the last dim.

    Both are log-probabilities over the full vocabulary at the same temperature; exact (no
    sampled estimator), so it is 0 exactly when the two distributions are equal.
    """
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               total_tokens: int | None = None) -> torch.Tensor:
    """Mean over completion tokens (mask 1) of token_kl: the anchor to the initial policy.

    Not in the paper (it has no KL). `total_tokens` as in `entropy_loss`: the question's token count
    when its samples are split into micro-batches, so the micro-batch terms add up to its mean.
    """
    mask = mask.to(logp.dtype)
    denominator = mask.sum().clamp(min=1) if total_tokens is None else max(total_tokens, 1)
    return (token_kl(logp, ref_logp) * mask).sum() / denominator


def sample_coefficients(
    objective: str,
    old_seq_logprobs: torch.Tensor,
    *,
    alpha: float,
    weighting: str,
    lengths: torch.Tensor,
    valid_format: torch.Tensor,
    agrees_with_majority: torch.Tensor,
) -> torch.Tensor | None:
    """The detached c_i of one question's k samples for a policy-gradient objective (None: entropy)."""
    if objective == "rlsc":
        return rlsc_weights(old_seq_logprobs, alpha=alpha, weighting=weighting, lengths=lengths)
    if objective == "confidence_reward":
        return confidence_reward_coefficients(old_seq_logprobs, valid_format, alpha)
    if objective == "majority_vote":
        return majority_vote_coefficients(old_seq_logprobs, agrees_with_majority)
    if objective == "entropy":
        return None
    raise ValueError(f"unknown objective {objective!r}")
