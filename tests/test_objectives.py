"""Tests for topr.objectives.policy_loss against an independently written reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from topr.objectives import (
    LENGTH_NORMALIZATIONS,
    LOG_RATIO_CLAMP,
    NEGATIVE_RATIO_STATS,
    PRESETS,
    RATIO_LEVELS,
    objective_names,
    policy_loss,
)

TAPERED = tuple(PRESETS)
STATS_KEYS = {
    "loss",
    "positive_count",
    "negative_count",
    "positive_fraction",
    "advantage_mean",
    "completion_tokens_mean",
    "mean_weight_positive",
    "mean_weight_negative",
    "clipped_fraction",
    "log_ratio_mean",
    "ratio_p10",
    "ratio_p50",
    "ratio_p90",
    "logprob_positive_mean",
    "logprob_negative_mean",
    "ratio_negative_p10",
    "ratio_negative_p50",
    "ratio_negative_p90",
    "gradient_weight_positive",
    "gradient_weight_negative",
    "log_ratio_per_token",
}


# ----------------------------------------------------------------------------- helpers


def reference_loss(logprobs, behavior, rewards, mask, bounds, ratio_level, baseline):
    """The TOPR family written out per completion, from index lists (no masking arithmetic)."""
    batch, length = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(batch):
        tokens = [t for t in range(length) if mask[i, t] != 0]
        if not tokens:
            continue
        logp, mu = logprobs[i, tokens], behavior[i, tokens]
        advantage = float(rewards[i]) - baseline
        low, high = bounds.positive_bounds if advantage >= 0 else bounds.negative_bounds
        if ratio_level == "token":
            weights = torch.exp(logp.detach() - mu).clamp(low, high)
            total = total + advantage * (weights * logp).sum() / len(tokens)
        else:
            log_rho = float((logp.detach() - mu).sum())
            if ratio_level == "geometric":
                log_rho /= len(tokens)
            weight = min(max(math.exp(log_rho), low), high)
            total = total + weight * advantage * logp.sum() / len(tokens)
    return -total / batch


def reference_ppo(logprobs, behavior, rewards, mask, baseline, epsilon):
    """PPO-clip written with an explicit case split instead of min()."""
    batch, length = logprobs.shape
    total = logprobs.new_zeros(())
    for i in range(batch):
        tokens = [t for t in range(length) if mask[i, t] != 0]
        advantage = float(rewards[i]) - baseline
        for t in tokens:
            rho = torch.exp(logprobs[i, t] - behavior[i, t])
            clipped = (advantage > 0 and rho > 1 + epsilon) or (advantage < 0 and rho < 1 - epsilon)
            if clipped:
                term = rho.detach().clamp(1 - epsilon, 1 + epsilon) * advantage
            else:
                term = rho * advantage
            total = total + term / len(tokens)
    return -total / batch


def random_batch(seed=0, dtype=torch.float64):
    """Six completions of varied length (one empty), prompts masked out, mixed rewards."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = 6, 7
    logprobs = -3 * torch.rand(batch, length, generator=generator, dtype=dtype)
    behavior = logprobs + 0.4 * torch.randn(batch, length, generator=generator, dtype=dtype)
    rewards = torch.tensor([1.0, -1.0, 0.3, -0.2, 1.0, -1.0], dtype=dtype)
    mask = torch.zeros(batch, length, dtype=dtype)
    for row, (start, stop) in enumerate([(0, 7), (2, 7), (4, 7), (6, 7), (0, 0), (1, 7)]):
        mask[row, start:stop] = 1.0
    return logprobs.requires_grad_(), behavior, rewards, mask


