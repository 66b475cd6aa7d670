"""Shared fixtures: a tiny random Llama with a character tokenizer and a chat template, built in
the test session (no download, well under a second to sample from)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("<eos>|<pad>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, tie_word_embeddings: bool = False,
                     family: str = "llama", heads: int = 4, kv_heads: int = 2):
    """A tiny random causal LM: Llama (SmolLM2's family) by default, or Qwen2 (the embedded default's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=tie_word_embeddings,
    )
    model = model_class(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder (safetensors + tokenizer), loadable through model.name=<folder>."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = build_tiny_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_policy():
    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok)), tok


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture()
def skinny_kernel():
    """The decode kernel where it is meant to run (x86-64 with AVX2 and a C compiler): there it must build."""
    import platform
    import shutil

    import torch

    from rlsc.decoding import skinny_kernel as build

    kernel = build()
    buildable = (platform.machine().lower() in ("x86_64", "amd64") and shutil.which("cc") is not None
                 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    if kernel is None and not buildable:
        pytest.skip("the decode kernel needs x86-64 with AVX2 and a C compiler")
    assert kernel is not None, "the decode kernel should build here (cc, x86-64, AVX2)"
    return kernel


@pytest.fixture()
def amx_kernel(skinny_kernel):
    """The bf16 AMX kernel where the CPU has AMX tiles and avx512_bf16: there it must build and run."""
    import torch

    from rlsc.decoding import amx_kernel as build

    if not (torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()):
        pytest.skip("the AMX kernel needs a CPU with AMX tiles and avx512_bf16 (this one has none)")
    kernel = build()
    assert kernel is not None, "the AMX kernel should build and be granted the tile state here"
    return kernel
