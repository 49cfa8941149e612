"""``topr experiment``: specs, arm configurations, shared data, failures, resuming and the report.

The arms' pipeline is replaced here by a runner that logs hand-made figures to a real local
MLflow store (or fails on purpose); tests/integration/test_experiment.py runs the real pipeline.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from topr.config import ConfigError
from topr.experiment import ExperimentSpec, arm_config, arm_configs, load_spec, named_specs, run_experiment, shares_first_iteration
from topr.records import read_records, write_json
from topr.report import accuracy_table, degeneration_table, verifier_table
from topr.tracking import default_tracking_uri, start_pipeline_run

TINY = ["task.train_size=2", "task.eval_size=2", "sample.samples_per_prompt=2", "sample.max_new_tokens=4"]


def test_every_named_experiment_loads_and_its_arms_validate():
    assert set(named_specs()) == {"objectives", "baseline", "curation", "positives", "ratio_level", "seeds", "verifier"}
    for name in named_specs():
        _, spec = load_spec(name)
        experiment, arms = arm_configs(spec, {}, [])
        assert set(arms) == set(spec.arms)
    _, objectives = load_spec("objectives")
    _, arms = arm_configs(objectives, {}, [])
    assert {arm.train.objective for arm in arms.values()} == {"topr", "rft", "reinforce", "tis", "ppo"}
    assert {arm.run.iterations for arm in arms.values()} == {3}
    _, baseline = load_spec("baseline")
    assert baseline.compare == "effective_positive_fraction"
    assert sorted(arm.train.baseline for arm in arm_configs(baseline, {}, [])[1].values()) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    _, seeds = load_spec("seeds")
    experiment, seeded = arm_configs(seeds, {}, [])
    assert sorted((arm.train.objective, arm.train.seed) for arm in seeded.values()) == [(o, s) for o in ("rft", "topr") for s in (0, 1, 2)]
    assert all(shares_first_iteration(arm, experiment) for arm in seeded.values())
    _, verifier = load_spec("verifier")
    assert all(arm.verifier.enabled for arm in arm_configs(verifier, {}, [])[1].values())


def test_later_overrides_win_file_then_spec_then_arm_then_command_line():
    spec = ExperimentSpec(
        description="d",
        overrides=["train.learning_rate=1e-4", "train.epochs=2"],
        arms={"a": ["train.epochs=3", "train.objective=rft"], "b": []},
    )
    base = {"train": {"learning_rate": 5e-5, "batch_size": 4}}
    experiment, arms = arm_configs(spec, base, ["train.objective=tis"])

    assert (arms["a"].train.learning_rate, arms["a"].train.epochs, arms["a"].train.objective) == (1e-4, 3, "tis")
    assert (arms["b"].train.epochs, arms["b"].train.batch_size) == (2, 4)
    assert experiment.train.epochs == 2
    assert base == {"train": {"learning_rate": 5e-5, "batch_size": 4}}  # the file's data is not changed


def test_a_bad_override_names_its_arm():
    spec = ExperimentSpec(description="d", arms={"good": [], "broken": ["train.objectiv=topr"]})
    with pytest.raises(ConfigError, match=r"arm 'broken'.*unknown field train.objectiv"):
        arm_configs(spec, {}, [])
    with pytest.raises(ConfigError, match=r"experiment's overrides.*\n  train.learning_rate: Input should be greater than 0"):
        arm_configs(ExperimentSpec(description="d", arms={"good": []}), {}, ["train.learning_rate=-1"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("description: d\narms: {}\n", "at least one arm"),
        ("description: d\narms: {'a/b': []}\n", "arm name 'a/b'"),
        ("description: d\narms: {a: []}\nextra: 1\n", "extra: Extra inputs"),
        ("arms: {a: []}\n", "description: Field required"),
        ("description: d\narms: {a: []}\ncompare: loss\n", "compare must be"),
        ("description: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_spec_file_is_named_with_its_problem(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"mine.yaml.*{message}"):
        load_spec(str(path))


def test_an_unknown_experiment_lists_the_named_ones():
    with pytest.raises(ConfigError, match=r"no experiment 'nope'.*objectives"):
        load_spec("nope")


def test_only_arms_that_keep_model_task_and_sample_settings_share_iteration_one():
    spec = ExperimentSpec(
        description="d",
        arms={"same": ["train.objective=rft"], "hotter": ["sample.temperature=1.0"], "other_model": ["model.path=/elsewhere"]},
    )
    experiment, arms = arm_configs(spec, {}, [])
    shared = {"model_dir": "/shared/base_model", "samples": "/shared/iter1_samples.jsonl"}
    running = {name: arm_config(name, "exp", arm, experiment, shared) for name, arm in arms.items()}

    assert shares_first_iteration(arms["same"], experiment) and not shares_first_iteration(arms["hotter"], experiment)
    assert running["same"].sample.first_iteration_samples == shared["samples"]
    assert running["same"].model.path == shared["model_dir"]
    assert running["hotter"].sample.first_iteration_samples is None
    assert running["hotter"].model.path == shared["model_dir"]  # same starting model, its own data
    assert running["other_model"].model.path == "/elsewhere"
    assert running["other_model"].sample.first_iteration_samples is None
    assert {(c.run.name, c.run.registered_model, c.run.experiment) for c in running.values()} == {
        ("same", "exp-same", "experiment-exp"),
        ("hotter", "exp-hotter", "experiment-exp"),
        ("other_model", "exp-other_model", "experiment-exp"),
    }


class ScriptedArms:
    """Stands in for the pipeline: logs the figures an arm's run would, or fails on purpose."""

    def __init__(self, failing: set[str]):
        self.failing, self.calls = failing, []

    def __call__(self, config, run_dir, tracking_uri, run_name):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        self.calls.append(config.run.name)
        if config.run.name in self.failing:
            raise RuntimeError("curation left nothing to train on")
        run_id = start_pipeline_run(tracking_uri, config, run_name)
        accuracy = {"topr": 0.5, "rft": 0.4}.get(config.run.name, 0.3)
        now = int(time.time() * 1000)
        figures = [("pass_at_1", 0.25, 0), ("pass_at_1_ci_low", 0.1, 0), ("pass_at_1_ci_high", 0.4, 0)]
        figures += [("pass_at_1", accuracy, 1), ("pass_at_1_ci_low", accuracy - 0.1, 1), ("pass_at_1_ci_high", accuracy + 0.1, 1)]
        figures += [("curated_count", 6, 1), ("curated_positives", 1, 1), ("curated_negatives", 5, 1), ("effective_positive_fraction", 1 / 6, 1)]
        figures += [("mean_weight_negative", 0.03, 1), ("final_logprob_negative", -2.5, 1), ("parse_failure_rate", 0.0, 1)]
        MlflowClient(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), now, s) for k, v, s in figures])
        return run_id