def loss_and_grad(logprobs, behavior, rewards, mask, **kwargs):
    loss, stats = policy_loss(logprobs, behavior, rewards, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss, grad, stats


def one_row(log_ratio_per_token, reward, tokens=4, dtype=torch.float64):
    """A single completion whose tokens all have the given log pi - log mu."""
    logprobs = torch.full((1, tokens), -1.0, dtype=dtype, requires_grad=True)
    behavior = torch.full((1, tokens), -1.0 - log_ratio_per_token, dtype=dtype)
    return logprobs, behavior, torch.tensor([reward], dtype=dtype), torch.ones(1, tokens)


# ----------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("baseline", [-0.5, 0.0, 0.5])
@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("objective", TAPERED)
def test_matches_reference(objective, ratio_level, baseline):
    logprobs, behavior, rewards, mask = random_batch()
    loss, grad, _ = loss_and_grad(
        logprobs, behavior, rewards, mask,
        objective=objective, ratio_level=ratio_level, baseline=baseline,
    )
    expected = reference_loss(
        logprobs, behavior, rewards, mask, PRESETS[objective], ratio_level, baseline
    )
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("baseline", [-0.5, 0.0, 0.5])
def test_ppo_matches_reference(baseline):
    logprobs, behavior, rewards, mask = random_batch(seed=1)
    loss, grad, _ = loss_and_grad(
        logprobs, behavior, rewards, mask, objective="ppo", baseline=baseline, ppo_clip=0.2
    )
    expected = reference_ppo(logprobs, behavior, rewards, mask, baseline, 0.2)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


def test_presets_are_the_papers_bounds():
    assert PRESETS["topr"] == ((1.0, 1.0), (0.0, 1.0))
    assert PRESETS["reinforce"] == ((1.0, 1.0), (1.0, 1.0))
    assert PRESETS["tis"] == ((0.0, 1.0), (0.0, 1.0))
    assert PRESETS["is"] == ((0.0, math.inf), (0.0, math.inf))
    assert PRESETS["rft"] == ((1.0, 1.0), (0.0, 0.0))
    assert set(objective_names()) == {*PRESETS, "ppo"}


@pytest.mark.parametrize(
    ("objective", "overrides", "same_as"),
    [
        ("topr", {"negative_bounds": (1.0, 1.0)}, "reinforce"),
        ("topr", {"positive_bounds": (0.0, 1.0)}, "tis"),
        ("reinforce", {"positive_bounds": (0.0, 1.0), "negative_bounds": (0.0, 1.0)}, "tis"),
        ("tis", {"positive_bounds": (1.0, 1.0), "negative_bounds": (0.0, 0.0)}, "rft"),
    ],
)
def test_bounds_overrides_take_effect(objective, overrides, same_as):
    logprobs, _, rewards, mask = random_batch(seed=2)
    behavior = logprobs.detach() + 0.2  # every non-empty completion has rho < 1
    loss, grad, _ = loss_and_grad(
        logprobs, behavior, rewards, mask, objective=objective, **overrides
    )
    plain, plain_grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective)
    target, target_grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective=same_as)
    assert_close(loss, target)
    assert_close(grad, target_grad)
    assert not torch.allclose(grad, plain_grad)


def test_partial_override_keeps_the_other_presets_bounds():
    logprobs, behavior, rewards, mask = random_batch(seed=3)
    loss, grad, _ = loss_and_grad(
        logprobs, behavior, rewards, mask, objective="rft", positive_bounds=(0.0, 2.0)
    )
    bounds = PRESETS["rft"]._replace(positive_bounds=(0.0, 2.0))
    expected = reference_loss(logprobs, behavior, rewards, mask, bounds, "sequence", 0.0)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------- gradient signs


@pytest.mark.parametrize("objective", objective_names())
def test_descent_raises_logprob_of_a_positive(objective):
    logprobs, behavior, rewards, mask = one_row(log_ratio_per_token=-0.05, reward=1.0)
    _, grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective)
    assert (grad < 0).all()


@pytest.mark.parametrize("objective", objective_names())
def test_descent_lowers_logprob_of_a_negative(objective):
    logprobs, behavior, rewards, mask = one_row(log_ratio_per_token=-0.05, reward=-1.0)
    _, grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective)
    if objective == "rft":
        assert (grad == 0).all()
    else:
        assert (grad > 0).all()


