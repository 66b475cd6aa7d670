"""Speedups of the decoding loop on CPU, each measured with bench/profile.py or bench/kernel.py.

A KV cache that grows in place instead of by concatenation: transformers' DynamicCache appends
each decode step's keys and values with `torch.cat`, which copies the whole cache of every layer on every token: for 16 rows that is most of a step's memory
traffic after the weights (measured: 13% of SmolLM2's sampling time). Here each layer keeps a
buffer with room for `reserve` more positions; a step writes its slot and the layer's keys/values
are views of the filled part. Values are bit-identical to DynamicCache's (tested).

A decode kernel for the linear layers: with k (~16) rows per decode step every linear layer is a
skinny matrix product whose cost is reading its weight. MKL's sgemm packs the weight on every
call at so few rows and streamed Qwen's weights at 2.1-4.7 GB/s here at 16 rows (read
bandwidth: 16-18 GB/s); rlsc/kernels/skinny_linear.c reads each weight once in its nn.Linear
layout (no copy), prefetching the next weight block while the current one is re-read from L1,
and streamed them 1.7-3.7x faster on the same shapes at two threads (`python -m bench.kernel`,
bench/RESULTS.md).
It is compiled with the system C compiler on first use into the model cache; where it cannot
run (not x86-64 with AVX2, no compiler, RLSC_DECODE_KERNEL=0) the layers run as before; where the
CPU has AVX-512 it is built for 16-float registers. Outputs agree with nn.Linear to float rounding
(a different summation order), not bit for bit.

bf16 decoding (sampling.precision = bf16, off by default): within the block every no-grad product
reads a bf16 copy of its weight, made as the block opens. On CPUs with AMX tiles the few-row
products run on the same source's tile kernel, which streams half the bytes and no longer waits
on arithmetic (1.8-2.5x the fp32 kernel's speed at 16 rows on Qwen's large layers,
bench/RESULTS.md); elsewhere, and for more rows, torch's bf16 matmul runs them. Sibling layers
(q/k/v, gate/up) share one concatenated copy and one product per input (FusedSiblings).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from rlsc.models import cache_root

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- the skinny-matrix decode kernel

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "skinny_linear.c"
GLUE_SOURCE = KERNEL_SOURCE.with_name("decode_glue.c")
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
AVX512_FLAGS = (*AVX2_FLAGS, "-mavx512f")  # the same C on 16-float registers (see skinny_linear.c)
AMX_FLAGS = (*AVX512_FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16")  # + the bf16 tile kernel
# `python -m bench.kernel` on Qwen's shapes, two threads (AVX2 EPYC): 1.7-3.7x torch's speed at 16 rows,
# 1.2-2.6x at 64, 1.0-1.7x at 128; above 64 the gain is small and MKL's blocking is the safer bet.
# Prefill (the prompt's tokens) and scoring have more rows and stay on MKL
MAX_KERNEL_ROWS = 64


def kernel_flags() -> tuple[str, ...]:
    """The compiler flags for this CPU: AVX-512 where torch finds it (avx512f/bw/vl/dq), with the
    AMX bf16 kernel where it also finds AMX tiles and avx512_bf16, else AVX2."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return AVX2_FLAGS
    return AMX_FLAGS if torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported() else AVX512_FLAGS


