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

Where rlsc/kernels/decode_glue.c builds (x86-64 with AVX2 and a C compiler, as the decode kernel)
and the model is fp32 on CPU, that glue runs as three C calls per layer (RMSNorm with the residual
add; rotary, the key/value write and attention; SiLU(gate) * up) instead of ~40 eager torch ops,
and where every projection of the layers is on rlsc/decoding.py's kernels (inside decode_kernel,
no adapter) a LayerPlan calls the kernels itself: no module call and no allocation per product.
SmolLM2's 16-row decode step, bf16: 35 -> 28 (glue) -> 21 ms (plans); fp32: 62 -> 51 -> 42 ms
(ad hoc, stop 18; bench/RESULTS.md). Elsewhere (GPU, other dtypes, RLSC_DECODE_GLUE=0) the glue
runs as torch ops and the modules are called.

Anything else (another architecture, sliding-window layers, an activation other than SiLU,
RLSC_FAST_DECODE=0) decodes through the model's own forward. The step is tested against that
forward's logits for Llama (tied and untied) and Qwen2, shared and per-row prompts, rows leaving
(tests/unit/test_decode_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from rlsc.decoding import MAX_KERNEL_ROWS, ReservedCache, direct_product, glue_library

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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """t as 2-D rows whose elements are contiguous (a slice of a fused product keeps its row stride)."""
    t = t.reshape(t.shape[0], -1)
    return t if t.stride(-1) == 1 else t.contiguous()


class NativeGlue:
    """rlsc/kernels/decode_glue.c on fp32 CPU tensors: the decode step's RMSNorm with the residual
    add, one layer's attention of the new position and SiLU(gate) * up; and the sampling loop's
    per-step draw and statistics (step_statistics, for rlsc/sampling.py's StepRecorder)."""

    def __init__(self, library: ctypes.CDLL):
        i64, p, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._norm, self._silu_mul, self._attention = (
            library.rlsc_add_rms_norm, library.rlsc_silu_mul, library.rlsc_decode_attention)
        self._norm.argtypes = [p, p, p, f32, p, i64, i64]
        self._silu_mul.argtypes = [p, i64, p, i64, p, i64, i64, ctypes.c_int]
        self._attention.argtypes = [p, i64, p, i64, p, i64, p, p, f32, p, p, p, i64, i64, i64, p, p, i64, i64,
                                    i64, p, i64, i64, i64, i64, ctypes.c_int]
        self._statistics = library.rlsc_step_statistics
        self._statistics.argtypes = [p, i64, i64, f32, p, p, i64, p, p, p, p, p, p, p, ctypes.c_int]
        for f in (self._norm, self._silu_mul, self._attention, self._statistics):
            f.restype = None
        self._probs = torch.empty(0)  # step_statistics' p table, reused step after step

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module,
                 x: torch.Tensor | None = None):
        """(h + delta, RMSNorm of it, into x where given): h is updated in place."""
        x = torch.empty_like(h) if x is None else x
        delta = None if delta is None else delta.contiguous()
        self._norm(h.data_ptr(), _ptr(delta), norm.weight.data_ptr(), norm.variance_epsilon, x.data_ptr(),
                   h.shape[0], h.shape[1])
        return h, x

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = _rows_of(gate), _rows_of(up)
        out = torch.empty(gate.shape, dtype=torch.float32) if out is None else out
        self._silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), *gate.shape,
                       torch.get_num_threads())
        return out

    def attention(self, q, k, v, rotation, scale, prompt_keys, prompt_values, prompt_keep, keys, values, t, out=None):
        """Attention output [rows, heads * D] of position t; writes the rotated k and v at t.
        prompt_keys [1 or rows, kv heads, P' / 16, D, 16] and keys [rows, kv heads, capacity' / 16,
        D, 16] in blocks of 16 columns (as_key_blocks); prompt_values [1 or rows, kv heads, P, D],
        values [rows, kv heads, capacity, D]."""
        q, k, v = _rows_of(q), _rows_of(k), _rows_of(v)
        cos, signed_sin = rotation
        rows, kv_heads, capacity, dim = values.shape
        out = torch.empty(rows, q.shape[1], dtype=torch.float32) if out is None else out
        self._attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                        cos.data_ptr(), signed_sin.data_ptr(), scale, prompt_keys.data_ptr(),
                        prompt_values.data_ptr(), _ptr(prompt_keep), prompt_values.shape[0], prompt_values.shape[2],
                        prompt_keys.shape[2] * 16, keys.data_ptr(), values.data_ptr(), keys.shape[2] * 16, capacity, t,
                        out.data_ptr(), rows, q.shape[1] // dim,
                        kv_heads, dim, torch.get_num_threads())
        return out

    def step_statistics(self, logits: torch.Tensor, temperature: float, uniforms: torch.Tensor | None,
                        groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(drawn tokens [rows], {statistic: [rows]}, agreement [n_groups]) of one sampling step from
        logits [rows, V]: the draw by inverse CDF with one float64 uniform per row (None: greedy);
        the statistics as rlsc/sampling.py's StepRecorder.record computes them in torch."""
        logits, groups = logits.contiguous(), groups.contiguous()
        rows, vocab = logits.shape
        if self._probs.numel() < rows * vocab:
            self._probs = torch.empty(rows * vocab)
        chosen = torch.empty(rows, dtype=torch.int64)
        values = {name: torch.empty(rows) for name in
                  ("token_logprobs", "token_entropy", "token_max_prob", "token_self_certainty")}
        agreement = torch.empty(n_groups)
        self._statistics(logits.data_ptr(), rows, vocab, temperature, _ptr(uniforms), groups.data_ptr(), n_groups,
                         self._probs.data_ptr(), chosen.data_ptr(), *(v.data_ptr() for v in values.values()),
                         agreement.data_ptr(), torch.get_num_threads())
        return chosen, values, agreement


class Products:
    """The products of some layers that read one input (q/k/v, gate/up, or one layer), straight on
    the decode kernels (rlsc/decoding.py's Direct): no module call, no per-call allocation. The
    outputs land in buffers held for the current row count and come back as views."""

    def __init__(self, directs: list, buffers: dict, role: str):
        self.pool, self.role = buffers, role
        if directs[0].fused is not None:  # one fused product; each layer takes its columns
            self.products = [directs[0][:3]]
            self.columns = [(0, d.columns) for d in directs]
        else:
            self.products = [d[:3] for d in directs]
            self.columns = [(i, slice(None)) for i in range(len(directs))]
        self.rows = -1

    @staticmethod
    def of(layers: list[torch.nn.Module], buffers: dict, role: str):
        """Products of these layers, or None where one of them is not on a kernel (a LoRA wrapper,
        a shape the kernel does not take) or only some of them are one fused group. Products of the
        same role in every decoder layer share `buffers` (each output is read before the next
        layer's overwrites it), so they stay in cache."""
        directs = [direct_product(layer) for layer in layers]
        if any(d is None for d in directs) or len({d.fused for d in directs}) != 1:
            return None
        return Products(directs, buffers, role)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[0] != self.rows:
            self._hold(x.shape[0])
        for (kernel, weight, bias), out in zip(self.products, self.buffers):
            kernel(x, weight, bias, out)
        return self.outputs

    def _hold(self, rows: int) -> None:
        self.rows = rows
        self.buffers = [self.pool.setdefault((self.role, i, rows, weight.shape[0]), torch.empty(rows, weight.shape[0]))
                        for i, (_, weight, _) in enumerate(self.products)]
        self.outputs = [self.buffers[i][:, columns] for i, columns in self.columns]


class LayerPlan:
    """A decoder layer's four products on the kernels: q/k/v, o, gate/up, down."""

    def __init__(self, qkv: Products, o: Products, gate_up: Products, down: Products):
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down

    @staticmethod
    def of(layer: torch.nn.Module, buffers: dict):
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
                  "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}
        parts = [Products.of(members, buffers, role) for role, members in groups.items()]
        return None if any(p is None for p in parts) else LayerPlan(*parts)


@functools.cache
def native_glue() -> NativeGlue | None:
    library = glue_library()
    return None if library is None else NativeGlue(library)


def padded_to_16(n: int) -> int:
    return -(-n // 16) * 16


def as_key_blocks(keys: torch.Tensor) -> torch.Tensor:
    """keys [..., P, D] in blocks of 16 columns [..., P' / 16, D, 16] (decode_glue.c's layout),
    P' = P padded to a multiple of 16 with zeros."""
    count, dim = keys.shape[-2:]
    padded = keys.new_zeros(*keys.shape[:-2], padded_to_16(count), dim)
    padded[..., :count, :] = keys
    return padded.unflatten(-2, (-1, 16)).transpose(-1, -2).contiguous()


class DecodeStep:
    """Decode state after the prompts' prefill: `step(tokens)` feeds one token per active row and
    returns the next-token logits; `keep(rows)` drops the rows that finished.

    cache, prompt_mask: the prefill's cache ([Q, kv heads, P, D] per layer) and its [Q, P] mask;
    k rows per prompt; room for `reserve` completion tokens.

    Keys and values of all layers: prompt_keys/values [L, 1 or rows, kv heads, P, D], keys/values
    [L, rows, kv heads, reserve, D]. Under the native glue the keys are held in blocks of 16
    columns instead ([..., P' / 16, D, 16], P' padded to 16; as_key_blocks): 16 keys' scores are
    then multiply-adds of whole vectors.
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
        # the prompt positions each prompt row attends (not its padding), [prompt rows, P]; None when
        # there is no padding (bool: the C glue reads it as bytes, 1 = attend)
        self.prompt_keep = None if mask.all() else mask.contiguous()
        self.positions = prompt_mask.sum(-1).repeat_interleave(k)  # next position of each row
        layers, _, kv_heads, _, dim = self.prompt_keys.shape
        rows = n_prompts * k
        self.values = self.prompt_values.new_empty(layers, rows, kv_heads, reserve, dim)
        self.filled = 0
        self.native = native_glue() if self._native_ready() else None
        # every product straight on the kernels where all of them are (decode_kernel's layers, few rows)
        buffers = {}  # the plans' outputs, shared by the layers
        plans = [LayerPlan.of(layer, buffers) for layer in self.layers] if self.native and rows <= MAX_KERNEL_ROWS else []
        self.plans = plans if plans and all(plans) else None
        if self.native is None:
            self.keys = self.prompt_keys.new_empty(layers, rows, kv_heads, reserve, dim)
        else:  # keys in blocks of 16 columns, positions padded to whole blocks (decode_glue.c)
            self.prompt_keys = as_key_blocks(self.prompt_keys)
            self.keys = self.prompt_keys.new_zeros(layers, rows, kv_heads, padded_to_16(reserve) // 16, dim, 16)

    def _native_ready(self) -> bool:
        """The C glue takes fp32 CPU tensors; anything else runs the torch glue."""
        tensors = [self.prompt_keys, *(layer.input_layernorm.weight for layer in self.layers)]
        return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` go on decoding: their filled positions move into smaller buffers (copying
        the whole reserved buffers of every layer whenever a row finished, as the cache did, took
        3.6 ms per SmolLM2 step in stop 17's profile)."""
        def kept(buffer: torch.Tensor, filled: int) -> torch.Tensor:  # axis 3: positions (or key blocks)
            smaller = buffer.new_empty(buffer.shape[0], len(rows), *buffer.shape[2:])
            smaller.narrow(3, 0, filled).copy_(buffer[:, rows].narrow(3, 0, filled))
            return smaller

        self.keys = kept(self.keys, self.filled if self.native is None else padded_to_16(self.filled) // 16)
        self.values = kept(self.values, self.filled)
        self.positions = self.positions[rows]
        if not self.shared:
            self.prompt_keys, self.prompt_values = self.prompt_keys[:, rows], self.prompt_values[:, rows]
            self.prompt_keep = None if self.prompt_keep is None else self.prompt_keep[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] (float32) of the position after `tokens` [rows]."""
        if self.filled == self.values.shape[3]:
            raise RuntimeError(f"decode step beyond the {self.filled} reserved positions")
        h = self.embed(tokens)
        cos, sin = self.rotary(h, self.positions[None, :])
        rotation = tuple(f.contiguous() for f in rotary_factors(cos[0], sin[0]))  # [rows, D] each
        if self.native is None:  # the torch glue's form: (key rotation, query rotation), over heads
            key_rotation = tuple(f[:, None, :] for f in rotation)  # [rows, 1, D]
            rotation = key_rotation, tuple(f * self.scaling for f in key_rotation)  # the scores' scaling, folded in
        h, delta = self._through_plans(h, rotation) if self.plans else self._through_modules(h, rotation)
        h, x = self._add_norm(h, delta, self.final_norm)
        self.filled += 1
        self.positions = self.positions + 1
        return self.head(x).float()

    def _through_modules(self, h: torch.Tensor, rotation) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers, calling the model's projection modules: (h before the last layer's
        MLP output is added, that output)."""
        delta = None  # what the last block adds to the residual stream h
        for index, layer in enumerate(self.layers):
            h, x = self._add_norm(h, delta, layer.input_layernorm)
            attn, mlp = layer.self_attn, layer.mlp
            out = self._attention(index, attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), rotation)
            h, x = self._add_norm(h, attn.o_proj(out), layer.post_attention_layernorm)
            delta = mlp.down_proj(self._silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))  # hidden_act: silu
        return h, delta

    def _through_plans(self, h: torch.Tensor, rotation) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layers with the native glue and every product straight on the kernels (LayerPlan):
        ~10 us of Python less per product and no allocation per call; h is updated in place."""
        glue, delta = self.native, None
        x, mixed, act = torch.empty_like(h), None, None
        for index, (layer, plan) in enumerate(zip(self.layers, self.plans)):
            glue.add_norm(h, delta, layer.input_layernorm, x)
            q, k, v = plan.qkv(x)
            mixed = self._attention(index, q, k, v, rotation, out=mixed)
            (o,) = plan.o(mixed)
            glue.add_norm(h, o, layer.post_attention_layernorm, x)
            act = glue.silu_mul(*plan.gate_up(x), out=act)
            (delta,) = plan.down(act)
        return h, delta

    # the glue between the modules: C where native_glue() runs (fp32 on CPU), torch elsewhere

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module):
        """(h + delta, RMSNorm of it)."""
        if self.native is not None:
            return self.native.add_norm(h, delta, norm)
        h = h if delta is None else h + delta
        return h, rms_norm(h, norm)

    def _silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.silu_mul(gate, up)
        return torch.nn.functional.silu(gate) * up

    def _attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotation,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [rows, heads * D] of the new position (into `out` where given, native
        glue), from the layer's projections; the rotated key and the value are written at position
        `filled` of the layer's buffers. rotation: step()'s form for this glue (native: (cos, signed
        sin) [rows, D]; torch: the key and query rotations over heads)."""
        if self.native is not None:
            return self.native.attention(q, k, v, rotation, self.scaling, self.prompt_keys[index],
                                         self.prompt_values[index], self.prompt_keep, self.keys[index],
                                         self.values[index], self.filled, out)
        rows, t = q.shape[0], self.filled
        key_rotation, query_rotation = rotation
        q = rotate(q.view(rows, -1, self.head_dim), *query_rotation)
        rotate(k.view(rows, -1, self.head_dim), *key_rotation, out=self.keys[index, :, :, t])
        self.values[index, :, :, t] = v.view(rows, -1, self.head_dim)
        kv_heads = self.keys.shape[2]
        q = q.view(rows, kv_heads, self.groups, self.head_dim)  # head h reads kv head h // groups
        own_keys, own_values = self.keys[index, :, :, : t + 1], self.values[index, :, :, : t + 1]
        prompt_scores = self._prompt_scores(index, q)  # [rows, kv heads, groups, P]
        own_scores = torch.matmul(q, own_keys.transpose(-1, -2))  # [..., t + 1]
        probs = torch.softmax(torch.cat((prompt_scores, own_scores), dim=-1), dim=-1, dtype=torch.float32)
        probs = probs.to(q.dtype)
        prompt_len = prompt_scores.shape[-1]
        out = self._prompt_mix(index, probs[..., :prompt_len]) + torch.matmul(probs[..., prompt_len:], own_values)
        return out.reshape(rows, -1)

    def _prompt_scores(self, index: int, q: torch.Tensor) -> torch.Tensor:
        scores = self._with_prompt(q, self.prompt_keys[index].transpose(-1, -2))
        return scores if self.prompt_keep is None else \
            scores.masked_fill(~self.prompt_keep[:, None, None, :], float("-inf"))  # padding

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