def test_topr_tapers_negatives_that_fell_far_below_behavior():
    far_below = one_row(log_ratio_per_token=-10.0, reward=-1.0)  # rho = e^-40 (clamped e^-20)
    _, topr_grad, _ = loss_and_grad(*far_below, objective="topr")
    _, reinforce_grad, _ = loss_and_grad(*far_below, objective="reinforce")
    assert (topr_grad > 0).all() and (topr_grad < 1e-8).all()
    assert_close(reinforce_grad, torch.full_like(reinforce_grad, 1 / 4))

    half = one_row(log_ratio_per_token=math.log(0.5) / 4, reward=-1.0)  # rho = 0.5
    _, half_grad, _ = loss_and_grad(*half, objective="topr")
    assert_close(half_grad, torch.full_like(half_grad, 0.5 / 4))


def test_topr_keeps_full_weight_on_positives_that_fell_below_behavior():
    far_below = one_row(log_ratio_per_token=-10.0, reward=1.0)
    _, topr_grad, _ = loss_and_grad(*far_below, objective="topr")
    _, tis_grad, _ = loss_and_grad(*far_below, objective="tis")
    assert_close(topr_grad, torch.full_like(topr_grad, -1 / 4))
    assert (tis_grad.abs() < 1e-8).all()


def test_rft_ignores_negatives_and_matches_reinforce_on_positives():
    logprobs, behavior, rewards, mask = random_batch(seed=4)
    _, rft_grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective="rft")
    _, reinforce_grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective="reinforce")
    negative = rewards < 0
    assert (rft_grad[negative] == 0).all()
    assert_close(rft_grad[~negative], reinforce_grad[~negative])
    assert (rft_grad[~negative][mask[~negative] != 0] < 0).all()


def test_baseline_sets_the_advantage_and_its_sign():
    # Rewards 1 and 0 with baseline 0.5: advantages +0.5 and -0.5, each pushed with weight 1.
    logprobs = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    behavior, rewards, mask = logprobs.detach().clone(), torch.tensor([1.0, 0.0]), torch.ones(2, 2)
    _, grad, stats = loss_and_grad(
        logprobs, behavior, rewards, mask, objective="reinforce", baseline=0.5
    )
    assert_close(grad, torch.tensor([[-0.5, -0.5], [0.5, 0.5]], dtype=torch.float64) / 4)
    assert stats["positive_count"] == 1.0 and stats["advantage_mean"] == 0.0

    # A correct completion (R = 1) below a baseline of 1.5 is a negative: TOPR tapers it away
    # once pi << mu, whereas with baseline 0 it is a positive at full weight.
    far_below = one_row(log_ratio_per_token=-10.0, reward=1.0)
    _, above, _ = loss_and_grad(*far_below, objective="topr", baseline=0.0)
    _, below, stats = loss_and_grad(*far_below, objective="topr", baseline=1.5)
    assert_close(above, torch.full_like(above, -1 / 4))
    assert (below > 0).all() and (below < 1e-8).all()
    assert stats["negative_count"] == 1.0

    # R equal to the baseline: advantage 0, counted as positive, no gradient.
    at_baseline = one_row(log_ratio_per_token=0.0, reward=0.5)
    _, grad, stats = loss_and_grad(*at_baseline, objective="topr", baseline=0.5)
    assert (grad == 0).all() and stats["positive_fraction"] == 1.0


