"""The training loop on a tiny model: it learns, it resumes exactly, it refuses non-finite losses."""

from __future__ import annotations

import json

import pytest
import torch

from rlsc.config import load_config
from rlsc.errors import RlscError
from rlsc.problems import Problem
from rlsc.trainer import latest_checkpoint, questions_for_step, train
from tests.conftest import build_tiny_model, build_tiny_tokenizer

TIMING = ("time/sample", "time/update", "time/step", "time/guard", "tokens_per_s")


def _cfg(tmp_path, *extra):
    return load_config(None, [
        f"paths.work_dir={tmp_path}", "sampling.k=4", "sampling.max_new_tokens=8", "train.steps=4",
        "train.micro_batch=3", "train.checkpoint_every=2", "train.lr=1e-2", "model.lora.enabled=false",
        "prompt.few_shot=[]", *extra,
    ])


PROBLEMS = [Problem(id=f"q{i}", question=f"What is {i} + {i}?", answer=None, source="test") for i in range(3)]


def _fresh_policy(lora: bool):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=7)
    if lora:
        from rlsc.config import ModelConfig
        from rlsc.models import attach_lora

        model = attach_lora(model, ModelConfig(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    return model, tok


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


@pytest.mark.parametrize("lora,steps_per_round", [(False, 3), (True, 1)], ids=["full-mid-round", "lora-on-policy"])
def test_resume_after_2_of_4_steps_gives_the_same_weights_and_metrics(tmp_path, lora, steps_per_round):
    cfg = _cfg(tmp_path, f"model.lora.enabled={str(lora).lower()}", f"train.steps_per_round={steps_per_round}")
    model, tok = _fresh_policy(lora)
    straight = train(cfg, PROBLEMS, tmp_path / "straight", model=model, tokenizer=tok, progress=False)
    expected = _weights(model)

    model, tok = _fresh_policy(lora)
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})})
    train(short, PROBLEMS, tmp_path / "resumed", model=model, tokenizer=tok, progress=False)
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-000001"
    model, tok = _fresh_policy(lora)  # a new process: nothing carried over but the files
    train(cfg, PROBLEMS, tmp_path / "resumed", model=model, tokenizer=tok, resume=True, progress=False)

    got = _weights(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _metrics(straight.metrics_path) == _metrics(tmp_path / "resumed" / "metrics.jsonl")
    changed = [n for n, p in _weights(_fresh_policy(lora)[0]).items() if not torch.equal(p, expected[n])]
    assert changed, "training changed no weight"


def test_training_raises_the_confidence_of_its_own_samples(tmp_path):
    # the guard off: driving a tiny model this hard is what its drift rule exists to stop
    cfg = _cfg(tmp_path, "train.steps=12", "train.lr=3e-2", "sampling.k=8", "train.alpha=0.1", "guard.enabled=false")
    model, tok = _fresh_policy(False)
    result = train(cfg, PROBLEMS[:1], tmp_path / "run", model=model, tokenizer=tok, progress=False)
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    first = sum(r["weights/mean_log"] for r in rows[:3]) / 3
    last = sum(r["weights/mean_log"] for r in rows[-3:]) / 3
    assert last > first + 1.0, (first, last)
    expected_keys = {"loss", "weights/mean", "weights/min", "weights/max", "weights/mean_log", "entropy",
                     "confidence/token_prob", "completions/mean_length", "completions/clipped_ratio",
                     "answers/distinct", "agreement/majority", "agreement/token", "grad_norm",
                     *(key for key in TIMING if key != "time/guard")}  # the guard is off here
    assert expected_keys <= rows[0].keys()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("objective", ["confidence_reward", "majority_vote", "entropy"])
def test_peer_objectives_train(tmp_path, objective):
    cfg = _cfg(tmp_path, f"train.objective={objective}", "train.steps=2")
    model, tok = _fresh_policy(False)
    before = _weights(model)
    train(cfg, PROBLEMS, tmp_path / objective, model=model, tokenizer=tok, progress=False)
    if objective != "majority_vote":  # random tiny models rarely produce a majority answer
        assert any(not torch.equal(p, before[n]) for n, p in _weights(model).items())


def test_non_finite_losses_skip_steps_then_abort(tmp_path, monkeypatch):
    from rlsc import trainer

    monkeypatch.setattr(trainer, "policy_gradient_loss", lambda s, c: (s * float("nan")).sum())
    cfg = _cfg(tmp_path, "train.max_nonfinite_steps=2")
    model, tok = _fresh_policy(False)
    before = _weights(model)
    with pytest.raises(RlscError, match="2 non-finite losses in a row"):
        train(cfg, PROBLEMS, tmp_path / "nan", model=model, tokenizer=tok, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in _weights(model).items())  # no step was applied
    rows = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["skipped_steps"] for r in rows] == [1, 2]
    assert not (tmp_path / "nan" / "final").exists()


