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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
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


def time_pair(plain, fast, repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternated call by call so drift hits both alike."""
    plain(), fast()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        fast()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def measure(shapes: dict[str, tuple[int, int]], rows: list[int], budget_bytes: float = 2e9,
            pool_bytes: float = 256e6) -> list[dict]:
    import itertools

    import torch

    from rlsc.decoding import skinny_kernel

    kernel = skinny_kernel()
    if kernel is None:
        raise SystemExit("the decode kernel is not available here (see the log line above)")
    results = []
    for name, (outer, inner) in shapes.items():
        nbytes = outer * inner * 4
        weights = [torch.randn(outer, inner) for _ in range(max(1, round(pool_bytes / nbytes)))]
        repeats = max(5, min(200, int(budget_bytes / nbytes)))
        for m in rows:
            x, out = torch.randn(m, inner), torch.empty(m, outer)
            expected = torch.nn.functional.linear(x, weights[0])
            kernel(x, weights[0], None, out)
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            plain_pool, fast_pool = itertools.cycle(weights), itertools.cycle(weights)
            plain_s, fast_s = time_pair(lambda: torch.nn.functional.linear(x, next(plain_pool)),  # noqa: B023
                                        lambda: kernel(x, next(fast_pool), None, out), repeats)  # noqa: B023
            results.append({"layer": name, "shape": [outer, inner], "rows": m, "torch_s": plain_s,
                            "kernel_s": fast_s, "torch_GBps": nbytes / plain_s / 1e9,
                            "kernel_GBps": nbytes / fast_s / 1e9, "speedup": plain_s / fast_s,
                            "max_rel_error": error})
    return results


def markdown(model: str, results: list[dict], threads: int) -> str:
    lines = [f"## Decode kernel vs torch's matmul: {model}, fp32, {threads} threads", "",
             "Weight GB streamed per second (higher is better), median of alternated calls.", "",
             "| layer | out × in | rows | torch GB/s | kernel GB/s | speedup | max rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['layer']} | {r['shape'][0]} × {r['shape'][1]} | {r['rows']} | {r['torch_GBps']:.1f} | "
                     f"{r['kernel_GBps']:.1f} | {r['speedup']:.2f}× | {r['max_rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--rows", default="1,4,16,32,64,128", help="rows per call (k samples x prompts)")
    p.add_argument("--pool-mb", type=float, default=256, help="weight copies cycled per shape (past the L3)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig

    from rlsc.config import load_config
    from rlsc.models import resolve_model_path

    cfg = load_config(None, [f"model.name={args.model}"])
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model, cfg.paths.cache_dir))
    results = measure(layer_shapes(config), [int(r) for r in args.rows.split(",")], pool_bytes=args.pool_mb * 1e6)
    slug = args.model.removeprefix("embedded:").rstrip("/").split("/")[-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernel-{slug}.json").write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                        "results": results}, indent=2))
    table = markdown(args.model, results, torch.get_num_threads())
    (out / f"kernel-{slug}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
