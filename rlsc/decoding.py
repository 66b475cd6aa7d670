"""Two speedups of the decoding loop on CPU, each measured with bench/profile.py.

A KV cache that grows in place instead of by concatenation: transformers' DynamicCache appends
each decode step's keys and values with `torch.cat`, which copies the whole cache of every layer on every token: for 16 rows that is most of a step's memory
traffic after the weights (measured: 13% of SmolLM2's sampling time). Here each layer keeps a
buffer with room for `reserve` more positions; a step writes its slot and the layer's keys/values
are views of the filled part. Values are bit-identical to DynamicCache's (tested).

A prepacked LM head: with 16 rows per decode step, MKL's fp32 GEMM streams the vocabulary
projection (49k-152k x hidden) from memory at about a third of the copy bandwidth; oneDNN on a
copy of the weight made once per sampling call ran Qwen's head 2.1x faster in isolation (one
thread) and sampling 15-20% faster at one thread; at two threads the speed benchmark saw no
difference beyond its noise (bench/RESULTS.md). The copy costs the head's size in memory while
sampling. Logits agree with the plain projection to float rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare positions."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._key_buffer is None or self.length + new > self._key_buffer.shape[-2]:
            self._grow(key_states, value_states, self.length + new + self.reserve)
        self._key_buffer[..., self.length : self.length + new, :] = key_states
        self._value_buffer[..., self.length : self.length + new, :] = value_states
        self.length += new
        self._refresh_views()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        def bigger(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            shape = (*like.shape[:-2], capacity, like.shape[-1])
            buffer = like.new_empty(shape)
            if old is not None and self.length:
                buffer[..., : self.length, :] = old[..., : self.length, :]
            return buffer

        self._key_buffer = bigger(self._key_buffer, key_states)
        self._value_buffer = bigger(self._value_buffer, value_states)

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._key_buffer = self._key_buffer[indices, ...]
            self._value_buffer = self._value_buffer[indices, ...]
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove and self.length:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh_views()

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self.length = 0
        super().reset()


class ReservedCache(DynamicCache):
    """A DynamicCache of ReservedLayers: `reserve` = the positions the caller will still append."""

    def __init__(self, reserve: int):
        Cache.__init__(self, layer_class_to_replicate=partial(ReservedLayer, reserve))


def _can_prepack(head) -> bool:
    weight = getattr(head, "weight", None)
    # a forward already set on the instance is a hook (accelerate's device placement): leave it be
    return (type(head) is torch.nn.Linear and "forward" not in vars(head) and weight is not None
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def prepacked_lm_head(model) -> Iterator[None]:
    """Within the block (no gradients), the model's output projection runs on a oneDNN copy of
    its weight; anywhere that is not a plain fp32 Linear on CPU it is left alone."""
    head = model.get_output_embeddings()
    if not _can_prepack(head):
        yield
        return
    packed = head.weight.detach().to_mkldnn()  # a copy: the weights may change after the block
    bias = None if head.bias is None else head.bias.detach()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, packed, bias, "none", [], "")

    head.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward
