"""The paired comparison of arms over replicates, against scipy, statsmodels and hand computation."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from topr.stats import (
    problem_gain,
    PairedComparison,
    compare_arms,
    equivalence_p_value,
    format_comparisons,
    joint_bootstrap,
    paired_t_interval,
    sign_flip_p_value,
)

DIFFERENCES = [0.05, 0.02, 0.08, -0.01, 0.04, 0.06]


def _rows(accuracies, problems=100, shift=0):
    """Per-replicate boolean vectors: the first round(acc * problems) problems correct."""
    return [np.arange(problems) < round(a * problems) + shift for a in accuracies]


# --- t-interval -------------------------------------------------------------------------------


def test_t_interval_is_mean_plus_minus_t_quantile_times_standard_error():
    d = np.array(DIFFERENCES)
    half = scipy_stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    low, high = paired_t_interval(DIFFERENCES)
    assert low == pytest.approx(d.mean() - half, rel=1e-12)
    assert high == pytest.approx(d.mean() + half, rel=1e-12)


def test_t_interval_at_another_level_and_degenerate_cases():
    d = np.array(DIFFERENCES)
    half = scipy_stats.t.ppf(0.95, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    assert paired_t_interval(DIFFERENCES, confidence=0.90) == pytest.approx((d.mean() - half, d.mean() + half))
    assert paired_t_interval([0.03, 0.03, 0.03]) == (0.03, 0.03)
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_interval([0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_t_interval(DIFFERENCES, confidence=95)


# --- sign-flip permutation p-value ----------------------------------------------------------------


def _enumerated_p(differences):
    d = np.asarray(differences)
    observed = abs(d.mean())
    means = [abs(np.mean(d * np.array(signs))) for signs in itertools.product([1, -1], repeat=d.size)]
    return np.mean([m >= observed - 1e-12 for m in means])


def test_sign_flip_p_value_all_positive_is_two_of_sixty_four():
    reference = np.array([0.30, 0.25, 0.40, 0.35, 0.20, 0.33])
    arm = reference + np.array([0.05, 0.02, 0.08, 0.01, 0.04, 0.06])
    assert sign_flip_p_value(arm, reference) == pytest.approx(2 / 64)
    assert sign_flip_p_value(reference, arm) == pytest.approx(2 / 64)


@pytest.mark.parametrize(
    "differences",
    [DIFFERENCES, [0.1, -0.2, 0.05, 0.3, -0.01], [0.0, 0.0, 0.01], [0.02, -0.02, 0.02, -0.02], [0.1, 0.1]],
)
def test_exact_sign_flip_p_value_matches_enumerated_sign_patterns(differences):
    reference = np.linspace(0.2, 0.4, len(differences))
    arm = reference + np.array(differences)
    # The differences as the test sees them (arm - reference in floating point).
    assert sign_flip_p_value(arm, reference) == pytest.approx(_enumerated_p(arm - reference))


def test_sign_flip_p_value_is_one_without_any_difference_and_needs_two_pairs():
    assert sign_flip_p_value([0.3, 0.4, 0.5], [0.3, 0.4, 0.5]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        sign_flip_p_value([0.3], [0.2])
    with pytest.raises(ValueError, match="equally long"):
        sign_flip_p_value([0.3, 0.4], [0.2])


def test_sign_flip_p_value_beyond_the_exact_limit_is_seeded_monte_carlo():
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.2, 0.4, 16)
    arm = reference + rng.normal(0.01, 0.03, 16)
    p = sign_flip_p_value(arm, reference, n_resamples=4999, seed=3)
    assert p == sign_flip_p_value(arm, reference, n_resamples=4999, seed=3)
    exact = _enumerated_p(arm - reference)  # 65,536 patterns: still enumerable here
    assert p == pytest.approx(exact, abs=0.03)


# --- Holm ---------------------------------------------------------------------------------------


def test_holm_matches_the_hand_computed_step_down():
    # Four arms against one reference, with accuracy-only data and fixed exact p-values:
    # 6 replicates, k of them positive, sorted p = 2/64 (6/6 up), then the others.
    reference = {f"r{i}": 0.3 for i in range(6)}
    correct = {
        "ref": reference,
        "a": {f"r{i}": 0.3 + 0.01 * (i + 1) for i in range(6)},  # all up: p = 2/64
        "b": {f"r{i}": 0.3 + (0.02 if i else -0.01) for i in range(6)},  # one small down
        "c": {f"r{i}": 0.3 + (0.01 if i % 2 else -0.01) for i in range(6)},  # balanced: p = 1
        "d": {f"r{i}": 0.3 + 0.05 * (1 if i < 5 else -5) for i in range(6)},
    }
    comparisons = compare_arms(correct, "ref")
    p = np.array([c.p_value for c in comparisons])
    for c in comparisons:
        assert c.p_value == pytest.approx(_enumerated_p(np.array(c.differences)))
    # Holm by hand: sort ascending, multiply the i-th smallest (0-based) by (m - i), running max, cap at 1.
    order = np.argsort(p)
    m = len(p)
    expected = np.empty(m)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        expected[index] = running
    assert [c.p_holm for c in comparisons] == pytest.approx(expected.tolist())


def test_holm_on_fixed_p_values_via_statsmodels_is_the_step_down():
    from statsmodels.stats.multitest import multipletests

    # p = 0.01, 0.04, 0.03, 0.20: sorted 0.01, 0.03, 0.04, 0.20 -> 0.04, 0.09, 0.09 (max(0.08, 0.09)), 0.20
    adjusted = multipletests([0.01, 0.04, 0.03, 0.20], method="holm")[1]
    assert adjusted.tolist() == pytest.approx([0.04, 0.09, 0.09, 0.20])


# --- joint bootstrap --------------------------------------------------------------------------------


def test_bootstrap_of_identical_arms_is_zero():
    rng = np.random.default_rng(0)
    correct = rng.random((6, 108)) < 0.3
    assert joint_bootstrap(correct, correct.copy()) == (0.0, 0.0)


def test_bootstrap_of_a_constant_shift_contains_it_and_is_reproducible():
    problems, k = 100, 5
    rng = np.random.default_rng(0)
    reference = np.zeros((6, problems), dtype=bool)
    arm = np.zeros((6, problems), dtype=bool)
    for r in range(6):
        solved = rng.permutation(problems)
        reference[r, solved[:30]] = True
        arm[r, solved[: 30 + k]] = True  # the reference's problems plus k more
    low, high = joint_bootstrap(arm, reference, seed=7)
    assert low < k / problems < high
    assert low >= 0.0
    assert joint_bootstrap(arm, reference, seed=7) == (low, high)
    assert joint_bootstrap(arm, reference, seed=8) != (low, high)


def test_bootstrap_widens_when_replicates_disagree():
    problems = 200
    reference = np.zeros((6, problems), dtype=bool)
    reference[:, :60] = True
    agreeing = np.zeros((6, problems), dtype=bool)
    agreeing[:, :70] = True  # +5 points in every replicate
    disagreeing = np.zeros((6, problems), dtype=bool)
    for r, extra in enumerate([40, -20, 30, -10, 20, 0]):  # also +5 points on average
        disagreeing[r, : 60 + extra] = True
    low_a, high_a = joint_bootstrap(agreeing, reference)
    low_d, high_d = joint_bootstrap(disagreeing, reference)
    assert high_d - low_d > 2 * (high_a - low_a)
    assert low_d < 0.05 < high_d


def test_bootstrap_draws_the_shared_problems_once_for_every_replicate():
    """The same distribution as drawing replicate indices, then ONE set of problem indices used by
    every drawn replicate (they share their problems), and wider than drawing problems per replicate
    when the problems' effect is shared."""
    rng = np.random.default_rng(3)
    easy = rng.random(30) < 0.5  # problems the arm solves in every replicate and the reference never
    arm = np.tile(easy, (4, 1)) | (rng.random((4, 30)) < 0.2)
    reference = rng.random((4, 30)) < 0.2
    naive_rng = np.random.default_rng(11)
    joint, independent = [], []
    for _ in range(20_000):
        chosen = naive_rng.integers(0, 4, 4)
        shared = naive_rng.integers(0, 30, 30)
        joint.append(np.mean(arm[chosen][:, shared].astype(float) - reference[chosen][:, shared]))
        own = naive_rng.integers(0, 30, (4, 30))
        independent.append(np.mean(arm[chosen[:, None], own].astype(float) - reference[chosen[:, None], own]))
    ours = joint_bootstrap(arm, reference, n_resamples=20_000)
    assert ours == pytest.approx(tuple(np.quantile(joint, [0.025, 0.975])), abs=0.015)
    independent_width = np.subtract(*np.quantile(independent, [0.975, 0.025]))
    assert ours[1] - ours[0] > 1.5 * independent_width


