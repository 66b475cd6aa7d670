"""Scoring: log p_theta of given completions under the current weights, with gradient.

Only completion positions are scored: prompt positions never reach the vocabulary projection,
and the caller chunks the batch (`micro_batch`), so full-vocabulary log-softmax is never
materialised for all sequences at once (at 151,936 tokens it, not the weights, dominates memory).
When every row of a micro-batch has the same prompt (the k samples of one question), the prompt
is run once and its KV cache expanded to the rows; gradients flow back through the expansion,
so the result and its gradient are exactly those of running each row in full.
"""

from __future__ import annotations

import torch


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as the sampler computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _shares_one_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> bool:
    return bool((prompt_ids == prompt_ids[:1]).all() and (prompt_mask == prompt_mask[:1]).all())


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Raw logits [n, C, V] at the completion positions, prompt and completion in one forward each row."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids_for(attention),
                logits_to_keep=completion_ids.shape[1] + 1, use_cache=False)
    return out.logits[:, :-1, :]  # logits at position P-1+j predict completion token j


def _logits_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    from transformers import DynamicCache

    n, width = completion_ids.shape
    prompt = prompt_ids[:1, prompt_mask[0].bool()]
    cache = DynamicCache()
    first = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits  # predicts token 0
    cache.batch_repeat_interleave(n)
    p = prompt.shape[1]
    attention = torch.cat([torch.ones(n, p, dtype=completion_mask.dtype, device=completion_mask.device),
                           completion_mask], dim=1)
    positions = torch.arange(p, p + width, device=completion_ids.device).expand(n, -1)
    rest = model(input_ids=completion_ids, attention_mask=attention, position_ids=positions, cache=cache,
                 use_cache=True).logits
    return torch.cat([first.expand(n, -1, -1), rest[:, :-1, :]], dim=1)


def _is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


def completion_token_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    *,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T) at each sampled completion token: [n, C], 0 at padding.

    With `with_entropy`, also the token entropy [n, C] (with gradient, for entropy minimisation).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    # gradient checkpointing turns the KV cache off in training, so it takes the full path
    checkpointing = model.training and _is_checkpointing(model)
    shared = len(prompt_ids) > 1 and not checkpointing and _shares_one_prompt(prompt_ids, prompt_mask)
    logits_of = _logits_shared_prompt if shared else completion_logits
    logits = logits_of(model, prompt_ids, prompt_mask, completion_ids, completion_mask).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, completion_ids[..., None]).squeeze(-1)
    mask = completion_mask.to(token_logp.dtype)
    entropy = None
    if with_entropy:
        entropy = -(logp.exp() * logp).sum(-1) * mask
    return token_logp * mask, entropy
