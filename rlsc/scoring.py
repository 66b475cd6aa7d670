"""Scoring: log p_theta of given completions under the current weights, with gradient.

Only completion positions are scored: prompt positions never reach the vocabulary projection,
and the caller chunks the batch (`micro_batch`), so full-vocabulary log-softmax is never
materialised for all sequences at once (at 151,936 tokens it, not the weights, dominates memory).
When every row of a micro-batch has the same prompt (the k samples of one question), the prompt
runs once, at the start of the first pack, and the completions are packed side by side without
padding, attending to the prompt's keys and their own row through a block mask; gradients flow back
into the prompt, so the result and its gradient equal, to float rounding, those of running each
padded row in full. That path runs the decoder and the LM head itself: one forward for prompt and
packs, and the head once, on the predicting positions only (with tied embeddings, each separate
lookup or head call cost a vocabulary-sized gradient: 3.4 s of a 26.5 s Qwen2.5-0.5B update, profiled).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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


# tokens per pack: the packed attention costs pack length x (prompt + pack length) per token, so
# shorter packs attend less; they all run in one batched forward (one weight gradient per call)
PACK_TOKENS = 256


def decoder_and_head(model):
    """(decoder stack, LM head) where a model's logits are exactly head(decoder output): the packed
    path runs the head itself, on the positions it needs only. None for models that transform their
    logits further (soft-capping, a logit scale), which take the padded path."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    return None if decoder is None or decoder is model or head is None else (decoder, head)


# config attributes of models whose forward does more to the logits than the head's product
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def assign_packs(lengths: list[int], n_packs: int, first_pack_holds: int = 0) -> list[int]:
    """The pack of each row: longest rows first, each into the pack holding the fewest tokens so
    far (pack 0 starts with `first_pack_holds`: the prompt), so the packs come out about equally
    long (little padding)."""
    load, pack_of = [first_pack_holds] + [0] * (n_packs - 1), [0] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        pack = min(range(n_packs), key=load.__getitem__)
        pack_of[row] = pack
        load[pack] += lengths[row]
    return pack_of


class _SharedPrompt(DynamicCache):
    """Not a cache: the hook every attention layer calls with its new keys and values
    (`cache.update`), used to let every pack attend to the prompt, which runs in pack 0 only: each
    row's keys and values get pack 0's first `prompt_len` positions prepended (the expand is
    differentiable: the prompt's gradient sums over the packs)."""

    def __init__(self, prompt_len: int):
        super().__init__()
        self.prompt_len, self.layers_updated = prompt_len, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.layers_updated += 1
        return self._with_prompt(key_states), self._with_prompt(value_states)

    def _with_prompt(self, states: torch.Tensor) -> torch.Tensor:
        prompt = states[:1, :, : self.prompt_len].expand(states.shape[0], -1, -1, -1)
        return torch.cat([prompt, states], dim=2)


PROMPT_ROW = -2  # row_at of the prompt's slots in pack 0 (-1: padding at a pack's end)