def test_ppo_clip_zeroes_gradient_only_where_clipping_applies():
    epsilon = 0.2
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.9], dtype=torch.float64)
    logprobs = torch.full((2, 4), -1.0, dtype=torch.float64, requires_grad=True)
    behavior = logprobs.detach() - ratios.log()
    rewards, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    _, grad, stats = loss_and_grad(
        logprobs, behavior, rewards, mask, objective="ppo", ppo_clip=epsilon
    )
    # d loss / d log pi = -A * rho / (|y| B) unless clipped: A > 0, rho > 1.2 or A < 0, rho < 0.8.
    unclipped = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1]])
    expected = -rewards[:, None].double() * ratios * unclipped
    assert_close(grad, expected / 8)
    assert stats["clipped_fraction"] == 0.25


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("objective", objective_names())
def test_masked_positions_are_inert(objective, ratio_level):
    logprobs, behavior, rewards, mask = random_batch(seed=5)
    kwargs = {"objective": objective, "ratio_level": ratio_level}
    clean_loss, clean_grad, clean_stats = loss_and_grad(logprobs, behavior, rewards, mask, **kwargs)

    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e9, -1e9], dtype=torch.float64)
    masked = mask == 0
    fill = garbage[torch.arange(int(masked.sum())) % len(garbage)]
    dirty_logprobs = logprobs.detach().clone()
    dirty_logprobs[masked] = fill
    dirty_behavior = behavior.clone()
    dirty_behavior[masked] = fill.flip(0)
    dirty_logprobs.requires_grad_()
    loss, grad, stats = loss_and_grad(dirty_logprobs, dirty_behavior, rewards, mask, **kwargs)

    assert_close(loss, clean_loss)
    assert_close(grad, clean_grad)
    assert torch.isfinite(grad).all() and (grad[masked] == 0).all()
    assert stats == pytest.approx(clean_stats)


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("objective", objective_names())
def test_extreme_log_ratios_stay_finite(objective, ratio_level):
    logprobs = torch.tensor([[-1e4, -1e4, 0.0], [0.0, 0.0, -1e4]], requires_grad=True)
    behavior = torch.tensor([[0.0, 0.0, -1e4], [-1e4, -1e4, 0.0]])
    for rewards in (torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])):
        loss, grad, stats = loss_and_grad(
            logprobs, behavior, rewards, torch.ones(2, 3),
            objective=objective, ratio_level=ratio_level,
        )
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(value) for value in stats.values())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_reported_as_such(bad):
    """A NaN or infinite log π on a completion token is a fault, not noise: the loss statistic
    shows it (training stops on it) instead of reading 0."""
    logprobs, behavior, rewards, mask = random_batch(seed=5)
    broken = logprobs.detach().clone()
    row, column = (mask != 0).nonzero()[0]
    broken[row, column] = bad
    loss, stats = policy_loss(broken, behavior, rewards, mask)
    assert not math.isfinite(loss.item())
    assert not math.isfinite(stats["loss"])


def test_log_ratio_clamp_bounds_the_importance_weight():
    logprobs, behavior, rewards, mask = one_row(log_ratio_per_token=100.0, reward=1.0)
    _, grad, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective="is")
    assert_close(grad, torch.full_like(grad, -math.exp(LOG_RATIO_CLAMP) / 4))
    assert stats["ratio_p50"] == pytest.approx(math.exp(LOG_RATIO_CLAMP))
    assert stats["log_ratio_mean"] == pytest.approx(400.0)


@pytest.mark.parametrize("objective", objective_names())
def test_empty_completions_contribute_nothing(objective):
    logprobs, behavior, rewards, mask = random_batch(seed=6)
    assert (mask[4] == 0).all()
    loss, grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective)
    keep = [0, 1, 2, 3, 5]
    sub_logprobs = logprobs.detach()[keep].requires_grad_()
    sub_loss, sub_grad, _ = loss_and_grad(
        sub_logprobs, behavior[keep], rewards[keep], mask[keep], objective=objective
    )
    assert_close(loss, sub_loss * 5 / 6)
    assert_close(grad[keep], sub_grad * 5 / 6)
    assert (grad[4] == 0).all()

    loss, grad, stats = loss_and_grad(
        logprobs, behavior, rewards, torch.zeros_like(mask), objective=objective
    )
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(math.isfinite(value) for value in stats.values())


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_bfloat16_logprobs(ratio_level):
    logprobs, behavior, rewards, mask = random_batch(seed=7, dtype=torch.float32)
    low = logprobs.detach().to(torch.bfloat16).requires_grad_()
    loss, grad, _ = loss_and_grad(low, behavior, rewards, mask, ratio_level=ratio_level)
    exact = low.detach().double().requires_grad_()
    expected = reference_loss(
        exact, behavior.double(), rewards, mask, PRESETS["topr"], ratio_level, 0.0
    )
    (expected_grad,) = torch.autograd.grad(expected, exact)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("objective", objective_names())