def test_a_failed_arm_is_reported_the_others_run_and_resume_retries_only_it(tmp_path, tiny_model_dir):
    spec = ExperimentSpec(description="Two objectives.", arms={"topr": [], "rft": ["train.objective=rft"], "ppo": ["train.objective=ppo"]})
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, uri = tmp_path / "exp", default_tracking_uri(tmp_path)
    runner = ScriptedArms(failing={"ppo"})

    report = run_experiment("exp", spec, experiment, arms, runner, folder, uri)

    text = report.read_text()
    assert "| ppo | `train.objective=ppo` | shared | failed: RuntimeError: curation left nothing to train on |" in text
    assert "| topr | 25.0% [10.0%, 40.0%] | 50.0% [40.0%, 60.0%] |" in text
    assert (folder / "accuracy.png").stat().st_size > 0 and (folder / "degeneration.png").stat().st_size > 0
    results = json.loads((folder / "results.json").read_text())
    assert {arm: result["status"] for arm, result in results["arms"].items()} == {"topr": "finished", "rft": "finished", "ppo": "failed"}
    # The shared data: one starting model, iteration 1's samples, each arm's config as it ran.
    samples = read_records(folder / "shared" / "iter1_samples.jsonl")
    assert len(samples) == 4 and {r["prompt_id"] for r in samples} == {r["prompt_id"] for r in read_records(folder / "shared" / "train_prompts.jsonl")[:2]}
    ran = yaml.safe_load((folder / "arms" / "rft" / "config.yaml").read_text())
    assert ran["sample"]["first_iteration_samples"] == str(folder / "shared" / "iter1_samples.jsonl")
    assert ran["model"]["path"] == str(folder / "shared" / "base_model")

    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        run_experiment("exp", spec, experiment, arms, runner, folder, uri)
    runner.failing.clear()
    write_json(folder / "shared" / "minutes.json", {"minutes": 12.34})  # as if the first preparation had been long
    run_experiment("exp", spec, experiment, arms, runner, folder, uri, resume=True)
    assert runner.calls == ["topr", "rft", "ppo", "ppo"]
    resumed = (folder / "report.md").read_text()
    assert "| ppo | `train.objective=ppo` | shared | finished |" in resumed
    assert "the shared data took 12.3" in resumed  # the first preparation's time, not the resume's


