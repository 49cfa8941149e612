"""Reports: the end-of-run summary of `topr run`, and the side-by-side report of `topr experiment`.

Read back from the parent MLflow run, where every evaluation and curation logged its figures at
``step = iteration``; so the table a local ``topr run`` prints is also what MLflow shows.
"""

from __future__ import annotations

from pathlib import Path

from topr.records import read_records, write_json
from topr.stats import ProblemGain
from topr.tracking import SKIPPED_TAG, metric_history, mlflow_client

ACCURACY_KEYS = ("pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high", "maj_at_k", "pass_at_k", "parse_failure_rate")
COMPOSITION_KEYS = ("sample_accuracy", "curated_count", "curated_positives", "curated_negatives", "effective_positive_fraction")
TRAINING_KEYS = ("positive_weight_share", "final_ratio_negative_p50", "first_step_log_ratio_per_token")
"""What training did with the data (``topr.train``): the share of the gradient weight on positives
after the taper, the median ratio π/μ on negatives at the end, and the first step's mean per-token
log π/μ (≈ 0 on data the model just sampled)."""


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    return {key: metric_history(tracking_uri, run_id, key) for key in ACCURACY_KEYS + COMPOSITION_KEYS + TRAINING_KEYS}


def format_table(metrics: dict[str, dict[int, float]]) -> str:
    """One row per evaluated iteration (0 = the starting model): accuracy, the training data's
    composition (eff. pos: the c-formula share of positives; pos. weight: the share of the
    gradient weight they carried after the taper) and the median ratio on negatives at the end
    of training (ρ⁻ p50)."""
    header = (
        f"{'iteration':>9}  {'pass@1':>7}  {'95% CI':<15}  {'parse fail':>10}  {'sampled acc':>11}  {'curated (+/-)':>14}  "
        f"{'eff. pos':>8}  {'pos. weight':>11}  {'ρ⁻ p50':>7}"
    )
    lines = [header, "-" * len(header)]
    for step in sorted(metrics["pass_at_1"]):
        ci = f"[{metrics['pass_at_1_ci_low'][step]:.1%}, {metrics['pass_at_1_ci_high'][step]:.1%}]"
        if step in metrics["curated_count"]:
            composition = f"{metrics['curated_count'][step]:.0f} ({metrics['curated_positives'][step]:.0f}/{metrics['curated_negatives'][step]:.0f})"
        else:
            composition = "start"
        lines.append(
            f"{step:>9}  {metrics['pass_at_1'][step]:>7.1%}  {ci:<15}  {metrics['parse_failure_rate'][step]:>10.1%}  "
            f"{_cell(metrics, 'sample_accuracy', step, '{:.1%}', missing='-'):>11}  {composition:>14}  "
            f"{_cell(metrics, 'effective_positive_fraction', step, '{:.2f}', missing='-'):>8}  "
            f"{_cell(metrics, 'positive_weight_share', step, '{:.2f}', missing='-'):>11}  {_cell(metrics, 'final_ratio_negative_p50', step, '{:.3f}', missing='-'):>7}"
        )
    return "\n".join(lines)


def format_warnings(metrics: dict[str, dict[int, float]]) -> str:
    """A line for each iteration whose training set held no positive or no negative."""
    from topr.curate import one_sided_warning

    warnings = {step: one_sided_warning(int(metrics["curated_positives"][step]), int(count)) for step, count in metrics.get("curated_count", {}).items()}
    return "\n".join(f"Warning, iteration {step}: {warning}." for step, warning in sorted(warnings.items()) if warning)


def error_bars(metrics: dict[str, dict[int, float]], steps: list[int]) -> list[list[float]]:
    """Distances from pass@1 down to its interval's low end and up to its high end, at each step;
    never negative (an interval of 0 successes logged as [3e-18, …] by older versions)."""
    values = [metrics["pass_at_1"][step] for step in steps]
    return [
        [max(0.0, value - metrics["pass_at_1_ci_low"][step]) for step, value in zip(steps, values)],
        [max(0.0, metrics["pass_at_1_ci_high"][step] - value) for step, value in zip(steps, values)],
    ]


def plot_accuracy(metrics: dict[str, dict[int, float]], path: Path) -> None:
    """One run's held-out pass@1 by iteration, with its Wilson 95% intervals."""
    plot_replicates_accuracy({"this run": {"run": metrics}}, path)


def evaluation_gains(tracking_uri: str, run_id: str) -> dict[int, ProblemGain]:
    """Each trained iteration's held-out gain over the starting model (iteration 0), problem by
    problem on the problems both were scored on; {} when the run has no iteration-0 evaluation
    with per-problem results (runs of older versions)."""
    from topr.stats import problem_gain
    from topr.tracking import EVALUATION_ARTIFACT, finished_stage_runs, load_json_artifact

    correct = {}
    for iteration, stage_run_id in finished_stage_runs(tracking_uri, run_id, "evaluate").items():
        report = load_json_artifact(tracking_uri, stage_run_id, EVALUATION_ARTIFACT)
        if report and "greedy_correct" in report:
            correct[iteration] = report["greedy_correct"]
    start = correct.pop(0, None)
    if start is None:
        return {}
    gains = {}
    for iteration, by_prompt in sorted(correct.items()):
        common = [prompt_id for prompt_id in start if prompt_id in by_prompt]
        gains[iteration] = problem_gain([by_prompt[p] for p in common], [start[p] for p in common])
    return gains


