"""Paired comparison of experiment arms over replicates.

An experiment runs every arm in R replicates. A replicate fixes its training prompts, sampling
seed and batch-order seed, shared by every arm of that replicate, and every arm is scored
(greedy, correct or not) on the same held-out problems. Between-replicate spread, not the
per-problem binomial interval, is the noise to beat, so arms are compared with a reference arm
by the per-replicate paired difference ``d_r = acc(arm, r) - acc(reference, r)``:

- the mean of ``d`` with a t-interval (scipy): the primary interval, which holds its level at
  3–6 replicates (``bench/interval_coverage.py``),
- a two-sided sign-flip permutation p-value (``scipy.stats.permutation_test``, exact for up to
  :data:`EXACT_MAX_REPLICATES` replicates),
- a joint bootstrap interval (replicates, and the problems every replicate shares drawn once for
  all of them), shown beside it: a percentile bootstrap over so few replicates covers less
  than its nominal level,
- Holm-adjusted p-values across the arms compared with one reference (statsmodels),
- with an equivalence margin set before the run, two one-sided t-tests (TOST, statsmodels):
  a "tie" is claimed only when both reject.

Accuracies and differences are fractions; :func:`format_comparisons` shows percentage points.
scipy and statsmodels are imported inside the functions that use them, so importing this
module costs only numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Up to this many replicates the sign-flip test enumerates all 2^R sign patterns.
EXACT_MAX_REPLICATES = 12

#: Fewer common replicates than this leave no t-interval, p-value or bootstrap interval.
MIN_REPLICATES = 2


@dataclass(frozen=True)
class PairedComparison:
    """One arm against the reference arm, paired by replicate. Figures are fractions (0.05 = 5 points).

    Attributes:
        arm, reference: the two arms' names.
        replicates: the replicate ids both arms finished, in the reference's order.
        differences: per replicate, the arm's accuracy minus the reference's.
        mean_difference: mean of ``differences``; None without any common replicate.
        t_interval: t-interval (at ``confidence``) for the mean difference over replicates,
            i.e. for the expected gain of the arm over the reference on a new replicate.
        p_value: two-sided sign-flip permutation p-value for "no difference" (each
            replicate's difference as likely to have either sign); exact up to
            :data:`EXACT_MAX_REPLICATES` replicates, Monte Carlo beyond.
        p_holm: ``p_value`` after Holm's step-down correction across all arms of one
            :func:`compare_arms` call (same reference).
        bootstrap_interval: joint percentile bootstrap interval (``joint_bootstrap``) for the
            mean difference; None when some common replicate has only an accuracy, not
            per-problem results.
        confidence: the confidence level of both intervals.
        equivalence_margin: the margin of the equivalence test, set before the run; None: no test.
        equivalence_p: TOST p-value for the mean difference lying within ±``equivalence_margin``
            (``equivalence_p_value``); below 1 − ``confidence`` the arms are equivalent within it.
        note: why a figure is None; None when every figure is there.
    """

    arm: str
    reference: str
    replicates: tuple[str, ...]
    differences: tuple[float, ...]
    mean_difference: float | None
    t_interval: tuple[float, float] | None
    p_value: float | None
    p_holm: float | None
    bootstrap_interval: tuple[float, float] | None
    confidence: float = 0.95
    equivalence_margin: float | None = None
    equivalence_p: float | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: tuples become lists, None stays None (``null``)."""
        return {
            "arm": self.arm,
            "reference": self.reference,
            "replicates": list(self.replicates),
            "differences": list(self.differences),
            "mean_difference": self.mean_difference,
            "t_interval": None if self.t_interval is None else list(self.t_interval),
            "p_value": self.p_value,
            "p_holm": self.p_holm,
            "bootstrap_interval": None if self.bootstrap_interval is None else list(self.bootstrap_interval),
            "confidence": self.confidence,
            "equivalence_margin": self.equivalence_margin,
            "equivalence_p": self.equivalence_p,
            "note": self.note,
        }


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """t-interval for the mean of paired differences: ``mean ± t_{(1+c)/2, n-1} · s / √n``.

    Computed by ``scipy.stats.ttest_1samp``; differences that are all equal give the
    degenerate interval (mean, mean). Needs at least two differences.
    """
    _check_confidence(confidence)
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < MIN_REPLICATES:
        raise ValueError(f"a t-interval needs at least {MIN_REPLICATES} differences, got {d.size}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"differences must be finite, got {d.tolist()}")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    from scipy import stats

    low, high = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return float(low), float(high)


def sign_flip_p_value(
    arm_values: Sequence[float],
    reference_values: Sequence[float],
    n_resamples: int = 9_999,
    seed: int = 0,
) -> float:
    """Two-sided sign-flip permutation p-value for the mean paired difference being zero.

    Under the null hypothesis the arm and reference values of each pair (replicate) are
    exchangeable, so each difference is as likely to carry either sign. The p-value is the
    share of sign patterns whose mean difference is at least as far from zero as the
    observed one (``scipy.stats.permutation_test``, ``permutation_type="samples"``). All 2^n
    patterns are enumerated when ``n <= EXACT_MAX_REPLICATES`` or ``2^n <= n_resamples``;
    otherwise ``n_resamples`` random patterns drawn with ``seed``. Needs at least two pairs.
    """
    arm = np.asarray(arm_values, dtype=float)
    reference = np.asarray(reference_values, dtype=float)
    if arm.ndim != 1 or arm.shape != reference.shape:
        raise ValueError(f"need two equally long 1-D sequences, got shapes {arm.shape} and {reference.shape}")
    n = arm.size
    if n < MIN_REPLICATES:
        raise ValueError(f"a sign-flip p-value needs at least {MIN_REPLICATES} pairs, got {n}")
    from scipy import stats

    exact = n <= EXACT_MAX_REPLICATES or 2**n <= n_resamples
    result = stats.permutation_test(
        (arm, reference),
        _mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf if exact else n_resamples,
        alternative="two-sided",
        rng=seed,
    )
    return float(min(1.0, result.pvalue))


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def equivalence_p_value(arm_values: Sequence[float], reference_values: Sequence[float], margin: float) -> float:
    """Two one-sided paired t-tests (TOST) of the mean difference lying within ±``margin``: the
    larger of the two one-sided p-values (``statsmodels.stats.weightstats.ttost_paired``). Below
    0.05 the arms are equivalent within the margin at the 5% level. Differences that are all equal
    give 0 inside the margin and 1 outside. Needs at least two pairs and a positive margin."""
    arm, reference = np.asarray(arm_values, dtype=float), np.asarray(reference_values, dtype=float)
    if arm.ndim != 1 or arm.shape != reference.shape or arm.size < MIN_REPLICATES:
        raise ValueError(f"an equivalence test needs two equally long sequences of at least {MIN_REPLICATES}, got {arm.shape} and {reference.shape}")
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    differences = arm - reference
    if np.all(differences == differences[0]):
        return 0.0 if abs(differences[0]) < margin else 1.0
    from statsmodels.stats.weightstats import ttost_paired

    return float(ttost_paired(arm, reference, -margin, margin)[0])


BOOTSTRAP_CHUNK = 1_000  # resamples drawn at once: [chunk, problems] weights in memory


def joint_bootstrap(
    arm_correct: np.ndarray | Sequence[Sequence[bool]],
    reference_correct: np.ndarray | Sequence[Sequence[bool]],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean paired accuracy difference of replicates that
    are all scored on the same problems.

    ``arm_correct`` and ``reference_correct`` hold per-problem correctness [R, P]: row r is
    replicate r, column p the same held-out problem in every replicate. Each resample draws R
    replicates with replacement and, once for all of them, P problems with replacement, since the
    replicates share their problems (drawing them anew for each replicate would average the
    problems' noise away and narrow the interval); its statistic is the mean difference over the
    drawn replicates and problems. Returns the ``confidence`` percentile interval of the
    ``n_resamples`` statistics; reproducible for a given ``seed``.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    differences = _difference_matrix(arm_correct, reference_correct)
    replicates, problems = differences.shape
    rng = np.random.default_rng(seed)
    statistics = np.empty(n_resamples)
    for start in range(0, n_resamples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, n_resamples - start)
        problem_weights = rng.multinomial(problems, np.full(problems, 1 / problems), size=size) / problems
        replicate_weights = rng.multinomial(replicates, np.full(replicates, 1 / replicates), size=size) / replicates
        statistics[start : start + size] = np.einsum("bp,rp,br->b", problem_weights, differences, replicate_weights)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def _difference_matrix(arm_correct: Any, reference_correct: Any) -> np.ndarray:
    """Per replicate and problem, arm minus reference: float [R, P] of -1, 0 and 1."""
    arm_rows, reference_rows = _rows(arm_correct, "arm"), _rows(reference_correct, "reference")
    if len(arm_rows) != len(reference_rows):
        raise ValueError(f"arm has {len(arm_rows)} replicates, reference {len(reference_rows)}")
    if not arm_rows:
        raise ValueError("the bootstrap needs at least one replicate")
    sizes = {row.size for row in (*arm_rows, *reference_rows)}
    if len(sizes) != 1:
        raise ValueError(f"every replicate of both arms must be scored on the same problems, got {sorted(sizes)} problems")
    if sizes == {0}:
        raise ValueError("the replicates have no problems")
    return np.stack(arm_rows).astype(float) - np.stack(reference_rows).astype(float)


def _rows(correct: Any, which: str) -> list[np.ndarray]:
    rows = [np.asarray(row) for row in correct]
    for r, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"{which} replicate {r}: expected a vector of per-problem results, got shape {row.shape}")
        if not np.all((row == 0) | (row == 1)):
            raise ValueError(f"{which} replicate {r}: per-problem results must be booleans (or 0/1)")
    return [row.astype(np.int8) for row in rows]


def compare_arms(
    correct: Mapping[str, Mapping[str, Sequence[bool] | float]],
    reference: str,
    arms: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    equivalence_margin: float | None = None,
) -> list[PairedComparison]:
    """Compare each arm with ``reference`` over the replicates both finished.

    ``correct[arm][replicate]`` is the per-problem correctness on the held-out problems (same
    order for every arm), or just the accuracy as a number when per-problem results are not
    at hand (then no bootstrap interval). ``arms`` defaults to every arm but the reference, in
    the mapping's order; the reference is never compared with itself. ``n_resamples`` and
    ``seed`` serve the bootstrap and, beyond :data:`EXACT_MAX_REPLICATES` replicates, the
    permutation test; Holm's correction runs across the returned arms. With
    ``equivalence_margin`` (set before the run), each comparison also has its TOST p-value.

    Raises ValueError for an unknown arm or reference, or when the arm's and the reference's
    per-problem vectors of one replicate differ in length.
    """
    _check_confidence(confidence)
    if reference not in correct:
        raise ValueError(f"unknown reference arm {reference!r}; arms: {sorted(correct)}")
    if arms is None:
        arms = [arm for arm in correct if arm != reference]
    unknown = [arm for arm in arms if arm not in correct]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms: {sorted(correct)}")
    arms = [arm for arm in arms if arm != reference]
    comparisons = [_compare(arm, correct[arm], reference, correct[reference], confidence, n_resamples, seed) for arm in arms]
    if equivalence_margin is not None:
        comparisons = [_with_equivalence(comparison, equivalence_margin) for comparison in comparisons]
    return _with_holm(comparisons)


def _with_equivalence(comparison: PairedComparison, margin: float) -> PairedComparison:
    """``comparison`` with its TOST p-value for ±``margin`` (None below two replicates)."""
    p_value = None
    if len(comparison.differences) >= MIN_REPLICATES:
        p_value = equivalence_p_value(comparison.differences, [0.0] * len(comparison.differences), margin)
    return dataclasses.replace(comparison, equivalence_margin=margin, equivalence_p=p_value)


def _compare(
    arm: str,
    arm_results: Mapping[str, Sequence[bool] | float],
    reference: str,
    reference_results: Mapping[str, Sequence[bool] | float],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> PairedComparison:
    replicates = tuple(r for r in reference_results if r in arm_results)
    arm_accuracy, reference_accuracy, arm_rows, reference_rows = [], [], [], []
    for replicate in replicates:
        a, b = arm_results[replicate], reference_results[replicate]
        arm_accuracy.append(_accuracy(a, arm, replicate))
        reference_accuracy.append(_accuracy(b, reference, replicate))
        if _is_accuracy(a) or _is_accuracy(b):
            continue
        if len(a) != len(b):
            raise ValueError(
                f"replicate {replicate!r}: arm {arm!r} has {len(a)} per-problem results, "
                f"reference {reference!r} has {len(b)}; both must be scored on the same problems"
            )
        arm_rows.append(np.asarray(a))
        reference_rows.append(np.asarray(b))
    differences = tuple(float(x - y) for x, y in zip(arm_accuracy, reference_accuracy))
    mean = float(np.mean(differences)) if differences else None
    if len(replicates) < MIN_REPLICATES:
        note = (
            f"{len(replicates)} replicate(s) in common with {reference!r}; the t-interval, "
            f"p-value and bootstrap need at least {MIN_REPLICATES}"
        )
        return PairedComparison(arm, reference, replicates, differences, mean, None, None, None, None, confidence, note=note)
    t_interval = paired_t_interval(differences, confidence)
    p_value = sign_flip_p_value(arm_accuracy, reference_accuracy, n_resamples, seed)
    bootstrap, note = None, None
    if len(arm_rows) == len(replicates):
        bootstrap = joint_bootstrap(arm_rows, reference_rows, n_resamples, confidence, seed)
    else:
        note = "no bootstrap interval: some common replicates have only an accuracy, not per-problem results"
    return PairedComparison(arm, reference, replicates, differences, mean, t_interval, p_value, None, bootstrap, confidence, note=note)


def _is_accuracy(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _accuracy(value: Sequence[bool] | float, arm: str, replicate: str) -> float:
    if _is_accuracy(value):
        accuracy = float(value)
    else:
        row = np.asarray(value)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"arm {arm!r}, replicate {replicate!r}: expected a non-empty vector of per-problem results")
        if not np.all((row == 0) | (row == 1)):
            raise ValueError(f"arm {arm!r}, replicate {replicate!r}: per-problem results must be booleans (or 0/1)")
        accuracy = float(row.mean())
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"arm {arm!r}, replicate {replicate!r}: accuracy {accuracy} is not in [0, 1]")
    return accuracy


def _with_holm(comparisons: list[PairedComparison]) -> list[PairedComparison]:
    tested = [i for i, c in enumerate(comparisons) if c.p_value is not None]
    if not tested:
        return comparisons
    from statsmodels.stats.multitest import multipletests

    adjusted = multipletests([comparisons[i].p_value for i in tested], method="holm")[1]
    result = list(comparisons)
    for i, p in zip(tested, adjusted):
        result[i] = dataclasses.replace(comparisons[i], p_holm=float(p))
    return result


@dataclass(frozen=True)
class ProblemGain:
    """One model's held-out accuracy against another's (the same run's starting model) on the same
    problems. This is the evaluation's noise only: a training seed moves results more (see
    ``compare_arms`` for replicated arms). Figures are fractions."""

    problems: int
    gained: int  # wrong before, right after
    lost: int  # right before, wrong after
    difference: float
    interval: tuple[float, float]
    p_value: float

    def __str__(self) -> str:
        return (
            f"{_points(self.difference)} points, {format_interval(self.interval)} (paired bootstrap over the {self.problems} problems), "
            f"{self.gained} gained, {self.lost} lost, p {_p(self.p_value)} (exact McNemar)"
        )


def problem_gain(
    after: Sequence[bool], before: Sequence[bool], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> ProblemGain:
    """``after``'s accuracy minus ``before``'s, problem by problem (the same problems, same order).

    The interval is a percentile bootstrap over problems (``scipy.stats.bootstrap``, paired); the
    p-value is the exact McNemar test: a two-sided binomial test (``scipy.stats.binomtest``) of
    the problems gained among those that changed.
    """
    from scipy import stats

    _check_confidence(confidence)
    after_array, before_array = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if after_array.shape != before_array.shape or after_array.ndim != 1 or after_array.size == 0:
        raise ValueError(f"need the same, non-empty list of problems twice, got {after_array.shape} and {before_array.shape}")
    differences = after_array - before_array
    gained, lost = int(np.sum(differences > 0)), int(np.sum(differences < 0))
    mean = float(differences.mean())
    if gained + lost == 0:
        return ProblemGain(differences.size, 0, 0, mean, (mean, mean), 1.0)
    result = stats.bootstrap(
        (differences,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed)
    )
    interval = (float(result.confidence_interval.low), float(result.confidence_interval.high))
    p_value = stats.binomtest(gained, gained + lost, 0.5).pvalue
    return ProblemGain(differences.size, gained, lost, mean, interval, float(p_value))


def format_comparisons(comparisons: Sequence[PairedComparison]) -> str:
    """A markdown table, one row per arm: differences in percentage points, one decimal.

    Columns: arm, reference, number of common replicates, mean difference, the t-interval (the
    primary interval), the joint bootstrap interval, sign-flip p-value, Holm-adjusted p-value and,
    when a margin was set, the TOST p-value of equivalence within it ("–" where a figure could not
    be formed); the notes (why) follow the table.
    """
    levels = {c.confidence for c in comparisons}
    level = f"{100 * levels.pop():g}% " if len(levels) == 1 else ""
    margins = {c.equivalence_margin for c in comparisons} - {None}
    equivalence = f" equivalent within ±{100 * margins.pop():g} points (TOST p) |" if len(margins) == 1 else ""
    lines = [
        f"| arm | vs | replicates | mean difference (points) | {level}t-interval | {level}joint bootstrap | p (sign-flip) | p (Holm) |{equivalence}",
        "|---|---|---:|---:|---|---|---:|---:|" + ("---:|" if equivalence else ""),
    ]
    for c in comparisons:
        row = (
            f"| {c.arm} | {c.reference} | {len(c.replicates)} | {_points(c.mean_difference)} | "
            f"{format_interval(c.t_interval)} | {format_interval(c.bootstrap_interval)} | {_p(c.p_value)} | {_p(c.p_holm)} |"
        )
        lines.append(row + (f" {_p(c.equivalence_p)} |" if equivalence else ""))
    notes = [f"- {c.arm}: {c.note}" for c in comparisons if c.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _points(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def format_interval(interval: tuple[float, float] | None) -> str:
    """An interval of fractions in points, one decimal: "[+1.2, +3.4]"; "–" for None."""
    return "–" if interval is None else f"[{_points(interval[0])}, {_points(interval[1])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0 or math.isnan(confidence):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