def test_questions_cover_each_epoch_once_and_depend_only_on_the_step():
    seen = [questions_for_step(s, 5, 1, seed=3) for s in range(5)]
    assert sorted(i for s in seen for i in s) == list(range(5))
    assert questions_for_step(7, 5, 2, seed=3) == questions_for_step(7, 5, 2, seed=3)


def test_rounds_sample_once_and_write_their_rollouts(tmp_path):
    import pandas as pd

    cfg = _cfg(tmp_path, "train.steps_per_round=2", "train.questions_per_step=2")
    model, tok = _fresh_policy(False)
    result = train(cfg, PROBLEMS, tmp_path / "rounds", model=model, tokenizer=tok, progress=False)
    files = sorted((result.output_dir / "rollouts").glob("round-*.parquet"))
    assert [f.name for f in files] == ["round-000000.parquet", "round-000001.parquet"]
    frame = pd.read_parquet(files[0])
    assert len(frame) == 2 * 2 * 4  # steps per round x questions per step x k
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 0, 1, 1]
    assert rows[0]["time/sample"] > 0 and rows[1]["time/sample"] == 0  # the 2nd step reuses the round's samples


def test_a_round_sampled_by_the_pipeline_trains_exactly_like_an_in_process_round(tmp_path):
    from rlsc.prompts import render_prompt
    from rlsc.trainer import sample_and_score_round

    cfg = _cfg(tmp_path, "train.steps=2")
    model, tok = _fresh_policy(False)
    train(cfg, PROBLEMS, tmp_path / "in-process", model=model, tokenizer=tok, progress=False)
    expected = _weights(model)

    model, tok = _fresh_policy(False)
    prompts = [render_prompt(tok, p.question, cfg.prompt) for p in PROBLEMS]
    first = tmp_path / "round-0.parquet"
    sample_and_score_round(model, tok, cfg, 0, [p.id for p in PROBLEMS], prompts, first)
    model, tok = _fresh_policy(False)
    train(cfg, PROBLEMS, tmp_path / "pipeline", model=model, tokenizer=tok, progress=False, first_round=first)
    assert all(torch.equal(p, expected[n]) for n, p in _weights(model).items())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_with_gradient_checkpointing(tmp_path, lora):
    cfg = _cfg(tmp_path, "train.steps=1", f"model.lora.enabled={str(lora).lower()}",
               "model.gradient_checkpointing=true")
    model, tok = _fresh_policy(lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()
    before = _weights(model)
    train(cfg, PROBLEMS, tmp_path / "ckpt", model=model, tokenizer=tok, progress=False)
    assert any(not torch.equal(p, before[n]) for n, p in _weights(model).items())


def test_probe_scores_held_out_problems_before_and_every_n_steps(tmp_path):
    probe_file = tmp_path / "probe.jsonl"
    probe_file.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)})
                                  + "\n" for i in range(3)))
    cfg = _cfg(tmp_path, f"train.probe_problems={probe_file}", "train.probe_every=2", "eval.max_new_tokens=4")
    model, tok = _fresh_policy(False)
    result = train(cfg, PROBLEMS, tmp_path / "run", model=model, tokenizer=tok, progress=False)
    lines = [json.loads(line) for line in (result.output_dir / "probe.jsonl").read_text().splitlines()]
    assert [x["steps_done"] for x in lines] == [0, 2, 4]
    assert all(x["n"] == 3 and 0 <= x["accuracy"] <= 1 for x in lines)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert ["probe/accuracy" in r for r in records] == [False, True, False, True]
    assert records[1]["probe/accuracy"] == lines[1]["accuracy"]  # the record says what the file says


