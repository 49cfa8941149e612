"""Policy-gradient losses for off-policy fine-tuning: TOPR and the baselines it is compared with.

Tapered Off-Policy REINFORCE (TOPR; Le Roux et al., 2025, "Tapered Off-Policy REINFORCE: Stable
and efficient reinforcement learning for LLMs", arXiv:2503.14286) trains a policy pi on
completions y_i sampled from a behaviour policy mu (an earlier copy of the model). Each
completion carries a reward R_i and the advantage A_i = R_i - c for a baseline c. With the
importance ratio rho_i = pi(y_i) / mu(y_i), the objective family is

    loss = -(1/B) sum_i  alpha_i * A_i * (sum_t log pi(y_it)) / L_i

    alpha_i = clip(rho_i, a+, b+)   if A_i >= 0
    alpha_i = clip(rho_i, a-, b-)   if A_i <  0

where alpha_i is a constant (stop-gradient) weight, so the gradient of a sample is
alpha_i * A_i * grad log pi(y_i) / L_i, and L_i normalises for length (``length_normalization``):
the completion length |y_i| (``"sequence"``; the paper writes log pi(y|x), a sum over tokens, and only
secondary notes say it divides by length), or one constant L for every
completion (``"constant"``; training passes sample.max_new_tokens), so that a token's gradient
weight does not depend on the length of its sequence. The bounds select the method (``PRESETS``):

============  ==========  ==========  =====================================================
objective     [a+, b+]    [a-, b-]    meaning
============  ==========  ==========  =====================================================
topr          [1, 1]      [0, 1]      positives: plain SFT-like push up at full weight;
                                      negatives: push down, tapered by rho once pi << mu
reinforce     [1, 1]      [1, 1]      ignores that the samples are off-policy
tis           [0, 1]      [0, 1]      truncated importance sampling
is            [0, inf]    [0, inf]    importance sampling (unbiased, high variance)
rft           [1, 1]      [0, 0]      rejection fine-tuning: positives only, negatives ignored
============  ==========  ==========  =====================================================

TOPR's point: a negative sample whose probability has already fallen far below mu stops being
pushed down (its weight rho -> 0), which keeps training on negatives stable, while positives
keep their full weight so that probabilities of good completions are not starved.

``ratio_level`` chooses how rho is formed from the per-token log-ratios
log pi(y_it) - log mu(y_it) over the completion tokens:

- ``"sequence"`` (the paper's, the default): log rho_i = sum_t (log pi - log mu);
- ``"geometric"``: that sum divided by |y_i| (a per-token geometric mean, length-independent);
- ``"token"``: a ratio rho_it per token, clipped with the same bounds, weighting each token's
  log-probability: loss = -(1/B) sum_i A_i * (sum_t alpha_it * log pi(y_it)) / L_i.

``negative_excluded`` marks tokens that a negative's loss leaves out: for A_i < 0 the sum over
t (of alpha * log pi(y_it), or of PPO's surrogate terms below) runs over its unmarked tokens only,
so the marked ones get no gradient, while rho_i and L_i still count every completion token (the
taper and the normaliser are unchanged); positives keep every token. It is a diagnostic for the mechanism experiment (issue 24), not a
training method: ``train.negatives_skip_shared_tokens`` marks the tokens that every completion
ends with whatever its reward, its end-of-sequence token and its last answer marker ("Answer:"),
to test whether the negatives' push on them, outnumbering the positives', is why TOPR at c = 0
stops ending its answers.

``objective="ppo"`` is the PPO-clip objective (Schulman et al., 2017), offered as a baseline. It
always uses per-token ratios (``ratio_level`` is validated but has no effect) and, unlike the
family above, lets the gradient flow through rho:

    loss = -(1/B) sum_i (1/L_i) sum_t min(rho_it * A_i, clip(rho_it, 1 - eps, 1 + eps) * A_i)

so the gradient of token t is A_i * rho_it * grad log pi(y_it) / L_i, or zero where the clip
is active (A_i > 0 and rho_it > 1 + eps, or A_i < 0 and rho_it < 1 - eps).

Numerics: log-ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exponentiating,
masked positions are replaced (not multiplied) by zeros so any value there (NaN, inf) is inert,
a completion with no tokens contributes 0, and everything is computed in at least float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""Log importance ratios are clamped to [-20, 20] (rho in [2e-9, 4.9e8]) before ``exp``."""

