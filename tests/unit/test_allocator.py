"""retain_freed_memory: a block freed and allocated again is reused in place, not page-faulted anew."""

import json
import os
import subprocess
import sys

import pytest

import rlsc.trainer
from rlsc.allocator import retain_freed_memory
from rlsc.config import load_config
from rlsc.problems import Problem
from tests.conftest import build_tiny_model, build_tiny_tokenizer

# in a fresh interpreter: page faults of a first and a second 256 MB malloc, each written in full
# (plain malloc: glibc 2.36's posix_memalign, torch's path, does not reuse every block, see the module)
PROBE = """
import ctypes, json, resource, sys
from rlsc.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults(n=256 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(n)
    libc.memset(block, 1, n)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "first": faults(), "second": faults()}))
"""
PAGES = 256 * 2**20 // 4096


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


@linux_glibc
def test_default_allocator_faults_every_reallocation():
    result = probe("off")
    assert result["second"] > 0.9 * PAGES  # unmapped on free, faulted page by page again


@linux_glibc
def test_retained_memory_is_reused_without_faults():
    result = probe("on")
    assert result["applied"] is True
    assert result["first"] > 0.9 * PAGES  # the first touch still faults
    assert result["second"] < 0.05 * PAGES


def test_off_by_default_in_the_config():
    assert load_config(None, []).train.retain_freed_memory is False
    assert load_config(None, ["train.retain_freed_memory=true"]).train.retain_freed_memory is True


def test_returns_a_flag_in_this_process():
    assert retain_freed_memory() in (True, False)


@pytest.mark.parametrize("flag", [False, True])
def test_the_trainer_retains_memory_only_when_configured(tmp_path, monkeypatch, flag):
    calls = []
    monkeypatch.setattr(rlsc.trainer, "retain_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config(None, [f"paths.work_dir={tmp_path}", "sampling.k=2", "sampling.max_new_tokens=4",
                             "train.steps=1", "model.lora.enabled=false", "prompt.few_shot=[]",
                             f"train.retain_freed_memory={str(flag).lower()}"])
    tok = build_tiny_tokenizer()
    problems = [Problem(id="q0", question="What is 1 + 1?", answer=None, source="test")]
    rlsc.trainer.train(cfg, problems, tmp_path / "out", model=build_tiny_model(len(tok), seed=7), tokenizer=tok,
                       progress=False)
    assert calls == ([1] if flag else [])