def test_cuda_matches_cpu(objective):
    logprobs, behavior, rewards, mask = random_batch(seed=8, dtype=torch.float32)
    loss, grad, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective)
    on_gpu = logprobs.detach().cuda().requires_grad_()
    gpu_loss, gpu_grad, gpu_stats = loss_and_grad(
        on_gpu, behavior.cuda(), rewards.cuda(), mask.cuda(), objective=objective
    )
    assert_close(gpu_loss.cpu(), loss)
    assert_close(gpu_grad.cpu(), grad)
    assert gpu_stats == pytest.approx(stats, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("objective", objective_names())
def test_stats_are_finite_floats(objective, ratio_level):
    logprobs, behavior, rewards, mask = random_batch(seed=9)
    loss, _, stats = loss_and_grad(
        logprobs, behavior, rewards, mask, objective=objective, ratio_level=ratio_level
    )
    assert set(stats) == STATS_KEYS
    assert all(type(value) is float and math.isfinite(value) for value in stats.values())
    assert stats["loss"] == pytest.approx(loss.item())
    assert stats["positive_count"] == 3.0 and stats["negative_count"] == 3.0
    assert stats["positive_fraction"] == 0.5
    assert 0.0 <= stats["clipped_fraction"] <= 1.0
    assert stats["ratio_p10"] <= stats["ratio_p50"] <= stats["ratio_p90"]


def test_stats_values():
    logprobs, behavior, rewards, mask = random_batch(seed=10)
    _, _, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective="topr", baseline=0.5)
    advantages = rewards - 0.5
    positive = advantages >= 0
    valid = mask != 0
    log_ratio = torch.stack(
        [(logprobs[i, valid[i]] - behavior[i, valid[i]]).sum() for i in range(6)]
    ).detach()
    ratio = log_ratio.exp()
    logp = logprobs.detach()
    assert stats["positive_fraction"] == pytest.approx(positive.double().mean().item())
    assert stats["mean_weight_positive"] == 1.0
    negative_weights = ratio[~positive].clamp(0, 1)
    assert stats["mean_weight_negative"] == pytest.approx(negative_weights.mean().item())
    assert stats["log_ratio_mean"] == pytest.approx(log_ratio.mean().item())
    middle = ratio.sort().values[2:4]  # quantile 0.5 of six values interpolates the middle two
    assert stats["ratio_p50"] == pytest.approx(middle.mean().item())
    positive_tokens = valid & positive[:, None]
    negative_tokens = valid & ~positive[:, None]
    assert stats["logprob_positive_mean"] == pytest.approx(logp[positive_tokens].mean().item())
    assert stats["logprob_negative_mean"] == pytest.approx(logp[negative_tokens].mean().item())
    assert stats["completion_tokens_mean"] == pytest.approx(mask.sum().item() / 6)


def test_stats_with_no_negatives_use_zero():
    logprobs, behavior, rewards, mask = random_batch(seed=11)
    _, _, stats = loss_and_grad(logprobs, behavior, rewards.abs(), mask, objective="reinforce")
    assert stats["positive_fraction"] == 1.0 and stats["negative_count"] == 0.0
    assert stats["mean_weight_positive"] == 1.0
    assert stats["mean_weight_negative"] == 0.0 and stats["logprob_negative_mean"] == 0.0
    assert stats["gradient_weight_negative"] == 0.0
    # No ratio on negatives at all, rather than a 0 that would read as a collapsed taper.
    assert not set(NEGATIVE_RATIO_STATS) & set(stats)


