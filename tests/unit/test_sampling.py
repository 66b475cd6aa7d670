"""Sampling records the distribution it drew from; scoring counts completion tokens only."""

from __future__ import annotations

import pytest
import torch

from rlsc.sampling import completion_mask, generate_rollouts
from rlsc.scoring import completion_token_logprobs


def _prompts(tok):
    return [
        tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                add_generation_prompt=True),
        "[user]a much longer question that needs more padding<eos>[assistant]",
    ]


def test_rollouts_have_k_rows_per_prompt_and_consistent_masks(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(0)
    r = generate_rollouts(model, tok, _prompts(tok), k=3, temperature=0.8, max_new_tokens=10)
    assert r.completion_ids.shape[0] == 6 and r.num_prompts == 2 and len(r.texts) == 6
    for i in range(6):
        n = int(r.lengths[i])
        assert r.completion_mask[i, :n].all() and not r.completion_mask[i, n:].any()
        eos_positions = (r.completion_ids[i, :n] == tok.eos_token_id).nonzero()
        # stopped <=> the last counted token is the (first) EOS; else truncated at max_new_tokens
        assert bool(r.stopped[i]) == (len(eos_positions) == 1 and int(eos_positions[0]) == n - 1)
        if not r.stopped[i]:
            assert n == 10
    assert (r.token_logprobs[r.completion_mask == 0] == 0).all()
    assert (r.token_logprobs[r.completion_mask == 1] < 0).all()


def test_completion_mask_stops_at_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, stopped = completion_mask(ids, {1})
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]


def test_recorded_logprobs_equal_a_fresh_forward_at_the_temperature(tiny_policy):
    """Samples come from softmax(logits / T) alone, even when the model's own generation config
    asks for top-k, top-p and a repetition penalty (as Qwen's does); the shared-prefix prefill and
    the shrinking batch give the same numbers as a plain forward."""
    model, tok = tiny_policy
    model.generation_config.top_k = 3
    model.generation_config.top_p = 0.5
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.temperature = 0.3
    torch.manual_seed(1)
    r = generate_rollouts(model, tok, _prompts(tok), k=4, temperature=0.7, max_new_tokens=12)
    logp, _ = completion_token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7)
    assert torch.allclose(logp.detach(), r.token_logprobs, atol=1e-4)
    # with top_k 3 in force, at most 3 distinct first tokens could appear across many samples
    r = generate_rollouts(model, tok, _prompts(tok)[:1], k=64, temperature=1.0, max_new_tokens=1)
    assert len(set(r.completion_ids[:, 0].tolist())) > 3


def test_scoring_matches_an_unpadded_single_sequence_forward(tiny_policy):
    """Prompt padding, prompt tokens and completion padding contribute nothing to the scores."""
    model, tok = tiny_policy
    torch.manual_seed(2)
    r = generate_rollouts(model, tok, _prompts(tok), k=2, temperature=1.0, max_new_tokens=8)
    batched, _ = completion_token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                           r.completion_mask, 1.0)
    for i in range(4):
        prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
        n = int(r.lengths[i])
        completion = r.completion_ids[i, :n]
        with torch.no_grad():
            logits = model(torch.cat([prompt, completion])[None]).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1).gather(-1, completion[:, None])
        assert torch.allclose(batched[i, :n].detach(), logp.squeeze(-1), atol=1e-5)
        assert (batched[i, n:] == 0).all()


def test_padding_content_changes_neither_scores_nor_gradients(tiny_policy):
    model, tok = tiny_policy
    torch.manual_seed(3)
    r = generate_rollouts(model, tok, _prompts(tok), k=2, temperature=1.0, max_new_tokens=8)
    r.completion_mask[0, 3:] = 0  # make sure some completions are shorter than the batch
    r.completion_mask[3, 5:] = 0

    def grads(prompt_ids, completion_ids):
        model.zero_grad()
        logp, _ = completion_token_logprobs(model, prompt_ids, r.prompt_mask, completion_ids, r.completion_mask, 1.0)
        logp.sum().backward()
        return logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    base_logp, base_grad = grads(r.prompt_ids, r.completion_ids)
    noisy_prompt = torch.where(r.prompt_mask.bool(), r.prompt_ids, torch.randint_like(r.prompt_ids, 3, 50))
    noisy_completion = torch.where(r.completion_mask.bool(), r.completion_ids,
                                   torch.randint_like(r.completion_ids, 3, 50))
    logp, grad = grads(noisy_prompt, noisy_completion)
    assert (r.prompt_mask == 0).any() and (r.completion_mask == 0).any()  # the test exercises padding
    assert torch.allclose(logp, base_logp, atol=1e-5)
    assert torch.allclose(grad, base_grad, atol=1e-5)


