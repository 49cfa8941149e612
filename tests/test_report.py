"""The end-of-run table and report, read back from a parent run in a local sqlite store."""

import json
import time

import pytest

from topr.config import load_config
from topr.report import evaluation_gains, format_table, format_warnings, run_html, plot_accuracy, run_metrics, write_run_report
from topr.tracking import EVALUATION_ARTIFACT, default_tracking_uri, stage_run, start_pipeline_run

# iteration -> (pass@1, CI low, CI high, parse failure rate)
EVALUATIONS = {0: (0.10, 0.05, 0.20, 0.30), 1: (0.25, 0.18, 0.33, 0.125), 2: (0.50, 0.40, 0.60, 0.0)}
# iteration -> (sample accuracy, curated count, positives, negatives, effective positive fraction)
CURATIONS = {1: (0.125, 40, 8, 32, 0.2), 2: (0.375, 30, 12, 18, 0.4)}
# iteration -> the held-out problems (20) answered right: iteration 1 gains p2-p4, iteration 2 also
# p5-p10 and loses p0
CORRECT = {0: {"p0", "p1"}, 1: {f"p{i}" for i in range(5)}, 2: {f"p{i}" for i in range(1, 11)}}
# iteration -> (positive weight share after the taper, median ratio on negatives at the end); iteration 2 had no negatives' ratio
TRAININGS = {1: (0.61, 0.042), 2: (0.7, None)}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A parent run holding the figures that verify, curate and evaluate log at step = iteration."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    root = tmp_path_factory.mktemp("report_store")
    uri = default_tracking_uri(root)
    config = load_config(overrides=["run.experiment=topr-report-tests"])
    parent = start_pipeline_run(uri, config, "report-run", kfp_run_id="kfp-report")
    figures = []
    for iteration, (pass_at_1, low, high, parse_failures) in EVALUATIONS.items():
        figures += [
            ("pass_at_1", pass_at_1, iteration),
            ("pass_at_1_ci_low", low, iteration),
            ("pass_at_1_ci_high", high, iteration),
            ("parse_failure_rate", parse_failures, iteration),
        ]
    for iteration, (accuracy, count, positives, negatives, effective) in CURATIONS.items():
        figures += [
            ("sample_accuracy", accuracy, iteration),
            ("curated_count", count, iteration),
            ("curated_positives", positives, iteration),
            ("curated_negatives", negatives, iteration),
            ("positive_fraction", positives / count, iteration),
            ("effective_positive_fraction", effective, iteration),
        ]
    for iteration, (share, ratio) in TRAININGS.items():
        figures += [("positive_weight_share", share, iteration)] + ([("final_ratio_negative_p50", ratio, iteration)] if ratio is not None else [])
    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(parent, metrics=[Metric(key, float(value), now, step) for key, value, step in figures])
    for iteration, right in CORRECT.items():
        with stage_run(uri, parent, "evaluate", iteration) as run:
            run.log_text(json.dumps({"greedy_correct": {f"p{i}": f"p{i}" in right for i in range(20)}}), EVALUATION_ARTIFACT)
    with pytest.raises(RuntimeError), stage_run(uri, parent, "evaluate", 1) as run:  # a failed retry: not read
        run.log_text(json.dumps({"greedy_correct": {f"p{i}": False for i in range(20)}}), EVALUATION_ARTIFACT)
        raise RuntimeError("evaluation failed")
    return uri, parent, root


def table_rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()[2:]]


def test_run_metrics_reads_parent_history(logged_run):
    uri, parent, _ = logged_run
    metrics = run_metrics(uri, parent)
    assert metrics["pass_at_1"] == {0: 0.10, 1: 0.25, 2: 0.50}
    assert metrics["pass_at_1_ci_high"] == {0: 0.20, 1: 0.33, 2: 0.60}
    assert metrics["curated_count"] == {1: 40.0, 2: 30.0}
    assert metrics["sample_accuracy"] == {1: 0.125, 2: 0.375}
    assert metrics["maj_at_k"] == {}  # never logged


def test_format_table_one_row_per_iteration(logged_run):
    uri, parent, _ = logged_run
    table = format_table(run_metrics(uri, parent))
    lines = table.splitlines()
    assert "iteration" in lines[0] and "pass@1" in lines[0] and "curated (+/-)" in lines[0]
    assert set(lines[1]) == {"-"}
    assert len(lines) == 2 + 3
    assert table_rows(table) == [
        ["0", "10.0%", "[5.0%,", "20.0%]", "30.0%", "-", "start", "-", "-", "-"],
        ["1", "25.0%", "[18.0%,", "33.0%]", "12.5%", "12.5%", "40", "(8/32)", "0.20", "0.61", "0.042"],
        ["2", "50.0%", "[40.0%,", "60.0%]", "0.0%", "37.5%", "30", "(12/18)", "0.40", "0.70", "-"],
    ]