RATIO_LEVELS = ("sequence", "geometric", "token")

LENGTH_NORMALIZATIONS = ("sequence", "constant")


class Preset(NamedTuple):
    """Clip bounds (low, high) on the importance ratio for non-negative and negative advantages."""

    positive_bounds: tuple[float, float]
    negative_bounds: tuple[float, float]


PRESETS: dict[str, Preset] = {
    "topr": Preset((1.0, 1.0), (0.0, 1.0)),
    "reinforce": Preset((1.0, 1.0), (1.0, 1.0)),
    "tis": Preset((0.0, 1.0), (0.0, 1.0)),
    "is": Preset((0.0, math.inf), (0.0, math.inf)),
    "rft": Preset((1.0, 1.0), (0.0, 0.0)),
}



def register_objective(name: str, preset: Preset) -> None:
    """Add an objective: its clip bounds on the ratio for positives and negatives (as ``PRESETS``).
    Call it where the objective is defined; ``train.objective=<name>`` then selects it."""
    if name in objective_names():
        raise ValueError(f"objective {name!r} is already registered")
    PRESETS[name] = preset


def objective_names() -> tuple[str, ...]:
    """Every registered objective: the presets and ``"ppo"``."""
    return (*PRESETS, "ppo")


NEGATIVE_RATIO_STATS = ("ratio_negative_p10", "ratio_negative_p50", "ratio_negative_p90")
"""Stats of ``policy_loss`` that it reports only when the batch has negatives."""


class LossStats(dict[str, float]):
    """The stats of ``policy_loss`` (a dict of Python floats), and ``negative_ratios``: the
    sequence ratio rho_i (clamped as the weights are) of each negative, in batch order, so that
    ratio quantiles can be taken over several batches together (``topr.train`` takes them over
    an optimizer step's micro-batches)."""

    def __init__(self, stats: dict[str, float], negative_ratios: list[float]):
        super().__init__(stats)
        self.negative_ratios = negative_ratios