def rows_with_log_ratios(sequence_log_ratios, rewards, tokens=2):
    """One completion per row whose tokens share its sequence log pi - log mu equally."""
    log_ratios = torch.tensor(sequence_log_ratios, dtype=torch.float64)
    logprobs = torch.full((len(log_ratios), tokens), -1.0, dtype=torch.float64, requires_grad=True)
    behavior = logprobs.detach() - (log_ratios / tokens)[:, None]
    return logprobs, behavior, torch.tensor(rewards, dtype=torch.float64), torch.ones(len(log_ratios), tokens)


def test_ratio_quantiles_on_negatives_leave_the_positives_out():
    log_ratios = [3.0, -1.0, 2.0, -2.0, -0.5, -3.0]  # the positives' ratios are the largest
    rewards = [1.0, -1.0, 1.0, -1.0, -1.0, -1.0]
    _, _, stats = loss_and_grad(*rows_with_log_ratios(log_ratios, rewards), objective="topr")
    negatives = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64).exp()
    expected = torch.quantile(negatives, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert [stats[name] for name in NEGATIVE_RATIO_STATS] == pytest.approx(expected.tolist())
    assert stats["ratio_negative_p50"] < stats["ratio_p50"]  # the batch's median mixes in the positives


def test_the_stats_hold_every_negatives_clamped_ratio_in_batch_order():
    """What ``topr.train`` takes a step's quantiles over, across its micro-batches."""
    log_ratios = [3.0, -1.0, 2.0, 25.0, -0.5, -30.0]  # two beyond the clamp
    rewards = [1.0, -1.0, 1.0, -1.0, -1.0, -1.0]
    _, _, stats = loss_and_grad(*rows_with_log_ratios(log_ratios, rewards), objective="topr")
    expected = torch.tensor([-1.0, LOG_RATIO_CLAMP, -0.5, -LOG_RATIO_CLAMP], dtype=torch.float64).exp()
    assert stats.negative_ratios == pytest.approx(expected.tolist(), rel=1e-12)
    _, _, positives_only = loss_and_grad(*rows_with_log_ratios([3.0, -1.0], [1.0, 0.0]), objective="topr")
    assert positives_only.negative_ratios == []


def test_gradient_weights_are_the_tapered_push_of_each_group():
    # TOPR: positives at weight 1; negatives at clip(rho, 0, 1) = e^-1, then 1 (rho = e^0.5 > 1).
    log_ratios, rewards = [-2.0, 0.0, -1.0, 0.5], [1.0, 0.5, -1.0, -2.0]
    _, _, stats = loss_and_grad(*rows_with_log_ratios(log_ratios, rewards), objective="topr")
    assert stats["gradient_weight_positive"] == pytest.approx((1.0 + 0.5) / 4)
    assert stats["gradient_weight_negative"] == pytest.approx((math.exp(-1.0) * 1.0 + 1.0 * 2.0) / 4)
    # TIS tapers positives too: clip(e^-2, 0, 1).
    _, _, stats = loss_and_grad(*rows_with_log_ratios(log_ratios, rewards), objective="tis")
    assert stats["gradient_weight_positive"] == pytest.approx((math.exp(-2.0) * 1.0 + 1.0 * 0.5) / 4)


def test_gradient_weights_per_token_average_the_completions_token_weights():
    # One negative of 2 tokens with ratios 0.5 and 2: TOPR's token weights 0.5 and 1.
    logprobs = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    behavior = logprobs.detach() - torch.tensor([[math.log(0.5), math.log(2.0)], [0.0, 0.0]], dtype=torch.float64)
    rewards, mask = torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, _, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective="topr", ratio_level="token")
    assert stats["gradient_weight_negative"] == pytest.approx((0.5 + 1.0) / 2 / 2)
    assert stats["gradient_weight_positive"] == pytest.approx(1.0 / 2)
    # PPO: the negative's token at ratio 0.5 < 1 - eps is clipped (weight 0), the other keeps 2.
    _, _, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective="ppo")
    assert stats["gradient_weight_negative"] == pytest.approx((0.0 + 2.0) / 2 / 2)