def format_gains(gains: dict[int, ProblemGain]) -> str:
    """One line per trained iteration: its gain over iteration 0 on the same problems."""
    if not gains:
        return ""
    lines = ["held-out gain over iteration 0, the same problems (the evaluation's noise only; training seeds vary more):"]
    lines += [f"  iteration {iteration}: {gain}" for iteration, gain in gains.items()]
    return "\n".join(lines)


def format_decision(tags: dict[str, str]) -> str:
    """The gate's decision, its guardrails and the promotion, from the run's tags, or why the run
    trained nothing; "" before the gate."""
    if SKIPPED_TAG in tags:
        return f"skipped: {tags[SKIPPED_TAG]}"
    lines = [f"gate: {tags['topr.gate']}"] if "topr.gate" in tags else []
    lines += [f"  {value}" for key, value in sorted(tags.items()) if key.startswith("topr.gate.")]
    if "topr.promoted" in tags:
        lines.append(f"promoted: {tags['topr.promoted']}")
    elif "topr.promotion" in tags:
        lines.append(f"promotion: {tags['topr.promotion']}")
    return "\n".join(lines)


def run_text(tracking_uri: str, run_id: str, metrics: dict[str, dict[int, float]]) -> str:
    """The run's table, its gains over the starting model, the gate's decision and its warnings."""
    tags = mlflow_client(tracking_uri).get_run(run_id).data.tags
    parts = (format_table(metrics), format_gains(evaluation_gains(tracking_uri, run_id)), format_decision(tags), format_warnings(metrics))
    return "\n\n".join(filter(None, parts))


def run_html(tracking_uri: str, run_id: str, title: str) -> str:
    """The run so far as one HTML page, what Kubeflow's UI shows for an HTML artifact: the
    accuracy curve with its intervals (an inline PNG), then ``run_text``."""
    import base64
    import html
    import tempfile

    metrics = run_metrics(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as scratch:
        plot = Path(scratch, "accuracy.png")
        plot_accuracy(metrics, plot)
        image = base64.b64encode(plot.read_bytes()).decode()
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h2>{html.escape(title)}</h2><img alt='held-out accuracy by iteration' src='data:image/png;base64,{image}'>"
        f"<pre>{html.escape(run_text(tracking_uri, run_id, metrics))}</pre></body></html>\n"
    )


def write_run_report(run_dir: Path, tracking_uri: str, run_id: str, minutes: float) -> str:
    """Write ``report.md`` and ``accuracy.png`` into the run folder, log both; return the table
    and the gains over the starting model (for a run that trained nothing, why: ``report.md`` alone)."""
    from topr.tracking import log_run_artifact

    heading = f"# topr run {run_dir.name}\n\nMLflow run `{run_id}` ({tracking_uri}), {minutes:.1f} minutes.\n\n"
    tags = mlflow_client(tracking_uri).get_run(run_id).data.tags
    if SKIPPED_TAG in tags:
        text = format_decision(tags)
        (run_dir / "report.md").write_text(f"{heading}{text}\n")
        log_run_artifact(tracking_uri, run_id, run_dir / "report.md")
        return text
    metrics = run_metrics(tracking_uri, run_id)
    table = run_text(tracking_uri, run_id, metrics)
    plot_accuracy(metrics, run_dir / "accuracy.png")
    (run_dir / "report.md").write_text(f"{heading}```\n{table}\n```\n\n![held-out accuracy](accuracy.png)\n")
    for name in ("report.md", "accuracy.png"):
        log_run_artifact(tracking_uri, run_id, run_dir / name)
    return table


# ---- experiments: several arms side by side (``topr experiment``) -------------------------------

DEGENERATION_KEYS = ("empty_rate", "truncated_rate", "mean_completion_tokens", "mean_weight_negative", "final_logprob_negative", "final_logprob_positive")