def policy_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    objective: str = "topr",
    baseline: float = 0.0,
    ratio_level: str = "sequence",
    positive_bounds: tuple[float, float] | None = None,
    negative_bounds: tuple[float, float] | None = None,
    ppo_clip: float = 0.2,
    length_normalization: str = "sequence",
    normalizer: float | None = None,
    negative_excluded: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """The loss to minimise for one batch of completions, and statistics to chart.

    Args:
        logprobs: [B, T] log pi of each completion token under the policy being trained; the
            gradient flows through it. Any dtype (bfloat16 included); computed in >= float32.
        behavior_logprobs: [B, T] log mu of the same tokens, recorded when they were sampled.
        rewards: [B] reward of each completion.
        mask: [B, T] nonzero (1.0) on completion tokens, 0 elsewhere (prompt, padding). Values
            of ``logprobs`` and ``behavior_logprobs`` at masked positions are ignored.
        objective: one of ``objective_names()``: a key of ``PRESETS`` or ``"ppo"``.
        baseline: c in the advantage A = R - c; A >= 0 counts as positive.
        ratio_level: one of ``RATIO_LEVELS`` (see the module docstring); ignored by ``"ppo"``.
        positive_bounds: (a+, b+), replaces the preset's bounds for A >= 0.
        negative_bounds: (a-, b-), replaces the preset's bounds for A < 0.
        ppo_clip: epsilon of ``"ppo"``.
        length_normalization: one of ``LENGTH_NORMALIZATIONS``: L_i = |y_i| (``"sequence"``) or
            ``normalizer`` (``"constant"``).
        normalizer: L of ``"constant"`` (> 0); not given with ``"sequence"``.
        negative_excluded: [B, T] nonzero at the completion tokens whose log-probability a
            negative's loss leaves out (see the module docstring); ignored on positives and
            outside the completions. None leaves nothing out.

    Returns:
        ``(loss, stats)``: the scalar loss (mean over the B completions, empty ones counting 0)
        and a dict of Python floats (a ``LossStats``, which also holds every negative's sequence
        ratio), finite when the inputs are at the completion tokens:

        - ``loss``; non-finite when a completion token's log-probability is, so that training
          can stop on it (``topr.train``) instead of reading a fault as 0;
        - ``positive_count``, ``negative_count``, ``positive_fraction``: completions with
          A >= 0 / A < 0, and the share of the first;
        - ``advantage_mean``, ``completion_tokens_mean``;
        - ``mean_weight_positive``, ``mean_weight_negative``: mean effective weight on
          A * grad log pi over positives / negatives: alpha per completion (per completion token
          at ``ratio_level="token"``), and for ``"ppo"`` rho_it, or 0 where clipped. 0.0 when
          the group is empty;
        - ``clipped_fraction``: share of those weights that the bounds changed (alpha != rho;
          for ``"ppo"``: completion tokens whose gradient the clip zeroes);
        - ``log_ratio_mean``: mean of the (unclamped) sequence log-ratio sum_t log pi/mu;
        - ``ratio_p10``, ``ratio_p50``, ``ratio_p90``: quantiles of the sequence-level ratio;
        - ``ratio_negative_p10``, ``ratio_negative_p50``, ``ratio_negative_p90``: the same over
          negatives only; absent (not 0, which would read as a collapsed taper) when the batch
          has no negatives;
        - ``gradient_weight_positive``, ``gradient_weight_negative``: (1/B) sum over the
          positives / negatives of |alpha_i * A_i|, the size of their push in the gradient after
          the taper (alpha_i: the mean of the completion's token weights at ``ratio_level="token"``
          and for ``"ppo"``; 0 for an empty completion);
        - ``log_ratio_per_token``: sum of log pi - log mu over all completion tokens of the batch,
          divided by their number (about 0 on data that the same model has just sampled);
        - ``logprob_positive_mean``, ``logprob_negative_mean``: mean per-token log pi over the
          completion tokens of positives / negatives (0.0 when there are none);
        - ``excluded_negative_tokens``: the negatives' completion tokens left out of the loss;
          only with ``negative_excluded``.

    Raises:
        ValueError: unknown ``objective`` or ``ratio_level`` (the message lists the choices),
            a shape mismatch (the message names the argument), bounds not satisfying
            0 <= low <= high, bounds given with ``"ppo"`` (which has none), ``ppo_clip < 0``,
            or an unknown ``length_normalization`` or a ``normalizer`` that does not fit it.
    """
    _check_choice("objective", objective, objective_names())
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_normalization(length_normalization, normalizer)
    _check_shapes(logprobs, behavior_logprobs, rewards, mask, negative_excluded)

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    valid = mask != 0
    logp = torch.where(valid, logprobs.to(dtype), 0.0)
    behavior = torch.where(valid, behavior_logprobs.to(dtype), 0.0)
    advantages = rewards.to(dtype) - baseline
    positive = advantages >= 0
    lengths = valid.sum(dim=1).to(dtype)
    token_log_ratio = logp - behavior  # zero at masked positions
    excluded = None if negative_excluded is None else valid & ~positive[:, None] & (negative_excluded != 0)
    trained = valid if excluded is None else valid & ~excluded
    trained_logp = torch.where(trained, logp, 0.0)

    if objective == "ppo":
        if positive_bounds is not None or negative_bounds is not None:
            raise ValueError("positive_bounds/negative_bounds do not apply to objective='ppo'")
        if ppo_clip < 0:
            raise ValueError(f"ppo_clip must be >= 0, got {ppo_clip}")
        per_completion, weights, clipped = _ppo(token_log_ratio, advantages, valid, trained, ppo_clip)
    else:
        bounds = _resolve_bounds(PRESETS[objective], positive_bounds, negative_bounds)
        log_ratio = _log_ratio(token_log_ratio, lengths, ratio_level)
        sign = positive[:, None] if ratio_level == "token" else positive
        weights, clipped = _tapered_weights(log_ratio, sign, bounds)
        if ratio_level == "token":
            per_completion = advantages * (weights * trained_logp).sum(dim=1)
        else:
            per_completion = weights * advantages * trained_logp.sum(dim=1)

    divisors = lengths.clamp_min(1) if normalizer is None else torch.full_like(lengths, normalizer)
    loss = -(per_completion / divisors).mean()
    stats = _stats(loss, logp, valid, lengths, advantages, token_log_ratio, weights, clipped, excluded)
    return loss, stats


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_normalization(length_normalization: str, normalizer: float | None) -> None:
    _check_choice("length_normalization", length_normalization, LENGTH_NORMALIZATIONS)
    if length_normalization == "sequence" and normalizer is not None:
        raise ValueError("normalizer applies only to length_normalization='constant'")
    if length_normalization == "constant" and not (normalizer is not None and normalizer > 0):
        raise ValueError(f"length_normalization='constant' needs a normalizer > 0, got {normalizer}")