def _compile_kernel(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_file = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        # -lm after the source: libm brings glibc's vector math (libmvec) the glue's exp uses
        subprocess.run([compiler, *flags, "-o", str(partial_file), str(source), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial_file, target)  # whole or absent: a concurrent process never loads half a file
    finally:
        partial_file.unlink(missing_ok=True)


@functools.cache
def kernel_library() -> ctypes.CDLL | None:
    """The package's kernel source built for this CPU and loaded, or None where it cannot run (the
    reason logged once)."""
    if os.environ.get("RLSC_DECODE_KERNEL", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("decode kernel off: needs x86-64 with AVX2 (this CPU: %s %s)", platform.machine(),
                 torch.backends.cpu.get_cpu_capability())
        return None
    return load_library(KERNEL_SOURCE)


@functools.cache
def glue_library() -> ctypes.CDLL | None:
    """rlsc/kernels/decode_glue.c built for this CPU and loaded (rlsc/decode_step.py's native glue),
    or None where it cannot run: the same conditions as the kernel's, and RLSC_DECODE_GLUE=0."""
    if os.environ.get("RLSC_DECODE_GLUE", "1") == "0" or kernel_library() is None:
        return None
    return load_library(GLUE_SOURCE)


def skinny_kernel() -> Callable | None:
    """The fp32 kernel as f(x2d, weight, bias, out), or None where it cannot run."""
    library = kernel_library()
    return None if library is None else fp32_entry(library)


@functools.cache
def amx_kernel() -> Callable | None:
    """The bf16 AMX kernel as f(x2d, weight_bf16, bias, out), or None where the build has no AMX
    or Linux does not grant this process the tile state."""
    library = kernel_library()
    if library is None or not hasattr(library, "rlsc_skinny_linear_amx"):
        return None
    if library.rlsc_amx_ready() != 1:
        log.info("AMX kernel off: the kernel refused this process the AMX tile state (arch_prctl)")
        return None
    run = library.rlsc_skinny_linear_amx
    run.restype = None
    run.argtypes = [*_FP32_ARGTYPES, ctypes.c_void_p]

    scratch = torch.empty(0, dtype=torch.bfloat16)  # x packed into tiles; grown, then reused call after call

    def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
        nonlocal scratch
        (rows, inner), outer = x.shape, weight.shape[0]
        size = -(-rows // AMX_TILE_ROWS) * AMX_TILE_ROWS * inner
        if scratch.numel() < size:
            scratch = torch.empty(size, dtype=torch.bfloat16)
        run(x.data_ptr(), x.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), rows, outer, inner, torch.get_num_threads(), scratch.data_ptr())

    return amx_linear


def amx_shape_ok(outer: int, inner: int) -> bool:
    """Shapes the AMX kernel takes: whole 16-row weight tiles and whole 32-value k chunks."""
    return outer % AMX_TILE_ROWS == 0 and inner % 32 == 0


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source: Path, name: str, compiler: str, flags: tuple[str, ...] | None = None) -> ctypes.CDLL:
    """A C source compiled with `flags` (default: kernel_flags()) once per source, compiler and
    flags into the model cache as <name>-<key>.so, and loaded; raises OSError or SubprocessError
    where that fails."""
    flags = kernel_flags() if flags is None else flags
    key = hashlib.sha256(source.read_bytes() + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}-{key}.so"
    if not target.is_file():
        _compile_kernel(compiler, flags, source, target)
    return ctypes.CDLL(str(target))


def load_library(source: Path, flags: tuple[str, ...] | None = None) -> ctypes.CDLL | None:
    """A kernel source built (once per source, compiler and flags) and loaded; None if that fails."""
    compiler = c_compiler()
    if compiler is None:
        log.warning("%s off: no C compiler (cc/gcc) on PATH; sampling runs on torch alone", source.name)
        return None
    try:
        return build_library(source, source.stem, compiler, flags)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        log.warning("%s off: building it with %s failed (%s); sampling runs on torch alone",
                    source.name, compiler, str(detail).strip()[-400:])
        return None


_FP32_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
AMX_TILE_ROWS = 16


def fp32_entry(library: ctypes.CDLL) -> Callable:
    run = library.rlsc_skinny_linear
    run.restype = None
    run.argtypes = _FP32_ARGTYPES

    def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
        (rows, inner), outer = x.shape, weight.shape[0]
        run(x.data_ptr(), x.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), rows, outer, inner, torch.get_num_threads())

    return skinny_linear


def load_kernel(source: Path, flags: tuple[str, ...] | None = None) -> Callable | None:
    """The fp32 kernel of a source (built once per source, compiler and flags), or None if that fails.

    skinny_kernel() loads the package's own source for this CPU; bench.kernel also loads an older
    revision's, or the AVX2 build on an AVX-512 CPU, to time them against each other."""
    library = load_library(source, flags)
    return None if library is None else fp32_entry(library)


def _kernel_ready(linear: torch.nn.Module) -> bool:
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    # a forward already set on the instance is a hook (accelerate's device placement): leave it be
    return (type(linear) is torch.nn.Linear and "forward" not in vars(linear) and weight is not None
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))