def test_format_table_columns_line_up():
    metrics = {
        "pass_at_1": {0: 0.5, 1: 1.0},
        "pass_at_1_ci_low": {0: 0.25, 1: 0.9},
        "pass_at_1_ci_high": {0: 0.75, 1: 1.0},
        "parse_failure_rate": {0: 0.0, 1: 0.0},
        "sample_accuracy": {1: 0.5},
        "curated_count": {1: 3.0},
        "curated_positives": {1: 1.0},
        "curated_negatives": {1: 2.0},
        "effective_positive_fraction": {1: 0.3333},
    }
    lines = format_table(metrics).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[3].split() == ["1", "100.0%", "[90.0%,", "100.0%]", "0.0%", "50.0%", "3", "(1/2)", "0.33", "-", "-"]


def test_an_iteration_trained_without_positives_or_negatives_is_a_warning_under_the_table():
    metrics = {"curated_count": {1: 256.0, 2: 30.0, 3: 12.0}, "curated_positives": {1: 0.0, 2: 12.0, 3: 12.0}}
    lines = format_warnings(metrics).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Warning, iteration 1: the training set has no positives: none of its 256 completions")
    assert lines[1].startswith("Warning, iteration 3: the training set has no negatives")
    assert format_warnings({"curated_count": {1: 30.0}, "curated_positives": {1: 12.0}}) == ""


def test_the_run_as_an_html_page_holds_the_curve_and_the_table(logged_run):
    import base64
    import re

    uri, parent, _ = logged_run
    page = run_html(uri, parent, "topr-arithmetic <after iteration 2>")
    assert "<h2>topr-arithmetic &lt;after iteration 2&gt;</h2>" in page
    (image,) = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "40 (8/32)" in page and "iteration 2: +40.0 points" in page


