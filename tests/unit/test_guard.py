"""The collapse guard: each signal against a hand computation, the rules, and a tiny model driven to
collapse (it fires and rolls back to the last healthy weights) next to a healthy run (it never fires);
the optional KL anchor to the initial policy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlsc.config import GuardConfig, load_config
from rlsc.errors import RlscError
from rlsc.guard import (
    GuardState,
    RollingBaseline,
    batch_distinct_share,
    collapse_signals,
    cross_question_identical_share,
    decisive,
    distinct_answer_share,
    evaluate_rules,
    few_shot_copy_rate,
    grad_norm_spike,
    p_old_saturation,
    ratio_to_baseline,
    reference_drift,
)
from rlsc.objectives import kl_penalty, token_kl
from rlsc.problems import Problem
from rlsc.sampling import Rollouts
from rlsc.trainer import train
from tests.conftest import build_tiny_model, build_tiny_tokenizer

# ---------------------------------------------------------------- signals, by hand


def test_distinct_answer_shares():
    # question 0: {1, 2} of 4 samples (None is no answer) = 0.5; question 1: {3} of 4 = 0.25
    assert distinct_answer_share([["1", "1", "2", None], ["3", "3", "3", "3"]]) == pytest.approx(0.375)
    assert distinct_answer_share([[None, None]]) == 0.0
    # {1, 2, 3} over 6 samples
    assert batch_distinct_share(["1", "1", "2", None, "3", "3"]) == pytest.approx(0.5)


def test_cross_question_identical_share():
    # k = 2: q0 = ("x y", "z"), q1 = ("x  y", "w"), q2 = ("z", "v"). "x y" is in q0 and q1 (whitespace
    # aside), "z" in q0 and q2: rows 0, 1, 2, 4 -> 4 of 6
    texts = ["x y", "z", "x  y", "w", "z", "v"]
    assert cross_question_identical_share(texts, k=2) == pytest.approx(4 / 6)
    # identical within a question only: what the objective rewards, not a collapse signal
    assert cross_question_identical_share(["a", "a", "b", "c"], k=2) == 0.0
    assert cross_question_identical_share(["a", "a", "a"], k=3) == 0.0  # one question


def test_cross_question_identical_share_remembers_recent_steps():
    # one question per step: the step alone has nothing to compare with; its texts are compared with
    # the completions the last steps gave to OTHER questions. 2 of the 3 samples of question "B" repeat
    # what question "A" got a step earlier; the same question again ("B" before) is not "other".
    recent = [["A", "same text"], ["B", "b's own"]]
    texts = ["same   text", "same text", "b's own"]
    assert cross_question_identical_share(texts, k=3, question_keys=["B"], recent=recent) == pytest.approx(2 / 3)
    assert cross_question_identical_share(texts, k=3, question_keys=["B"]) == 0.0


def test_few_shot_copy_rate():
    reference = ["One two three four five"]
    # 4-grams of the first sample: (one two three four) is in the example, the other 2 are not -> 1/3;
    # the second has fewer than 4 words -> 0
    assert few_shot_copy_rate(["one two three four six seven", "one two"], reference) == pytest.approx(1 / 6)
    assert few_shot_copy_rate(["one two three four"], []) == 0.0
    assert few_shot_copy_rate(["one two three four five"], reference, n=2) == 1.0


def test_p_old_saturation_baselines_and_grad_spikes():
    seq = torch.tensor([0.995, 0.5, 0.999, 0.2]).log()
    assert p_old_saturation(seq) == 0.5
    assert p_old_saturation(seq, threshold=0.1) == 1.0
    assert ratio_to_baseline(0.5, 2.0) == 0.25
    assert ratio_to_baseline(0.5, None) == 1.0 and ratio_to_baseline(0.5, 0.0) == 1.0
    baseline = RollingBaseline(2)
    for value in (1.0, float("nan"), 3.0, 100.0):  # NaN skipped, frozen after 2 values
        baseline.add(value)
    assert baseline.value == 2.0
    assert grad_norm_spike(50.0, [1.0, 5.0, 3.0]) == pytest.approx(50 / 3)
    assert grad_norm_spike(50.0, []) == 1.0


def _rollouts(texts: list[str], k: int, seq_p: list[float], lengths: list[int], entropy: float) -> Rollouts:
    """Rollouts with given texts, p_old(y), lengths and a constant token entropy."""
    n, width = len(texts), max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    token_logprobs = torch.zeros(n, width)
    token_logprobs[:, 0] = torch.tensor(seq_p).log()
    zeros = torch.zeros(n, width)
    return Rollouts(
        k=k, temperature=0.5, prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1),
        completion_ids=torch.ones(n, width, dtype=torch.long), completion_mask=mask,
        stopped=torch.ones(n, dtype=torch.bool), token_logprobs=token_logprobs * mask,
        token_entropy=torch.full((n, width), entropy) * mask, token_max_prob=zeros, token_self_certainty=zeros,
        token_agreement=torch.zeros(n // k), texts=texts,
    )


def test_collapse_signals_of_one_step_under_stable_names():
    rollouts = _rollouts(["4 * 6 = 24 crayons. \\boxed{24}", "4 * 6 = 24 crayons. \\boxed{24}", "a", "b"], k=2,
                         seq_p=[0.999, 0.999, 0.5, 0.1], lengths=[2, 2, 1, 3], entropy=0.2)
    state = GuardState(RollingBaseline(2, [0.4]), RollingBaseline(2, [4.0]), grad_norms=[2.0, 4.0])
    signals = collapse_signals(rollouts, ["24", "24", None, "7"], ["4 * 6 = 24 crayons. 24 - 5 = 19."], 30.0, state)
    assert signals == pytest.approx({
        "guard/distinct_share": (1 / 2 + 1 / 2) / 2,  # q0: {24} of 2; q1: {7} of 2
        "guard/batch_distinct_share": 2 / 4,
        "guard/cross_question_identical": 0.0,  # the identical pair is within question 0
        "guard/few_shot_copy": (3 / 4 + 3 / 4 + 0 + 0) / 4,  # 4 four-grams, the first 3 in the example
        "guard/p_old_saturation": 2 / 4,
        "guard/entropy_ratio": 0.2 / 0.4,
        "guard/length_ratio": 2.0 / 4.0,  # mean length (2 + 2 + 1 + 3) / 4
        "guard/grad_norm_spike": 30.0 / 3.0,  # median of (2, 4)
    })


def test_reference_drift_against_a_hand_computation():
    # row 0: tokens (-0.1 vs -0.5), (-0.2 vs -0.2); row 1: (-1.0 vs -3.0), padding (ignored)
    logp = torch.tensor([[-0.1, -0.2], [-1.0, 0.0]])
    ref = torch.tensor([[-0.5, -0.2], [-3.0, -9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert reference_drift(logp, ref, mask) == pytest.approx((0.4 + 0.0 + 2.0) / 3)
    assert reference_drift(logp, logp, mask) == 0.0


def test_the_drift_rule_separates_the_measured_collapse_from_the_healthy_run():
    # bench/collapse/drift.py: first updated step of the collapsed full-FT run 0.447 nats/token (its
    # lowest step 0.158 came after the onset); highest step of the healthy LoRA run 0.125
    fired = decisive(evaluate_rules({"guard/reference_drift": 0.447}, GuardConfig()))
    assert (fired.signal, fired.action) == ("reference_drift", "rollback")
    assert decisive(evaluate_rules({"guard/reference_drift": 0.125}, GuardConfig())) is None


def test_guard_state_round_trips_through_json():
    state = GuardState(RollingBaseline(2, [0.4]), RollingBaseline(2, [4.0, 5.0]), [1.5], healthy_step=3)
    again = GuardState.from_dict(json.loads(json.dumps(state.to_dict())), baseline_steps=2)
    assert again == state
    assert GuardState.from_dict(None, 3) == GuardState.fresh(3)


# ---------------------------------------------------------------- rules


def test_default_rules_fire_on_the_collapse_signals_only():
    firings = evaluate_rules({
        "guard/cross_question_identical": 0.75, "guard/few_shot_copy": 0.6,  # 0.6 is not above 0.6
        "guard/entropy_ratio": 0.01, "guard/p_old_saturation": float("nan"), "guard/distinct_share": 0.0625,
    }, GuardConfig())
    assert [(f.signal, f.action) for f in firings] == [("cross_question_identical", "rollback"), ("entropy_ratio", "warn")]
    assert decisive(firings).signal == "cross_question_identical"
    assert decisive([f for f in firings if f.action == "warn"]) is None


def test_the_measured_healthy_end_state_does_not_stop_a_run():
    # last step of a healthy LoRA run on the embedded model: 1 distinct answer of 16 per question,
    # mean p_old 0.95 (half the samples saturated), entropy at 6% of its first steps, grad norm 24.6
    healthy = {"guard/distinct_share": 1 / 16, "guard/batch_distinct_share": 2 / 32, "guard/p_old_saturation": 0.5,
               "guard/cross_question_identical": 0.0, "guard/few_shot_copy": 0.02, "guard/entropy_ratio": 0.064,
               "guard/length_ratio": 0.85, "guard/grad_norm_spike": 0.2}
    assert decisive(evaluate_rules(healthy, GuardConfig())) is None


def test_rules_merge_onto_the_defaults_and_unknown_signals_are_refused():
    cfg = load_config(None, ["guard.rules.few_shot_copy.threshold=0.7", "guard.rules.entropy_ratio.action=off",
                             "guard.rules.distinct_share={threshold: 0.1, direction: below}"]).guard
    assert cfg.rules["few_shot_copy"].threshold == 0.7 and cfg.rules["few_shot_copy"].action == "rollback"
    assert cfg.rules["cross_question_identical"].action == "rollback"
    assert cfg.rules["distinct_share"].action == "warn"
    assert evaluate_rules({"guard/entropy_ratio": 0.0}, cfg) == []
    with pytest.raises(RlscError, match="unknown guard signal 'bogus'"):
        load_config(None, ["guard.rules.bogus.threshold=1"])


# ---------------------------------------------------------------- the guard in training, on a tiny model

PROBLEMS = [Problem(id=f"q{i}", question=f"What is {i} + {i}?", answer=None, source="test") for i in range(3)]


def _cfg(tmp_path, *extra):
    return load_config(None, [
        f"paths.work_dir={tmp_path}", "sampling.k=4", "sampling.max_new_tokens=6", "train.micro_batch=4",
        "train.checkpoint_every=100", "model.lora.enabled=false", "prompt.few_shot=[]", *extra,
    ])


# full FT at a huge lr: every question soon gets one text. The drift rule (which fires first on it)
# is off here so these tests exercise the text rules; test_the_drift_rule_rolls_back_* covers it.
COLLAPSE = ("train.lr=0.3", "train.steps=6", "guard.rules.reference_drift.action=off")


def _policy(seed: int = 7):
    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok), seed=seed), tok


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rows(result):
    return [json.loads(line) for line in result.metrics_path.read_text().splitlines()]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_collapsing_run_is_rolled_back_to_its_last_healthy_weights(tmp_path):
    model, tok = _policy()
    result = train(_cfg(tmp_path, *COLLAPSE), PROBLEMS, tmp_path / "collapse", model=model, tokenizer=tok,
                   progress=False)
    fired = result.guard_fired
    assert fired is not None and fired["signal"] == "cross_question_identical" and fired["action"] == "rollback"
    rows = _rows(result)
    assert rows[-1]["guard/fired"] == "cross_question_identical" and rows[-1]["step"] == fired["step"]
    assert result.steps_done == fired["step"] + 1 < 6
    assert json.loads((result.output_dir / "guard.json").read_text())["restored"]["step"] == result.rolled_back_to_step

    healthy = load_file(result.output_dir / "healthy.safetensors")
    assert _equal(_trainable(model), healthy)
    assert _equal(load_file(result.final_dir / "model.safetensors"), healthy)  # final/ holds the healthy weights
    # and those are the weights a run stopped at the start of that step ends with
    again, tok = _policy()
    short = _cfg(tmp_path, *COLLAPSE, f"train.steps={result.rolled_back_to_step}", "guard.enabled=false")
    train(short, PROBLEMS, tmp_path / "short", model=again, tokenizer=tok, progress=False)
    assert _equal(_trainable(again), healthy)


@pytest.mark.parametrize("lora", [False, True])
def test_the_drift_rule_rolls_back_a_policy_that_ran_away_from_its_start(tmp_path, lora):
    model, tok = _policy()
    if lora:
        from rlsc.config import ModelConfig
        from rlsc.models import attach_lora

        model = attach_lora(model, ModelConfig(lora={"enabled": True, "r": 4, "alpha": 8}))
    start = _trainable(model)
    # a tiny adapter moves the policy less: its drift reaches 0.03 to 0.1 here, so a lower threshold
    threshold = 0.02 if lora else 0.25
    cfg = _cfg(tmp_path, "train.lr=0.3", "train.steps=6", f"guard.rules.reference_drift.threshold={threshold}")
    result = train(cfg, PROBLEMS, tmp_path / "drift", model=model, tokenizer=tok, progress=False)
    assert result.guard_fired["signal"] == "reference_drift" and result.guard_fired["value"] > threshold
    rows = _rows(result)
    assert rows[0]["guard/reference_drift"] == pytest.approx(0.0, abs=1e-5)  # sampled by the starting weights
    assert _equal(_trainable(model), load_file(result.output_dir / "healthy.safetensors"))
    if result.rolled_back_to_step == 0:
        assert _equal(_trainable(model), start)
    # full FT keeps the starting weights for the reference; LoRA needs no copy (adapter off)
    assert (result.output_dir / "reference.safetensors").is_file() is not lora


def test_the_stop_action_keeps_the_current_weights(tmp_path):
    model, tok = _policy()
    stop = _cfg(tmp_path, *COLLAPSE, "guard.rules.cross_question_identical.action=stop")
    result = train(stop, PROBLEMS, tmp_path / "stop", model=model, tokenizer=tok, progress=False)
    assert result.guard_fired["action"] == "stop" and result.rolled_back_to_step is None
    assert json.loads((result.output_dir / "guard.json").read_text())["restored"] is None
    # the weights after the step that fired: what the same run without a guard has after as many steps
    unguarded, tok = _policy()
    plain = _cfg(tmp_path, *COLLAPSE, f"train.steps={result.steps_done}", "guard.enabled=false")
    train(plain, PROBLEMS, tmp_path / "plain", model=unguarded, tokenizer=tok, progress=False)
    assert _equal(_trainable(model), _trainable(unguarded))
    assert not _equal(_trainable(model), load_file(result.output_dir / "healthy.safetensors"))


def test_a_healthy_run_never_fires(tmp_path):
    model, tok = _policy()
    result = train(_cfg(tmp_path, "train.lr=1e-3", "train.steps=4"), PROBLEMS, tmp_path / "healthy", model=model,
                   tokenizer=tok, progress=False)
    assert result.guard_fired is None and result.rolled_back_to_step is None and result.steps_done == 4
    rows = _rows(result)
    assert all("guard/fired" not in r and "guard/warnings" not in r for r in rows)
    assert {"guard/cross_question_identical", "guard/entropy_ratio", "guard/grad_norm_spike"} <= rows[0].keys()
    assert rows[0]["guard/reference_drift"] == pytest.approx(0.0, abs=1e-5)  # samples of the starting weights
    assert not (result.output_dir / "guard.json").exists()
    assert (result.output_dir / "healthy.safetensors").is_file()


def test_the_guard_plot_draws_every_signal(tmp_path):
    from rlsc.report import plot_guard

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "guard/cross_question_identical": 0.0, "guard/entropy_ratio": 1.0},
            {"step": 1, "guard/cross_question_identical": 1.0, "guard/entropy_ratio": 0.01,
             "guard/fired": "cross_question_identical"}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_guard(metrics, tmp_path / "train" / "guard.png", GuardConfig())
    assert out.is_file() and out.stat().st_size > 10_000


# ---------------------------------------------------------------- the KL anchor


def test_token_kl_and_its_mean_against_a_hand_computation():
    logp = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]).log()
    ref = torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]]]).log()
    # position 0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465); position 1: equal -> 0
    expected_0 = 0.5 * (math.log(2) + math.log(2 / 3))
    expected_2 = 0.3 * math.log(0.6) + 0.7 * math.log(1.4)
    assert token_kl(logp, ref)[0].tolist() == pytest.approx([expected_0, 0.0, expected_2], abs=1e-6)
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    assert kl_penalty(logp, ref, mask).item() == pytest.approx(expected_0 / 2, abs=1e-6)
    assert kl_penalty(logp, ref, mask, total_tokens=4).item() == pytest.approx(expected_0 / 4, abs=1e-6)


def _lora_policy():
    from rlsc.config import ModelConfig
    from rlsc.models import attach_lora

    model, tok = _policy()
    lora = ModelConfig(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    return attach_lora(model, lora), tok


def test_the_kl_anchor_is_zero_at_the_start_and_enters_the_loss(tmp_path):
    model, tok = _lora_policy()
    cfg = _cfg(tmp_path, "model.lora.enabled=true", "train.kl_beta=0.5", "train.lr=0.05", "train.steps=3")
    rows = _rows(train(cfg, PROBLEMS, tmp_path / "kl", model=model, tokenizer=tok, progress=False))
    assert abs(rows[0]["kl"]) < 1e-6  # LoRA B starts at zero: the adapter is the identity
    assert rows[-1]["kl"] > 1e-6

    from rlsc.prompts import render_prompt
    from rlsc.trainer import backward_on_rollouts, sample_questions

    torch.manual_seed(0)
    rollouts = sample_questions(model, tok, [render_prompt(tok, p.question, cfg.prompt) for p in PROBLEMS[:2]], cfg)
    answers = [None] * len(rollouts.texts)
    without = cfg.model_copy(update={"train": cfg.train.model_copy(update={"kl_beta": 0.0})})
    loss_0, kl_0 = backward_on_rollouts(model, rollouts, answers, without, lambda loss: None)
    loss_b, kl_b = backward_on_rollouts(model, rollouts, answers, cfg, lambda loss: None)
    assert kl_0 is None and kl_b > 0
    assert loss_b == pytest.approx(loss_0 + 0.5 * kl_b, rel=1e-5)


def test_a_kl_anchor_without_lora_is_refused(tmp_path):
    model, tok = _policy()
    with pytest.raises(RlscError, match="needs a LoRA model"):
        train(_cfg(tmp_path, "train.kl_beta=0.1"), PROBLEMS, tmp_path / "refused", model=model, tokenizer=tok,
              progress=False)
