"""The decode kernel against torch's matmul on a model's own layer shapes, by rows per call.

A decode step multiplies a few rows (k samples) by every linear layer's weight; this times
`rlsc.decoding.skinny_kernel` and `torch.nn.functional.linear` on the shapes of the configured
model (query/key/value/output, gate/up/down, the vocabulary projection) with random fp32 weights,
alternating the two and taking medians, and reports the weight bytes streamed per second. Each
call takes the next of enough copies of the weight to exceed the last-level cache several times
over, so the weight streams from memory as in a decode step (one weight called again and again
would sit in L3 and flatter both sides). It is where `MAX_KERNEL_ROWS` and the speed section's
kernel figures come from:

    python -m bench.kernel --model embedded:qwen2.5-coder-0.5b-instruct   # -> bench/results/kernel-*.md

Where the CPU has AMX tiles (rlsc.decoding.amx_kernel, sampling.precision = bf16) the bf16 tile
kernel is timed in the same alternation on bf16 copies of the weights (its GB/s counts bf16 bytes).

`--against REV` also builds the kernel source of an earlier git revision and times it in the same
alternation (a column of its own), so a change to the kernel is measured against what it replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each distinct linear layer of a decoder, from its config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    return {"q_proj": (heads * head_dim, hidden), "k_proj / v_proj": (kv, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_proj / up_proj": (config.intermediate_size, hidden),
            "down_proj": (hidden, config.intermediate_size), "lm_head": (config.vocab_size, hidden)}


def time_alternated(calls: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds of each call, alternated call by call so drift hits all alike."""
    for call in calls.values():
        call()
    seconds = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[label].append(time.perf_counter() - start)
    return {label: statistics.median(s) for label, s in seconds.items()}


def fma_peak_gflops(threads: int, iterations: int = 20_000_000) -> float | None:
    """fp32 GFLOP/s of bench/fma_peak.c (independent FMA chains as wide as the kernel's, no memory traffic) at this
    many threads: the ceiling the kernel's arithmetic is judged against. None without a compiler."""
    import ctypes
    import subprocess

    from rlsc.decoding import build_library, c_compiler

    compiler = c_compiler()
    if compiler is None:
        return None
    try:
        peak = build_library(HERE / "fma_peak.c", "fma_peak", compiler).rlsc_fma_peak_gflops
    except (OSError, subprocess.SubprocessError):
        return None
    peak.restype, peak.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_long]
    peak(threads, iterations // 10)  # warm-up: clocks up
    return max(peak(threads, iterations) for _ in range(3))


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size from sysfs (Linux), None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        with contextlib.suppress(ValueError):
            sizes.append(int(text[:-1]) * {"K": 1024, "M": 1024**2}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=None)


def default_pool_mb() -> float:
    # weights cycled must stream from memory, as in a decode step: several times past the L3
    # (32 MB on one machine this ran on, 480 MB on another)
    return max(256.0, 3 * (last_level_cache_bytes() or 0) / 1e6)


def kernel_at(revision: str) -> Callable:
    """The decode kernel as built from an earlier git revision's source."""
    import subprocess
    import tempfile

    from rlsc.decoding import KERNEL_SOURCE, load_kernel

    relative = KERNEL_SOURCE.relative_to(HERE.parent).as_posix()
    source = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=HERE.parent, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="rlsc-kernel-") as folder:  # the built .so lives in the cache
        path = Path(folder) / KERNEL_SOURCE.name
        path.write_text(source)
        kernel = load_kernel(path)
    if kernel is None:
        raise SystemExit(f"the kernel of {revision} does not build here (see the log line above)")
    return kernel


