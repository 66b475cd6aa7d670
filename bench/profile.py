"""Where an rlsc step's time goes: torch.profiler over the speed benchmark's workload, by phase.

One question x k samples x at most 128 new tokens (bench.speed's workload, full FT, fp32): the
sampling phase (prefill + decode loop with its per-token statistics) and the update phase (scoring
forward, backward, grad clip, AdamW) are profiled separately, and their self CPU time is grouped
into kinds of work, so a change can be judged by what it removes:

    python -m bench.profile --model embedded:smollm2-135m-instruct   # -> bench/results/profile-*.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# operator name -> kind of work (first match wins); anything else is "other"
KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkldnn", "rlsc::skinny_linear",
                "rlsc::amx_linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("kv cache / concat", ("aten::cat", "aten::index", "aten::repeat_interleave")),
    ("vocabulary statistics", ("log_softmax", "aten::exp", "aten::cumsum", "aten::searchsorted",
                               "aten::max", "aten::gather", "aten::div")),
    ("optimizer", ("_foreach", "_fused_adamw", "aten::addcdiv", "aten::lerp", "aten::sqrt", "aten::norm")),
    ("copies and dtype casts", ("aten::copy_", "aten::_to_copy")),
    ("zero fills", ("aten::fill_", "aten::zero_")),
)


def kind_of(op: str) -> str:
    for kind, needles in KINDS:
        if any(n in op for n in needles):
            return kind
    return "other"


def summarize(prof, wall_s: float, top: int = 12) -> dict:
    """Self CPU time per kind of work and the top operators; both in seconds."""
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    ops.sort(key=lambda o: -o[1])
    kinds: dict[str, float] = {}
    for name, seconds, _ in ops:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + seconds
    profiled = sum(kinds.values())
    return {"wall_s": wall_s, "profiled_s": profiled,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"op": n, "self_s": s, "calls": c} for n, s, c in ops[:top]]}


def profile_step(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.speed import QUESTION
    from rlsc.config import load_config
    from rlsc.models import load_policy
    from rlsc.prompts import render_prompt
    from rlsc.sampling import generate_rollouts
    from rlsc.trainer import backward_on_rollouts, make_optimizer, trainable_parameters

    cfg = load_config(None, [f"model.name={args.model}", "model.lora.enabled=false", f"sampling.k={args.k}",
                             f"train.micro_batch={args.k}", "train.lr=1e-6", *args.set])
    model, tokenizer = load_policy(cfg.model, cfg.paths.cache_dir)
    prompt = render_prompt(tokenizer, QUESTION, cfg.prompt)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg.train)

    def sample():
        return generate_rollouts(model, tokenizer, [prompt], k=args.k, temperature=cfg.sampling.temperature,
                                 max_new_tokens=args.max_new_tokens, precision=cfg.sampling.precision)

    def update(rollouts):
        from rlsc.answers import extract_answer

        answers = [extract_answer(t) for t in rollouts.texts]
        model.train()
        backward_on_rollouts(model, rollouts, answers, cfg, lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    def profiled(work):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            out = work()
            wall = time.perf_counter() - start
        return out, summarize(prof, wall)

    torch.manual_seed(0)
    update(sample())  # warm-up: allocator, optimizer state
    torch.manual_seed(1)
    rollouts, sampled = profiled(sample)
    sampled.update(completion_tokens=int(rollouts.lengths.sum()), decode_steps=int(rollouts.lengths.max()))
    _, updated = profiled(lambda: update(rollouts))
    phases = {"sample": sampled, "update": updated}
    return {"model": args.model, "k": args.k, "max_new_tokens": args.max_new_tokens,
            "torch_threads": torch.get_num_threads(), "overrides": args.set, "phases": phases}


def render(result: dict) -> str:
    title = (f"## {result['model']}: k {result['k']}, ≤{result['max_new_tokens']} new tokens, "
             f"{result['torch_threads']} threads" +
             "".join(f", `{o}`" for o in result.get("overrides", [])))
    lines = [title, ""]
    for phase, p in result["phases"].items():
        extra = (f", {p['decode_steps']} decode steps, {p['completion_tokens']} completion tokens"
                 if phase == "sample" else "")
        lines += [f"### {phase}: {p['wall_s']:.1f} s wall under the profiler{extra}", "",
                  "| kind of work | self CPU s | share |", "|---|---|---|"]
        lines += [f"| {k} | {s:.2f} | {s / p['profiled_s']:.0%} |" for k, s in p["kinds"].items()]
        lines += ["", "| top operators | self CPU s | calls |", "|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_s']:.2f} | {o['calls']} |" for o in p["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--set", "-s", action="append", default=[], help="config overrides")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    result = profile_step(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "profile-" + args.model.split(":")[-1].split("/")[-1]
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