def test_log_ratio_per_token_counts_every_completion_token_once():
    logprobs, behavior, rewards, mask = random_batch(seed=12)
    _, _, stats = loss_and_grad(logprobs, behavior, rewards, mask)
    valid = mask != 0
    expected = (logprobs.detach() - behavior)[valid].sum() / valid.sum()
    assert stats["log_ratio_per_token"] == pytest.approx(expected.item())
    on_policy = logprobs.detach().clone()
    _, _, stats = loss_and_grad(logprobs, on_policy, rewards, mask)
    assert stats["log_ratio_per_token"] == 0.0 and stats["ratio_negative_p50"] == 1.0


# ----------------------------------------------------------------------------- length normalization


@pytest.mark.parametrize("ratio_level", ["sequence", "token"])
@pytest.mark.parametrize("length_normalization", LENGTH_NORMALIZATIONS)
def test_length_normalization_divides_each_completion_by_its_length_or_a_constant(length_normalization, ratio_level):
    logprobs, behavior, rewards, mask = random_batch(seed=13)
    normalizer = 10.0 if length_normalization == "constant" else None
    _, grad, _ = loss_and_grad(
        logprobs, behavior, rewards, mask, objective="topr", ratio_level=ratio_level,
        length_normalization=length_normalization, normalizer=normalizer,
    )  # fmt: skip
    # The closed form: d loss / d log pi(y_it) = -alpha * A_i / (B * L_i) on completion tokens.
    valid = mask != 0
    token_log_ratio = torch.where(valid, logprobs.detach() - behavior, 0.0)
    log_ratio = token_log_ratio if ratio_level == "token" else token_log_ratio.sum(dim=1, keepdim=True)
    positive = (rewards >= 0)[:, None]
    alpha = torch.where(positive, 1.0, log_ratio.exp().clamp(0, 1))
    lengths = valid.sum(dim=1, keepdim=True).clamp_min(1).double()
    divisor = lengths if normalizer is None else torch.full_like(lengths, normalizer)
    expected = torch.where(valid, -alpha * rewards[:, None] / (len(rewards) * divisor), 0.0)
    assert_close(grad, expected)


def test_constant_length_normalization_weighs_tokens_alike_whatever_the_length():
    short, long = one_row(0.0, 1.0, tokens=2), one_row(0.0, 1.0, tokens=8)
    grads = {
        name: [loss_and_grad(*row, length_normalization=name, normalizer=normalizer)[1][0, 0].item() for row in (short, long)]
        for name, normalizer in (("sequence", None), ("constant", 8.0))
    }
    assert grads["constant"][0] == grads["constant"][1] == pytest.approx(-1 / 8)
    assert grads["sequence"] == pytest.approx([-1 / 2, -1 / 8])


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"length_normalization": "tokens"}, "length_normalization"),
        ({"length_normalization": "constant"}, "normalizer"),
        ({"length_normalization": "constant", "normalizer": 0.0}, "normalizer"),
        ({"length_normalization": "sequence", "normalizer": 64.0}, "normalizer"),
    ],
)
def test_length_normalization_arguments_are_checked(arguments, named):
    with pytest.raises(ValueError, match=named):
        policy_loss(*random_batch(), **arguments)


# ----------------------------------------------------------------------------- tokens left out of negatives