def test_optimizer_is_fused_on_cpu_and_steps_like_the_default_adamw():
    from rlsc.config import TrainConfig
    from rlsc.trainer import make_optimizer

    train = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused_param = torch.nn.Parameter(torch.linspace(-1, 1, 50))
    plain_param = torch.nn.Parameter(fused_param.detach().clone())
    fused = make_optimizer({"w": fused_param}, train)
    plain = torch.optim.AdamW([plain_param], lr=train.lr, weight_decay=train.weight_decay, betas=train.betas)
    assert fused.defaults["fused"] is True
    for step in range(5):
        for param, opt in ((fused_param, fused), (plain_param, plain)):
            param.grad = torch.cos(torch.arange(50.0) + step)
            opt.step()
    assert not torch.equal(fused_param, torch.linspace(-1, 1, 50))  # it moved
    assert torch.allclose(fused_param, plain_param, atol=1e-6)


def _one_update(tmp_path, *configs):
    """One set of rollouts sampled from a fresh tiny policy, and the (loss, flat gradient) of the
    step's update on them under each config (the first one samples)."""
    from rlsc.prompts import render_prompt
    from rlsc.trainer import backward_on_rollouts, sample_questions

    model, tok = _fresh_policy(lora=False)
    torch.manual_seed(0)
    prompts = [render_prompt(tok, p.question, configs[0].prompt) for p in PROBLEMS[:2]]
    rollouts = sample_questions(model, tok, prompts, configs[0])
    answers = [None] * len(rollouts.texts)
    results = []
    for cfg in configs:
        model.zero_grad(set_to_none=True)
        loss, _ = backward_on_rollouts(model, rollouts, answers, cfg, lambda loss: loss.backward())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads)  # the optimizer never sees another dtype
        results.append((loss, torch.cat([g.flatten() for g in grads])))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return results


def test_bf16_mixed_precision_gives_the_fp32_gradient_to_bf16_rounding(tmp_path):
    """The update under train.mixed_precision=bf16: its products really run in bf16 (the gradient is
    not fp32's bit for bit), the gradient agrees with the fp32 one to bf16 rounding, and weights and
    gradients stay fp32."""
    (loss_32, grad_32), (loss_16, grad_16) = _one_update(
        tmp_path, _cfg(tmp_path, "sampling.max_new_tokens=16"),
        _cfg(tmp_path, "sampling.max_new_tokens=16", "train.mixed_precision=bf16"))
    assert not torch.equal(grad_32, grad_16)
    assert torch.nn.functional.cosine_similarity(grad_32, grad_16, dim=0) > 0.99
    assert float(grad_16.norm() / grad_32.norm()) == pytest.approx(1.0, abs=0.05)
    assert loss_16 == pytest.approx(loss_32, rel=0.05, abs=1e-3)


def test_micro_batches_respect_both_caps_and_keep_the_order():
    from rlsc.trainer import micro_batches

    lengths = torch.tensor([5, 1, 3, 9, 2, 4])
    order = torch.argsort(lengths, stable=True)  # rows 1, 4, 2, 5, 0, 3 (lengths 1, 2, 3, 4, 5, 9)
    cut = lambda rows, positions: [c.tolist() for c in micro_batches(order, lengths, rows, positions)]
    assert cut(8, 10_000) == [[1, 4, 2, 5, 0, 3]]
    assert cut(4, 10_000) == [[1, 4, 2, 5], [0, 3]]
    # positions = rows x the longest row: 1,2,3 -> 3 x 3 = 9 fits 10; adding 4 would be 16
    assert cut(8, 10) == [[1, 4, 2], [5, 0], [3]]
    assert cut(8, 4) == [[1, 4], [2], [5], [0], [3]]  # 5 and 9 exceed the cap: each alone


def test_the_gradient_does_not_depend_on_the_micro_batch_cut(tmp_path):
    (loss_whole, grad_whole), (loss_single, grad_single) = _one_update(
        tmp_path, _cfg(tmp_path, "sampling.max_new_tokens=12", "train.micro_batch=8", "train.micro_batch_tokens=100000"),
        _cfg(tmp_path, "sampling.max_new_tokens=12", "train.micro_batch=8", "train.micro_batch_tokens=1"))
    assert loss_single == pytest.approx(loss_whole, rel=1e-5)
    assert torch.allclose(grad_single, grad_whole, rtol=1e-4, atol=1e-6)