def test_bootstrap_is_fast_and_validates_its_input():
    rng = np.random.default_rng(0)
    arm, reference = rng.random((6, 500)) < 0.3, rng.random((6, 500)) < 0.3
    start = time.perf_counter()
    joint_bootstrap(arm, reference, n_resamples=10_000)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match=r"scored on the same problems, got \[499, 500\]"):
        joint_bootstrap(list(arm), [reference[0], reference[1, :499], *reference[2:]])
    with pytest.raises(ValueError, match="booleans"):
        joint_bootstrap([[0.5, 1.0]], [[0, 1]])
    with pytest.raises(ValueError, match="replicates"):
        joint_bootstrap(arm, reference[:5])


# --- equivalence (TOST) ------------------------------------------------------------------------------


def test_equivalence_is_statsmodels_tost_on_the_paired_differences():
    from statsmodels.stats.weightstats import ttost_paired

    arm, reference = [0.41, 0.38, 0.45, 0.40, 0.43, 0.39], [0.40, 0.39, 0.44, 0.41, 0.42, 0.40]
    p = equivalence_p_value(arm, reference, 0.03)
    assert p == pytest.approx(ttost_paired(np.array(arm), np.array(reference), -0.03, 0.03)[0])
    assert p < 0.05  # differences of ±1 point: equivalent within 3 points
    assert equivalence_p_value(arm, reference, 0.005) > 0.05  # not within half a point
    # A wide spread never supports a tie, whatever its mean.
    assert equivalence_p_value([0.5, 0.2, 0.6], [0.3, 0.4, 0.4], 0.05) > 0.5