def test_plot_accuracy_writes_png(tmp_path, logged_run):
    uri, parent, _ = logged_run
    path = tmp_path / "plot.png"
    plot_accuracy(run_metrics(uri, parent), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_run_report(tmp_path, logged_run):
    from mlflow import MlflowClient

    uri, parent, root = logged_run
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    table = write_run_report(run_dir, uri, parent, minutes=2.5)
    assert table.startswith(format_table(run_metrics(uri, parent)) + "\n\nheld-out gain over iteration 0")
    assert "  iteration 2: +40.0 points, [" in table and "9 gained, 1 lost" in table
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# topr run my-run")
    assert parent in report and "2.5 minutes" in report
    assert table in report
    assert "accuracy.png" in report
    png = (run_dir / "accuracy.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(uri)
    assert {"report.md", "accuracy.png", "config.yaml"} <= {f.path for f in client.list_artifacts(parent)}
    downloaded = client.download_artifacts(parent, "report.md", str(tmp_path))
    assert open(downloaded).read() == report


def test_each_iterations_gain_is_paired_with_the_start_problem_by_problem(logged_run):
    uri, parent, _ = logged_run
    gains = evaluation_gains(uri, parent)
    assert sorted(gains) == [1, 2]
    assert (gains[1].problems, gains[1].gained, gains[1].lost, gains[1].difference) == (20, 3, 0, pytest.approx(0.15))
    assert (gains[2].gained, gains[2].lost, gains[2].difference) == (9, 1, pytest.approx(0.40))
    assert gains[2].interval[0] > 0 and gains[2].p_value < 0.05 and gains[1].p_value == pytest.approx(0.25)


def test_a_run_without_per_problem_results_reports_no_gains(tmp_path):
    uri = default_tracking_uri(tmp_path)
    parent = start_pipeline_run(uri, load_config(overrides=["run.experiment=topr-report-tests"]), "old-run", kfp_run_id="kfp-old")
    with stage_run(uri, parent, "evaluate", 0) as run:
        run.log_text(json.dumps({"metrics": {"pass_at_1": 0.1}}), EVALUATION_ARTIFACT)
    assert evaluation_gains(uri, parent) == {}


def test_the_page_drawn_as_the_run_finishes_has_the_start_the_gains_and_the_gates_decision(tmp_path):
    """Drawn by the exit handler, it holds what every task logged, whichever finished first: here
    the starting model's evaluation is logged after iteration 1's, and the gate's after both."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from topr.config import config_to_dict
    from topr.steps import finish

    uri = default_tracking_uri(tmp_path)
    config = load_config(overrides=["run.experiment=topr-report-tests"])
    parent = start_pipeline_run(uri, config, "page-run", kfp_run_id="kfp-page")
    client = MlflowClient(uri)
    for iteration in (1, 0):
        right = CORRECT[iteration]
        figures = dict(zip(("pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high", "parse_failure_rate"), EVALUATIONS[iteration]))
        client.log_batch(parent, metrics=[Metric(key, value, int(time.time() * 1000), iteration) for key, value in figures.items()])
        with stage_run(uri, parent, "evaluate", iteration) as run:
            run.log_text(json.dumps({"greedy_correct": {f"p{i}": f"p{i}" in right for i in range(20)}}), EVALUATION_ARTIFACT)
    client.set_tag(parent, "topr.gate", "keep: gain +0.0500 (new 0.2500, champion 0.2000) > margin 0.0000; but mean answer length (tokens) fails")
    client.set_tag(parent, "topr.gate.mean_completion_tokens", "mean answer length (tokens) fails: new 40.0 > limit 30.0 (champion 20.0)")

    page = tmp_path / "run_page.html"
    finish(json.dumps(config_to_dict(config)), uri, "kfp-page", failed=False, run_page=str(page))
    text = page.read_text()
    assert "<h2>page-run: the run, FINISHED</h2>" in text and "data:image/png;base64," in text
    assert "\n        0 " in text and "\n        1 " in text  # the start's row and iteration 1's
    assert "iteration 1: +15.0 points" in text
    assert "gate: keep: gain +0.0500" in text and "  mean answer length (tokens) fails: new 40.0 &gt; limit 30.0" in text
    assert client.get_run(parent).info.status == "FINISHED"


def test_the_exit_handler_closes_the_run_even_when_its_page_cannot_be_drawn(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import topr.report
    from topr.config import config_to_dict
    from topr.steps import finish

    uri = default_tracking_uri(tmp_path)
    config = load_config(overrides=["run.experiment=topr-report-tests"])
    parent = start_pipeline_run(uri, config, "failed-run", kfp_run_id="kfp-failed")

    def broken(*_):
        raise ValueError("no figures")

    monkeypatch.setattr(topr.report, "run_html", broken)
    page = tmp_path / "run_page.html"
    finish(json.dumps(config_to_dict(config)), uri, "kfp-failed", failed=True, run_page=str(page))
    assert MlflowClient(uri).get_run(parent).info.status == "FAILED"
    assert "the page could not be drawn (no figures)" in page.read_text()


def test_the_exit_handler_closes_a_run_whose_config_json_alone_does_not_validate(tmp_path):
    """A jsonl run whose files come from the run form: config_json alone lacks them."""
    from mlflow import MlflowClient

    from topr.steps import finish

    uri = default_tracking_uri(tmp_path)
    config = load_config(overrides=["run.experiment=topr-report-tests"])
    parent = start_pipeline_run(uri, config, "form-run", kfp_run_id="kfp-form")
    finish(json.dumps({"task": {"name": "jsonl"}, "run": {"experiment": "topr-report-tests"}}), uri, "kfp-form", failed=False)
    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"


def test_the_accuracy_table_gives_each_arms_gain_over_the_start_paired_on_the_same_problems():
    from scipy import stats

    from topr.report import gains_over_start, replicate_accuracy_table

    problems = [f"p{i}" for i in range(10)]
    start = {p: i < 2 for i, p in enumerate(problems)}  # 20% in every replicate
    trained = {"rep0": 3, "rep1": 5, "rep2": 4}  # right answers after training, out of 10
    correct = {
        0: {"topr": {rep: start for rep in trained}, "rft": {"rep0": start}},
        1: {"topr": {rep: {p: i < n for i, p in enumerate(problems)} for rep, n in trained.items()}, "rft": {"rep0": start}},
    }
    gains = gains_over_start(correct)

    assert set(gains) == {"topr"}  # rft has one replicate: no interval over replicates
    low, high = stats.ttest_1samp([10.0, 30.0, 20.0], 0.0).confidence_interval()
    assert gains["topr"].mean_difference == pytest.approx(0.2) and gains["topr"].replicates == ("rep0", "rep1", "rep2")
    assert gains["topr"].t_interval == pytest.approx((low / 100, high / 100))
    finished = {
        "topr": {rep: {"pass_at_1": {0: 0.2, 1: n / 10}} for rep, n in trained.items()},
        "rft": {"rep0": {"pass_at_1": {0: 0.2, 1: 0.2}}},
    }
    table = replicate_accuracy_table(finished, gains=gains)
    assert "gain over iteration 0 (points) [95% t-interval] [joint bootstrap]" in table.splitlines()[0]
    assert f"| topr | 3 | 20.0% (20%, 20%, 20%) | 40.0% (30%, 50%, 40%) | +20.0 [{low:+.1f}, {high:+.1f}] [" in table
    assert "| rft | 1 | 20.0% (20%) | 20.0% (20%) | – |" in table
    assert "gain over iteration 0" not in replicate_accuracy_table(finished)  # without per-problem results, no column