def shared_token_marks(mask):
    """Marks on the last two completion tokens of every row (positives included, where they must
    change nothing) and on one position outside the completions."""
    marks = torch.zeros_like(mask, dtype=torch.bool)
    marks[:, -2:] = True
    marks[0, 0] = marks[1, 0] = True  # row 1's position 0 is prompt: not a completion token
    return marks


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("objective", ["topr", "reinforce", "ppo"])
def test_negative_excluded_tokens_get_no_gradient_and_the_rest_is_unchanged(objective, ratio_level):
    logprobs, behavior, rewards, mask = random_batch(seed=14)
    marks = shared_token_marks(mask)
    _, grad, stats = loss_and_grad(logprobs, behavior, rewards, mask, objective=objective, ratio_level=ratio_level)
    _, excluded_grad, excluded_stats = loss_and_grad(
        logprobs, behavior, rewards, mask, objective=objective, ratio_level=ratio_level, negative_excluded=marks
    )
    negative = (rewards < 0)[:, None].expand_as(mask)
    skipped = negative & marks & (mask != 0)
    assert (excluded_grad[skipped] == 0).all()
    assert_close(excluded_grad[~skipped], grad[~skipped])  # positives, and a negative's other tokens
    assert (grad[skipped] != 0).any()  # what the marks took away (PPO's clip may zero some already)
    # The ratio and the length normaliser still count every completion token: the stats but the
    # loss are the same; the count of tokens left out is added.
    assert excluded_stats.pop("excluded_negative_tokens") == skipped.sum().item() == 5
    assert excluded_stats.pop("loss") != stats.pop("loss")
    assert excluded_stats == pytest.approx(stats)
    assert excluded_stats.negative_ratios == stats.negative_ratios


def test_a_negatives_tokens_left_in_are_still_pushed_down_at_the_tapered_weight():
    logprobs, behavior, rewards, mask = one_row(log_ratio_per_token=-0.5, reward=-1.0, tokens=4)
    marks = torch.tensor([[False, False, True, True]])
    _, grad, _ = loss_and_grad(logprobs, behavior, rewards, mask, objective="topr", negative_excluded=marks)
    # rho = e^(4 * -0.5) over all four tokens, L = 4: d loss / d log pi = rho * 1 / 4 on the first two.
    assert grad[0].tolist() == pytest.approx([math.exp(-2.0) / 4, math.exp(-2.0) / 4, 0.0, 0.0])


def test_marks_on_positives_change_nothing():
    logprobs, behavior, rewards, mask = random_batch(seed=15)
    everything = torch.ones_like(mask, dtype=torch.bool)
    positives = rewards.abs()
    loss, grad, _ = loss_and_grad(logprobs, behavior, positives, mask)
    marked_loss, marked_grad, stats = loss_and_grad(logprobs, behavior, positives, mask, negative_excluded=everything)
    assert torch.equal(marked_loss, loss) and torch.equal(marked_grad, grad)
    assert stats["excluded_negative_tokens"] == 0.0


# ----------------------------------------------------------------------------- validation


def test_unknown_objective_lists_the_choices():
    with pytest.raises(ValueError, match="objective") as error:
        policy_loss(*random_batch(), objective="grpo")
    assert all(choice in str(error.value) for choice in objective_names())


def test_unknown_ratio_level_lists_the_choices():
    with pytest.raises(ValueError, match="ratio_level") as error:
        policy_loss(*random_batch(), ratio_level="tokens")
    assert all(choice in str(error.value) for choice in RATIO_LEVELS)


@pytest.mark.parametrize("argument", ["behavior_logprobs", "rewards", "mask", "negative_excluded"])
def test_shape_mismatch_names_the_argument(argument):
    inputs = dict(zip(["logprobs", "behavior_logprobs", "rewards", "mask"], random_batch()))
    inputs["negative_excluded"] = inputs["mask"] != 0
    inputs[argument] = inputs[argument][:-1]
    with pytest.raises(ValueError, match=argument):
        policy_loss(**inputs)


def test_logprobs_must_be_two_dimensional():
    logprobs, behavior, rewards, mask = random_batch()
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(logprobs[0], behavior[0], rewards, mask[0])


@pytest.mark.parametrize(
    "overrides",
    [{"negative_bounds": (1.0, 0.0)}, {"positive_bounds": (-1.0, 1.0)}],
)
def test_invalid_bounds_are_rejected(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        policy_loss(*random_batch(), **overrides)


def test_bounds_do_not_apply_to_ppo():
    with pytest.raises(ValueError, match="ppo"):
        policy_loss(*random_batch(), objective="ppo", negative_bounds=(0.0, 1.0))