def test_equivalence_of_identical_differences_and_bad_input():
    assert equivalence_p_value([0.3, 0.3], [0.29, 0.29], 0.05) == 0.0
    assert equivalence_p_value([0.3, 0.3], [0.2, 0.2], 0.05) == 1.0
    with pytest.raises(ValueError, match="margin must be positive"):
        equivalence_p_value([0.3, 0.4], [0.3, 0.4], 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        equivalence_p_value([0.3], [0.3], 0.05)


# --- compare_arms --------------------------------------------------------------------------------


def _experiment():
    return {
        "rft": {"r0": _rows([0.30])[0], "r1": _rows([0.25])[0], "r2": _rows([0.40])[0], "r3": _rows([0.20])[0]},
        "topr": {"r1": _rows([0.31])[0], "r0": _rows([0.35])[0], "r2": _rows([0.42])[0]},  # r3 missing
        "sft": {"r0": _rows([0.28])[0], "r1": _rows([0.26])[0], "r2": _rows([0.37])[0], "r3": _rows([0.21])[0]},
    }


def test_compare_arms_pairs_common_replicates_with_the_reference():
    comparisons = compare_arms(_experiment(), "rft")
    assert [c.arm for c in comparisons] == ["topr", "sft"]
    assert all(c.reference == "rft" for c in comparisons)
    topr, sft = comparisons
    assert topr.replicates == ("r0", "r1", "r2")  # the reference's order, r3 unfinished by topr
    assert topr.differences == pytest.approx((0.05, 0.06, 0.02))
    assert topr.mean_difference == pytest.approx(np.mean([0.05, 0.06, 0.02]))
    assert topr.t_interval == pytest.approx(paired_t_interval([0.05, 0.06, 0.02]))
    assert topr.p_value == pytest.approx(2 / 8)
    assert sft.replicates == ("r0", "r1", "r2", "r3")
    assert sft.differences == pytest.approx((-0.02, 0.01, -0.03, 0.01))
    assert topr.bootstrap_interval[0] <= topr.mean_difference <= topr.bootstrap_interval[1]
    assert topr.note is None and sft.note is None
    # Holm over the two arms: 2 * min p first, then the running max.
    low, high = sorted([topr.p_value, sft.p_value])
    holm = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}
    assert topr.p_holm == pytest.approx(holm[topr.p_value])
    assert sft.p_holm == pytest.approx(holm[sft.p_value])


def test_compare_arms_with_chosen_arms_never_lists_the_reference():
    comparisons = compare_arms(_experiment(), "rft", arms=["sft", "rft"])
    assert [c.arm for c in comparisons] == ["sft"]
    assert comparisons[0].p_holm == comparisons[0].p_value  # a single test: Holm changes nothing


def test_compare_arms_with_fewer_than_two_common_replicates_gives_none_and_says_why():
    correct = _experiment()
    correct["late"] = {"r2": _rows([0.50])[0]}
    correct["none"] = {"r9": _rows([0.50])[0]}
    by_arm = {c.arm: c for c in compare_arms(correct, "rft")}
    late = by_arm["late"]
    assert late.replicates == ("r2",) and late.differences == pytest.approx((0.10,))
    assert late.mean_difference == pytest.approx(0.10)
    assert late.t_interval is None and late.p_value is None and late.p_holm is None and late.bootstrap_interval is None
    assert "1 replicate(s) in common" in late.note and "at least 2" in late.note
    none = by_arm["none"]
    assert none.replicates == () and none.mean_difference is None and "0 replicate(s)" in none.note
    # Holm runs over the two arms that have a p-value only.
    from statsmodels.stats.multitest import multipletests

    p = [by_arm["topr"].p_value, by_arm["sft"].p_value]
    assert [by_arm["topr"].p_holm, by_arm["sft"].p_holm] == pytest.approx(multipletests(p, method="holm")[1].tolist())


