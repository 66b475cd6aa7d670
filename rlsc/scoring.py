"""Scoring: log p_theta of given completions under the current weights, with gradient.

Only completion positions are scored: prompt positions never reach the vocabulary projection,
and the caller chunks the batch (`micro_batch`), so full-vocabulary log-softmax is never
materialised for all sequences at once (at 151,936 tokens it, not the weights, dominates memory).
When every row of a micro-batch has the same prompt (the k samples of one question), the prompt
is run once and the completions are packed side by side without padding, attending to the prompt's
KV cache and their own row through a block mask; gradients flow back into the prompt, so the
result and its gradient are exactly those of running each row in full.
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


# completions packed into one forward hold at most this many tokens: the packed attention is
# quadratic in them, the padded one in each row's length only
PACK_TOKENS = 1024


def _prompt_cache(model, prompt_ids, prompt_mask):
    """(cache after the one shared prompt, logits [V] predicting every row's first token, prompt length)."""
    from transformers import DynamicCache

    prompt = prompt_ids[:1, prompt_mask[0].bool()]
    cache = DynamicCache()
    first = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    return cache, first, prompt.shape[1]


def _packs(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows grouped so that each group's tokens stay within `budget` (one row at least)."""
    packs: list[list[int]] = [[]]
    used = 0
    for row, n in enumerate(lengths):
        if packs[-1] and used + n > budget:
            packs.append([])
            used = 0
        packs[-1].append(row)
        used += n
    return packs


def _pack_forward(model, prompt_kv, p: int, ids: torch.Tensor, row: torch.Tensor, col: torch.Tensor):
    """Logits [F, V] after each fed token: the rows' tokens side by side in one sequence, each
    attending to the shared prompt and to the earlier tokens of its own row only."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=prompt_kv)  # a fresh cache per pack around the same prompt KV
    own_row = (row[:, None] == row[None, :]) & (col[None, :] <= col[:, None])
    prompt_cols = torch.ones(len(ids), p, dtype=torch.bool, device=ids.device)
    mask = torch.cat([prompt_cols, own_row], dim=1)[None, None]
    out = model(input_ids=ids[None], attention_mask=mask, position_ids=(p + col)[None], cache=cache,
                use_cache=True)
    return out.logits[0]


def packed_logits_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Raw logits [T, V] predicting each completion token, T = the real tokens in row-major order
    (`completion_ids[completion_mask.bool()]`): no padding is ever run through the model.

    The shared prompt runs once; the rows' tokens are packed into sequences of at most PACK_TOKENS
    that attend through a block mask (prompt + own row, causal), so values and gradients equal
    those of running each row on its own (tested).
    """
    n, width = completion_ids.shape
    real = completion_mask.bool()
    lengths = real.sum(-1)
    cache, first, p = _prompt_cache(model, prompt_ids, prompt_mask)
    prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
    # a row's last token predicts nothing, so it is not fed; logits of token j come from token j-1
    fed = real.clone()
    fed[torch.arange(n, device=real.device), (lengths - 1).clamp(min=0)] = False
    rows = torch.arange(n, device=real.device)[:, None].expand(n, width)
    cols = torch.arange(width, device=real.device)[None, :].expand(n, width)
    outputs = [first[None]]
    for pack in _packs((lengths - 1).clamp(min=0).tolist(), PACK_TOKENS):
        in_pack = fed & torch.isin(rows, torch.tensor(pack, device=real.device))
        if in_pack.any():
            outputs.append(_pack_forward(model, prompt_kv, p, completion_ids[in_pack], rows[in_pack],
                                         cols[in_pack]))
    logits = torch.cat(outputs)  # [1 + fed tokens, V], packs in row order
    # where each fed token's logits sit, and so which row of `logits` predicts token (i, j)
    fed_at = torch.zeros(n, width, dtype=torch.long, device=real.device)
    fed_at[fed] = torch.arange(1, int(fed.sum()) + 1, device=real.device)
    predictor = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=real.device), fed_at[:, :-1]], dim=1)
    return logits[predictor[real]]


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
    real = completion_mask.bool()
    if shared:
        logits = packed_logits_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    else:
        logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)[real]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [T, V]: real tokens only
    token_logp = _unpack(logp.gather(-1, completion_ids[real][:, None]).squeeze(-1), real)
    entropy = _unpack(-(logp.exp() * logp).sum(-1), real) if with_entropy else None
    return token_logp, entropy


def _unpack(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Values of the real tokens [T] back into their [n, C] places, 0 at padding (keeps gradients)."""
    return torch.zeros(real.shape, dtype=values.dtype, device=values.device).index_put(real.nonzero(as_tuple=True),
                                                                                      values)