def measure(shapes: dict[str, tuple[int, int]], rows: list[int], budget_bytes: float = 2e9,
            pool_bytes: float = 256e6, other: Callable | None = None) -> list[dict]:
    import itertools

    import torch

    from rlsc.decoding import amx_kernel, amx_shape_ok, skinny_kernel

    kernel, amx = skinny_kernel(), amx_kernel()
    if kernel is None:
        raise SystemExit("the decode kernel is not available here (see the log line above)")
    results = []
    for name, (outer, inner) in shapes.items():
        nbytes = outer * inner * 4
        weights = [torch.randn(outer, inner) for _ in range(max(1, round(pool_bytes / nbytes)))]
        tiles = amx is not None and amx_shape_ok(outer, inner)
        # as many bf16 copies as fill the same pool: they stream from memory too
        halves = [torch.randn(outer, inner).bfloat16() for _ in range(max(1, round(2 * pool_bytes / nbytes)))] \
            if tiles else []
        repeats = max(5, min(200, int(budget_bytes / nbytes)))
        for m in rows:
            x, out = torch.randn(m, inner), torch.empty(m, outer)
            expected = torch.nn.functional.linear(x, weights[0])
            kernel(x, weights[0], None, out)
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            pool = itertools.cycle(weights)
            calls = {"torch": lambda: torch.nn.functional.linear(x, next(pool)),  # noqa: B023
                     "kernel": lambda: kernel(x, next(pool), None, out)}  # noqa: B023
            if other is not None:
                calls["other"] = lambda: other(x, next(pool), None, out)  # noqa: B023
            if tiles:
                half_pool = itertools.cycle(halves)
                calls["amx"] = lambda: amx(x, next(half_pool), None, out)  # noqa: B023
            seconds = time_alternated(calls, repeats)
            row = {"layer": name, "shape": [outer, inner], "rows": m, "max_rel_error": error,
                   "speedup": seconds["torch"] / seconds["kernel"]}
            for label, s in seconds.items():
                row[f"{label}_s"], row[f"{label}_GBps"] = s, nbytes / (2 if label == "amx" else 1) / s / 1e9
            results.append(row)
    return results


def kernel_gflops(result: dict) -> float:
    """The kernel's arithmetic rate: 2 FLOPs per weight per row, 4 bytes per weight."""
    return result["kernel_GBps"] / 4 * 2 * result["rows"]


def markdown(model: str, results: list[dict], threads: int, against: str | None = None,
             peak: float | None = None) -> str:
    other = [f"kernel@{against} GB/s", "kernel / kernel@" + against] if against else []
    amx = ["AMX bf16 GB/s (bf16 bytes)", "AMX speedup over kernel"] if any("amx_s" in r for r in results) else []
    header = ["layer", "out × in", "rows", "torch GB/s", "kernel GB/s", "speedup", "kernel GFLOP/s",
              *other, *amx, "max rel. error"]
    from rlsc.decoding import kernel_flags

    isa = "AVX-512" if "-mavx512f" in kernel_flags() else "AVX2"
    peak_line = (f"fp32 FMA peak at {threads} threads (`bench/fma_peak.c`: {isa} FMA chains, no memory "
                 f"traffic): **{peak:.0f} GFLOP/s**; the kernel GFLOP/s column is 2 FLOPs per weight per row."
                 if peak else "FMA peak: not measured (no C compiler).")
    lines = [f"## Decode kernel vs torch's matmul: {model}, fp32, {threads} threads", "",
             "Weight GB streamed per second (higher is better), median of alternated calls.", "", peak_line, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["layer"], f"{r['shape'][0]} × {r['shape'][1]}", str(r["rows"]), f"{r['torch_GBps']:.1f}",
                 f"{r['kernel_GBps']:.1f}", f"{r['speedup']:.2f}×",
                 f"{kernel_gflops(r):.0f}" + (f" ({kernel_gflops(r) / peak:.0%})" if peak else "")]
        if against:
            cells += [f"{r['other_GBps']:.1f}", f"{r['other_s'] / r['kernel_s']:.2f}×"]
        if amx:
            cells += [f"{r['amx_GBps']:.1f}", f"{r['kernel_s'] / r['amx_s']:.2f}×"] if "amx_s" in r else ["–", "–"]
        lines.append("| " + " | ".join([*cells, f"{r['max_rel_error']:.1e}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--rows", default="1,4,16,32,64,128", help="rows per call (k samples x prompts)")
    p.add_argument("--pool-mb", type=float, default=default_pool_mb(),
                   help="weight copies cycled per shape (default: 3x the last-level cache, at least 256)")
    p.add_argument("--against", metavar="REV", help="also time the kernel source of this git revision")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig

    from rlsc.config import load_config
    from rlsc.models import resolve_model_path

    cfg = load_config(None, [f"model.name={args.model}"])
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model, cfg.paths.cache_dir))
    other = kernel_at(args.against) if args.against else None
    results = measure(layer_shapes(config), [int(r) for r in args.rows.split(",")], pool_bytes=args.pool_mb * 1e6,
                      other=other)
    slug = args.model.removeprefix("embedded:").rstrip("/").split("/")[-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = fma_peak_gflops(torch.get_num_threads())
    (out / f"kernel-{slug}.json").write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                        "against": args.against, "fma_peak_gflops": peak,
                                                        "results": results}, indent=2))
    table = markdown(args.model, results, torch.get_num_threads(), args.against, peak)
    (out / f"kernel-{slug}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