def test_compare_arms_with_accuracies_only_has_no_bootstrap():
    correct = {"ref": {"a": 0.30, "b": 0.25, "c": 0.40}, "new": {"a": 0.35, "b": 0.27, "c": 0.41}}
    (c,) = compare_arms(correct, "ref")
    assert c.differences == pytest.approx((0.05, 0.02, 0.01))
    assert c.t_interval is not None and c.p_value == pytest.approx(2 / 8)
    assert c.bootstrap_interval is None and "per-problem" in c.note


def test_compare_arms_rejects_mismatched_lengths_and_unknown_names():
    correct = _experiment()
    correct["topr"]["r1"] = _rows([0.31], problems=99)[0]
    with pytest.raises(ValueError, match=r"replicate 'r1': arm 'topr' has 99 .* reference 'rft' has 100"):
        compare_arms(correct, "rft")
    with pytest.raises(ValueError, match="unknown reference arm 'grpo'"):
        compare_arms(_experiment(), "grpo")
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['grpo'\]"):
        compare_arms(_experiment(), "rft", arms=["topr", "grpo"])


def test_comparisons_as_json_and_markdown():
    comparisons = compare_arms(_experiment() | {"late": {"r0": _rows([0.5])[0]}}, "rft")
    for c in comparisons:
        assert isinstance(c, PairedComparison)
        assert json.loads(json.dumps(c.as_dict())) == c.as_dict()
    topr = comparisons[0].as_dict()
    assert topr["replicates"] == ["r0", "r1", "r2"] and len(topr["t_interval"]) == 2
    table = format_comparisons(comparisons)
    lines = table.splitlines()
    assert lines[0].startswith("| arm | vs | replicates | mean difference (points) | 95% t-interval | 95% joint bootstrap")
    low, high = comparisons[0].t_interval
    assert lines[2].startswith(f"| topr | rft | 3 | +4.3 | [{100 * low:+.1f}, {100 * high:+.1f}] |")
    assert "| late | rft | 1 | +20.0 | – | – | – | – |" in table
    assert "- late: 1 replicate(s) in common" in table
    assert "TOST" not in table


def test_a_margin_set_before_the_run_adds_the_equivalence_test():
    comparisons = compare_arms(_experiment() | {"late": {"r0": _rows([0.5])[0]}}, "rft", equivalence_margin=0.05)
    topr, sft, late = comparisons
    assert topr.equivalence_margin == 0.05
    assert topr.equivalence_p == pytest.approx(equivalence_p_value(topr.differences, [0.0] * 3, 0.05))
    assert late.equivalence_p is None  # one replicate: no test
    table = format_comparisons(comparisons)
    assert table.splitlines()[0].endswith("| equivalent within ±5 points (TOST p) |")
    assert f"| {sft.arm} | rft | 4 |" in table and table.splitlines()[3].endswith(f" {sft.equivalence_p:.3f} |")


def test_a_runs_gain_on_the_same_problems_is_an_exact_mcnemar_test_with_a_paired_bootstrap_interval():
    from statsmodels.stats.contingency_tables import mcnemar

    # 40 problems: 20 right both times, 10 wrong both, 8 gained, 2 lost.
    before = [True] * 20 + [False] * 10 + [False] * 8 + [True] * 2
    after = [True] * 20 + [False] * 10 + [True] * 8 + [False] * 2
    gain = problem_gain(after, before)
    assert (gain.problems, gain.gained, gain.lost) == (40, 8, 2)
    assert gain.difference == pytest.approx(6 / 40)
    assert gain.p_value == pytest.approx(mcnemar([[20, 2], [8, 10]], exact=True).pvalue)
    low, high = gain.interval
    assert -0.1 < low <= 0 < 6 / 40 < high < 0.35  # 6 net of 40 problems: not beyond the noise, as p says
    clear = problem_gain([True] * 30 + [False] * 10, [False] * 12 + [True] * 18 + [False] * 10)
    assert (clear.gained, clear.lost) == (12, 0) and clear.interval[0] > 0.1 and clear.p_value < 0.001
    assert problem_gain(after, before) == gain  # seeded
    assert str(gain).startswith("+15.0 points, [") and "8 gained, 2 lost, p 0.109 (exact McNemar)" in str(gain)

    unchanged = problem_gain(before, before)
    assert (unchanged.difference, unchanged.interval, unchanged.p_value) == (0.0, (0.0, 0.0), 1.0)
    with pytest.raises(ValueError, match="same, non-empty list of problems"):
        problem_gain(after, before[:-1])


def test_importing_the_module_is_quick_and_loads_neither_scipy_nor_statsmodels():
    code = (
        "import sys, time; import numpy; t = time.perf_counter(); import topr.stats; "
        "print(time.perf_counter() - t, 'scipy' in sys.modules, 'statsmodels' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0
    assert out[1:] == ["False", "False"]
