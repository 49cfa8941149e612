import itertools

import numpy as np
import pytest

from topr.metrics import (
    PromptResult,
    bootstrap_interval,
    majority_vote,
    pass_at_k,
    summarize_evaluation,
    weighted_vote,
    wilson_interval,
)


def test_wilson_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(50, 100, z=2.576)
    assert low < 0.4038 and high > 0.5962
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize("n", [1, 7, 108, 1000])
def test_wilson_interval_always_contains_the_observed_rate(n):
    # Plots draw p - low and high - p as error bars, which must not be negative.
    for successes in range(n + 1):
        low, high = wilson_interval(successes, n)
        assert 0.0 <= low <= successes / n <= high <= 1.0
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        expected = sum(any(subset) for subset in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_validated():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 <= pass_at_k(10_000, 3, 100) <= 1.0
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote():
    assert majority_vote(["a", "b", "b"]) == "b"
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie: first seen
    assert majority_vote(["b", None, None, "a"]) == "b"  # None never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_weighted_vote():
    assert weighted_vote(["a", "b", "a"], [0.2, 0.5, 0.2]) == "b"
    assert weighted_vote(["a", "b", "a"], [0.3, 0.5, 0.3]) == "a"
    assert weighted_vote(["a", "b"], [1.0, 1.0]) == "a"
    assert weighted_vote([None, "b"], [9.0, 0.1]) == "b"
    assert weighted_vote([None], [1.0]) is None
    with pytest.raises(ValueError):
        weighted_vote(["a"], [1.0, 2.0])


def test_bootstrap_interval():
    values = [0.0, 1.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    low, high = bootstrap_interval(values, seed=3)
    assert (low, high) == bootstrap_interval(values, seed=3)
    assert low < np.mean(values) < high
    wide_low, wide_high = bootstrap_interval(values, seed=3, confidence=0.99)
    assert wide_low <= low and wide_high >= high
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_interval(values, statistic=np.max, seed=3)[1] == 1.0
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_summarize_greedy_only():
    results = [PromptResult(True, False), PromptResult(False, True), PromptResult(True, False), PromptResult(False, False)]
    summary = summarize_evaluation(results)
    low, high = wilson_interval(2, 4)
    assert summary == {
        "n_prompts": 4,
        "pass_at_1": 0.5,
        "pass_at_1_ci_low": low,
        "pass_at_1_ci_high": high,
        "parse_failure_rate": 0.25,
    }


def test_summarize_with_samples():
    results = [
        # majority "4" is correct
        PromptResult(True, False, ("4", "4", "5", None), (True, True, False, False)),
        # majority "7" (tie with "3", seen first) is wrong although one sample is right
        PromptResult(False, False, ("7", "3", "7", "3"), (False, True, False, True)),
        # nothing parsed
        PromptResult(False, True, (None, None, None, None), (False, False, False, False)),
    ]
    summary = summarize_evaluation(results, seed=1)
    assert summary["k"] == 4 and summary["n_prompts"] == 3
    assert summary["pass_at_1"] == pytest.approx(1 / 3)
    assert summary["parse_failure_rate"] == pytest.approx(1 / 3)
    assert summary["pass_at_k"] == pytest.approx(2 / 3)
    assert summary["maj_at_k"] == pytest.approx(1 / 3)
    assert (summary["maj_at_k_ci_low"], summary["maj_at_k_ci_high"]) == wilson_interval(1, 3)
    assert summary["sample_accuracy"] == pytest.approx(4 / 12)
    assert 0.0 <= summary["pass_at_k_ci_low"] <= summary["pass_at_k"] <= summary["pass_at_k_ci_high"] <= 1.0
    assert all("@" not in key for key in summary)
    assert summary == summarize_evaluation(results, seed=1)


def test_summarize_rejects_empty_and_ragged():
    with pytest.raises(ValueError):
        summarize_evaluation([])
    with pytest.raises(ValueError):
        summarize_evaluation([PromptResult(True, False, ("1",), (True,)), PromptResult(True, False)])
