"""The decoding loop's speedups: the in-place KV cache holds exactly what transformers' DynamicCache
holds; the fp32 and bf16 (AMX) kernels compute what an independent float64 product computes."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("outer,inner", [(1, 1), (2, 7), (3, 8), (7, 9), (5, 16), (4, 47), (12, 33), (130, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("build", ["this CPU's", "AVX2"])
def test_skinny_kernel_equals_a_float64_matmul(rows, outer, inner, with_bias, build, skinny_kernel):
    """Every edge of the 4x3 blocking (rows and weight rows short of a block, inner sizes short of
    and past a multiple of 8 and of 16) against an independent float64 product; x a strided slice.
    Both builds: AVX-512 CPUs run the 16-float one, and the AVX2 one where that is all there is."""
    from rlsc.decoding import AVX2_FLAGS, KERNEL_SOURCE, load_kernel

    kernel = skinny_kernel if build == "this CPU's" else load_kernel(KERNEL_SOURCE, AVX2_FLAGS)
    assert kernel is not None
    g = torch.Generator().manual_seed(rows * 1000 + outer * 10 + inner)
    wide = torch.randn(rows, inner + 5, generator=g)
    x = wide[:, 2:2 + inner]  # row stride inner + 5: the kernel honours it
    weight, bias = torch.randn(outer, inner, generator=g), torch.randn(outer, generator=g) if with_bias else None
    out = torch.full((rows, outer), float("nan"))
    kernel(x, weight, bias, out)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * inner ** 0.5)


def test_decode_kernel_matches_the_plain_model_and_is_restored(tiny_policy, monkeypatch, skinny_kernel):
    from rlsc import decoding
    from rlsc.decoding import MAX_KERNEL_ROWS, decode_kernel

    kernel, calls = skinny_kernel, []
    monkeypatch.setattr(decoding, "skinny_kernel", lambda: lambda *a: calls.append(1) or kernel(*a))
    model, _ = tiny_policy
    ids = torch.randint(0, model.config.vocab_size, (6, 1))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        plain = model(ids).logits
        with decode_kernel(model):
            assert all("forward" in vars(m) for m in linears)
            fast = model(ids).logits
            long_input = torch.randn(MAX_KERNEL_ROWS + 1, linears[0].in_features)
            assert torch.equal(linears[0](long_input), torch.nn.functional.linear(long_input, linears[0].weight,
                                                                                 linears[0].bias))  # torch's path
    with decode_kernel(model):  # autograd on: torch's path, so gradients flow
        assert model(ids).logits.requires_grad
    assert not any("forward" in vars(m) for m in linears)  # the class's forward again
    assert torch.allclose(fast, plain, atol=1e-5)
    assert len(calls) >= len(linears)  # the kernel really ran, once per layer at least


def test_kernel_calls_are_named_in_a_profile_only_while_one_records(tiny_policy, skinny_kernel):
    from torch.profiler import profile

    from rlsc.decoding import decode_kernel

    model, _ = tiny_policy
    ids = torch.randint(0, model.config.vocab_size, (4, 1))
    with torch.no_grad(), decode_kernel(model):
        plain = model(ids).logits
        with profile() as prof:
            profiled = model(ids).logits
    names = {event.name for event in prof.events()}
    assert "rlsc::skinny_linear" in names
    assert torch.equal(plain, profiled)


def test_sampling_with_the_decode_kernel_draws_the_same_tokens(tiny_policy, monkeypatch, skinny_kernel):
    import contextlib

    from rlsc import sampling

    model, tok = tiny_policy
    prompts = ["[user]what is 2+3?<eos>[assistant]"]

    def sample():
        torch.manual_seed(3)
        return sampling.generate_rollouts(model, tok, prompts, k=4, temperature=1.0, max_new_tokens=10)

    fast = sample()
    monkeypatch.setattr(sampling, "decode_kernel", lambda model, precision: contextlib.nullcontext())
    plain = sample()
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.allclose(fast.token_logprobs, plain.token_logprobs, atol=1e-5)


def test_a_failing_compiler_turns_the_kernel_off_with_a_warning(tmp_path, monkeypatch, caplog):
    """No half-built library is left behind, and the model still runs (torch's matmul)."""
    from rlsc import decoding

    monkeypatch.setenv("RLSC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    decoding.kernel_library.cache_clear()
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel is off on this CPU before any compiler runs")
    try:
        with caplog.at_level("WARNING", logger="rlsc.decoding"):
            assert decoding.skinny_kernel() is None
        assert "skinny_linear.c off" in caplog.text and "false" in caplog.text
        assert list(tmp_path.rglob("*.so*")) == []
    finally:
        decoding.kernel_library.cache_clear()


def test_the_kernel_can_be_switched_off(monkeypatch):
    from rlsc import decoding

    monkeypatch.setenv("RLSC_DECODE_KERNEL", "0")
    decoding.kernel_library.cache_clear()
    try:
        assert decoding.skinny_kernel() is None
    finally:
        decoding.kernel_library.cache_clear()


def _bf16_product(x, weight, bias):
    """The bf16 kernel's contract, computed independently: x and w rounded to bf16, summed in float64."""
    out = x.bfloat16().double() @ weight.bfloat16().double().T
    return out + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("rows", [1, 5, 15, 16, 17, 37, 64])
@pytest.mark.parametrize("outer,inner", [(16, 32), (32, 64), (48, 96), (80, 32), (160, 896)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_amx_kernel_equals_a_float64_product_of_bf16_values(rows, outer, inner, with_bias, amx_kernel):
    """Row counts short of, at and past a 16-row tile; one or two 16-row weight tiles per task and
    an odd number of tiles; x a strided slice."""
    g = torch.Generator().manual_seed(rows * 1000 + outer * 10 + inner)
    wide = torch.randn(rows, inner + 5, generator=g)
    x = wide[:, 2:2 + inner]
    weight, bias = torch.randn(outer, inner, generator=g), torch.randn(outer, generator=g) if with_bias else None
    out = torch.full((rows, outer), float("nan"))
    amx_kernel(x, weight.bfloat16(), bias, out)
    expected = _bf16_product(x, weight, bias)
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5 * inner ** 0.5)


def test_bf16_decoding_reads_bf16_weights_on_every_path_and_is_restored():
    """Few rows of a tile-shaped layer (the AMX kernel where there is one), many rows, and a shape
    the tiles do not take all give the bf16 product, not the fp32 one; grad-enabled calls run fp32;
    afterwards the layers and their fp32 weights are as before."""
    from rlsc.decoding import MAX_KERNEL_ROWS, decode_kernel

    torch.manual_seed(0)
    tiled, odd = torch.nn.Linear(64, 32), torch.nn.Linear(32, 24, bias=False)  # odd: 24 is no whole tile
    model = torch.nn.Sequential(tiled, odd)
    before = [p.detach().clone() for p in model.parameters()]
    cases = {"few rows": (tiled, torch.randn(5, 64)), "many rows": (tiled, torch.randn(MAX_KERNEL_ROWS + 3, 64)),
             "odd shape": (odd, torch.randn(5, 32))}
    with torch.no_grad(), decode_kernel(model, "bf16"):
        outputs = {name: layer(x) for name, (layer, x) in cases.items()}
    for name, (layer, x) in cases.items():
        out, fp32 = outputs[name].double(), x.double() @ layer.weight.double().T
        expected = _bf16_product(x, layer.weight, layer.bias)
        assert outputs[name].dtype == torch.float32, name
        # torch's bf16 matmul rounds its output to bf16 (the AMX kernel does not): 2^-8 relative
        assert torch.allclose(out, expected, rtol=2 ** -8, atol=2 ** -8), name
        assert (out - (fp32 + (layer.bias.double() if layer.bias is not None else 0))).abs().max() > 1e-4, name
    with decode_kernel(model, "bf16"):  # autograd on: torch's fp32 path, so gradients flow
        x = cases["few rows"][1]
        assert torch.equal(tiled(x), torch.nn.functional.linear(x, tiled.weight, tiled.bias))
    assert not any("forward" in vars(m) for m in model)
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(before, model.parameters()))


def test_a_nested_decode_context_leaves_the_outer_one_in_place(monkeypatch):
    """The trainer wraps a round's generate calls in one context (one bf16 cast per round); each
    call's own context then finds the layers taken and changes nothing."""
    from rlsc.decoding import decode_kernel

    layer = torch.nn.Linear(32, 16)
    with decode_kernel(layer, "bf16"):
        outer = vars(layer)["forward"]
        with decode_kernel(layer, "bf16"):
            assert vars(layer)["forward"] is outer
        assert vars(layer)["forward"] is outer
    assert "forward" not in vars(layer)


def test_bf16_sampling_records_the_bf16_policys_logprobs(tiny_policy):
    """p_old is the probability under the policy that drew the sample: the recorded log-probs are
    close to (not equal to) the fp32 model's, and the samples are valid token sequences."""
    from rlsc.sampling import generate_rollouts
    from rlsc.scoring import completion_token_logprobs

    model, tok = tiny_policy
    torch.manual_seed(4)
    r = generate_rollouts(model, tok, ["[user]what is 2+3?<eos>[assistant]"], k=4, temperature=1.0,
                          max_new_tokens=10, precision="bf16")
    with torch.no_grad():
        fp32, _ = completion_token_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                            r.completion_mask, temperature=1.0)
    mask = r.completion_mask.bool()
    gap = (r.token_logprobs - fp32)[mask].abs()
    assert gap.max() < 0.1 and gap.max() > 0


class _Block(torch.nn.Module):
    """The sibling layout of transformers' attention and gated MLP: q/k/v (biased, as in Qwen2) and gate/up."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = torch.nn.Linear(64, 32), torch.nn.Linear(64, 16), torch.nn.Linear(64, 16)
        self.gate_proj, self.up_proj = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 48, bias=False)


def test_sibling_layers_share_one_bf16_product_whatever_the_call_order(monkeypatch):
    """q/k/v called in order on one input cost one product (gate/up likewise) and each gets its own
    bf16 product; out of order or on another input each member still gets its own."""
    from rlsc import decoding

    torch.manual_seed(0)
    block, calls = _Block(), []
    product = decoding._bf16_product
    monkeypatch.setattr(decoding, "_bf16_product", lambda x, w, b, amx: calls.append(w.shape) or product(x, w, b, amx))
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    x, other = torch.randn(5, 64), torch.randn(5, 64)
    with torch.no_grad(), decoding.decode_kernel(block, "bf16"):
        in_order = {name: getattr(block, name)(x) for name in names}
        assert calls == [(64, 64), (96, 64)]  # one product per sibling group
        out_of_order = {"v_proj": block.v_proj(other), "k_proj": block.k_proj(x), "q_proj": block.q_proj(other)}
    for outputs, inputs in ((in_order, {n: x for n in names}), (out_of_order, {"v_proj": other, "k_proj": x, "q_proj": other})):
        for name, out in outputs.items():
            layer = getattr(block, name)
            expected = _bf16_product(inputs[name], layer.weight, layer.bias)
            assert out.shape == expected.shape and torch.allclose(out.double(), expected, rtol=2 ** -8, atol=2 ** -8), name
    assert not any("forward" in vars(m) for m in block.modules())


def test_fusing_siblings_leaves_a_real_models_logits_as_they_were(tiny_policy, monkeypatch):
    """On a transformers Llama the fused products give the logits the per-layer bf16 products give."""
    from rlsc import decoding

    model, _ = tiny_policy
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(decoding.sibling_groups(model, layers)) == 2 * model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (4, 7))

    def logits():
        with torch.no_grad(), decoding.decode_kernel(model, "bf16"):
            return model(input_ids=ids).logits

    fused = logits()
    monkeypatch.setattr(decoding, "SIBLINGS", ())
    assert torch.allclose(fused, logits(), rtol=1e-5, atol=1e-5)
