"""The one typed configuration of rlsc: every section of params.yaml, with the one set of defaults.

The CLI, the Prefect flows and the DVC stages all read this model; nothing else holds a default.
Each field documents itself (what it does, its default, and where the paper's value differs).
A YAML file supplies values and `--set section.key=value` overrides them; an unknown key or a bad
value is refused with an `RlscError` that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlsc.errors import RlscError

EMBEDDED_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
# Terse on purpose: on 2 CPU cores every generated token costs ~0.03 s per sequence, and this wording
# halves the answers (31 vs 76 tokens on 48 generated problems) at a similar accuracy (26 vs 31 of 48).
DEFAULT_INSTRUCTION = (
    "Solve the math word problem. Write only the arithmetic, one short line per step, "
    "then the final answer as \\boxed{N}."
)


class Section(BaseModel):
    # forbid: a misspelt key is an error, never silently ignored
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (peft) instead of all weights.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; 0 keeps sampling == scoring.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names."
    )


class ModelConfig(Section):
    name: str = Field(
        EMBEDDED_MODEL,
        description="Hub id, local folder (safetensors), or 'embedded:<name>' (assembled from PyPI wheels).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off: it executes code.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class FewShotExample(Section):
    question: str
    answer: str


class PromptConfig(Section):
    instruction: str = Field(DEFAULT_INSTRUCTION, description="System message; asks for the answer in \\boxed{}.")
    few_shot: list[FewShotExample] = Field(
        default_factory=lambda: [
            FewShotExample(
                question="Mia has 4 boxes with 6 crayons in each box. She gives away 5 crayons. "
                "How many crayons does she have left?",
                answer="4 * 6 = 24 crayons. 24 - 5 = 19 left. The answer is \\boxed{19}.",
            )
        ],
        description="Worked examples shown as prior chat turns (user question, assistant answer).",
    )


class DataConfig(Section):
    train: str = Field(
        "synthetic:20:1",
        description="Training questions (labels never used): a .jsonl path, 'synthetic:N[:SEED]' or 'hf:NAME[:CONFIG]'.",
    )
    eval: str = Field("synthetic:128:2", description="Held-out evaluation problems with gold answers.")
    train_split: str = Field("train", description="Split for hf: sources.")
    eval_split: str = Field("test", description="Split for hf: sources.")
    train_limit: int | None = Field(None, gt=0, description="Seeded subset of the training set.")
    eval_limit: int | None = Field(None, gt=0, description="Seeded subset of the eval set.")
    subset_seed: int = Field(0, description="Seed of the subsets above.")
    eval_templates: list[str] | None = Field(
        None, description="Synthetic eval set: templates to draw from (None = all)."
    )
    train_templates: list[str] | None = Field(
        None, description="Synthetic train set: templates to draw from (None = all)."
    )


class SamplingConfig(Section):
    """Samples come from the model's own tempered distribution: no top-k, top-p or penalties,
    as the objective assumes (sum_y p(y)^2 is over the model's distribution)."""

    k: int = Field(16, ge=1, description="Samples per question (paper: 16).")
    temperature: float = Field(0.5, gt=0.0, description="Sampling temperature (paper: 0.5).")
    max_new_tokens: int = Field(128, gt=0, description="Completion budget (paper: 3072 on 8xA100).")
    questions_per_batch: int = Field(
        2, ge=1, description="Questions sampled together in one call (their k samples share one batch)."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: training-time sampling multiplies bf16 copies of the weights (made as each "
        "round's sampling starts) with inputs rounded to bf16; sums, norms, attention, softmax and the "
        "recorded p_old stay fp32, so p_old is the probability under the policy that drew the sample. "
        "On AMX CPUs the decode step's products run on a tile kernel at half the weight bytes "
        "(bench/RESULTS.md); elsewhere torch's bf16 matmul (slow without bf16 hardware). Evaluation "
        "always decodes in fp32."
    )


class TrainConfig(Section):
    objective: Literal["rlsc", "confidence_reward", "majority_vote", "entropy"] = Field(
        "rlsc", description="rlsc = the paper's L1/L2; the others are the peer signals."
    )
    alpha: float = Field(
        0.1, ge=0.0, description="rlsc: L2 smoothing (0 = L1). confidence_reward: format bonus weight."
    )
    weighting: Literal["sequence", "token_mean", "normalized"] = Field(
        "sequence",
        description="rlsc weights: 'sequence' = p_old(y) (the paper); 'token_mean' = geometric mean "
        "per token; 'normalized' = p_old(y) / sum over the k samples. Only 'sequence' is the paper's.",
    )
    lr: float = Field(1e-4, gt=0.0, description="AdamW lr (paper: 1e-5 full FT; LoRA needs about 10x).")
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping (paper setup: 1.0).")
    steps: int = Field(10, ge=1, description="Optimizer steps (paper: 10 or 20).")
    questions_per_step: int = Field(2, ge=1, description="Questions accumulated into one optimizer step.")
    micro_batch: int = Field(8, ge=1, description="Sequences per forward/backward (memory knob only).")
    micro_batch_tokens: int = Field(
        1024, ge=1, description="At most this many completion positions (rows x the longest) per forward/"
        "backward, so long samples get smaller micro-batches (memory knob only: activations and the "
        "vocabulary-wide tensors grow with it). Qwen 0.5B + LoRA, one step at 384 new tokens: 8 rows x 384 "
        "was OOM-killed at 24 GB; capped at 2048 / 1024 it peaked at 21.4 / 22.3 GB (bench/RESULTS.md). "
        "A longer sample goes alone."
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16: the update's forward and backward under torch.autocast (bf16 matrix products; "
        "weights, gradients, optimizer, log-softmax and the sampling-time p_old stay fp32). Several times "
        "faster where the CPU has AMX or avx512_bf16 (bench/RESULTS.md), emulated and slower where not."
    )
    retain_freed_memory: bool = Field(
        False, description="Keep freed memory in the process (glibc: no per-block mmaps, no trimming) so each "
        "step reuses it instead of page-faulting it anew: full fine-tuning updates ~20% faster, peak RSS "
        "higher (see rlsc/allocator.py)."
    )
    steps_per_round: int = Field(
        1, ge=1, description="Optimizer steps per sampling round: the old (sampling) policy is refreshed "
        "every this many steps. 1 is the paper's on-policy form."
    )
    checkpoint_every: int = Field(5, ge=1, description="Write a resumable checkpoint every N steps.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Abort after this many non-finite losses in a row.")
    kl_beta: float = Field(
        0.0, ge=0.0, description="Weight of a KL(pi_theta || pi_initial) penalty per completion token (0 = off, "
        "the paper has none). Needs LoRA: the reference is the same model with the adapter disabled."
    )
    probe_problems: str | None = Field(
        None, description="Held-out problems WITH gold answers scored greedily during training (a monitor, never a "
        "training signal), so a user sees when accuracy peaks; same source forms as data.eval."
    )
    probe_every: int = Field(0, ge=0, description="Score the probe set before training and every N steps (0 = off).")
    probe_limit: int = Field(32, ge=1, description="Seeded subset of the probe problems (each probe costs a greedy pass).")
    seed: int = Field(0)


# The collapse guard's signals, logged as guard/<name> every step (see rlsc/guard.py for the formulas).
GUARD_SIGNALS = (
    "distinct_share", "batch_distinct_share", "cross_question_identical", "few_shot_copy",
    "p_old_saturation", "entropy_ratio", "length_ratio", "grad_norm_spike", "reference_drift",
)


class GuardRule(Section):
    threshold: float = Field(description="The rule fires when the signal is beyond this value.")
    direction: Literal["above", "below"] = Field("above", description="Fire when the signal is above or below.")
    action: Literal["off", "warn", "stop", "rollback"] = Field(
        "warn", description="warn = log only; stop = end training, keep the current weights; rollback = end "
        "training and restore the weights of the last round that passed the guard; off = rule disabled."
    )

    @field_validator("action", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


# Chosen from runs on the embedded model (../shared/METHOD.md, "Measured on the embedded model"). The
# measured collapse (full FT, lr 1e-5) gave every question the same garbled copy of the few-shot
# example: identical completions across DIFFERENT questions and few-shot copying are specific to it,
# so they roll back. A healthy LoRA run (lr 1e-4) ended with 1 distinct answer per question, majority
# agreement 1.0, mean p_old 0.95 and entropy at 6% of its first steps, with pre-clip grad norms of
# 10 to 215 on every step: distinct answers, p_old saturation, entropy and grad-norm spikes also
# move in healthy runs, so they only warn (and distinct answers has no rule at all).
# With our boxed-answer prompt the same full-FT run collapsed differently (bench/collapse): one-line,
# single-operation answers, held-out accuracy 72/128 -> 30/128, no copying. Only the drift from the
# starting policy separated it from the healthy LoRA run on the same questions: 0.35 to 1.5 nats per
# token from the first updated step on vs at most 0.125 (bench/collapse/drift.py). Length per step
# did not (one question per step: the healthy run's length also halved on short questions).
DEFAULT_GUARD_RULES = {
    "reference_drift": {"threshold": 0.25, "direction": "above", "action": "rollback"},
    "cross_question_identical": {"threshold": 0.5, "direction": "above", "action": "rollback"},
    "few_shot_copy": {"threshold": 0.6, "direction": "above", "action": "rollback"},
    "entropy_ratio": {"threshold": 0.05, "direction": "below", "action": "warn"},
    "length_ratio": {"threshold": 0.3, "direction": "below", "action": "warn"},
    "p_old_saturation": {"threshold": 0.95, "direction": "above", "action": "warn"},
    "grad_norm_spike": {"threshold": 20.0, "direction": "above", "action": "warn"},
}


class GuardConfig(Section):
    """Label-free collapse detection every step, and what to do when a signal crosses its threshold."""

    enabled: bool = Field(True, description="Compute the guard signals and apply the rules every step.")
    baseline_steps: int = Field(
        2, ge=1, description="Entropy and length ratios compare against their mean over this many first "
        "steps that passed the guard."
    )
    rules: dict[str, GuardRule] = Field(
        default_factory=lambda: {name: GuardRule(**rule) for name, rule in DEFAULT_GUARD_RULES.items()},
        description="Signal name -> {threshold, direction, action}. Given rules are merged onto the defaults "
        "key by key (set action: off to disable one); names are those of GUARD_SIGNALS.",
    )

    @field_validator("rules", mode="before")
    @classmethod
    def _merge_onto_defaults(cls, given: Any) -> Any:
        # merging lets `--set guard.rules.few_shot_copy.threshold=0.7` change one field of one rule
        if not isinstance(given, dict):
            return given
        merged = {name: dict(rule) for name, rule in DEFAULT_GUARD_RULES.items()}
        for name, rule in given.items():
            if name not in GUARD_SIGNALS:
                raise ValueError(f"unknown guard signal {name!r}; known: {', '.join(GUARD_SIGNALS)}")
            fields = rule.model_dump() if isinstance(rule, GuardRule) else rule
            merged[name] = {**merged.get(name, {}), **fields} if isinstance(fields, dict) else fields
        return merged


class EvalConfig(Section):
    greedy: bool = Field(True, description="Greedy pass@1, the headline number.")
    k: int = Field(0, ge=0, description="Extra samples per problem for maj@k and pass@k (0 = none).")
    temperature: float = Field(0.5, gt=0.0, description="Temperature of the extra samples.")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, ge=1, description="Problems per greedy generate call.")
    bootstrap_samples: int = Field(10000, ge=100, description="Resamples for paired-bootstrap intervals.")
    seed: int = Field(0)


class ChecksConfig(Section):
    """Data contracts (Great Expectations suites) run before any training."""

    min_question_chars: int = Field(10, ge=1, description="Shortest acceptable question text.")
    max_question_chars: int = Field(4000, ge=1, description="Longest acceptable question text.")
    allow_test_time_training: bool = Field(
        False, description="Allow train and eval questions to overlap (the paper's test-time training); tagged."
    )


class RegistryConfig(Section):
    """MLflow tracking and the model registry with its promotion gate."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in <work_dir>/mlflow."
    )
    experiment: str = Field("rlsc", description="MLflow experiment name.")
    model_name: str = Field("rlsc-policy", description="Registered model name.")
    margin: float = Field(
        0.0, description="Promote only if the lower bound of the paired-bootstrap 95% interval of "
        "(candidate - champion) greedy accuracy is above this margin."
    )
    completions_logged: int = Field(64, ge=0, description="Sample completions logged as an MLflow table.")


class PathsConfig(Section):
    work_dir: str = Field("outputs", description="Where runs write data, checkpoints, metrics and reports.")
    cache_dir: str | None = Field(None, description="Model cache (default $RLSC_CACHE or ~/.cache/rlsc).")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    def flat(self) -> dict[str, Any]:
        """The config as {'section.key': value}, for MLflow params and run reports."""
        return _flatten(self.model_dump())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-5' -> (['train', 'lr'], 1e-5); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise RlscError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise RlscError(f"--set {item!r}: the key must name a section and a field, e.g. train.lr")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RlscError(f"--set {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each `section.key=value` override, validated once."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RlscError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise RlscError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise RlscError(f"config file {path}: expected a mapping of sections at the top level")
    for item in overrides:
        key_path, value = parse_override(item)
        _apply(tree, key_path, value)
        source += f" + --set {item}"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise RlscError(_describe(e, source)) from None


def dump_config(cfg: Config) -> str:
    """The config as YAML in the shape of params.yaml."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