def _check_shapes(
    logprobs: Tensor, behavior_logprobs: Tensor, rewards: Tensor, mask: Tensor, negative_excluded: Tensor | None
) -> None:
    if logprobs.dim() != 2 or logprobs.shape[0] == 0:
        raise ValueError(f"logprobs must have shape [B, T] with B >= 1, got {list(logprobs.shape)}")
    token_shaped = {"behavior_logprobs": behavior_logprobs, "mask": mask, "negative_excluded": negative_excluded}
    for name, tensor in token_shaped.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {list(logprobs.shape)}, "
                f"got {list(tensor.shape)}"
            )
    if rewards.shape != logprobs.shape[:1]:
        raise ValueError(
            f"rewards must have shape [{logprobs.shape[0]}], got {list(rewards.shape)}"
        )


def _resolve_bounds(
    preset: Preset,
    positive_bounds: tuple[float, float] | None,
    negative_bounds: tuple[float, float] | None,
) -> Preset:
    """The preset's bounds with the given overrides, validated."""
    positive = preset.positive_bounds if positive_bounds is None else positive_bounds
    negative = preset.negative_bounds if negative_bounds is None else negative_bounds
    return Preset(
        _check_bounds("positive_bounds", positive), _check_bounds("negative_bounds", negative)
    )


def _check_bounds(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(value) for value in bounds)
    if not 0 <= low <= high:
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got {[low, high]}")
    return low, high


def _log_ratio(token_log_ratio: Tensor, lengths: Tensor, ratio_level: str) -> Tensor:
    """Detached log rho at the chosen level: [B] for sequence/geometric, [B, T] for token."""
    token_log_ratio = token_log_ratio.detach()
    if ratio_level == "token":
        return token_log_ratio
    total = token_log_ratio.sum(dim=1)
    return total / lengths.clamp_min(1) if ratio_level == "geometric" else total


def _tapered_weights(log_ratio: Tensor, positive: Tensor, bounds: Preset) -> tuple[Tensor, Tensor]:
    """Weights alpha = clip(rho, bounds of the advantage's sign), and where the clip changed rho."""
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    weights = torch.where(
        positive, ratio.clamp(*bounds.positive_bounds), ratio.clamp(*bounds.negative_bounds)
    )
    return weights, weights != ratio