def _torch_only(linear: torch.nn.Linear, x: torch.Tensor) -> bool:
    """Inputs the kernels leave to torch: not fp32 on CPU, or anything autograd sees (no backward)."""
    return (x.dtype != torch.float32 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1) if x.dim() else 0


def _on_kernel(kernel: Callable, name: str, weight: torch.Tensor, bias: torch.Tensor | None,
               x: torch.Tensor) -> torch.Tensor:
    """x [..., in] through a few-row kernel f(x2d, weight, bias, out) into a new fp32 [..., out]."""
    flat = x.reshape(_rows(x), x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    # named in profiles, which cannot see the call otherwise; only while one records (the
    # annotation costs 5 us a call, 121 calls a SmolLM2 decode step)
    with torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext():
        kernel(flat, weight, bias, out)
    return out.view(*x.shape[:-1], weight.shape[0])


def _kernel_forward(linear: torch.nn.Linear, kernel: Callable) -> Callable:
    plain = torch.nn.Linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _torch_only(linear, x) or not 0 < _rows(x) <= MAX_KERNEL_ROWS:
            return plain(linear, x)
        return _on_kernel(kernel, "rlsc::skinny_linear", linear.weight, linear.bias, x)

    return forward


def _bf16_product(x: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None,
                  amx: Callable | None) -> torch.Tensor:
    """x @ weight^T + bias in fp32 from a bf16 weight: few rows of a tile-shaped weight on the AMX
    kernel (fp32 sums), the rest on torch's bf16 matmul (oneDNN, which rounds its output to bf16)."""
    if amx is not None and amx_shape_ok(*weight_bf16.shape) and 0 < _rows(x) <= MAX_KERNEL_ROWS:
        return _on_kernel(amx, "rlsc::amx_linear", weight_bf16, bias, x)
    out = torch.nn.functional.linear(x.to(torch.bfloat16), weight_bf16).float()
    return out if bias is None else out + bias


def _bf16_forward(linear: torch.nn.Linear, weight_bf16: torch.Tensor, amx: Callable | None) -> Callable:
    """sampling.precision = bf16: every no-grad product of the layer reads its bf16 copy."""
    plain = torch.nn.Linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _torch_only(linear, x):
            return plain(linear, x)
        return _bf16_product(x, weight_bf16, linear.bias, amx)

    return forward


# Linear layers a module applies to one input, named in the order its forward calls them
# (transformers' attention and gated MLP blocks: Llama, Qwen2, Mistral, ...)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(model, layers: list[torch.nn.Linear]) -> list[list[torch.nn.Linear]]:
    """Groups of layers (from `layers`) that one module applies to the same input, each member's
    weight its own (a shared weight stays with its single-layer copy)."""
    owners = collections.Counter(layer.weight.data_ptr() for layer in layers)
    eligible = {layer for layer in layers if owners[layer.weight.data_ptr()] == 1}
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            if all(m in eligible for m in members) and len({m.in_features for m in members}) == 1 \
                    and len({m.bias is None for m in members}) == 1:
                groups.append(members)
    return groups


class FusedSiblings:
    """Sibling layers' bf16 weights concatenated into one, so one product serves them all.

    The first member's call computes every member's output of its input x; the later members,
    called with that same tensor x, take their slice (no product of their own). A member called
    any other way (another input, out of order) runs its own product on its rows of the
    concatenated copy, so the result never depends on the call order, only the speed. For
    SmolLM2 this turns 7 products per decoder layer into 4 (211 kernel calls per decode step
    into 121), and each call pays ~35 us of packing and thread start besides its weight stream.
    """

    def __init__(self, members: list[torch.nn.Linear], amx: Callable | None):
        self.members = members
        bounds = [0]
        for m in members:
            bounds.append(bounds[-1] + m.out_features)
        self.slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        self.weight = torch.empty(bounds[-1], members[0].in_features, dtype=torch.bfloat16)
        for m, rows in zip(members, self.slices):
            self.weight[rows].copy_(m.weight.detach())
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.amx = amx
        self._input: torch.Tensor | None = None  # the input whose outputs wait in _outputs
        self._outputs: dict[int, torch.Tensor] = {}

    def forward_of(self, index: int) -> Callable:
        linear, rows, plain = self.members[index], self.slices[index], torch.nn.Linear.forward
        own_bias = None if self.bias is None else self.bias[rows]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if _torch_only(linear, x):
                return plain(linear, x)
            if x is self._input and index in self._outputs:
                out = self._outputs.pop(index)
                if not self._outputs:
                    self._input = None  # all taken: hold no reference to this step's tensors
                return out
            if index == 0:
                fused = _bf16_product(x, self.weight, self.bias, self.amx)
                self._input = x  # held, so `is` cannot match a new tensor at a reused address
                self._outputs = {i: fused[..., r] for i, r in enumerate(self.slices) if i}
                return fused[..., rows]
            return _bf16_product(x, self.weight[rows], own_bias, self.amx)

        return forward


def _bf16_forwards(model, layers: list[torch.nn.Linear]) -> dict[torch.nn.Linear, Callable]:
    # one bf16 copy per weight, made as sampling starts (the weights change every step) and
    # dropped when it ends; siblings share one concatenated copy, layers that share a weight its copy
    amx, forwards, copies = amx_kernel(), {}, {}
    for members in sibling_groups(model, layers):
        fused = FusedSiblings(members, amx)
        forwards.update({m: fused.forward_of(i) for i, m in enumerate(members)})
        if amx is not None and amx_shape_ok(*fused.weight.shape):
            _DIRECT.update({m: Direct(amx, fused.weight, fused.bias, rows, fused)
                            for m, rows in zip(members, fused.slices)})
    for layer in layers:
        if layer not in forwards:
            if layer.weight.data_ptr() not in copies:
                copies[layer.weight.data_ptr()] = layer.weight.detach().to(torch.bfloat16)
            forwards[layer] = _bf16_forward(layer, copies[layer.weight.data_ptr()], amx)
            if amx is not None and amx_shape_ok(*layer.weight.shape):
                _DIRECT[layer] = Direct(amx, copies[layer.weight.data_ptr()], layer.bias)
    return forwards


def _layer_forwards(model, precision: str) -> dict[torch.nn.Linear, Callable]:
    layers = [m for m in model.modules() if _kernel_ready(m)]
    if precision == "bf16":
        return _bf16_forwards(model, layers)
    kernel = skinny_kernel()
    if kernel is None:
        return {}
    _DIRECT.update({layer: Direct(kernel, layer.weight, layer.bias) for layer in layers})
    return {layer: _kernel_forward(layer, kernel) for layer in layers}


class Direct(NamedTuple):
    """How a layer's few-row products run on a kernel while a decode_kernel block is open, for a
    caller that skips the module call (rlsc/decode_step.py's layer plan): kernel(x2d, weight, bias,
    out) computes the product whose `columns` are this layer's output (all of them, or its slice
    of a fused sibling group's product, `fused` the group)."""

    kernel: Callable
    weight: torch.Tensor
    bias: torch.Tensor | None
    columns: slice | None = None
    fused: object | None = None


_DIRECT: dict[torch.nn.Module, Direct] = {}  # filled while a decode_kernel block is open


def direct_product(layer: torch.nn.Module) -> Direct | None:
    """The layer's Direct inside a decode_kernel block, or None (not on a kernel, e.g. a LoRA wrapper)."""
    return _DIRECT.get(layer)


@contextlib.contextmanager
def decode_kernel(model, precision: str = "fp32") -> Iterator[None]:
    """Within the block, the model's plain fp32 CPU Linear layers run few-row inputs on the skinny
    kernel (precision fp32; everything else, and everything where the kernel is unavailable, is left
    alone), or every no-grad product on bf16 copies of the weights (precision bf16)."""
    forwards = _layer_forwards(model, precision)
    for layer, forward in forwards.items():
        layer.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in forwards:
            del layer.forward
            _DIRECT.pop(layer, None)
