"""The written-out decode step (rlsc/decode_step.py) against the model's own forward: the same
next-token logits, step after step, for shared and per-row prompts, with rows leaving."""

from __future__ import annotations

import pytest
import torch

from rlsc import decode_step
from rlsc.sampling import ForwardStep, generate_rollouts, prefill
from tests.conftest import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["[user]What is 3 + 4?<eos>[assistant]", "[user]Name a colour.<eos>[assistant]Red is",
           "[user]Hi<eos>[assistant]"]


def _states(model, tok, prompts, k, reserve):
    tokens = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    logits_a, cache_a, mask_a = prefill(model, tokens, tok.pad_token_id, torch.device("cpu"))
    logits_b, cache_b, mask_b = prefill(model, tokens, tok.pad_token_id, torch.device("cpu"))
    assert torch.equal(logits_a, logits_b)
    written = decode_step.DecodeStep(model, cache_a, mask_a, k, reserve=reserve)
    own = ForwardStep(model, cache_b, mask_b, k)
    return written, own, len(prompts) * k


@pytest.fixture(params=["native", "native-avx2", "torch"])
def glue(request, monkeypatch):
    """The step's glue: decode_glue.c built for this CPU or for AVX2 only (where it builds: x86-64
    with AVX2 and a C compiler), or torch's ops."""
    from rlsc import decoding

    if request.param == "torch":
        monkeypatch.setattr(decode_step, "native_glue", lambda: None)
        return request.param
    if decode_step.native_glue() is None:
        pytest.skip("decode_glue.c does not run on this machine (needs x86-64 with AVX2 and a C compiler)")
    if request.param == "native-avx2":
        avx2 = decode_step.NativeGlue(decoding.load_library(decoding.GLUE_SOURCE, decoding.AVX2_FLAGS))
        monkeypatch.setattr(decode_step, "native_glue", lambda: avx2)
    return "native"


def _compare_steps(tok, written, own, rows, steps, leave_at=(2, 5)):
    gen = torch.Generator().manual_seed(0)
    active = torch.arange(rows)
    for t in range(steps):
        tokens = torch.randint(3, len(tok), (len(active),), generator=gen)
        expected, got = own.step(tokens), written.step(tokens)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if t in leave_at and len(active) > 1:  # some rows finish: keep every other one
            keep = torch.arange(0, len(active), 2)
            own.keep(keep)
            written.keep(keep)
            active = active[keep]


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", False)])
@pytest.mark.parametrize("prompts,k", [(PROMPTS[:1], 5), (PROMPTS, 2), (PROMPTS, 1)],
                         ids=["one-prompt-shared", "three-prompts-per-row", "greedy-batch"])
@torch.no_grad()
def test_written_out_step_gives_the_models_own_logits(family, tied, prompts, k, glue):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), family=family, tie_word_embeddings=tied, layers=3)
    assert decode_step.supports(model)
    written, own, rows = _states(model, tok, prompts, k, reserve=8)
    assert written.shared == (len(prompts) == 1)
    assert (written.native is not None) == (glue == "native")
    _compare_steps(tok, written, own, rows, steps=8)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("prompts,k", [(PROMPTS[:1], 4), (PROMPTS, 2)], ids=["one-prompt-shared", "three-prompts-per-row"])
