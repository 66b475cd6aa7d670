"""Statistics of evaluation against brute force and known values."""

from __future__ import annotations

import itertools
import math

import pytest

from rlsc.errors import RlscError
from rlsc.evaluate import bootstrap_interval, compare, pass_at_k, wilson_interval


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 3), (8, 1, 4), (7, 7, 2), (10, 4, 10)])
def test_pass_at_k_matches_brute_force_over_all_k_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_interval(values, 4000, seed=1)
    se = math.sqrt(0.3 * 0.7 / 100)
    assert lo == pytest.approx(0.3 - 1.96 * se, abs=0.02) and hi == pytest.approx(0.3 + 1.96 * se, abs=0.02)
    assert bootstrap_interval(values, 4000, seed=1) == (lo, hi)


def _records(correct):
    return [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]


def test_paired_comparison_counts_discordant_pairs():
    a = _records([True, False, False, True, False, False])
    b = _records([True, True, True, False, False, True])
    result = compare(a, b, samples=2000, seed=0)
    assert result["difference"] == pytest.approx(2 / 6)
    assert (result["b_only_correct"], result["a_only_correct"]) == (3, 1)
    assert result["ci_low"] <= result["difference"] <= result["ci_high"]
    same = compare(a, a, samples=500)
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0)


def test_paired_comparison_refuses_different_problem_sets():
    with pytest.raises(RlscError, match="different problems"):
        compare(_records([True, False]), _records([True]))
