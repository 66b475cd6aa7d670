"""The in-place KV cache holds exactly what transformers' DynamicCache holds, through every operation."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rlsc.decoding import ReservedCache


def _states(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def test_reserved_cache_matches_dynamic_cache_through_appends_repeats_and_selects():
    reserved, dynamic = ReservedCache(reserve=3), DynamicCache()

    def both(fn):
        for cache in (reserved, dynamic):
            fn(cache)
        assert len(reserved.layers) == len(dynamic.layers)
        for layer in range(len(dynamic.layers)):
            assert torch.equal(reserved.layers[layer].keys, dynamic.layers[layer].keys)
            assert torch.equal(reserved.layers[layer].values, dynamic.layers[layer].values)
        assert reserved.get_seq_length() == dynamic.get_seq_length()

    for layer in range(2):
        both(lambda c, layer=layer: c.update(*_states(1, 5, layer), layer_idx=layer))  # a prompt
    both(lambda c: c.batch_repeat_interleave(3))  # its k samples
    rows = 3
    for step in range(6):  # past the reserve: the buffer grows
        for layer in range(2):
            both(lambda c, layer=layer, step=step, rows=rows: c.update(*_states(rows, 1, 10 * step + layer),
                                                                   layer_idx=layer))
        if step == 2:
            both(lambda c: c.batch_select_indices(torch.tensor([0, 2])))  # a sample ended
            rows = 2
    assert reserved.get_seq_length() == 11


def test_sampling_with_the_reserved_cache_is_bit_identical(tiny_policy, monkeypatch):
    from rlsc import sampling

    model, tok = tiny_policy
    prompts = ["[user]what is 2+3?<eos>[assistant]", "[user]a longer question here<eos>[assistant]"]

    def sample():
        torch.manual_seed(2)
        return sampling.generate_rollouts(model, tok, prompts, k=3, temperature=1.5, max_new_tokens=12)

    fast = sample()
    monkeypatch.setattr(sampling, "ReservedCache", lambda reserve: DynamicCache())
    plain = sample()
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.token_logprobs, plain.token_logprobs)
    assert torch.equal(fast.token_entropy, plain.token_entropy)


def test_prepacked_lm_head_matches_the_plain_projection_and_is_restored(tiny_policy):
    from rlsc.decoding import prepacked_lm_head

    model, _ = tiny_policy
    head = model.get_output_embeddings()
    hidden = torch.randn(5, 1, head.in_features)
    with torch.no_grad():
        plain = head(hidden)
        with prepacked_lm_head(model):
            assert "forward" in vars(head) or not torch.backends.mkldnn.is_available()
            packed = head(hidden)
    assert "forward" not in vars(head)  # the class's forward again: training sees the real weights
    assert torch.allclose(packed, plain, atol=1e-5)


def test_sampling_with_the_prepacked_head_draws_the_same_tokens(tiny_policy, monkeypatch):
    import contextlib

    from rlsc import sampling

    model, tok = tiny_policy
    prompts = ["[user]what is 2+3?<eos>[assistant]"]

    def sample():
        torch.manual_seed(3)
        return sampling.generate_rollouts(model, tok, prompts, k=4, temperature=1.0, max_new_tokens=10)

    fast = sample()
    monkeypatch.setattr(sampling, "prepacked_lm_head", lambda model: contextlib.nullcontext())
    plain = sample()
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.allclose(fast.token_logprobs, plain.token_logprobs, atol=1e-5)
