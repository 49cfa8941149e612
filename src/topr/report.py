"""Reports: the end-of-run summary of `topr run`, and the side-by-side report of `topr experiment`.

Read back from the parent MLflow run, where every evaluation and curation logged its figures at
``step = iteration``; so the table a local ``topr run`` prints is also what MLflow shows.
"""

from __future__ import annotations

from pathlib import Path

from topr.records import write_json
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


def error_bars(metrics: dict[str, dict[int, float]], steps: list[int]) -> list[list[float]]:
    """Distances from pass@1 down to its interval's low end and up to its high end, at each step;
    never negative (an interval of 0 successes logged as [3e-18, …] by older versions)."""
    values = [metrics["pass_at_1"][step] for step in steps]
    return [
        [max(0.0, value - metrics["pass_at_1_ci_low"][step]) for step, value in zip(steps, values)],
        [max(0.0, metrics["pass_at_1_ci_high"][step] - value) for step, value in zip(steps, values)],
    ]


def plot_accuracy(metrics: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(metrics["pass_at_1"])
    values = [metrics["pass_at_1"][s] for s in steps]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar(steps, values, yerr=error_bars(metrics, steps), marker="o", capsize=4)
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


# ---- experiments: several arms side by side (``topr experiment``) -------------------------------

DEGENERATION_KEYS = ("empty_rate", "mean_completion_tokens", "mean_weight_negative", "final_logprob_negative", "final_logprob_positive")


def arm_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Every figure an arm's parent run holds, by key and iteration: accuracy, composition,
    degeneration and, when the verifier branch ran, the verifier's."""
    from topr.tracking import mlflow_client

    keys = set(ACCURACY_KEYS + COMPOSITION_KEYS + DEGENERATION_KEYS) | set(mlflow_client(tracking_uri).get_run(run_id).data.metrics)
    return {key: metric_history(tracking_uri, run_id, key) for key in sorted(keys)}


def _cell(metrics: dict[str, dict[int, float]], key: str, step: int, form: str = "{:.1%}") -> str:
    value = metrics.get(key, {}).get(step)
    return "–" if value is None else form.format(value)


def _accuracy_cell(metrics: dict[str, dict[int, float]], step: int) -> str:
    if step not in metrics["pass_at_1"]:
        return "–"
    return f"{metrics['pass_at_1'][step]:.1%} [{metrics['pass_at_1_ci_low'][step]:.1%}, {metrics['pass_at_1_ci_high'][step]:.1%}]"


def accuracy_table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    """Held-out pass@1 with its 95% interval, one row per arm, one column per iteration."""
    steps = sorted({step for metrics in results.values() for step in metrics["pass_at_1"]})
    lines = ["| arm | " + " | ".join(f"iteration {step}" for step in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(_accuracy_cell(metrics, step) for step in steps) + " |" for arm, metrics in results.items()]
    return "\n".join(lines)


def degeneration_table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    """Per arm and trained iteration: what the data was and how training treated negatives."""
    header = (
        "| arm | iteration | sampled acc. | curated (+/−) | eff. pos. | mean weight on negatives | log π negatives | log π positives "
        "| held-out parse failures | empty outputs | mean tokens |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for arm, metrics in results.items():
        for step in sorted(metrics.get("curated_count", {})):
            curated = f"{metrics['curated_count'][step]:.0f} ({metrics['curated_positives'][step]:.0f}/{metrics['curated_negatives'][step]:.0f})"
            lines.append(
                f"| {arm} | {step} | {_cell(metrics, 'sample_accuracy', step)} | {curated} | {_cell(metrics, 'effective_positive_fraction', step, '{:.2f}')} "
                f"| {_cell(metrics, 'mean_weight_negative', step, '{:.3f}')} | {_cell(metrics, 'final_logprob_negative', step, '{:.2f}')} "
                f"| {_cell(metrics, 'final_logprob_positive', step, '{:.2f}')} | {_cell(metrics, 'parse_failure_rate', step)} "
                f"| {_cell(metrics, 'empty_rate', step)} | {_cell(metrics, 'mean_completion_tokens', step, '{:.1f}')} |"
            )
    return "\n".join(lines)


def verifier_table(results: dict[str, dict[str, dict[int, float]]]) -> str | None:
    """The verifier's accuracy and invalid rate before and after training, and the votes; None
    when no arm ran the verifier branch."""
    rows = {arm: {key: max(values.items())[1] for key, values in metrics.items() if values} for arm, metrics in results.items()}
    rows = {arm: row for arm, row in rows.items() if "verifier_accuracy_trained" in row}
    if not rows:
        return None
    lines = [
        "| arm | verifier accuracy (base → trained) | invalid judgments (base → trained) | k | pass@1 | majority vote "
        "| weighted vote, base verifier | weighted vote, trained verifier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        def interval(key: str) -> str:
            return f"{row[key]:.1%} [{row[key + '_ci_low']:.1%}, {row[key + '_ci_high']:.1%}]"

        lines.append(
            f"| {arm} | {row['verifier_accuracy_base']:.1%} → {row['verifier_accuracy_trained']:.1%} "
            f"| {row['verifier_invalid_rate_base']:.1%} → {row['verifier_invalid_rate_trained']:.1%} | {row['vote_k']:.0f} "
            f"| {interval('vote_pass_at_1')} | {interval('vote_majority')} | {interval('vote_weighted_base')} | {interval('vote_weighted_trained')} |"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_arms_accuracy(results: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    """Held-out pass@1 by iteration, one line per arm, 95% intervals as error bars (arms nudged apart)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for index, (arm, metrics) in enumerate(results.items()):
        steps = sorted(metrics["pass_at_1"])
        offset = (index - (len(results) - 1) / 2) * 0.04
        values = [metrics["pass_at_1"][s] for s in steps]
        axis.errorbar([s + offset for s in steps], values, yerr=error_bars(metrics, steps), marker="o", capsize=3, label=arm)
    axis.set_xlabel("iteration (0 = starting model)")
    axis.set_ylabel("held-out pass@1 (greedy), 95% CI")
    axis.set_xticks(sorted({s for metrics in results.values() for s in metrics["pass_at_1"]}))
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_degeneration(results: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    """By trained iteration: the mean weight on negatives, the log π of negatives at the end of
    training, and the held-out outputs with no parsable answer."""
    plt = _pyplot()
    panels = (  # key, title, y range (None: automatic)
        ("mean_weight_negative", "mean weight on negatives", (0, 1.05)),
        ("final_logprob_negative", "log π of negatives (end of training)", None),
        ("parse_failure_rate", "held-out unparsable outputs", (0, 1.05)),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.5))
    for axis, (key, title, limits) in zip(axes, panels):
        for arm, metrics in results.items():
            points = sorted(metrics.get(key, {}).items())
            if points:
                axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=arm)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("iteration")
        iterations = sorted({step for metrics in results.values() for step in metrics.get(key, {})})
        if iterations:  # whole iterations only, with room around a single one
            axis.set_xticks(iterations)
            axis.set_xlim(iterations[0] - 0.5, iterations[-1] + 0.5)
        if limits:
            axis.set_ylim(*limits)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_positive_fraction(results: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    """Held-out pass@1 after the last iteration against the effective positive fraction of the
    training data (its mean over iterations), one point per arm."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, metrics in results.items():
        fractions = list(metrics.get("effective_positive_fraction", {}).values())
        if not fractions:
            continue
        last = max(metrics["pass_at_1"])
        value = metrics["pass_at_1"][last]
        x = sum(fractions) / len(fractions)
        axis.errorbar([x], [value], yerr=error_bars(metrics, [last]), marker="o", capsize=3)
        axis.annotate(arm, (x, value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    starts = {metrics["pass_at_1"][0] for metrics in results.values() if 0 in metrics["pass_at_1"]}
    if len(starts) == 1:  # every arm started from the same model
        axis.axhline(starts.pop(), color="grey", linestyle="--", linewidth=1, label="before training")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_xlabel("effective positive fraction of the training data")
    axis.set_ylabel("held-out pass@1 after training, 95% CI")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_experiment_report(folder: Path, tracking_uri: str, experiment, arms: dict, results: dict, context: dict) -> Path:
    """Write ``report.md``, its plots and ``results.json`` into the experiment folder, and log them
    to an MLflow run of the experiment (tagging each arm's run); return the report's path."""
    finished = {arm: arm_metrics(tracking_uri, result["run_id"]) for arm, result in results.items() if result["status"] == "finished"}
    spec = context["spec"]
    figures = []
    if finished:
        plot_arms_accuracy(finished, folder / "accuracy.png")
        plot_degeneration(finished, folder / "degeneration.png")
        figures = ["accuracy.png", "degeneration.png"]
        if spec.compare == "effective_positive_fraction":
            plot_positive_fraction(finished, folder / "positive_fraction.png")
            figures.append("positive_fraction.png")
    (folder / "report.md").write_text(_experiment_markdown(experiment, spec, arms, results, finished, context, figures))
    write_json(folder / "results.json", {"arms": results, "metrics": {arm: {k: {str(s): v for s, v in m.items()} for k, m in metrics.items()} for arm, metrics in finished.items()}})
    _log_experiment(folder, tracking_uri, context["name"], results, ["report.md", "results.json", *figures])
    return folder / "report.md"


def _experiment_markdown(experiment, spec, arms: dict, results: dict, finished: dict, context: dict, figures: list[str]) -> str:
    shared = context["shared"]
    lines = [
        f"# Experiment `{context['name']}`",
        "",
        spec.description.strip(),
        "",
        f"{len(arms)} arm(s), run for {sum(result['minutes'] for result in results.values()):.1f} minutes in all "
        f"on {context['machine']} (minutes per arm below; the shared data took {context['shared']['minutes']:.1f}).",
        f"Shared by every arm that keeps the experiment's model, task and sample settings: the starting model "
        f"(`{experiment.model.path}`), the prompts ({experiment.task.name}, {experiment.task.train_size} per iteration, "
        f"{shared['eval_prompts']} held out) and iteration 1's {shared['samples_count']} samples "
        f"({shared['samples_accuracy']:.1%} correct).",
        "",
        "| arm | overrides | iteration 1 data | status | minutes |",
        "|---|---|---|---|---|",
    ]
    for arm, result in results.items():
        own = " ".join(f"`{o}`" for o in spec.arms[arm]) or "(none)"
        data = "shared" if arms[arm].sample.first_iteration_samples == shared["samples"] else "its own"
        status = result["status"] if result["status"] == "finished" else f"failed: {result['error']}"
        lines.append(f"| {arm} | {own} | {data} | {status} | {result['minutes']:.1f} |")
    lines += ["", "Overrides of every arm: " + (" ".join(f"`{o}`" for o in spec.overrides) or "(none)"), ""]
    if finished:
        lines += ["## Held-out pass@1 (greedy decoding, Wilson 95% CI)", "", accuracy_table(finished), "", "![accuracy by iteration](accuracy.png)", ""]
        lines += ["## Training data and signs of degeneration", "", degeneration_table(finished), "", "![degeneration](degeneration.png)", ""]
        if "positive_fraction.png" in figures:
            lines += ["## Accuracy against the effective positive fraction", "", "![accuracy vs effective positive fraction](positive_fraction.png)", ""]
        verifier = verifier_table(finished)
        if verifier:
            lines += ["## Generative verifier", "", verifier, ""]
    return "\n".join(lines)


def _log_experiment(folder: Path, tracking_uri: str, name: str, results: dict, files: list[str]) -> None:
    from topr.tracking import code_version, experiment_id, mlflow_client

    client = mlflow_client(tracking_uri)
    mlflow_experiment_id = experiment_id(client, f"experiment-{name}", tracking_uri)
    run = client.create_run(mlflow_experiment_id, run_name=f"{name}/report", tags={**code_version(), "topr.experiment": name})
    for arm, result in results.items():
        client.set_tag(run.info.run_id, f"topr.arm.{arm}", result["run_id"] or result["status"])
        if result["run_id"]:
            client.set_tag(result["run_id"], "topr.experiment", name)
            client.set_tag(result["run_id"], "topr.arm", arm)
    for file in files:
        client.log_artifact(run.info.run_id, str(folder / file))
    client.set_terminated(run.info.run_id, "FINISHED")
