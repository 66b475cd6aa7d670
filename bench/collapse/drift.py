"""How far each step's samples drifted from the starting policy, measured after the fact.

For every round file of the runs of bench/collapse/run.sh, the samples are re-scored under the
starting (base) weights at the sampling temperature; per step we report the mean over completion
tokens of log pi_step(y_t) - log pi_base(y_t), the sampled estimate of KL(pi_step || pi_base) on the
policy's own samples, next to the mean base token log-prob. This is the measurement the guard's
`reference_drift` signal and its default threshold come from.

    python bench/collapse/drift.py [WORK_DIR] [RUN ...]     (default outputs/bench-collapse guard-warn lora)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    import pandas as pd
    import torch

    from rlsc.config import load_config
    from rlsc.models import load_policy
    from rlsc.sampling import rollouts_from_frame
    from rlsc.scoring import completion_token_logprobs

    work = Path(argv[0]) if argv else Path("outputs/bench-collapse")
    runs = argv[1:] or ["guard-warn", "lora"]
    cfg = load_config(None, ["model.lora.enabled=false"])
    model, tokenizer = load_policy(cfg.model, cfg.paths.cache_dir)
    model.eval()
    result: dict[str, list[dict]] = {}
    for run in runs:
        result[run] = []
        for path in sorted((work / run / "rollouts").glob("round-*.parquet")):
            rollouts, _, _ = rollouts_from_frame(pd.read_parquet(path), tokenizer)
            with torch.no_grad():
                base_logp, _ = completion_token_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask,
                                                         rollouts.completion_ids, rollouts.completion_mask,
                                                         rollouts.temperature)
            mask = rollouts.completion_mask.float()
            drift = float(((rollouts.token_logprobs - base_logp) * mask).sum() / mask.sum())
            row = {"round": int(path.stem.split("-")[1]), "drift_per_token": drift,
                   "base_token_logprob": float((base_logp * mask).sum() / mask.sum()),
                   "mean_length": float(mask.sum(-1).mean())}
            result[run].append(row)
            print(run, row, flush=True)
    out = HERE / "drift.json"
    kept = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**kept, **result}, indent=1))  # runs measured earlier stay
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
