"""The sampling loop's decode step for Llama-family decoders (Llama, Qwen2), written out.

Why: with 16 rows a decode step of a small model is mostly not its weights. SmolLM2-135M's bf16
step took 48-52 ms through transformers' forward where reading its 270 MB of bf16 weights takes
~11: the rest was the kernels' per-call cost, eager per-op cost, transformers' per-layer Python
(mask building, kwargs plumbing, decorators, module hooks) and attention that read the shared
prompt's keys and values once per row. Written out, the step takes 8-15% less (42-45 ms in the
same hour; bench/RESULTS.md, stop 17); Qwen2.5-0.5B's, bound by its 2 GB of weights, does not
change. This step keeps the model's own modules for everything that holds weights (embedding,
projections, norms' weights, LM head; so LoRA adapters and rlsc/decoding.py's kernels apply
unchanged) and the model's own rotary module, and writes out only the glue between them:

- RMSNorm as one `rms_norm` call, rotary embedding in three ops, the scores' scaling folded
  into the query's rotation;
- keys and values of the completion in one buffer for all layers, [L, rows, kv heads, C, D],
  written in place; rows that finish leave with one copy of the filled positions;
- attention in two parts merged under one softmax: the prompt part and the row's own completion.
  When every row samples the same prompt (one question, k samples: the benchmark workload and
  any single-question round), the prompt's keys and values are held once, not once per row, and
  all rows' queries of a kv head multiply them in one product; otherwise (several prompts) each
  row holds its prompt's copy, as transformers' cache would.

Anything else (another architecture, sliding-window layers, an activation other than SiLU,
RLSC_FAST_DECODE=0) decodes through the model's own forward. The step is tested against that
forward's logits for Llama (tied and untied) and Qwen2, shared and per-row prompts, rows leaving
(tests/unit/test_decode_step.py).
"""

from __future__ import annotations

import os

import torch