def _ppo(
    token_log_ratio: Tensor, advantages: Tensor, valid: Tensor, trained: Tensor, epsilon: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-completion PPO-clip surrogate sums over the ``trained`` tokens, effective token weights
    and clipped tokens (both over every ``valid`` one)."""
    ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon) * advantage)
    per_completion = torch.where(trained, surrogate, 0.0).sum(dim=1)
    clipped = valid & (
        ((advantage > 0) & (ratio > 1 + epsilon)) | ((advantage < 0) & (ratio < 1 - epsilon))
    )
    weights = torch.where(clipped, 0.0, ratio.detach())
    return per_completion, weights, clipped


def _mean_over(values: Tensor, selected: Tensor) -> Tensor:
    """Mean of ``values`` where ``selected``; 0 when nothing is selected."""
    count = selected.sum()
    return torch.where(selected, values, 0.0).sum() / count.clamp_min(1)


def _stats(
    loss: Tensor,
    logp: Tensor,
    valid: Tensor,
    lengths: Tensor,
    advantages: Tensor,
    token_log_ratio: Tensor,
    weights: Tensor,
    clipped: Tensor,
    excluded: Tensor | None,
) -> LossStats:
    """Detached summaries and the negatives' sequence ratios, gathered into one tensor so that
    reading them costs one device sync; ``excluded``: the negatives' tokens left out of the loss,
    counted when given."""
    positive = advantages >= 0
    negative = ~positive
    per_token = weights.dim() == 2
    weighted = valid if per_token else torch.ones_like(positive)
    weight_positive = weighted & (positive[:, None] if per_token else positive)
    weight_negative = weighted & (negative[:, None] if per_token else negative)
    sequence_log_ratio = token_log_ratio.detach().sum(dim=1)
    sequence_ratio = sequence_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=sequence_ratio.dtype, device=logp.device)
    quantiles = torch.quantile(sequence_ratio, levels)
    # NaN outside the negatives, so that no negative at all gives NaN: the figures are then dropped.
    negative_quantiles = torch.nanquantile(torch.where(negative, sequence_ratio, math.nan), levels)
    gradient_weights = _sequence_weights(weights, valid, lengths) * advantages.abs()
    logp = logp.detach()
    values = {
        "loss": loss.detach(),
        "positive_count": positive.sum(),
        "negative_count": negative.sum(),
        "positive_fraction": positive.to(logp.dtype).mean(),
        "advantage_mean": advantages.mean(),
        "completion_tokens_mean": lengths.mean(),
        "mean_weight_positive": _mean_over(weights, weight_positive),
        "mean_weight_negative": _mean_over(weights, weight_negative),
        "clipped_fraction": _mean_over(clipped.to(logp.dtype), weighted),
        "log_ratio_mean": sequence_log_ratio.mean(),
        "ratio_p10": quantiles[0],
        "ratio_p50": quantiles[1],
        "ratio_p90": quantiles[2],
        "ratio_negative_p10": negative_quantiles[0],
        "ratio_negative_p50": negative_quantiles[1],
        "ratio_negative_p90": negative_quantiles[2],
        "gradient_weight_positive": torch.where(positive, gradient_weights, 0.0).mean(),
        "gradient_weight_negative": torch.where(negative, gradient_weights, 0.0).mean(),
        "log_ratio_per_token": sequence_log_ratio.sum() / lengths.sum().clamp_min(1),
        "logprob_positive_mean": _mean_over(logp, valid & positive[:, None]),
        "logprob_negative_mean": _mean_over(logp, valid & negative[:, None]),
    }
    if excluded is not None:
        values["excluded_negative_tokens"] = excluded.sum()
    figures = torch.stack([value.to(torch.float64) for value in values.values()])
    read = torch.cat([figures, sequence_ratio.to(torch.float64), negative.to(torch.float64)]).tolist()
    count, batch = len(values), len(negative)
    stats = dict(zip(values, read[:count], strict=True))
    ratios, negatives = read[count : count + batch], read[count + batch :]
    if not stats["negative_count"]:
        for name in NEGATIVE_RATIO_STATS:
            del stats[name]
    return LossStats(stats, [ratio for ratio, is_negative in zip(ratios, negatives, strict=True) if is_negative])


def _sequence_weights(weights: Tensor, valid: Tensor, lengths: Tensor) -> Tensor:
    """alpha per completion: its weight, or the mean of its token weights; 0 for an empty one."""
    if weights.dim() == 2:
        return torch.where(valid, weights, 0.0).sum(dim=1) / lengths.clamp_min(1)
    return torch.where(lengths > 0, weights, 0.0)