def arm_metrics(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Every figure an arm's parent run holds, by key and iteration: accuracy, composition,
    degeneration and, when the verifier branch ran, the verifier's."""
    from topr.tracking import mlflow_client

    keys = set(ACCURACY_KEYS + COMPOSITION_KEYS + TRAINING_KEYS + DEGENERATION_KEYS) | set(mlflow_client(tracking_uri).get_run(run_id).data.metrics)
    return {key: metric_history(tracking_uri, run_id, key) for key in sorted(keys)}


def _cell(metrics: dict[str, dict[int, float]], key: str, step: int, form: str = "{:.1%}", missing: str = "–") -> str:
    """One figure formatted, or ``missing`` when that key was not logged at that step."""
    value = metrics.get(key, {}).get(step)
    return missing if value is None else form.format(value)


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


def _count(value: float) -> str:
    """A count, or a mean count over replicates with one decimal."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def degeneration_table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    """Per arm and trained iteration: what the data was and how training treated negatives."""
    header = (
        "| arm | iteration | sampled acc. | curated (+/−) | eff. pos. | positive weight after taper | mean weight on negatives "
        "| median ratio on negatives (end) | first step log π/μ per token | log π negatives | log π positives "
        "| held-out parse failures | empty outputs | cut at the length limit | mean tokens |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for arm, metrics in results.items():
        for step in sorted(metrics.get("curated_count", {})):
            counts = [_count(metrics[key][step]) for key in ("curated_count", "curated_positives", "curated_negatives")]
            curated = f"{counts[0]} ({counts[1]}/{counts[2]})"
            lines.append(
                f"| {arm} | {step} | {_cell(metrics, 'sample_accuracy', step)} | {curated} | {_cell(metrics, 'effective_positive_fraction', step, '{:.2f}')} "
                f"| {_cell(metrics, 'positive_weight_share', step, '{:.2f}')} | {_cell(metrics, 'mean_weight_negative', step, '{:.3f}')} "
                f"| {_cell(metrics, 'final_ratio_negative_p50', step, '{:.3f}')} | {_cell(metrics, 'first_step_log_ratio_per_token', step, '{:+.4f}')} "
                f"| {_cell(metrics, 'final_logprob_negative', step, '{:.2f}')} "
                f"| {_cell(metrics, 'final_logprob_positive', step, '{:.2f}')} | {_cell(metrics, 'parse_failure_rate', step)} "
                f"| {_cell(metrics, 'empty_rate', step)} | {_cell(metrics, 'truncated_rate', step)} | {_cell(metrics, 'mean_completion_tokens', step, '{:.1f}')} |"
            )
    return "\n".join(lines)


def _verifier_rows(results: dict[str, dict[str, dict[int, float]]]) -> dict[str, dict[str, float]]:
    """Each entry's last logged value of every figure, for the entries that ran the verifier branch."""
    rows = {name: {key: max(values.items())[1] for key, values in metrics.items() if values} for name, metrics in results.items()}
    return {name: row for name, row in rows.items() if "verifier_accuracy_trained" in row}


def verifier_table(results: dict[str, dict[str, dict[int, float]]]) -> str | None:
    """The verifier before → after training, and the votes it weights; None when no arm ran the
    verifier branch.

    Per verifier: greedy judgment accuracy, then the balanced accuracy and AUROC of its P(correct)
    (the two that a verifier answering "No" to every pair cannot raise above 0.5), and the invalid
    judgments. Over the k held-out solutions per question: pass@1, the majority vote, the vote
    weighted by each verifier's P(correct), and the weighted vote minus the majority vote on the
    same questions in points (``topr.stats.problem_gain``). A figure an arm did not log (AUROC when
    its held-out pairs all had one label) shows as "–".
    """
    rows = _verifier_rows(results)
    if not rows:
        return None

    def percent(x: float) -> str:
        return f"{x:.1%}"

    def points(x: float) -> str:
        return f"{100 * x:+.1f}"

    lines = [
        "| arm | judgment accuracy | balanced accuracy | AUROC [95% CI] | invalid judgments | k | pass@1 | majority vote "
        "| weighted vote, base verifier | weighted vote, trained verifier | weighted − majority, points (base → trained) |",
        "|---" * 11 + "|",
    ]
    for arm, row in rows.items():

        def value(key: str, form=percent) -> str:
            return form(row[key]) if key in row else "–"

        def interval(key: str, form=percent) -> str:
            return f"{form(row[key])} [{form(row[key + '_ci_low'])}, {form(row[key + '_ci_high'])}]" if key in row else "–"

        def change(key: str, show=value) -> str:
            return f"{show(key.format('base'))} → {show(key.format('trained'))}"

        cells = [
            arm,
            change("verifier_accuracy_{}"),
            change("verifier_balanced_accuracy_{}"),
            change("verifier_auroc_{}", lambda key: interval(key, "{:.2f}".format)),
            change("verifier_invalid_rate_{}"),
            value("vote_k", "{:.0f}".format),
            interval("vote_pass_at_1"),
            interval("vote_majority"),
            interval("vote_weighted_base"),
            interval("vote_weighted_trained"),
            change("vote_gain_{}", lambda key: interval(key, points)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(figure, path: Path) -> None:
    """Lay out, write as PNG and close a figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    _save(figure, path)


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
    _save(figure, path)


Replicates = dict[str, dict[str, dict[int, float]]]
"""An arm's figures by replicate: ``{replicate: {key: {iteration: value}}}``."""


def mean_over_replicates(replicates: Replicates) -> dict[str, dict[int, float]]:
    """Each figure's mean over the replicates that logged it, by key and iteration."""
    sums: dict[str, dict[int, list[float]]] = {}
    for metrics in replicates.values():
        for key, values in metrics.items():
            for step, value in values.items():
                sums.setdefault(key, {}).setdefault(step, []).append(value)
    return {key: {step: sum(values) / len(values) for step, values in steps.items()} for key, steps in sums.items()}


GAIN_EXPLAINED = (
    "The gain over iteration 0 pairs each replicate's last iteration with the starting model on the same problems: "
    "the t-interval is over replicates, so it holds the training seed's spread on these problems; the joint "
    "bootstrap also draws the problems, so it holds how another draw of problems could move the figure too."
)
"""Under the accuracy table when it has a gain column: what its two intervals cover."""


def replicate_accuracy_table(finished: dict[str, Replicates], key: str = "pass_at_1", gains: dict | None = None) -> str:
    """Held-out pass@1 (or ``key``) per arm and iteration: the mean over replicates with each
    replicate's value (pass@1 of one replicate: its Wilson 95% interval instead), and, given
    ``gains`` (``gains_over_start``), each arm's gain from iteration 0 to its last iteration."""
    if key == "pass_at_1" and all(len(replicates) == 1 for replicates in finished.values()):
        return accuracy_table({arm: next(iter(replicates.values())) for arm, replicates in finished.items()})
    steps = sorted({step for replicates in finished.values() for metrics in replicates.values() for step in metrics.get(key, {})})
    header = [f"iteration {step}" for step in steps]
    if gains:
        header.append("gain over iteration 0 (points) [95% t-interval] [joint bootstrap]")
    lines = ["| arm | replicates | " + " | ".join(header) + " |", "|---" * (len(header) + 2) + "|"]
    for arm, replicates in finished.items():
        cells = []
        for step in steps:
            values = [metrics[key][step] for metrics in replicates.values() if step in metrics.get(key, {})]
            cells.append("–" if not values else f"{sum(values) / len(values):.1%} ({', '.join(f'{v:.0%}' for v in values)})")
        if gains:
            cells.append(_gain_cell(gains.get(arm)))
        lines.append(f"| {arm} | {len(replicates)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gain_cell(gain) -> str:
    from topr.stats import format_interval

    if gain is None or gain.mean_difference is None:
        return "–"
    return f"{100 * gain.mean_difference:+.1f} {format_interval(gain.t_interval)} {format_interval(gain.bootstrap_interval)}"


ProblemResults = dict[int, dict[str, dict[str, dict[str, bool]]]]
"""Greedy correctness by iteration, arm, replicate and held-out prompt id."""


def per_problem_correct(folder: Path, shared: dict, finished: dict[str, Replicates], decoding: str = "greedy") -> ProblemResults:
    """Greedy correctness per held-out problem, by iteration, arm and replicate, read from the
    units' evaluation completions (iteration 0: the shared starting model's, else the unit's own);
    ``decoding="greedy_cut"``: the completions cut at ``evaluate.cut_at_tokens``, where evaluated so."""
    from topr.workflow import IterationFiles

    def correct(path: Path) -> dict[str, bool] | None:
        if not path.exists():
            return None
        return {r["prompt_id"]: bool(r["correct"]) for r in read_records(path) if r.get("decoding") == decoding} or None

    start = correct(Path(shared["start_evaluation"]).with_name("evaluation_completions.jsonl"))
    found: ProblemResults = {}
    for arm, replicates in finished.items():
        for replicate, metrics in replicates.items():
            for step in metrics["pass_at_1"]:
                run = folder / "arms" / arm / replicate / "run"
                own = correct(IterationFiles(run / f"iter{step}").completions)
                values = own if own is not None or step > 0 else start
                if values is not None:
                    found.setdefault(step, {}).setdefault(arm, {})[replicate] = values
    return found


def gains_over_start(correct: ProblemResults) -> dict:
    """Each arm's gain from iteration 0 to its last trained iteration, replicate by replicate on the
    problems both were scored on, with the paired comparisons' statistics (``topr.stats.compare_arms``:
    the t-interval over replicates, the joint bootstrap that also draws the problems, the sign-flip
    p-value); arms with fewer than two such replicates are left out."""
    from topr.stats import MIN_REPLICATES, compare_arms

    found = {}
    for arm in {arm for by_arm in correct.values() for arm in by_arm}:
        last = max((step for step, by_arm in correct.items() if arm in by_arm), default=0)
        trained, start = correct[last][arm] if last else {}, correct.get(0, {}).get(arm, {})
        replicates = [replicate for replicate in trained if replicate in start]
        if len(replicates) < MIN_REPLICATES:
            continue
        aligned = _on_common_problems({"trained": {r: trained[r] for r in replicates}, "start": {r: start[r] for r in replicates}})
        if aligned["start"][replicates[0]]:
            found[arm] = compare_arms(aligned, "start")[0]
    return found


def _on_common_problems(by_arm: dict[str, dict[str, dict[str, bool]]]) -> dict[str, dict[str, list[bool]]]:
    """Each arm's per-replicate verdicts as lists over the problems every one of them was scored
    on, in one order: what ``compare_arms`` pairs problem by problem."""
    common = sorted(set.intersection(*(set(results) for replicates in by_arm.values() for results in replicates.values())))
    return {arm: {rep: [results[p] for p in common] for rep, results in replicates.items()} for arm, replicates in by_arm.items()}


def units_without(correct: ProblemResults, finished: dict[str, Replicates]) -> list[str]:
    """The finished units (``arm/replicate``) with no verdicts in ``correct`` at some trained
    iteration: what a pairing on those verdicts leaves out."""
    return [
        f"{arm}/{replicate}"
        for arm, replicates in finished.items()
        for replicate, metrics in replicates.items()
        if any(step > 0 and replicate not in correct.get(step, {}).get(arm, {}) for step in metrics["pass_at_1"])
    ]


def paired_comparisons(correct: ProblemResults, reference: str, equivalence_margin: float | None = None) -> dict[int, list]:
    """Each trained iteration's comparisons of every arm with ``reference`` (``topr.stats.compare_arms``,
    with the spec's ``equivalence_margin``), where the reference has the replicates that a paired
    comparison needs. Arms pair on the held-out problems that every unit of the iteration was
    scored on, problem by problem."""
    from topr.stats import MIN_REPLICATES, compare_arms

    comparisons = {}
    for step, by_arm in sorted(correct.items()):
        if step == 0 or len(by_arm.get(reference, {})) < MIN_REPLICATES or len(by_arm) < 2:
            continue
        comparisons[step] = compare_arms(_on_common_problems(by_arm), reference, equivalence_margin=equivalence_margin)
    return comparisons


def plot_replicates_accuracy(finished: dict[str, Replicates], path: Path) -> None:
    """Held-out pass@1 by iteration: every replicate's point, and each arm's mean as a line (one
    replicate: its Wilson 95% interval as error bars)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for index, (arm, replicates) in enumerate(finished.items()):
        offset = (index - (len(finished) - 1) / 2) * 0.06
        means = mean_over_replicates(replicates)["pass_at_1"]
        steps = sorted(means)
        (line,) = axis.plot([s + offset for s in steps], [means[s] for s in steps], marker="o", label=f"{arm} (n={len(replicates)})")
        for metrics in replicates.values():
            points = sorted(metrics["pass_at_1"].items())
            if len(replicates) == 1:
                axis.errorbar([s + offset for s, _ in points], [v for _, v in points], yerr=error_bars(metrics, [s for s, _ in points]), capsize=3, color=line.get_color(), linestyle="none")
            else:
                axis.scatter([s + offset for s, _ in points], [v for _, v in points], s=14, alpha=0.45, color=line.get_color())
    axis.set_xlabel("iteration (0 = starting model)")
    axis.set_ylabel("held-out pass@1 (greedy)")
    axis.set_xticks(sorted({s for replicates in finished.values() for m in replicates.values() for s in m["pass_at_1"]}))
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, path)


def plot_paired_differences(comparisons: list, iteration: int, path: Path) -> None:
    """Each arm's difference from the reference at one iteration: every replicate's difference as
    a point, the mean with its 95% t-interval as a bar."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 0.6 * len(comparisons) + 1.6))
    comparisons = [c for c in comparisons if c.mean_difference is not None]  # an arm with no replicate in common: nothing to draw
    for row, comparison in enumerate(comparisons):
        differences = [100 * d for d in comparison.differences]
        axis.scatter(differences, [row] * len(differences), s=18, alpha=0.5, color="tab:blue")
        mean = 100 * comparison.mean_difference
        if comparison.t_interval is not None:
            low, high = (100 * bound for bound in comparison.t_interval)
            axis.errorbar([mean], [row], xerr=[[mean - low], [high - mean]], fmt="D", color="black", capsize=4)
        else:
            axis.plot([mean], [row], "D", color="black")
    axis.axvline(0, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(comparisons)), [c.arm for c in comparisons])
    axis.set_ylim(-0.7, len(comparisons) - 0.3)
    reference = comparisons[0].reference if comparisons else ""
    axis.set_xlabel(f"held-out pass@1 minus {reference}'s, points (iteration {iteration}); mean with 95% t-interval")
    axis.grid(alpha=0.3, axis="x")
    _save(figure, path)


TAPER_KEY = "ratio_negative_p50"


def stage_step_history(tracking_uri: str, parent_run_id: str, stage: str, key: str) -> dict[int, float]:
    """``{step: value}`` of a per-step metric of a nested stage run (``iter1/train``), or {} when
    that run or metric is missing."""
    from topr.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.run_name = '{stage}'",
        max_results=1,
    )
    return metric_history(tracking_uri, found[0].info.run_id, key) if found else {}


def plot_taper(histories: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    """The median ratio π/μ on negatives at every optimizer step of iteration 1, one line per arm
    (the mean over replicates) and a faint line per replicate: where the taper works (near 1,
    negatives pushed down at full weight) and where it has shut them off (near 0)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for arm, by_replicate in histories.items():
        steps = sorted({step for history in by_replicate.values() for step in history})
        means = [sum(h[s] for h in by_replicate.values() if s in h) / sum(s in h for h in by_replicate.values()) for s in steps]
        (line,) = axis.plot(steps, means, marker="o", markersize=3, label=arm)
        if len(by_replicate) > 1:
            for history in by_replicate.values():
                points = sorted(history.items())
                axis.plot([s for s, _ in points], [v for _, v in points], color=line.get_color(), alpha=0.25, linewidth=1)
    axis.axhline(0.3, color="grey", linestyle="--", linewidth=1, label="0.3 (calibration threshold)")
    axis.set_xlabel("optimizer step of iteration 1")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel("median ratio π/μ on negatives")
    axis.set_ylim(0, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    _save(figure, path)


def taper_histories(tracking_uri: str, results: dict) -> dict[str, dict[str, dict[int, float]]]:
    """Iteration 1's per-step median ratio on negatives, by arm and replicate (a unit whose
    training set had no negatives is left out)."""
    histories: dict[str, dict[str, dict[int, float]]] = {}
    for arm, by_replicate in results.items():
        for replicate, result in by_replicate.items():
            if result["status"] == "finished":
                history = stage_step_history(tracking_uri, result["run_id"], "iter1/train", TAPER_KEY)
                if history:
                    histories.setdefault(arm, {})[replicate] = history
    return histories


def write_experiment_report(folder: Path, tracking_uri: str, experiment, arms: dict, results: dict, context: dict) -> Path:
    """Write ``report.md``, its plots and ``results.json`` into the experiment folder, and log them
    to an MLflow run of the experiment (tagging each unit's run); return the report's path.

    ``results`` holds each unit's result by arm and replicate (``{arm: {replicate: result}}``)."""
    finished = {
        arm: {replicate: arm_metrics(tracking_uri, result["run_id"]) for replicate, result in by_replicate.items() if result["status"] == "finished"}
        for arm, by_replicate in results.items()
    }
    finished = {arm: replicates for arm, replicates in finished.items() if replicates}
    means = {arm: mean_over_replicates(replicates) for arm, replicates in finished.items()}
    spec = context["spec"]
    correct = per_problem_correct(folder, context["shared"], finished)
    cut_correct = per_problem_correct(folder, context["shared"], finished, "greedy_cut")
    by_reference = {
        reference: (paired_comparisons(correct, reference, spec.equivalence_margin), paired_comparisons(cut_correct, reference, spec.equivalence_margin))
        for reference in spec.references
    }
    comparisons, cut = by_reference[spec.reference_arm]
    context = {
        **context,
        "by_reference": by_reference,
        "gains": gains_over_start(correct),
        "gains_cut": gains_over_start(cut_correct),
        "uncut_units": units_without(cut_correct, finished) if cut_correct else [],
    }
    figures = []
    if finished:
        plot_replicates_accuracy(finished, folder / "accuracy.png")
        plot_degeneration(means, folder / "degeneration.png")
        figures = ["accuracy.png", "degeneration.png"]
        histories = taper_histories(tracking_uri, results)
        if histories:
            plot_taper(histories, folder / "taper.png")
            figures.append("taper.png")
        if comparisons:
            last = max(comparisons)
            plot_paired_differences(comparisons[last], last, folder / "paired_differences.png")
            figures.append("paired_differences.png")
        if spec.compare == "effective_positive_fraction":
            plot_positive_fraction(means, folder / "positive_fraction.png")
            figures.append("positive_fraction.png")
    sections = _experiment_markdown(experiment, spec, arms, results, finished, means, context, figures)
    (folder / "report.md").write_text(sections)
    write_json(
        folder / "results.json",
        {
            "units": results,
            "metrics": {arm: {rep: _json_metrics(metrics) for rep, metrics in replicates.items()} for arm, replicates in finished.items()},
            "comparisons": _json_comparisons(comparisons),
            "comparisons_cut": _json_comparisons(cut),
            "also_compared": {
                reference: {"comparisons": _json_comparisons(found), "comparisons_cut": _json_comparisons(found_cut)}
                for reference, (found, found_cut) in by_reference.items()
                if reference != spec.reference_arm
            },
        },
    )
    _log_experiment(folder, tracking_uri, context["name"], results, ["report.md", "results.json", *figures])
    return folder / "report.md"


def _json_comparisons(comparisons: dict[int, list]) -> dict[str, list[dict]]:
    return {str(step): [c.as_dict() for c in found] for step, found in comparisons.items()}


def _json_metrics(metrics: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {key: {str(step): value for step, value in values.items()} for key, values in metrics.items()}


def _units_table(spec, arms: dict, results: dict, shared: dict) -> list[str]:
    lines = ["| arm | overrides | iteration 1 data | replicates finished | minutes per unit | failures |", "|---|---|---|---|---|---|"]
    shared_samples = {replicate["samples"] for replicate in shared["replicates"].values()}
    for arm, by_replicate in results.items():
        own = " ".join(f"`{o}`" for o in spec.arms[arm]) or "(none)"
        data = "shared" if arms[arm].sample.first_iteration_samples in shared_samples else "its own"
        done = sum(result["status"] == "finished" for result in by_replicate.values())
        minutes = sum(result["minutes"] for result in by_replicate.values()) / len(by_replicate)
        failures = "; ".join(f"{rep}: {result['error']}" for rep, result in by_replicate.items() if result["status"] != "finished") or "–"
        lines.append(f"| {arm} | {own} | {data} | {done}/{len(by_replicate)} | {minutes:.1f} | {failures} |")
    return lines


def _experiment_markdown(experiment, spec, arms: dict, results: dict, finished: dict, means: dict, context: dict, figures: list[str]) -> str:
    shared = context["shared"]
    units = [result for by_replicate in results.values() for result in by_replicate.values()]
    samples = [f"{rep}: {data['samples_count']} ({data['samples_accuracy']:.1%} correct)" for rep, data in shared["replicates"].items()]
    lines = [
        f"# Experiment `{context['name']}`",
        "",
        spec.description.strip(),
        "",
        f"{len(arms)} arm(s) × {spec.replicates} replicate(s), run for {sum(u['minutes'] for u in units):.1f} minutes in all "
        f"on {context['machine']} (the shared data took {shared['minutes']:.1f}).",
        f"Shared by every arm that keeps the experiment's model, task and sample settings: the starting model "
        f"(`{experiment.model.path}`) and its evaluation, the held-out prompts ({shared['eval_prompts']}, the same in every replicate), "
        f"and in each replicate its training prompts ({experiment.task.name}, {experiment.task.train_size} per iteration), seeds "
        f"and iteration 1's samples ({'; '.join(samples)}).",
        "",
        *_units_table(spec, arms, results, shared),
        "",
        "Overrides of every arm: " + (" ".join(f"`{o}`" for o in spec.overrides) or "(none)"),
        "",
    ]
    if finished:
        lines += ["## Held-out pass@1 (greedy decoding)", "", replicate_accuracy_table(finished, gains=context["gains"]), ""]
        if context["gains"]:
            lines += [GAIN_EXPLAINED, ""]
        lines += ["![accuracy by iteration](accuracy.png)", ""]
        for reference in spec.references:
            lines += _comparison_sections(experiment, spec, reference, finished, context)
        if "paired_differences.png" in figures:
            lines += ["![paired differences](paired_differences.png)", ""]
        lines += [
            "## Training data, what training did with it, and signs of degeneration" + (" (means over replicates)" if spec.replicates > 1 else ""),
            "",
            degeneration_table(means),
            "",
            "![degeneration](degeneration.png)",
            "",
        ]
        if "taper.png" in figures:
            lines += ["![median ratio on negatives by training step](taper.png)", ""]
        if "positive_fraction.png" in figures:
            lines += ["## Accuracy against the effective positive fraction", "", "![accuracy vs effective positive fraction](positive_fraction.png)", ""]
        verifier = verifier_table(means)
        if verifier:
            lines += ["## Generative verifier" + (" (means over replicates)" if spec.replicates > 1 else ""), "", verifier, ""]
            lines += verifier_replicates(finished)
            lines += verifier_arm_differences(finished, spec.reference_arm)
    return "\n".join(lines)


def _comparison_sections(experiment, spec, reference: str, finished: dict, context: dict) -> list[str]:
    """The paired differences of every arm from ``reference``, per trained iteration, and the same
    at ``evaluate.cut_at_tokens`` where the arms were scored so."""
    from topr.stats import format_comparisons

    comparisons, cut = context["by_reference"][reference]
    explained = (
        "Per replicate, the arm's held-out pass@1 minus the reference's on the same problems; the mean with its 95% "
        "t-interval over replicates (the primary interval), a joint bootstrap interval (replicates, and the problems "
        "they share drawn once for all; narrower than its nominal level at few replicates), the two-sided sign-flip "
        "permutation p-value and its Holm correction across the arms"
        + (f"; and the TOST p-value of equivalence within ±{100 * spec.equivalence_margin:g} points, a margin set "
           "before the run (below 0.05: a tie within it)." if spec.equivalence_margin else ".")
    )
    if reference != spec.reference_arm:
        explained = f"As for `{spec.reference_arm}` above, with `{reference}` as the reference (the spec's `also_compared_with`)."
    lines = []
    for step, found in comparisons.items():
        lines += [f"## Paired differences from `{reference}`, iteration {step}", "", explained, "", format_comparisons(found), ""]
        if step in cut:
            missing = context["uncut_units"]
            lines += [
                f"The same, each greedy completion cut at `evaluate.cut_at_tokens`={experiment.evaluate.cut_at_tokens} tokens "
                f"(decoded to {experiment.evaluate.max_new_tokens}): what the arms score where an answer must end by then"
                + (f"; without cut verdicts, so not paired here: {', '.join(missing)}." if missing else "."),
                "",
                *([replicate_accuracy_table(finished, "pass_at_1_cut", context["gains_cut"]), ""] if reference == spec.reference_arm else []),
                format_comparisons(cut[step]),
                "",
            ]
    return lines


VERIFIER_COMPARISONS = (
    ("AUROC of P(correct), trained − base", "verifier_auroc_trained", "verifier_auroc_base", 1.0),
    ("balanced accuracy, trained − base, points", "verifier_balanced_accuracy_trained", "verifier_balanced_accuracy_base", 100.0),
    ("weighted vote (trained verifier) − majority vote, points", "vote_weighted_trained", "vote_majority", 100.0),
    ("weighted vote (base verifier) − majority vote, points", "vote_weighted_base", "vote_majority", 100.0),
)
"""The verifier's replicate-level comparisons: (what, figure, the figure it is compared with, scale)."""


def verifier_replicates(finished: dict[str, dict[str, dict[str, dict[int, float]]]]) -> list[str]:
    """Per arm that ran the verifier in two replicates or more: each comparison of
    ``VERIFIER_COMPARISONS`` replicate by replicate, with the mean difference's 95% t-interval
    and sign-flip p-value over the replicates (``topr.stats``): what holds across training seeds,
    beyond the questions of one replicate. Report lines (none when no arm qualifies)."""
    lines = []
    for arm, replicates in finished.items():
        last = _verifier_rows(replicates)
        if len(last) < 2:
            continue
        lines += [
            f"Replicate by replicate (`{arm}`), and over the {len(last)} replicates: the mean difference, its 95% t-interval and the "
            "two-sided sign-flip p-value.",
            "",
            "| comparison | " + " | ".join(last) + " | mean [95% CI] | p |",
            "|---" * (len(last) + 3) + "|",
        ]
        for what, figure, compared, scale in VERIFIER_COMPARISONS:
            rows = [row for row in last.values() if figure in row and compared in row]
            if len(rows) == len(last):
                lines.append(_difference_row(what, [row[figure] for row in rows], [row[compared] for row in rows], scale))
        lines.append("")
    return lines


VERIFIER_ARM_FIGURES = (
    ("AUROC of P(correct), trained", "verifier_auroc_trained", 1.0),
    ("balanced accuracy, trained, points", "verifier_balanced_accuracy_trained", 100.0),
    ("weighted vote (trained verifier), points", "vote_weighted_trained", 100.0),
)
"""The trained verifier's figures that ``verifier_arm_differences`` compares between arms."""


def verifier_arm_differences(finished: dict[str, dict[str, dict[str, dict[int, float]]]], reference: str) -> list[str]:
    """Each arm's trained verifier against the reference arm's, replicate by replicate: the
    control that credits a verifier's gain to its objective (TOPR's negatives against rft's
    positives only) when the arms differ in the verifier's settings alone. Pairs the replicates
    both arms finished (two or more); report lines, none without such an arm."""
    rows = {arm: _verifier_rows(replicates) for arm, replicates in finished.items()}
    lines = []
    for arm in rows:
        shared = sorted(set(rows[arm]) & set(rows.get(reference, {}))) if arm != reference else []
        if len(shared) < 2:
            continue
        lines += [
            f"The verifier of `{arm}` minus that of `{reference}`, replicate by replicate (the same replicate's seeds and data; "
            "each arm trains its own copy of the policy, the same policy where the arms' policy settings are and training is "
            "deterministic), and over the replicates: the mean difference, its 95% t-interval and the two-sided sign-flip p-value.",
            "",
            "| comparison | " + " | ".join(shared) + " | mean [95% CI] | p |",
            "|---" * (len(shared) + 3) + "|",
        ]
        for what, figure, scale in VERIFIER_ARM_FIGURES:
            if all(figure in rows[name][rep] for name in (arm, reference) for rep in shared):
                values = [rows[arm][rep][figure] for rep in shared]
                lines.append(_difference_row(what, values, [rows[reference][rep][figure] for rep in shared], scale))
        lines.append("")
    return lines


def _difference_row(what: str, values: list[float], compared: list[float], scale: float) -> str:
    """A table row: each replicate's scaled difference, their mean with its 95% t-interval, and
    the sign-flip p-value (``topr.stats``)."""
    from topr.stats import paired_t_interval, sign_flip_p_value

    differences = [scale * (value - other) for value, other in zip(values, compared)]
    low, high = paired_t_interval(differences)
    p = sign_flip_p_value(values, compared)
    mean = sum(differences) / len(differences)
    cells = [f"{d:+.2f}" if scale == 1.0 else f"{d:+.1f}" for d in (*differences, mean, low, high)]
    return f"| {what} | {' | '.join(cells[: len(values)])} | {cells[-3]} [{cells[-2]}, {cells[-1]}] | {p:.3f} |"


def _log_experiment(folder: Path, tracking_uri: str, name: str, results: dict, files: list[str]) -> None:
    from topr.tracking import code_version, experiment_id, mlflow_client

    client = mlflow_client(tracking_uri)
    mlflow_experiment_id = experiment_id(client, f"experiment-{name}", tracking_uri)
    run = client.create_run(mlflow_experiment_id, run_name=f"{name}/report", tags={**code_version(), "topr.experiment": name})
    for arm, by_replicate in results.items():
        for replicate, result in by_replicate.items():
            client.set_tag(run.info.run_id, f"topr.unit.{arm}.{replicate}", result["run_id"] or result["status"])
            if result["run_id"]:
                client.set_tag(result["run_id"], "topr.experiment", name)
                client.set_tag(result["run_id"], "topr.arm", arm)
                client.set_tag(result["run_id"], "topr.replicate", replicate)
    for file in files:
        client.log_artifact(run.info.run_id, str(folder / file))
    client.set_terminated(run.info.run_id, "FINISHED")
