"""How often the experiment report's intervals cover the true difference, by simulation.

An experiment's arms are compared over a few replicates that share their held-out problems
(``topr.stats``). This simulates such experiments where the spread between replicates
dominates, as the training seed does here: each problem has a difficulty q_p ~ U(0.2, 0.8)
(drawn once per experiment and shared by every replicate); each replicate r moves each arm's
accuracy by its own s ~ N(0, tau) (the seed's effect), the arm by delta; a problem is solved
with probability clip(q_p + s + delta·arm, 0, 1). The true difference of an experiment is
the expected accuracy difference on its problems over the seeds' distribution (exact: the
clipped normal's mean). Each simulated experiment gets the 95% t-interval over replicates
(``paired_t_interval``, the primary interval) and the joint bootstrap (``joint_bootstrap``);
the table gives how often each covers the truth, with its Wilson interval (statsmodels).

    .venv/bin/python bench/interval_coverage.py                     # 1000 experiments per row
    .venv/bin/python bench/interval_coverage.py --json coverage.json
"""

from __future__ import annotations

import sys

import common

DEFAULTS = dict(problems=108, tau=0.08, delta=0.03)


def clipped_mean(mean, sd):
    """E[clip(X, 0, 1)] for X ~ N(mean, sd), elementwise."""
    from scipy.stats import norm

    upper, lower = (1 - mean) / sd, -mean / sd
    inside = mean * (norm.cdf(upper) - norm.cdf(lower)) + sd * (norm.pdf(lower) - norm.pdf(upper))
    return inside + (1 - norm.cdf(upper))


def simulate(replicates: int, experiments: int, problems: int, tau: float, delta: float, seed: int = 0, n_resamples: int = 2000) -> dict:
    """Coverage of both intervals over ``experiments`` simulated experiments (see the docstring)."""
    import numpy as np

    from topr.stats import joint_bootstrap, paired_t_interval

    rng = np.random.default_rng(seed)
    covered = {"t-interval": 0, "joint bootstrap": 0}
    for experiment in range(experiments):
        difficulty = rng.uniform(0.2, 0.8, problems)
        truth = float(np.mean(clipped_mean(difficulty + delta, tau) - clipped_mean(difficulty, tau)))
        arm_p = np.clip(difficulty + rng.normal(0, tau, (replicates, 1)) + delta, 0, 1)
        reference_p = np.clip(difficulty + rng.normal(0, tau, (replicates, 1)), 0, 1)
        arm, reference = rng.random(arm_p.shape) < arm_p, rng.random(reference_p.shape) < reference_p
        low, high = paired_t_interval(arm.mean(axis=1) - reference.mean(axis=1))
        covered["t-interval"] += low <= truth <= high
        low, high = joint_bootstrap(arm, reference, n_resamples=n_resamples, seed=experiment)
        covered["joint bootstrap"] += low <= truth <= high
    return {name: count / experiments for name, count in covered.items()}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--experiments", type=int, default=1000, help="simulated experiments per replicate count (default 1000)")
    p.add_argument("--replicates", default="3,6", help="replicate counts, comma-separated (default 3,6)")
    args = p.parse_args(argv)
    if args.quick:
        args.experiments, args.replicates = 20, "3"
    info = common.setup(args)
    from statsmodels.stats.proportion import proportion_confint

    rows = []
    for replicates in (int(value) for value in args.replicates.split(",")):
        coverage = simulate(replicates, args.experiments, **DEFAULTS)
        for interval, share in coverage.items():
            low, high = proportion_confint(round(share * args.experiments), args.experiments, method="wilson")
            rows.append({"replicates": replicates, "interval": interval, "coverage": share, "low": low, "high": high})
    text = (
        f"coverage of the nominal 95% intervals: {args.experiments} simulated experiments per row, "
        f"{DEFAULTS['problems']} shared problems, seed sd tau = {DEFAULTS['tau']}, true gain delta = {DEFAULTS['delta']}\n\n"
        + common.table(rows, [("replicates", "replicates", "d"), ("interval", "interval", ""), ("coverage", "coverage", ".3f"), ("low", "Wilson low", ".3f"), ("high", "Wilson high", ".3f")])
    )
    common.finish(args, "interval_coverage", info, {"rows": rows, "settings": {**DEFAULTS, "experiments": args.experiments}}, text)
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