def packed_logits_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Raw logits [T, V] predicting each completion token, T = the real tokens in row-major order
    (`completion_ids[completion_mask.bool()]`): padding is (almost) never run through the model.

    One batched forward: the shared prompt at the start of pack 0, the rows' tokens laid side by
    side in packs of about PACK_TOKENS tokens. Each layer's keys get the prompt's prepended on
    every pack (`_SharedPrompt`), and a block mask lets each token attend to the prompt and to the
    earlier tokens of its own row only, so values and gradients equal those of running each row on
    its own (tested). The prompt is not a separate forward: each weight's gradient is one product,
    not two and an add (1.9 s of a Qwen2.5-0.5B update, profiled).
    """
    split = decoder_and_head(model)
    if split is None:
        raise ValueError(f"{type(model).__name__} transforms its logits beyond the head: score it with completion_logits")
    decoder, head = split
    n, width = completion_ids.shape
    device = completion_ids.device
    real = completion_mask.bool()
    lengths = real.sum(-1)
    prompt = prompt_ids[0, prompt_mask[0].bool()]
    p = prompt.shape[0]
    # a row's last token predicts nothing, so it is not fed; logits of token j come from token j-1
    fed = real.clone()
    fed[torch.arange(n, device=device), (lengths - 1).clamp(min=0)] = False
    fed_lengths = fed.sum(-1).tolist()
    rows_fed = sum(1 for f in fed_lengths if f)
    n_packs = max(1, min(rows_fed, -(-(p + sum(fed_lengths)) // PACK_TOKENS)))
    pack_of = assign_packs(fed_lengths, n_packs, first_pack_holds=p)
    starts, used = [0] * n, [p] + [0] * (n_packs - 1)  # where each row begins inside its pack
    for row in range(n):
        starts[row], used[pack_of[row]] = used[pack_of[row]], used[pack_of[row]] + fed_lengths[row]
    width_packed = max(used)

    r, c = fed.nonzero(as_tuple=True)  # row-major, like the packs
    pack = torch.tensor(pack_of, device=device)[r]
    slot = torch.tensor(starts, device=device)[r] + c
    ids = torch.zeros(n_packs, width_packed, dtype=completion_ids.dtype, device=device)
    row_at = torch.full((n_packs, width_packed), -1, device=device)
    col_at = torch.zeros(n_packs, width_packed, dtype=torch.long, device=device)
    ids[0, :p], row_at[0, :p], col_at[0, :p] = prompt, PROMPT_ROW, torch.arange(p, device=device)
    ids[pack, slot], row_at[pack, slot], col_at[pack, slot] = completion_ids[r, c], r, c
    mask = torch.cat([_prompt_keys_mask(row_at, col_at, p), _own_row_mask(row_at, col_at)], dim=-1)[:, None]
    positions = torch.where(row_at == PROMPT_ROW, col_at, p + col_at)
    hook = _SharedPrompt(p)
    out = decoder(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, position_ids=positions,
                  cache=hook, use_cache=True)
    if hook.layers_updated != model.config.num_hidden_layers:  # a layer that skips cache.update missed the prompt
        raise ValueError(f"{type(model).__name__}: {hook.layers_updated} of {model.config.num_hidden_layers} attention "
                         "layers called cache.update; score it with completion_logits")
    hidden = out.last_hidden_state.reshape(n_packs * width_packed, -1)
    # which row of `hidden` predicts token (i, j): the prompt's last slot for j = 0, else token j-1's
    fed_at = torch.zeros(n, width, dtype=torch.long, device=device)
    fed_at[r, c] = pack * width_packed + slot
    predictor = torch.cat([torch.full((n, 1), p - 1, dtype=torch.long, device=device), fed_at[:, :-1]], dim=1)
    # the head runs once, on the predicting positions only: no logits for pack padding or the prompt
    return head(hidden[predictor[real]])


def _prompt_keys_mask(row_at: torch.Tensor, col_at: torch.Tensor, p: int) -> torch.Tensor:
    """[packs, W, p]: completion (and padding) slots see the whole prompt, prompt slots its causal part."""
    causal = torch.arange(p, device=row_at.device)[None, None, :] <= col_at[:, :, None]
    return (row_at != PROMPT_ROW)[:, :, None] | causal


def _own_row_mask(row_at: torch.Tensor, col_at: torch.Tensor) -> torch.Tensor:
    """[packs, W, W]: a slot sees its own row's earlier slots; never pack 0's copy of the prompt,
    which every slot sees through the prepended prompt keys instead."""
    same_row = (row_at[:, :, None] == row_at[:, None, :]) & (col_at[:, None, :] <= col_at[:, :, None])
    return same_row & (row_at != PROMPT_ROW)[:, None, :]


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
    shared = (len(prompt_ids) > 1 and not checkpointing and decoder_and_head(model) is not None
              and _shares_one_prompt(prompt_ids, prompt_mask))
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
