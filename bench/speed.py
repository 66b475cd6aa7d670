"""Speed: one RLSC optimizer step with rlsc against TRL's GRPOTrainer, measured in the same run.

The workload (issue 4): one step = 1 question x k samples (16) x at most 128 new tokens, the same
prompt every step, sampling + scoring + update, fp32 on CPU. Both sides get the same model weights,
learning rate, temperature (top_k/top_p off), gradient checkpointing, batch (all k samples in one
forward/backward) and grad clip. TRL's reward is each sample's sequence confidence
exp(sum log p(y|x)) at the sampling temperature: TRL gives reward functions no log-probs, so the
reward needs its own forward pass (that is the cost of doing RLSC in TRL, and it is counted).

Each implementation runs in its own process (so peak RSS is its own), warm-up steps first, then the
timed steps; the processes alternate rlsc, trl, rlsc, trl ... for `--rounds` rounds. The machine's
floors are measured in the same run (memory copy bandwidth, fp32 matmul throughput) and each phase
is reported against its floor (`phase_floors`):
  sampling floor = the prompt's prefill (2 x matmul params x prompt tokens / matmul throughput) plus
                   the larger of decode steps x bytes of the matmul weights / read bandwidth (every
                   decode step must read all weights once; decode steps = the longest completion)
                   and 2 x matmul params x sampled tokens / matmul throughput;
  update floor   = 6 x matmul params x tokens / matmul throughput (forward + backward, full FT),
                   tokens = k x (prompt + mean completion) as in the issue's own estimate, and the
                   minimal one with the shared prompt once + each completion token once.

    python -m bench.speed --models embedded:smollm2-135m-instruct,embedded:qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTION = ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them. "
            "How many muffins are left?")


# ---------------------------------------------------------------- the machine's floors


def measure_floors(seconds: float = 2.0) -> dict[str, float]:
    """Memory bandwidth two ways and fp32 matmul throughput (GFLOP/s).

    read_GBps: bytes read per second by a reduction, the rate a decode step can stream weights at
    (weights are only read) and the sampling floor's bandwidth; copy_GBps: bytes copied per second,
    the issue's 23.5 GB/s figure (a copy also writes, so it is lower than the read rate)."""
    import torch

    src = torch.ones(64 * 1024 * 1024 // 4 * 8)  # 256 MB, well past the caches
    dst = torch.empty_like(src)

    def rate(work) -> float:
        """The best of three windows: a floor is the most the machine can do, and a shared VM's
        rate varies from one second to the next (one 2 s window read 89 GFLOP/s, three later 101-104)."""
        work()
        best = 0.0
        for _ in range(3):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                work()
                runs += 1
            best = max(best, runs / (time.perf_counter() - start))
        return best

    copy_gbs = src.numel() * 4 * rate(lambda: dst.copy_(src)) / 1e9
    read_gbs = src.numel() * 4 * rate(src.sum) / 1e9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gflops = 2 * 2048**3 * rate(lambda: a @ b) / 1e9
    return {"copy_GBps": copy_gbs, "read_GBps": read_gbs, "matmul_GFLOPs": gflops,
            "torch_threads": torch.get_num_threads()}


def matmul_params(model) -> tuple[int, int]:
    """(parameters in Linear layers incl. the LM head, their bytes): the weights every token multiplies."""
    import torch

    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(w.numel() for w in linears), sum(w.numel() * w.element_size() for w in linears)


# ---------------------------------------------------------------- the two workers


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def bench_config(args):
    from rlsc.config import load_config

    return load_config(None, [
        f"model.name={args.model}", f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "model.lora.enabled=false", f"sampling.k={args.k}", f"sampling.temperature={args.temperature}",
        f"sampling.max_new_tokens={args.max_new_tokens}", f"train.lr={args.lr}",
        f"train.steps={args.warmup + args.steps}", "train.questions_per_step=1", f"train.micro_batch={args.k}",
        "train.checkpoint_every=100000", "guard.enabled=false", *args.set,
    ])


def run_rlsc(args, work: Path) -> dict:
    """The real trainer on the same question every step; its per-step metrics carry the phase times."""
    from rlsc.models import load_policy
    from rlsc.problems import Problem
    from rlsc.prompts import render_prompt
    from rlsc.trainer import train

    cfg = bench_config(args)
    start = time.perf_counter()
    model, tokenizer = load_policy(cfg.model, cfg.paths.cache_dir)
    load_s = time.perf_counter() - start
    problems = [Problem(id=f"q{i}", question=QUESTION, answer=None, source="bench")
                for i in range(cfg.train.steps)]
    result = train(cfg, problems, work / "rlsc", model=model, tokenizer=tokenizer, progress=False)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    steps = [{"step_s": r["time/step"], "sample_s": r["time/sample"], "update_s": r["time/update"],
              "tokens": r["completions/tokens"], "max_length": r.get("completions/max_length"),
              "mean_length": r["completions/mean_length"]} for r in records]
    prompt_tokens = len(tokenizer(render_prompt(tokenizer, QUESTION, cfg.prompt))["input_ids"])
    return {"load_s": load_s, "steps": steps, "prompt_tokens": prompt_tokens, **_model_facts(model)}


def _model_facts(model) -> dict:
    params, weight_bytes = matmul_params(model)
    return {"matmul_params": params, "matmul_weight_bytes": weight_bytes,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_trl(args, work: Path) -> dict:
    """GRPOTrainer configured like the rlsc step, its reward the sample's sequence confidence."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlsc.models import load_policy
    from rlsc.prompts import build_messages

    cfg = bench_config(args)
    start = time.perf_counter()
    model, tokenizer = load_policy(cfg.model, cfg.paths.cache_dir)
    load_s = time.perf_counter() - start
    messages = build_messages(QUESTION, cfg.prompt)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    phase = {"generate_s": 0.0, "reward_s": 0.0, "tokens": 0, "lengths": []}

    def sequence_confidence(prompts, completions, completion_ids, **_) -> list[float]:
        """exp(sum over completion tokens of log softmax(logits / T)): one no-grad forward per sample."""
        t0 = time.perf_counter()
        rewards = []
        with torch.no_grad():
            for ids in completion_ids:
                full = torch.tensor([list(prompt_ids) + list(ids)])
                logits = trainer.model(full).logits[0, len(prompt_ids) - 1 : -1].float() / args.temperature
                rewards.append(float(logits.log_softmax(-1).gather(-1, full[0, len(prompt_ids):, None]).sum().exp()))
        phase["reward_s"] += time.perf_counter() - t0
        phase["tokens"] += sum(len(ids) for ids in completion_ids)
        phase["lengths"] += [len(ids) for ids in completion_ids]
        return rewards

    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        phase["generate_s"] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            phase.update(generate_s=0.0, reward_s=0.0, tokens=0, lengths=[])
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s = time.perf_counter() - self.start
            sample = phase["generate_s"] + phase["reward_s"]
            steps.append({"step_s": step_s, "sample_s": sample, "generate_s": phase["generate_s"],
                          "reward_s": phase["reward_s"], "update_s": step_s - sample, "tokens": phase["tokens"],
                          "max_length": max(phase["lengths"], default=0),
                          "mean_length": statistics.fmean(phase["lengths"]) if phase["lengths"] else 0.0})

    config = GRPOConfig(
        output_dir=str(work / "trl"), num_generations=args.k, per_device_train_batch_size=args.k,
        gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_k=0, top_p=1.0, repetition_penalty=1.0, beta=0.0, learning_rate=args.lr, weight_decay=0.01,
        max_grad_norm=1.0, max_steps=args.warmup + args.steps, gradient_checkpointing=args.gradient_checkpointing,
        bf16=False, fp16=False, use_cpu=True, logging_steps=1, report_to="none", save_strategy="no",
        disable_dropout=True, dataloader_num_workers=0, seed=0,
    )
    dataset = Dataset.from_list([{"prompt": messages}] * (args.warmup + args.steps))
    trainer = GRPOTrainer(model=model, reward_funcs=sequence_confidence, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return {"load_s": load_s, "steps": steps, "prompt_tokens": len(prompt_ids), **_model_facts(model)}


def worker(args) -> int:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.impl}-") as tmp:
        result = (run_rlsc if args.impl == "rlsc" else run_trl)(args, Path(tmp))
    result.update(impl=args.impl, model=args.model, warmup=args.warmup, peak_rss_gb=peak_rss_gb())
    result["timed"] = result["steps"][args.warmup :]
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------- the orchestrator


def phase_floors(matmul_params: int, weight_bytes: int, prompt_tokens: int, k: int, mean_length: float,
                 decode_steps: float, floors: dict) -> dict[str, float]:
    """Seconds no implementation can beat on this machine, per phase (fp32, full fine-tuning).

    sample_s = sample_prefill_s + sample_decode_s:
      prefill: the shared prompt read once, 2 FLOPs per weight per prompt token;
      decode: each decode step reads every matmul weight once (bandwidth), and each sampled token
      costs 2 FLOPs per weight (compute): the larger of the two (a roofline);
    update_s: the issue's estimate, 6 FLOPs per weight per token (forward + backward) over every
      sample's prompt and completion;
    update_min_s: the same over what the gradient needs at least: the shared prompt once and each
      completion token once.
    """
    # runs recorded before read_GBps was measured used the copy rate
    bandwidth = floors.get("read_GBps", floors["copy_GBps"]) * 1e9
    throughput = floors["matmul_GFLOPs"] * 1e9
    sample_tokens = k * mean_length
    prefill = 2 * matmul_params * prompt_tokens / throughput
    decode = max(decode_steps * weight_bytes / bandwidth, 2 * matmul_params * sample_tokens / throughput)
    per_token = 6 * matmul_params / throughput
    return {"sample_s": prefill + decode, "sample_prefill_s": prefill, "sample_decode_s": decode,
            "update_s": per_token * k * (prompt_tokens + mean_length),
            "update_min_s": per_token * (prompt_tokens + k * mean_length)}


def summarize(runs: list[dict], floors: dict) -> dict:
    """Per model and implementation: medians over every timed step of every round, and the floors."""
    out: dict[str, dict] = {}
    for run in runs:
        entry = out.setdefault(run["model"], {}).setdefault(run["impl"], {"timed": [], "peak_rss_gb": 0.0})
        entry["timed"] += run["timed"]
        entry["peak_rss_gb"] = max(entry["peak_rss_gb"], run["peak_rss_gb"])
        entry.update(prompt_tokens=run["prompt_tokens"], matmul_params=run["matmul_params"],
                     matmul_weight_bytes=run["matmul_weight_bytes"], k=run.get("k"))
    for impls in out.values():
        for entry in impls.values():
            timed = entry["timed"]
            med = {key: statistics.median(s[key] for s in timed)
                   for key in ("step_s", "sample_s", "update_s", "tokens", "max_length", "mean_length")}
            entry["floor"] = phase_floors(entry["matmul_params"], entry["matmul_weight_bytes"], entry["prompt_tokens"],
                                          entry["k"], med["mean_length"], med["max_length"], floors)
            entry["median"] = med
            entry["tokens_per_s"] = med["tokens"] / med["step_s"]
            floor = entry["floor"]
            entry["over_floor"] = {"sample": med["sample_s"] / floor["sample_s"],
                                   "update": med["update_s"] / floor["update_s"],
                                   "update_min": med["update_s"] / floor["update_min_s"]}
        if {"rlsc", "trl"} <= impls.keys():
            impls["ratio_rlsc_over_trl"] = {
                "step": impls["rlsc"]["median"]["step_s"] / impls["trl"]["median"]["step_s"],
                "peak_rss": impls["rlsc"]["peak_rss_gb"] / impls["trl"]["peak_rss_gb"]}
    return out


def markdown(summary: dict, floors: dict, meta: dict, overrides: list[str] = ()) -> str:
    read = f"read {floors['read_GBps']:.1f} GB/s, " if "read_GBps" in floors else ""
    extra = f" Config overrides: {' '.join(f'`{o}`' for o in overrides)}." if overrides else ""
    lines = [(f"Machine: {meta['machine']}; {read}copy {floors['copy_GBps']:.1f} GB/s, fp32 matmul "
             f"{floors['matmul_GFLOPs']:.0f} GFLOP/s ({floors['torch_threads']} threads), measured in this run. "
             f"torch {meta['torch']}, transformers {meta['transformers']}, trl {meta['trl']}; {meta['date']}.{extra}"), "",
             ("| model | impl | timed steps | median step s | sample s (floor, ×) | update s (floor: issue's / "
              "minimal, ×) | tokens/step | tokens/s | peak RSS GB |"), "|---|---|---|---|---|---|---|---|---|"]
    for model, impls in summary.items():
        for impl in ("rlsc", "trl"):
            if impl not in impls:
                continue
            e, m = impls[impl], impls[impl]["median"]
            lines.append(
                f"| {model.removeprefix('embedded:')} | {impl} | {len(e['timed'])} | {m['step_s']:.1f} | "
                f"{m['sample_s']:.1f} ({e['floor']['sample_s']:.1f}, x{e['over_floor']['sample']:.1f}) | "
                f"{m['update_s']:.1f} ({e['floor']['update_s']:.1f} / {e['floor']['update_min_s']:.1f}, "
                f"x{e['over_floor']['update']:.2f} / x{e['over_floor']['update_min']:.1f}) | "
                f"{m['tokens']:.0f} | {e['tokens_per_s']:.1f} | {e['peak_rss_gb']:.1f} |")
        if "ratio_rlsc_over_trl" in impls:
            r = impls["ratio_rlsc_over_trl"]
            lines.append(f"| {model.removeprefix('embedded:')} | **rlsc / trl** | | **{r['step']:.2f}** | | | | "
                         f"| **{r['peak_rss']:.2f}** |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except (OSError, StopIteration):
        isa = []
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "machine": f"{os.cpu_count()} cores, {cpu}, {'/'.join(isa) or 'no avx flags read'}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def orchestrate(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:  # the worker files and floors of an earlier run, summarized again
        earlier = json.loads((out_dir / "speed.json").read_text())
        return write_summary(out_dir, earlier["runs"], earlier["floors"], earlier["args"], earlier["meta"])
    floors = measure_floors()
    print(f"floors: {floors}", file=sys.stderr)
    runs = []
    if args.keep_other_runs:  # re-measure some implementations, keep the others' runs from speed.json
        earlier = json.loads((out_dir / "speed.json").read_text())
        runs = [r for r in earlier["runs"] if r["impl"] not in args.impls.split(",")]
    for model in args.models.split(","):
        for round_index in range(args.rounds):
            for impl in args.impls.split(","):
                result_path = out_dir / f"{model.removeprefix('embedded:')}-{impl}-{round_index}.json"
                cmd = [sys.executable, "-m", "bench.speed", "worker", "--impl", impl, "--model", model,
                       "--out", str(result_path), *_shared_flags(args)]
                print(f"[{time.strftime('%H:%M:%S')}] {impl} on {model}, round {round_index}", file=sys.stderr)
                subprocess.run(cmd, check=True, cwd=HERE.parent)
                run = json.loads(result_path.read_text())
                run["k"] = args.k
                runs.append(run)
    return write_summary(out_dir, runs, floors, vars(args), versions())


def write_summary(out_dir: Path, runs: list[dict], floors: dict, args: dict, meta: dict) -> int:
    summary = summarize(runs, floors)
    (out_dir / "speed.json").write_text(json.dumps({"floors": floors, "meta": meta, "args": args,
                                                     "summary": summary, "runs": runs}, indent=1))
    table = markdown(summary, floors, meta, args.get("set", []))
    (out_dir / "speed.md").write_text(table)
    print(table)
    return 0


def _shared_flags(args) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--k", str(args.k),
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
             "--lr", str(args.lr)]
    flags += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    for item in args.set:
        flags += ["--set", item]
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    p.add_argument("--models", default="embedded:smollm2-135m-instruct,embedded:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--impls", default="rlsc,trl", help="order within a round")
    p.add_argument("--rounds", type=int, default=1, help="alternations of the implementations per model")
    p.add_argument("--impl", choices=["rlsc", "trl"], help="worker: which implementation")
    p.add_argument("--model", help="worker: which model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra rlsc config overrides (both sides)")
    p.add_argument("--out", default=str(HERE / "results"), help="run: results folder; worker: result file")
    p.add_argument("--summarize-only", action="store_true", help="summarize the results folder's speed.json again")
    p.add_argument("--keep-other-runs", action="store_true",
                   help="keep the runs of implementations not in --impls from the folder's speed.json")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return worker(args) if args.mode == "worker" else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