@torch.no_grad()
def test_real_head_sizes_over_several_key_blocks(family, prompts, k, glue):
    """Head size 64 and 5 query heads per kv head (as Qwen2.5-0.5B's 64 and 7): the native glue's
    vector paths (16-key blocks, 16-wide value stripes, query heads 4 at a time and a remainder),
    over prompts and completions longer than one 16-key block, rows leaving mid-block."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), family=family, hidden=640, heads=10, kv_heads=2)
    long_prompts = [p.replace("[assistant]", " Please think step by step, then answer.[assistant]") for p in prompts]
    assert len(tok(long_prompts[0], add_special_tokens=False)["input_ids"]) > 16
    written, own, rows = _states(model, tok, long_prompts, k, reserve=40)
    _compare_steps(tok, written, own, rows, steps=37, leave_at=(5, 17))


@torch.no_grad()
def test_the_shared_prompt_is_held_once_and_rows_write_their_own_positions():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    written, _, rows = _states(model, tok, PROMPTS[:1], k=4, reserve=3)
    prompt_len = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert written.prompt_keys.shape[1] == 1 and written.prompt_values.shape[3] == prompt_len
    assert written.keys.shape[1] == rows and written.values.shape[3] == 3
    written.step(torch.tensor([5, 6, 7, 8]))
    assert written.positions.tolist() == [prompt_len + 1] * rows
    written.step(torch.tensor([5, 6, 7, 8]))
    written.step(torch.tensor([5, 6, 7, 8]))
    with pytest.raises(RuntimeError, match="beyond the 3 reserved positions"):
        written.step(torch.tensor([5, 6, 7, 8]))


def test_other_architectures_and_the_switch_use_the_models_forward(monkeypatch):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    monkeypatch.setenv("RLSC_FAST_DECODE", "0")
    assert not decode_step.supports(model)
    monkeypatch.delenv("RLSC_FAST_DECODE")
    model.config.hidden_act = "gelu"
    assert not decode_step.supports(model)
    model.config.hidden_act = "silu"
    model.config.model_type = "gemma"
    assert not decode_step.supports(model)
    assert not decode_step.supports(torch.nn.Sequential(model))  # a wrapper without a config


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_rollouts_are_the_same_either_way(monkeypatch, family, glue):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), family=family, seed=3)

    def rollouts():
        return generate_rollouts(model, tok, PROMPTS, k=1, temperature=1.0, max_new_tokens=12, greedy=True)

    written = rollouts()
    monkeypatch.setenv("RLSC_FAST_DECODE", "0")
    own = rollouts()
    assert torch.equal(written.completion_ids, own.completion_ids)
    torch.testing.assert_close(written.token_logprobs, own.token_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@torch.no_grad()
def test_a_lora_wrapped_model_decodes_through_its_adapters(precision, glue):
    """The step calls the model's own projection modules, so a peft adapter (non-zero here) and
    the decode kernels' layer forwards apply as in the model's forward."""
    from rlsc.config import ModelConfig
    from rlsc.decoding import decode_kernel
    from rlsc.models import attach_lora

    tok = build_tiny_tokenizer()
    model = attach_lora(build_tiny_model(len(tok), family="qwen2"), ModelConfig(lora={"enabled": True, "r": 4, "alpha": 8}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5)
    model.eval()
    assert decode_step.supports(model)
    with decode_kernel(model, precision):
        written, own, rows = _states(model, tok, PROMPTS[:1], k=3, reserve=4)
        for _ in range(4):
            tokens = torch.randint(3, len(tok), (rows,))
            torch.testing.assert_close(written.step(tokens), own.step(tokens), rtol=1e-5, atol=1e-5)


def test_rotary_in_three_ops_equals_transformers_rotate_half_formula():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    angles = torch.rand(5, 8) * 10
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    # transformers' layout: [batch, heads, seq, D] with cos/sin [batch, seq, D]; here each row is a batch of one position
    expected_q, expected_k = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None])
    factors = decode_step.rotary_factors(cos[:, None], sin[:, None])
    torch.testing.assert_close(decode_step.rotate(q, *factors), expected_q[:, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(decode_step.rotate(k, *factors), expected_k[:, :, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("prompts,k", [(PROMPTS[:1], 4), (PROMPTS, 2)], ids=["one-prompt-shared", "three-prompts-per-row"])
@torch.no_grad()
def test_layer_plans_give_the_module_calls_logits(precision, prompts, k, glue):
    """Inside decode_kernel every product can skip its module call (LayerPlan): the same kernels
    on the same weights, so the same logits as calling the modules, as rows leave."""
    from rlsc.decoding import decode_kernel, direct_product

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), family="qwen2", hidden=64, layers=2)  # q/k/v biases: Qwen2's
    with decode_kernel(model, precision):
        on_kernels = direct_product(model.model.layers[0].mlp.down_proj) is not None
        if glue == "torch" or not on_kernels:
            written, _, _ = _states(model, tok, prompts, k, reserve=6)
            assert written.plans is None  # plans run with the native glue, on the kernels only
            return
        planned, _, rows = _states(model, tok, prompts, k, reserve=6)
        through_modules, _, _ = _states(model, tok, prompts, k, reserve=6)
        through_modules.plans = None
        assert planned.plans is not None
        _compare_steps(tok, planned, through_modules, rows, steps=6)
    assert direct_product(model.model.layers[0].mlp.down_proj) is None  # the block closed: nothing left behind
