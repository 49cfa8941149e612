"""Evaluation metrics as pure functions: intervals, pass@k, votes, ranking, and the per-run summary."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% for ``z = 1.96``); ``n = 0`` gives (0, 1).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for small evaluation sets.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # Clamped to contain p: in floating point, 0 successes would otherwise give a low end of 3e-18.
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


def bootstrap_interval(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (e.g. per-prompt pass@k)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resamples = values[rng.integers(0, values.size, size=(n_resamples, values.size))]
    statistics = np.array([statistic(resample) for resample in resamples])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, which
    avoids the huge binomial coefficients.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The answer whose solutions carry the largest total weight; ties go to the answer seen first.

    ``None`` (no answer extracted) never wins; all ``None`` gives ``None``.
    """
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    scores: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            scores[answer] = scores.get(answer, 0.0) + weight
    return max(scores, key=scores.__getitem__, default=None)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common non-``None`` answer; ties go to the answer seen first."""
    return weighted_vote(answers, [1.0] * len(answers))


def vote_correct(answers: Sequence[str | None], correct: Sequence[bool], winner: str | None) -> bool:
    """A voted answer is as correct as the solutions that reached it (the checker's verdict)."""
    return winner is not None and correct[answers.index(winner)]


def _labels_and_scores(labels: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as arrays, checked: as many of each, and both labels present (the
    figures below compare the two groups and mean nothing with one)."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"need one score per label, got {labels.shape} labels and {scores.shape} scores")
    if labels.all() or not labels.any():
        raise ValueError("need both labels, positive and negative, among the labels")
    return labels, scores


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``): the probability that a random
    positive scores above a random negative, ties counting half; 0.5 is chance.

    It judges the ranking, whatever the threshold: a classifier that always answers one label but
    still scores positives higher shows here, where its accuracy at a threshold does not.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = _labels_and_scores(labels, scores)
    return float(roc_auc_score(labels, scores))


def auroc_interval(
    labels: Sequence[bool], scores: Sequence[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (``scipy.stats.bootstrap``).

    Positives and negatives are resampled separately (stratified), so every resample keeps both
    labels, in their original numbers, and has an AUROC. Items are treated as independent.
    """
    from scipy import stats

    labels, scores = _labels_and_scores(labels, scores)

    def statistic(positives: np.ndarray, negatives: np.ndarray) -> float:
        return auroc(np.r_[np.ones(positives.size, bool), np.zeros(negatives.size, bool)], np.r_[positives, negatives])

    result = stats.bootstrap(
        (scores[labels], scores[~labels]),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def balanced_accuracy(labels: Sequence[bool], scores: Sequence[float], threshold: float = 0.5) -> float:
    """The mean of the accuracy on positives and on negatives when a score ``>= threshold`` calls an
    item positive (``sklearn.metrics.balanced_accuracy_score``).

    Any constant answer scores 0.5, where plain accuracy is the share of the more common label.
    """
    from sklearn.metrics import balanced_accuracy_score

    labels, scores = _labels_and_scores(labels, scores)
    return float(balanced_accuracy_score(labels, scores >= threshold))


@dataclass(frozen=True)
class PromptResult:
    """One held-out prompt's outcome, as judged by the task's checker.

    ``greedy_correct`` and ``greedy_unparsable`` describe the greedy completion;
    ``sample_answers`` (extracted answers, ``None`` where none) and ``sample_correct`` the k
    sampled ones, empty when no samples were drawn.
    """

    greedy_correct: bool
    greedy_unparsable: bool
    sample_answers: tuple[str | None, ...] = ()
    sample_correct: tuple[bool, ...] = ()


def summarize_evaluation(results: Sequence[PromptResult], n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Flat, MLflow-friendly metrics over the prompts of one evaluation.

    Always: ``n_prompts``; ``pass_at_1`` (greedy accuracy) with its Wilson interval
    ``pass_at_1_ci_low`` / ``pass_at_1_ci_high``; ``parse_failure_rate`` (greedy answers that
    could not be extracted).

    With k samples per prompt, also: ``k``; ``pass_at_k`` (mean unbiased pass@k) with a bootstrap
    interval over prompts ``pass_at_k_ci_low`` / ``pass_at_k_ci_high``; ``maj_at_k`` (the
    majority answer is correct) with its Wilson interval ``maj_at_k_ci_low`` /
    ``maj_at_k_ci_high``; ``sample_accuracy`` (fraction of correct samples).

    The majority answer's correctness is that of the samples that reached it, i.e. the checker's
    verdict, rather than a string comparison with the reference that would disagree with a
    numeric checker ("1,000" vs "1000").
    """
    if not results:
        raise ValueError("no prompts to summarize")
    n = len(results)
    greedy = sum(result.greedy_correct for result in results)
    low, high = wilson_interval(greedy, n)
    summary = {
        "n_prompts": n,
        "pass_at_1": greedy / n,
        "pass_at_1_ci_low": low,
        "pass_at_1_ci_high": high,
        "parse_failure_rate": sum(result.greedy_unparsable for result in results) / n,
    }
    k = _samples_per_prompt(results)
    if k:
        summary.update(_sample_metrics(results, k, n_resamples, seed))
    return summary


def _samples_per_prompt(results: Sequence[PromptResult]) -> int:
    counts = {len(result.sample_answers) for result in results} | {len(result.sample_correct) for result in results}
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of answers and verdicts, got counts {sorted(counts)}")
    return counts.pop()


def _sample_metrics(results: Sequence[PromptResult], k: int, n_resamples: int, seed: int) -> dict[str, float]:
    per_prompt = [pass_at_k(k, sum(result.sample_correct), k) for result in results]
    pass_low, pass_high = bootstrap_interval(per_prompt, n_resamples=n_resamples, seed=seed)
    majority = sum(_majority_correct(result) for result in results)
    maj_low, maj_high = wilson_interval(majority, len(results))
    return {
        "k": k,
        "pass_at_k": sum(per_prompt) / len(results),
        "pass_at_k_ci_low": pass_low,
        "pass_at_k_ci_high": pass_high,
        "maj_at_k": majority / len(results),
        "maj_at_k_ci_low": maj_low,
        "maj_at_k_ci_high": maj_high,
        "sample_accuracy": sum(sum(result.sample_correct) for result in results) / (k * len(results)),
    }


def _majority_correct(result: PromptResult) -> bool:
    return vote_correct(result.sample_answers, result.sample_correct, majority_vote(result.sample_answers))
