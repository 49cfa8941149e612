"""The end-of-run summary: held-out accuracy and dataset composition per iteration.

Read back from the parent MLflow run, where every evaluation and curation logged its figures at
``step = iteration``; so the table a local ``topr run`` prints is also what MLflow shows.
"""

from __future__ import annotations

from pathlib import Path

from topr.tracking import metric_history

ACCURACY_KEYS = ("pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high", "maj_at_k", "pass_at_k", "parse_failure_rate")
COMPOSITION_KEYS = ("sample_accuracy", "curated_count", "curated_positives", "curated_negatives", "effective_positive_fraction")


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    return {key: metric_history(tracking_uri, run_id, key) for key in ACCURACY_KEYS + COMPOSITION_KEYS}


def format_table(metrics: dict[str, dict[int, float]]) -> str:
    """One row per evaluated iteration (0 = the starting model)."""
    header = f"{'iteration':>9}  {'pass@1':>7}  {'95% CI':<15}  {'parse fail':>10}  {'sampled acc':>11}  {'curated (+/-)':>14}  {'eff. pos':>8}"
    lines = [header, "-" * len(header)]
    for step in sorted(metrics["pass_at_1"]):
        ci = f"[{metrics['pass_at_1_ci_low'][step]:.1%}, {metrics['pass_at_1_ci_high'][step]:.1%}]"
        if step in metrics["curated_count"]:
            composition = f"{metrics['curated_count'][step]:.0f} ({metrics['curated_positives'][step]:.0f}/{metrics['curated_negatives'][step]:.0f})"
            sampled = f"{metrics['sample_accuracy'][step]:.1%}"
            effective = f"{metrics['effective_positive_fraction'][step]:.2f}"
        else:
            composition, sampled, effective = "start", "-", "-"
        lines.append(
            f"{step:>9}  {metrics['pass_at_1'][step]:>7.1%}  {ci:<15}  {metrics['parse_failure_rate'][step]:>10.1%}  "
            f"{sampled:>11}  {composition:>14}  {effective:>8}"
        )
    return "\n".join(lines)


def plot_accuracy(metrics: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(metrics["pass_at_1"])
    values = [metrics["pass_at_1"][s] for s in steps]
    errors = [
        [v - metrics["pass_at_1_ci_low"][s] for s, v in zip(steps, values)],
        [metrics["pass_at_1_ci_high"][s] - v for s, v in zip(steps, values)],
    ]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar(steps, values, yerr=errors, marker="o", capsize=4)
    axis.set_xlabel("iteration (0 = starting model)")
    axis.set_ylabel("held-out pass@1 (greedy)")
    axis.set_xticks(steps)
    axis.set_ylim(0, max(1e-3, max(metrics["pass_at_1_ci_high"].values())) * 1.1)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_run_report(run_dir: Path, tracking_uri: str, run_id: str, minutes: float) -> str:
    """Write ``report.md`` and ``accuracy.png`` into the run folder, log both; return the table."""
    from topr.tracking import log_run_artifact

    metrics = run_metrics(tracking_uri, run_id)
    table = format_table(metrics)
    plot_accuracy(metrics, run_dir / "accuracy.png")
    (run_dir / "report.md").write_text(
        f"# topr run {run_dir.name}\n\nMLflow run `{run_id}` ({tracking_uri}), {minutes:.1f} minutes.\n\n"
        f"```\n{table}\n```\n\n![held-out accuracy](accuracy.png)\n"
    )
    for name in ("report.md", "accuracy.png"):
        log_run_artifact(tracking_uri, run_id, run_dir / name)
    return table