from rlsc.decoding import ReservedCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def unwrapped(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports(model) -> bool:
    """Whether `DecodeStep` reproduces this model's forward (else the model's own forward runs)."""
    if os.environ.get("RLSC_FAST_DECODE", "1") == "0":
        return False
    base = unwrapped(model)
    config = getattr(base, "config", None)  # None under a wrapper this module does not know
    decoder = getattr(base, "model", None)
    return (config is not None and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "use_sliding_window", False)
            and all(t == "full_attention" for t in (getattr(config, "layer_types", None) or []))
            and all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and hasattr(base, "lm_head"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotary_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with its first half negated): rotate(x) = x*cos + roll(x, D/2)*that, since
    rotate_half(x) = (-x2, x1) = roll(x, D/2) with the first half negated."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None):
    """Rotary embedding of x [rows, heads, D]: x*cos + rotate_half(x)*sin, in three ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin, out=out)


class DecodeStep:
    """Decode state after the prompts' prefill: `step(tokens)` feeds one token per active row and
    returns the next-token logits; `keep(rows)` drops the rows that finished.

    cache, prompt_mask: the prefill's cache ([Q, kv heads, P, D] per layer) and its [Q, P] mask;
    k rows per prompt; room for `reserve` completion tokens.
    """

    def __init__(self, model, cache: ReservedCache, prompt_mask: torch.Tensor, k: int, reserve: int):
        base = unwrapped(model)
        decoder = base.model
        self.layers, self.final_norm = list(decoder.layers), decoder.norm
        self.embed, self.rotary, self.head = decoder.embed_tokens, decoder.rotary_emb, base.lm_head
        attn = self.layers[0].self_attn
        self.head_dim, self.groups, self.scaling = attn.head_dim, attn.num_key_value_groups, attn.scaling
        n_prompts = prompt_mask.shape[0]
        self.shared = n_prompts == 1  # one prompt: its keys/values once for all rows
        repeats = 1 if self.shared else k
        self.prompt_keys = torch.stack([layer.keys for layer in cache.layers]).repeat_interleave(repeats, dim=1)
        self.prompt_values = torch.stack([layer.values for layer in cache.layers]).repeat_interleave(repeats, dim=1)
        mask = prompt_mask.repeat_interleave(repeats, dim=0).bool()
        # additive mask of the prompt's padding, [prompt rows, 1, 1, P]; None when there is none
        self.prompt_bias = None if mask.all() else self.prompt_keys.new_zeros(mask.shape) \
            .masked_fill(~mask, float("-inf"))[:, None, None, :]
        self.positions = prompt_mask.sum(-1).repeat_interleave(k)  # next position of each row
        layers, _, kv_heads, _, dim = self.prompt_keys.shape
        rows = n_prompts * k
        self.keys = self.prompt_keys.new_empty(layers, rows, kv_heads, reserve, dim)
        self.values = self.prompt_values.new_empty(layers, rows, kv_heads, reserve, dim)
        self.filled = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` go on decoding: their filled positions move into smaller buffers (copying
        the whole reserved buffers of every layer whenever a row finished, as the cache did, took
        3.6 ms per SmolLM2 step in stop 17's profile)."""
        shape = (self.keys.shape[0], len(rows), *self.keys.shape[2:])
        keys, values = self.keys.new_empty(shape), self.values.new_empty(shape)
        keys[:, :, :, : self.filled] = self.keys[:, rows, :, : self.filled]
        values[:, :, :, : self.filled] = self.values[:, rows, :, : self.filled]
        self.keys, self.values = keys, values
        self.positions = self.positions[rows]
        if not self.shared:
            self.prompt_keys, self.prompt_values = self.prompt_keys[:, rows], self.prompt_values[:, rows]
            self.prompt_bias = None if self.prompt_bias is None else self.prompt_bias[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] (float32) of the position after `tokens` [rows]."""
        if self.filled == self.keys.shape[3]:
            raise RuntimeError(f"decode step beyond the {self.filled} reserved positions")
        h = self.embed(tokens)
        cos, sin = self.rotary(h, self.positions[None, :])
        key_rotation = rotary_factors(cos[0, :, None, :], sin[0, :, None, :])  # [rows, 1, D]: over heads
        query_rotation = tuple(f * self.scaling for f in key_rotation)  # the scores' scaling, folded in
        for index, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_layernorm)
            h = h + self._attention(index, layer.self_attn, x, query_rotation, key_rotation)
            x, mlp = rms_norm(h, layer.post_attention_layernorm), layer.mlp
            h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # hidden_act: silu
        self.filled += 1
        self.positions = self.positions + 1
        return self.head(rms_norm(h, self.final_norm)).float()

    def _attention(self, index: int, attn: torch.nn.Module, x: torch.Tensor, query_rotation, key_rotation):
        rows, t = x.shape[0], self.filled
        q = rotate(attn.q_proj(x).view(rows, -1, self.head_dim), *query_rotation)  # q * scaling
        rotate(attn.k_proj(x).view(rows, -1, self.head_dim), *key_rotation, out=self.keys[index, :, :, t])
        self.values[index, :, :, t] = attn.v_proj(x).view(rows, -1, self.head_dim)
        kv_heads = self.keys.shape[2]
        q = q.view(rows, kv_heads, self.groups, self.head_dim)  # head h reads kv head h // groups
        own_keys, own_values = self.keys[index, :, :, : t + 1], self.values[index, :, :, : t + 1]
        prompt_scores = self._prompt_scores(index, q)  # [rows, kv heads, groups, P]
        own_scores = torch.matmul(q, own_keys.transpose(-1, -2))  # [..., t + 1]
        probs = torch.softmax(torch.cat((prompt_scores, own_scores), dim=-1), dim=-1, dtype=torch.float32)
        probs = probs.to(q.dtype)
        prompt_len = prompt_scores.shape[-1]
        out = self._prompt_mix(index, probs[..., :prompt_len]) + torch.matmul(probs[..., prompt_len:], own_values)
        return attn.o_proj(out.reshape(rows, -1))

    def _prompt_scores(self, index: int, q: torch.Tensor) -> torch.Tensor:
        scores = self._with_prompt(q, self.prompt_keys[index].transpose(-1, -2))
        return scores if self.prompt_bias is None else scores + self.prompt_bias

    def _prompt_mix(self, index: int, probs: torch.Tensor) -> torch.Tensor:
        return self._with_prompt(probs, self.prompt_values[index])

    def _with_prompt(self, a: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """a [rows, kv heads, groups, X] @ prompt [1 or rows, kv heads, X, Y] -> [rows, kv heads, groups, Y].
        Shared prompt: every row's vectors of a kv head in one product, [kv heads, rows*groups, X]."""
        if not self.shared:
            return torch.matmul(a, prompt)
        rows, kv_heads, groups, width = a.shape
        flat = a.transpose(0, 1).reshape(kv_heads, rows * groups, width)
        return torch.matmul(flat, prompt[0]).view(kv_heads, rows, groups, -1).transpose(0, 1)