def test_greedy_rollouts_are_deterministic_and_need_k_1(tiny_policy):
    model, tok = tiny_policy
    a = generate_rollouts(model, tok, _prompts(tok), k=1, temperature=1.0, max_new_tokens=6, greedy=True)
    b = generate_rollouts(model, tok, _prompts(tok), k=1, temperature=1.0, max_new_tokens=6, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    # greedy picks the arg-max, so each token's probability is the max probability
    assert torch.allclose(a.token_logprobs.exp() * a.completion_mask, a.token_max_prob, atol=1e-5)
    with pytest.raises(ValueError):
        generate_rollouts(model, tok, _prompts(tok), k=2, temperature=1.0, max_new_tokens=6, greedy=True)


@pytest.mark.parametrize("pack_tokens,tied,family", [(1024, False, "llama"), (7, False, "llama"), (1, False, "llama"),
                                                     (7, True, "llama"), (7, True, "qwen2")])
def test_shared_prompt_scoring_equals_full_scoring_with_gradients(tiny_policy, monkeypatch, pack_tokens, tied, family):
    """The k samples of one question score their prompt once, packed without padding; values and
    gradients are those of running every padded row in full (one pack; several; a row per pack;
    several with the head tied to the embedding, whose gradient then sums head and lookups; the
    same in the Qwen2 family, the embedded default's, whose attention has biases)."""
    from rlsc import scoring
    from tests.conftest import build_tiny_model

    monkeypatch.setattr(scoring, "PACK_TOKENS", pack_tokens)
    model, tok = tiny_policy
    if tied or family != "llama":
        model = build_tiny_model(len(tok), seed=3, tie_word_embeddings=tied, family=family)
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    torch.manual_seed(4)
    r = generate_rollouts(model, tok, _prompts(tok)[1:], k=6, temperature=1.0, max_new_tokens=8)
    assert scoring._shares_one_prompt(r.prompt_ids, r.prompt_mask)
    # rows of different lengths, as when samples stop early: padding the packed path must skip
    lengths = torch.tensor([8, 3, 5, 1, 7, 2])
    r.completion_mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    r.completion_ids = torch.where(r.completion_mask.bool(), r.completion_ids, tok.pad_token_id)

    def _packed_as_padded(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
        packed = scoring.packed_logits_shared_prompt(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        real = completion_mask.bool()
        padded = torch.zeros(*completion_ids.shape, packed.shape[-1])
        return padded.index_put(real.nonzero(as_tuple=True), packed)

    def run(logits_fn):
        model.zero_grad()
        logits = logits_fn(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
        (logp * r.completion_mask).sum().backward()
        return logp.detach() * r.completion_mask, torch.cat([p.grad.flatten() for p in model.parameters()])

    full_logp, full_grad = run(scoring.completion_logits)
    shared_logp, shared_grad = run(_packed_as_padded)
    assert torch.allclose(shared_logp, full_logp, atol=1e-5)
    assert torch.allclose(shared_grad, full_grad, atol=1e-5)


def test_inverse_cdf_sampling_follows_the_distribution():
    from rlsc.sampling import sample_from

    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logp = p.clamp(min=1e-30).log().expand(40000, -1)
    counts = torch.bincount(sample_from(logp), minlength=4).float() / 40000
    assert counts[1] == 0
    assert torch.allclose(counts, p, atol=0.01)


def test_rollouts_round_trip_through_parquet(tiny_policy, tmp_path):
    import pandas as pd

    from rlsc.sampling import rollouts_frame, rollouts_from_frame, write_rollouts

    model, tok = tiny_policy
    torch.manual_seed(5)
    prompts = _prompts(tok)
    r = generate_rollouts(model, tok, prompts, k=3, temperature=0.9, max_new_tokens=6)
    answers = [None, "1", "2", None, "3", "3"]
    write_rollouts(tmp_path / "r.parquet", rollouts_frame(r, ["a", "b"], prompts, answers))
    frame = pd.read_parquet(tmp_path / "r.parquet")
    assert len(frame) == 6 and frame["p_old"].between(0, 1).all() and (frame["seq_logprob"] <= 0).all()
    assert frame.loc[frame.question_id == "b", "majority_share"].iloc[0] == pytest.approx(2 / 3)
    back, ids, extracted = rollouts_from_frame(frame, tok)
    assert ids == ["a", "b"] and extracted == answers
    width = r.completion_ids.shape[1]
    for name in ("prompt_ids", "prompt_mask", "stopped", "token_agreement"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    for name in ("completion_ids", "completion_mask", "token_logprobs", "token_entropy"):
        assert torch.equal(getattr(back, name), getattr(r, name)[:, : back.completion_ids.shape[1]]), name
        assert back.completion_ids.shape[1] <= width


def test_packs_balance_rows_longest_first():
    from rlsc.scoring import assign_packs

    lengths = [127, 20, 60, 5, 90, 33, 0, 70]
    pack_of = assign_packs(lengths, 3)
    loads = [sum(n for n, p in zip(lengths, pack_of) if p == pack) for pack in range(3)]
    # by hand: 127 | 90 | 70, then 60 -> the 70 pack, 33 -> the 90 one, 20 -> 123, 5 -> 127, 0 -> 132
    assert sorted(loads) == [130, 132, 143]
    assert pack_of[0] == pack_of[3] and pack_of[4] == pack_of[5] == pack_of[1] and pack_of[7] == pack_of[2]
    assert assign_packs([4, 4], 1) == [0, 0]


def test_single_token_completions_are_scored_from_the_prompt_alone(tiny_policy):
    from rlsc import scoring

    model, tok = tiny_policy
    prompt = tok("[user]hi<eos>[assistant]", add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt_ids, prompt_mask = prompt.expand(3, -1), torch.ones(3, prompt.shape[1], dtype=torch.long)
    ids, mask = torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.long)
    packed = scoring.packed_logits_shared_prompt(model, prompt_ids, prompt_mask, ids, mask)
    full = scoring.completion_logits(model, prompt_ids, prompt_mask, ids, mask)[:, 0]
    assert torch.allclose(packed, full, atol=1e-5)


def test_models_that_transform_their_logits_take_the_padded_path(tiny_policy):
    from rlsc import scoring

    model, _ = tiny_policy
    decoder, head = scoring.decoder_and_head(model)
    assert decoder is model.model and head is model.lm_head
    model.config.final_logit_softcapping = 30.0  # as Gemma-2's: logits = 30 tanh(head / 30)
    try:
        assert scoring.decoder_and_head(model) is None
    finally:
        model.config.final_logit_softcapping = None


@pytest.mark.parametrize("vocab", [37, 49152])
@pytest.mark.parametrize("greedy", [False, True])
def test_native_step_statistics_equal_the_torch_record(vocab, greedy):
    """decode_glue.c's one-pass statistics against StepRecorder.record's torch computation (the
    independent one): same tokens from the same generator state, log p, entropy, max p,
    self-certainty to float rounding, agreement per prompt (NaN for a prompt with no row left)."""
    from rlsc import decode_step
    from rlsc.sampling import StepRecorder, sample_from

    glue = decode_step.native_glue()
    if glue is None:
        pytest.skip("decode_glue.c does not run on this machine (needs x86-64 with AVX2 and a C compiler)")
    k, n_prompts = 4, 3
    rows = torch.tensor([0, 1, 3, 4, 6, 7])  # prompt 2's rows have all finished
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    logits[1, 5] = logits[1].max() + 0.0  # a tie at the top: the first index wins, as torch's argmax
    native, reference = StepRecorder(12, n_prompts, k, 3, 0), StepRecorder(12, n_prompts, k, 3, 0)
    for temperature in (0.5, 1.0):
        torch.manual_seed(7)
        chosen = native.step(1, rows, logits, temperature, greedy)
        torch.manual_seed(7)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        expected = logp.argmax(-1) if greedy else sample_from(logp, logp.exp())
        reference.record(1, rows, logp, logp.exp(), expected)
        assert torch.equal(chosen, expected)
        assert torch.equal(native.tokens, reference.tokens)
        for name in native.tables:
            torch.testing.assert_close(native.tables[name], reference.tables[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native.agreement, reference.agreement, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert native.agreement[2, 1].isnan() and not native.agreement[:2, 1].isnan().any()
