"""rlsc: reinforcement learning from self-confidence (Li et al., arXiv 2506.06395 v3).

The library knows about models, samples, confidence, losses, answers and metrics; the CLI,
Prefect flows and DVC stages are thin faces on it and are never imported from here.
"""

__version__ = "0.1.0"