def test_the_report_is_logged_to_mlflow_and_tags_every_arm(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    spec = ExperimentSpec(description="d", arms={"topr": [], "rft": ["train.objective=rft"]}, compare="effective_positive_fraction")
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    uri = default_tracking_uri(tmp_path)
    run_experiment("tagged", spec, experiment, arms, ScriptedArms(failing=set()), tmp_path / "tagged", uri)

    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("experiment-tagged").experiment_id])
    by_name = {run.info.run_name: run for run in found}
    assert set(by_name) == {"tagged/topr", "tagged/rft", "tagged/report"}
    assert by_name["tagged/topr"].data.tags["topr.arm"] == "topr"
    assert by_name["tagged/report"].data.tags["topr.arm.rft"] == by_name["tagged/rft"].info.run_id
    logged = {item.path for item in client.list_artifacts(by_name["tagged/report"].info.run_id)}
    assert logged == {"report.md", "results.json", "accuracy.png", "degeneration.png", "positive_fraction.png"}


def test_tables_show_intervals_composition_and_the_verifier_only_when_it_ran():
    metrics = {
        "pass_at_1": {0: 0.25, 1: 0.5},
        "pass_at_1_ci_low": {0: 0.1, 1: 0.4},
        "pass_at_1_ci_high": {0: 0.4, 1: 0.6},
        "curated_count": {1: 10},
        "curated_positives": {1: 2},
        "curated_negatives": {1: 8},
        "effective_positive_fraction": {1: 0.2},
        "mean_weight_negative": {1: 0.0312},
        "final_logprob_negative": {1: -3.21},
        "parse_failure_rate": {1: 0.125},
    }
    assert accuracy_table({"topr": metrics}).splitlines()[2] == "| topr | 25.0% [10.0%, 40.0%] | 50.0% [40.0%, 60.0%] |"
    row = degeneration_table({"topr": metrics}).splitlines()[2]
    assert row == "| topr | 1 | – | 10 (2/8) | 0.20 | 0.031 | -3.21 | – | 12.5% | – | – |"
    assert verifier_table({"topr": metrics}) is None
    votes = {key: {1: value} for key, value in {
        "verifier_accuracy_base": 0.3, "verifier_accuracy_trained": 0.7, "verifier_invalid_rate_base": 0.4,
        "verifier_invalid_rate_trained": 0.0, "vote_k": 4,
        **{f"vote_{name}{end}": value for name, value in (("pass_at_1", 0.4), ("majority", 0.5), ("weighted_base", 0.5), ("weighted_trained", 0.6))
           for end, value in (("", value), ("_ci_low", value - 0.1), ("_ci_high", value + 0.1))},
    }.items()}
    table = verifier_table({"topr": {**metrics, **votes}})
    assert table.splitlines()[2] == (
        "| topr | 30.0% → 70.0% | 40.0% → 0.0% | 4 | 40.0% [30.0%, 50.0%] | 50.0% [40.0%, 60.0%] "
        "| 50.0% [40.0%, 60.0%] | 60.0% [50.0%, 70.0%] |"
    )
