"""``topr experiment``: specs, arm configurations, shared data, failures, resuming and the report.

The arms' runs are replaced here by a runner that logs hand-made figures to a real local MLflow
store and writes each evaluation's per-problem results (or fails on purpose);
tests/integration/test_experiment_run.py runs the real loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from topr.config import ConfigError
from topr.experiment import (
    ExperimentSpec,
    arm_config,
    arm_configs,
    load_spec,
    named_specs,
    replicate_config,
    run_experiment,
    shares_first_iteration,
    shares_start,
)
from topr.records import read_records, write_json
from topr.report import accuracy_table, degeneration_table, verifier_table
from topr.tracking import default_tracking_uri, start_pipeline_run

TINY = ["task.train_size=2", "task.eval_size=2", "sample.samples_per_prompt=2", "sample.max_new_tokens=4"]


def test_every_named_experiment_loads_and_its_arms_validate():
    assert set(named_specs()) == {"calibration", "objectives", "iterations", "baseline", "curation", "positives", "ratio_level", "seeds", "verifier", "composition", "default_iterations", "lora", "learning_rates", "verifier_control", "mechanism", "paper_sampling", "normalization"}
    for name in named_specs():
        _, spec = load_spec(name)
        experiment, arms = arm_configs(spec, {}, [])
        assert set(arms) == set(spec.arms)
    _, objectives = load_spec("objectives")
    _, arms = arm_configs(objectives, {}, [])
    assert {arm.train.objective for arm in arms.values()} == {"topr", "rft", "reinforce", "tis"}
    assert {arm.run.iterations for arm in arms.values()} == {1}
    assert (objectives.replicates, objectives.reference_arm) == (6, "rft")
    _, iterations = load_spec("iterations")
    assert {arm.run.iterations for arm in arm_configs(iterations, {}, [])[1].values()} == {3} and iterations.replicates == 3
    _, baseline = load_spec("baseline")
    assert baseline.compare == "effective_positive_fraction"
    assert sorted(arm.train.baseline for arm in arm_configs(baseline, {}, [])[1].values()) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    _, seeds = load_spec("seeds")
    experiment, seeded = arm_configs(seeds, {}, [])
    assert sorted((arm.train.objective, arm.train.seed) for arm in seeded.values()) == [(o, s) for o in ("rft", "topr") for s in (0, 1, 2)]
    assert all(shares_first_iteration(arm, experiment) for arm in seeded.values())
    _, verifier = load_spec("verifier")
    assert all(arm.verifier.enabled for arm in arm_configs(verifier, {}, [])[1].values())
    # Issue 24: choices on validation, verdicts on the test set, every arm's baseline and steps pinned.
    _, rates = load_spec("learning_rates")
    experiment, rated = arm_configs(rates, {}, [])
    assert experiment.task.eval_split == "validation" and {(arm.train.objective, arm.train.baseline) for arm in rated.values()} == {("rft", -0.8), ("topr", 0.0)}
    for name in ("mechanism", "paper_sampling"):
        spec = load_spec(name)[1]
        experiment, pinned = arm_configs(spec, {}, [])
        assert (experiment.task.eval_split, experiment.task.eval_size, experiment.task.level) == ("test", 512, "add_sub_2digit")
        assert all(arm.train.steps_per_epoch == 3 and arm.evaluate.cut_at_tokens == 64 for arm in pinned.values())
        assert {(arm.train.objective, arm.train.baseline) for arm in pinned.values()} <= {("rft", -0.8), ("topr", 0.0), ("topr", -0.8)}
        assert {arm.train.learning_rate for name, arm in pinned.items() if name.startswith("topr-c0")} == {3e-6}
        assert spec.reference_arm == "rft" and spec.equivalence_margin == 0.05
    experiment, normalised = arm_configs(load_spec("normalization")[1], {}, [])
    assert experiment.task.eval_split == "validation" and {arm.train.length_normalization for arm in normalised.values()} == {"sequence", "constant"}
    assert {(arm.train.baseline, arm.train.learning_rate, arm.train.steps_per_epoch) for arm in normalised.values()} == {(-0.8, 1e-5, 3)}
    _, control = load_spec("verifier_control")
    assert {arm.verifier.objective for arm in arm_configs(control, {}, [])[1].values()} == {"topr", "rft"}


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
    shared = {"model_dir": "/shared/base_model", "replicates": {"rep0": {"samples": "/shared/rep0/samples.jsonl"}}}
    running = {name: arm_config(name, "exp", arm, experiment, shared) for name, arm in arms.items()}

    assert shares_first_iteration(arms["same"], experiment) and not shares_first_iteration(arms["hotter"], experiment)
    assert running["same"].sample.first_iteration_samples == "/shared/rep0/samples.jsonl"
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


def test_a_replicate_moves_every_training_seed_and_keeps_the_held_out_problems():
    experiment, _ = arm_configs(ExperimentSpec(description="d", arms={"a": []}), {}, ["train.seed=5", "task.train_size=4"])
    second = replicate_config(experiment, 2)
    assert replicate_config(experiment, 0) == experiment
    assert (second.task.train_seed, second.sample.seed, second.curate.seed, second.train.seed) == (2, 200_000, 2, 7)
    assert (second.task.seed, second.evaluate.seed) == (experiment.task.seed, experiment.evaluate.seed)


def test_replicates_draw_their_own_training_prompts_but_share_the_held_out_ones(tmp_path):
    from topr.prompts import run_prompts

    experiment, _ = arm_configs(ExperimentSpec(description="d", arms={"a": []}), {}, ["task.train_size=8", "task.eval_size=8"])
    prompts = {}
    for replicate in (0, 1):
        folder = tmp_path / f"rep{replicate}"
        run_prompts(replicate_config(experiment, replicate), folder / "train.jsonl", folder / "eval.jsonl")
        prompts[replicate] = [[r["prompt_id"] for r in read_records(folder / name)] for name in ("train.jsonl", "eval.jsonl")]
    assert prompts[0][1] == prompts[1][1]  # the same held-out problems
    assert prompts[0][0] != prompts[1][0]  # their own training prompts


def test_spec_replicates_and_reference_are_checked():
    spec = ExperimentSpec(description="d", arms={"a": [], "b": []}, replicates=3, reference="b")
    assert (spec.replicates, spec.reference_arm) == (3, "b")
    assert ExperimentSpec(description="d", arms={"a": [], "b": []}).reference_arm == "a"
    with pytest.raises(ValueError, match="reference 'c' is not one of the arms"):
        ExperimentSpec(description="d", arms={"a": []}, reference="c")
    with pytest.raises(ValueError, match="also_compared_with 'c' is not one of the arms"):
        ExperimentSpec(description="d", arms={"a": []}, also_compared_with=["c"])
    assert ExperimentSpec(description="d", arms={"a": [], "b": []}, reference="b", also_compared_with=["a", "b"]).references == ["b", "a"]
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ExperimentSpec(description="d", arms={"a": []}, replicates=0)


class ScriptedArms:
    """Stands in for the loop: logs the figures a unit's run would and writes its per-problem
    results (two held-out problems), or fails on purpose."""

    def __init__(self, failing: set[str]):
        self.failing, self.calls = failing, []

    def __call__(self, config, run_dir, tracking_uri, run_name, start):
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        from topr.workflow import IterationFiles
        from topr.records import write_records

        replicate = run_name.rsplit("/", 1)[1]
        self.calls.append(f"{config.run.name}/{replicate}")
        if config.run.name in self.failing:
            raise RuntimeError("curation left nothing to train on")
        run_id = start_pipeline_run(tracking_uri, config, run_name)
        accuracy = {"topr": 0.5, "rft": 0.4}.get(config.run.name, 0.3)
        if replicate == "rep1":
            accuracy = {"topr": 1.0, "rft": 0.5}.get(config.run.name, 0.5)
        correct = [index < round(2 * accuracy) for index in range(2)]
        greedy = [{"prompt_id": f"p{index}", "decoding": "greedy", "correct": value} for index, value in enumerate(correct)]
        # Cut short, topr's answers have not ended yet: none right; rft's are the same.
        cut = [{**r, "decoding": "greedy_cut", "correct": r["correct"] and config.run.name != "topr"} for r in greedy]
        write_records(IterationFiles(run_dir / "iter1").completions, greedy + (cut if config.evaluate.cut_at_tokens else []))
        now = int(time.time() * 1000)
        figures = [("pass_at_1", 0.25, 0), ("pass_at_1_ci_low", 0.1, 0), ("pass_at_1_ci_high", 0.4, 0)]
        figures += [("pass_at_1", accuracy, 1), ("pass_at_1_ci_low", accuracy - 0.1, 1), ("pass_at_1_ci_high", accuracy + 0.1, 1)]
        figures += [("curated_count", 6, 1), ("curated_positives", 1, 1), ("curated_negatives", 5, 1), ("effective_positive_fraction", 1 / 6, 1)]
        figures += [("mean_weight_negative", 0.03, 1), ("final_logprob_negative", -2.5, 1), ("parse_failure_rate", 0.0, 1)]
        if config.evaluate.cut_at_tokens:
            figures.append(("pass_at_1_cut", sum(r["correct"] for r in cut) / len(cut), 1))
        MlflowClient(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), now, s) for k, v, s in figures])
        return run_id


def test_a_failed_arm_is_reported_the_others_run_and_resume_retries_only_it(tmp_path, tiny_model_dir):
    spec = ExperimentSpec(description="Two objectives.", arms={"topr": [], "rft": ["train.objective=rft"], "ppo": ["train.objective=ppo"]})
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, uri = tmp_path / "exp", default_tracking_uri(tmp_path)
    runner = ScriptedArms(failing={"ppo"})

    report = run_experiment("exp", spec, experiment, arms, folder, uri, run_arm=runner)

    text = report.read_text()
    assert "| ppo | `train.objective=ppo` | shared | 0/1 |" in text and "rep0: RuntimeError: curation left nothing to train on |" in text
    assert "| topr | 25.0% [10.0%, 40.0%] | 50.0% [40.0%, 60.0%] |" in text
    assert (folder / "accuracy.png").stat().st_size > 0 and (folder / "degeneration.png").stat().st_size > 0
    results = json.loads((folder / "results.json").read_text())
    assert {arm: unit["rep0"]["status"] for arm, unit in results["units"].items()} == {"topr": "finished", "rft": "finished", "ppo": "failed"}
    # The shared data: one starting model and its evaluation, iteration 1's samples, each unit's config as it ran.
    samples = read_records(folder / "shared" / "rep0" / "samples.jsonl")
    assert len(samples) == 4 and {r["prompt_id"] for r in samples} == {r["prompt_id"] for r in read_records(folder / "shared" / "rep0" / "train_prompts.jsonl")[:2]}
    assert len(read_records(folder / "shared" / "start" / "evaluation_completions.jsonl")) == 2
    ran = yaml.safe_load((folder / "arms" / "rft" / "rep0" / "config.yaml").read_text())
    assert ran["sample"]["first_iteration_samples"] == str(folder / "shared" / "rep0" / "samples.jsonl")
    assert ran["model"]["path"] == str(folder / "shared" / "base_model")

    with pytest.raises(ConfigError, match="already exists: pass --resume"):
        run_experiment("exp", spec, experiment, arms, folder, uri, run_arm=runner)
    runner.failing.clear()
    write_json(folder / "shared" / "minutes.json", {"minutes": 12.34})  # as if the first preparation had been long
    run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner)
    assert runner.calls == ["topr/rep0", "rft/rep0", "ppo/rep0", "ppo/rep0"]
    resumed = (folder / "report.md").read_text()
    assert "| ppo | `train.objective=ppo` | shared | 1/1 |" in resumed
    assert "the shared data took 12.3" in resumed  # the first preparation's time, not the resume's


def test_resume_refuses_when_a_finished_units_configuration_changed(tmp_path, tiny_model_dir):
    spec = ExperimentSpec(description="Two objectives.", arms={"topr": [], "rft": ["train.objective=rft"]})
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, uri, runner = tmp_path / "exp", default_tracking_uri(tmp_path), ScriptedArms(failing=set())
    run_experiment("exp", spec, experiment, arms, folder, uri, run_arm=runner)

    changed = ExperimentSpec(description="Two objectives.", arms={"topr": ["train.learning_rate=1e-4"], "rft": ["train.objective=rft"]})
    experiment, arms = arm_configs(changed, {}, [f"model.path={tiny_model_dir}", *TINY])
    with pytest.raises(ConfigError, match=r"cannot resume: exp/topr/rep0 ran with another configuration \(train.learning_rate: 1e-05 then, 0.0001 now\)"):
        run_experiment("exp", changed, experiment, arms, folder, uri, resume=True, run_arm=runner)
    # The starting model is replaced by the shared copy in every unit's config: the experiment's own settings catch it.
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}-other", *TINY])
    with pytest.raises(ConfigError, match=r"cannot resume: exp ran with another configuration \(model.path: "):
        run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner)
    # A cluster's pod settings change nothing a unit computes.
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY, "cluster.stages={train: {retries: 3}}"])
    run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner)
    assert runner.calls == ["topr/rep0", "rft/rep0"]  # nothing ran again


def test_replicates_run_every_arm_on_their_own_data_and_the_report_pairs_them(tmp_path, tiny_model_dir):
    spec = ExperimentSpec(description="Two objectives, two replicates.", arms={"rft": ["train.objective=rft"], "topr": []}, replicates=2)
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, runner = tmp_path / "exp", ScriptedArms(failing=set())

    report = run_experiment("exp", spec, experiment, arms, folder, default_tracking_uri(tmp_path), run_arm=runner)

    assert runner.calls == ["rft/rep0", "topr/rep0", "rft/rep1", "topr/rep1"]  # replicate by replicate
    ran = {rep: yaml.safe_load((folder / "arms" / "topr" / rep / "config.yaml").read_text()) for rep in ("rep0", "rep1")}
    assert (ran["rep1"]["train"]["seed"], ran["rep1"]["sample"]["seed"], ran["rep1"]["task"]["train_seed"]) == (1, 100_000, 1)
    assert ran["rep1"]["sample"]["first_iteration_samples"] == str(folder / "shared" / "rep1" / "samples.jsonl")
    text = report.read_text()
    # ScriptedArms: in rep0 both arms solve problem p0 only; in rep1 topr solves both, rft p0 only.
    assert "| topr | 2 | 25.0% (25%, 25%) | 75.0% (50%, 100%) |" in text
    assert "## Paired differences from `rft`, iteration 1" in text
    comparisons = json.loads((folder / "results.json").read_text())["comparisons"]["1"]
    assert [c["arm"] for c in comparisons] == ["topr"]
    assert comparisons[0]["differences"] == pytest.approx([0.0, 0.5])
    assert (folder / "paired_differences.png").stat().st_size > 0


def test_evaluated_long_and_cut_short_the_report_pairs_the_arms_at_both_lengths(tmp_path, tiny_model_dir):
    arms = {"rft": ["train.objective=rft"], "topr": [], "tis": ["train.objective=tis"]}
    spec = ExperimentSpec(description="d", arms=arms, replicates=2, also_compared_with=["topr"])
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY, "evaluate.max_new_tokens=8", "evaluate.cut_at_tokens=2"])
    folder = tmp_path / "exp"

    report = run_experiment("exp", spec, experiment, arms, folder, default_tracking_uri(tmp_path), run_arm=ScriptedArms(failing=set()))

    results = json.loads((folder / "results.json").read_text())
    assert results["comparisons"]["1"][0]["differences"] == pytest.approx([0.0, 0.5])
    assert results["comparisons_cut"]["1"][0]["differences"] == pytest.approx([-0.5, -0.5])
    text = report.read_text()
    assert "cut at `evaluate.cut_at_tokens`=2 tokens (decoded to 8): what the arms score where an answer must end by then." in text
    cut_section = text.split("cut at `evaluate.cut_at_tokens`")[1]
    assert "| topr | 2 | 0.0% (0%, 0%) |" in cut_section and "| rft | 2 | 50.0% (50%, 50%) |" in cut_section
    start = read_records(folder / "shared" / "start" / "evaluation_completions.jsonl")
    assert sorted({r["decoding"] for r in start}) == ["greedy", "greedy_cut"]
    # Every arm also paired with topr, at both lengths, in tables after rft's.
    also = results["also_compared"]["topr"]
    assert [c["arm"] for c in also["comparisons"]["1"]] == ["rft", "tis"] and {c["reference"] for c in also["comparisons"]["1"]} == {"topr"}
    assert also["comparisons"]["1"][0]["differences"] == pytest.approx([0.0, -0.5])
    assert also["comparisons_cut"]["1"][0]["differences"] == pytest.approx([0.5, 0.5])
    assert text.index("## Paired differences from `rft`, iteration 1") < text.index("## Paired differences from `topr`, iteration 1")
    assert "with `topr` as the reference (the spec's `also_compared_with`)" in text
    assert text.count("| rft | 2 | 50.0% (50%, 50%) |") == 1  # the accuracy at the cut is shown once


def test_without_a_cut_there_is_no_comparison_at_the_cut(tmp_path, tiny_model_dir):
    spec = ExperimentSpec(description="d", arms={"rft": ["train.objective=rft"], "topr": []}, replicates=2)
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    report = run_experiment("exp", spec, experiment, arms, tmp_path / "exp", default_tracking_uri(tmp_path), run_arm=ScriptedArms(failing=set()))
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["comparisons_cut"] == {}
    assert "evaluate.cut_at_tokens" not in report.read_text()


def test_the_report_is_logged_to_mlflow_and_tags_every_arm(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    spec = ExperimentSpec(description="d", arms={"topr": [], "rft": ["train.objective=rft"]}, compare="effective_positive_fraction")
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    uri = default_tracking_uri(tmp_path)
    run_experiment("tagged", spec, experiment, arms, tmp_path / "tagged", uri, run_arm=ScriptedArms(failing=set()))

    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("experiment-tagged").experiment_id])
    by_name = {run.info.run_name: run for run in found}
    assert set(by_name) == {"tagged/topr/rep0", "tagged/rft/rep0", "tagged/report"}
    assert by_name["tagged/topr/rep0"].data.tags["topr.arm"] == "topr"
    assert by_name["tagged/topr/rep0"].data.tags["topr.replicate"] == "rep0"
    assert by_name["tagged/report"].data.tags["topr.unit.rft.rep0"] == by_name["tagged/rft/rep0"].info.run_id
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
        "truncated_rate": {1: 0.5},
    }
    assert accuracy_table({"topr": metrics}).splitlines()[2] == "| topr | 25.0% [10.0%, 40.0%] | 50.0% [40.0%, 60.0%] |"
    row = degeneration_table({"topr": metrics}).splitlines()[2]
    assert row == "| topr | 1 | – | 10 (2/8) | 0.20 | – | 0.031 | – | – | -3.21 | – | 12.5% | – | 50.0% | – |"
    assert verifier_table({"topr": metrics}) is None
    votes = {key: {1: value} for key, value in {
        "verifier_accuracy_base": 0.3, "verifier_accuracy_trained": 0.7, "verifier_invalid_rate_base": 0.4,
        "verifier_invalid_rate_trained": 0.0, "vote_k": 4, "verifier_balanced_accuracy_base": 0.5,
        "verifier_balanced_accuracy_trained": 0.65, "verifier_auroc_trained": 0.72, "verifier_auroc_trained_ci_low": 0.61,
        "verifier_auroc_trained_ci_high": 0.8,
        **{f"vote_{name}{end}": value for name, value in (("pass_at_1", 0.4), ("majority", 0.5), ("weighted_base", 0.5), ("weighted_trained", 0.6),
                                                            ("gain_base", 0.0), ("gain_trained", 0.1))
           for end, value in (("", value), ("_ci_low", value - 0.1), ("_ci_high", value + 0.1))},
    }.items()}  # fmt: skip
    table = verifier_table({"topr": {**metrics, **votes}})
    assert table.splitlines()[2] == (
        "| topr | 30.0% → 70.0% | 50.0% → 65.0% | – → 0.72 [0.61, 0.80] | 40.0% → 0.0% | 4 | 40.0% [30.0%, 50.0%] "
        "| 50.0% [40.0%, 60.0%] | 50.0% [40.0%, 60.0%] | 60.0% [50.0%, 70.0%] | +0.0 [-10.0, +10.0] → +10.0 [+0.0, +20.0] |"
    )  # a figure that was not logged (the base verifier's AUROC here) shows as "–"


def test_the_verifier_is_compared_replicate_by_replicate_with_intervals_over_replicates():
    from scipy import stats

    from topr.report import verifier_replicates

    def replicate(auroc_base, auroc_trained, majority, weighted):
        figures = {"verifier_accuracy_trained": 0.6, "verifier_auroc_base": auroc_base, "verifier_auroc_trained": auroc_trained,
                   "vote_majority": majority, "vote_weighted_trained": weighted}  # fmt: skip
        return {key: {1: value} for key, value in figures.items()}

    finished = {"topr": {"rep0": replicate(0.4, 0.8, 0.40, 0.50), "rep1": replicate(0.5, 0.7, 0.40, 0.44), "rep2": replicate(0.4, 0.75, 0.30, 0.36)}}
    lines = verifier_replicates(finished)
    auroc = next(line for line in lines if line.startswith("| AUROC"))
    low, high = stats.ttest_1samp([0.4, 0.2, 0.35], 0.0).confidence_interval(0.95)
    assert auroc == f"| AUROC of P(correct), trained − base | +0.40 | +0.20 | +0.35 | +0.32 [{low:+.2f}, {high:+.2f}] | 0.250 |"
    vote = next(line for line in lines if line.startswith("| weighted vote (trained"))
    assert vote.split(" | ")[1:4] == ["+10.0", "+4.0", "+6.0"]  # points, on the same questions in each replicate
    # Without the base verifier's votes that row is left out, and one replicate alone gives nothing.
    assert not any(line.startswith("| weighted vote (base") for line in lines)
    assert verifier_replicates({"topr": {"rep0": finished["topr"]["rep0"]}}) == []


def test_a_verifier_trained_otherwise_is_compared_with_the_references_replicate_by_replicate():
    from scipy import stats

    from topr.report import verifier_arm_differences

    def replicate(auroc, weighted):
        figures = {"verifier_accuracy_trained": 0.6, "verifier_auroc_trained": auroc, "vote_weighted_trained": weighted}
        return {key: {1: value} for key, value in figures.items()}

    finished = {
        "topr": {"rep0": replicate(0.80, 0.50), "rep1": replicate(0.85, 0.44), "rep2": replicate(0.75, 0.40)},
        "rft": {"rep0": replicate(0.70, 0.45), "rep1": replicate(0.81, 0.44), "rep3": replicate(0.99, 0.99)},
    }
    lines = verifier_arm_differences(finished, "topr")
    assert lines[0].startswith("The verifier of `rft` minus that of `topr`")
    auroc = next(line for line in lines if line.startswith("| AUROC"))
    low, high = stats.ttest_1samp([-0.10, -0.04], 0.0).confidence_interval(0.95)
    assert auroc == f"| AUROC of P(correct), trained | -0.10 | -0.04 | -0.07 [{low:+.2f}, {high:+.2f}] | 0.500 |"  # rep0, rep1 only
    vote = next(line for line in lines if line.startswith("| weighted vote"))
    assert vote.split(" | ")[1:3] == ["-5.0", "+0.0"]
    assert not any(line.startswith("| balanced accuracy") for line in lines)  # not logged
    assert verifier_arm_differences({"topr": finished["topr"]}, "topr") == []


def test_an_arm_with_its_own_model_or_evaluation_does_not_take_the_shared_start():
    spec = ExperimentSpec(description="d", arms={"same": [], "other_model": ["model.path=/elsewhere"], "longer": ["evaluate.max_new_tokens=128"]})
    experiment, arms = arm_configs(spec, {}, [])
    assert {name: shares_start(arm, experiment) for name, arm in arms.items()} == {"same": True, "other_model": False, "longer": False}


def test_paired_comparisons_pair_problem_by_problem_whatever_the_order():
    from topr.report import paired_comparisons

    reference = {"rep0": {"a": True, "b": False, "c": False}, "rep1": {"c": True, "b": False, "a": False}}
    # The same problems listed in another order, plus one that the reference was not scored on.
    arm = {"rep0": {"c": True, "a": True, "b": True, "z": True}, "rep1": {"b": True, "a": False, "c": True, "z": False}}
    (comparison,) = paired_comparisons({1: {"rft": reference, "topr": arm}}, "rft")[1]
    assert comparison.arm == "topr" and comparison.differences == pytest.approx([2 / 3, 1 / 3])


class ImportsALibraryFirst(ScriptedArms):
    """ScriptedArms in a process whose first unit imports a library that binds a logging handler
    to the output of that moment, as transformers does (its handler's ``flush`` is that of
    ``sys.stderr`` when it is imported: the first unit's console, closed once the unit ends)."""

    LIBRARY = "topr.test_experiment.library"

    def __call__(self, config, run_dir, tracking_uri, run_name, start):
        import logging
        import sys

        if not self.calls:  # a fresh process: the library's first import
            handler = logging.StreamHandler()
            handler.flush = sys.stderr.flush
            logging.getLogger(self.LIBRARY).handlers = [handler]
        logging.getLogger(self.LIBRARY).warning("a library's warning in %s", run_name)
        return super().__call__(config, run_dir, tracking_uri, run_name, start)


class ArmsThatRegisterModels(ScriptedArms):
    """ScriptedArms whose units also train a model as the loop's train stage leaves it: a folder in
    the run's iter1/, logged to a stage run (hard linked) and registered from that copy."""

    def __call__(self, config, run_dir, tracking_uri, run_name, start):
        from mlflow import MlflowClient

        from topr.tracking import link_tree

        run_id = super().__call__(config, run_dir, tracking_uri, run_name, start)
        client = MlflowClient(tracking_uri)
        stage = client.create_run(client.get_run(run_id).info.experiment_id, tags={"mlflow.parentRunId": run_id})
        model = run_dir / "iter1" / "model"
        model.mkdir(parents=True)
        (model / "model.safetensors").write_bytes(b"w" * 1000)
        (model / "config.json").write_text("{}")
        logged = Path(stage.info.artifact_uri.removeprefix("file://")) / "model"
        link_tree(model, logged)
        if not client.search_registered_models(f"name = '{config.run.registered_model}'"):
            client.create_registered_model(config.run.registered_model)
        client.create_model_version(config.run.registered_model, str(logged), run_id=stage.info.run_id, tags={"topr.model_uri": str(model)})
        return run_id


def test_drop_models_removes_every_finished_units_models_and_keeps_what_the_report_reads(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    from topr.tracking import FILES_REMOVED_TAG

    spec = ExperimentSpec(description="Two objectives.", arms={"topr": [], "rft": ["train.objective=rft"]})
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, uri, runner = tmp_path / "exp", default_tracking_uri(tmp_path), ArmsThatRegisterModels(failing=set())
    run_experiment("exp", spec, experiment, arms, folder, uri, run_arm=runner)
    models = {arm: folder / "arms" / arm / "rep0" / "run" / "iter1" / "model" for arm in arms}
    client = MlflowClient(uri)
    (rft_version,) = client.search_model_versions("name = 'exp-rft'")
    assert all(model.is_dir() for model in models.values()) and Path(rft_version.source).is_dir()  # kept by default

    # Resumed with --drop-models: nothing runs again, and the units it keeps lose their models.
    report = run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner, drop_models=True)

    assert runner.calls == ["topr/rep0", "rft/rep0"]
    assert not any(model.exists() for model in models.values()) and not Path(rft_version.source).exists()
    for arm in arms:
        (version,) = client.search_model_versions(f"name = 'exp-{arm}'")
        assert "topr experiment --drop-models" in version.tags[FILES_REMOVED_TAG]
    assert "| topr | 25.0% [10.0%, 40.0%] | 50.0% [40.0%, 60.0%] |" in report.read_text()
    assert (folder / "arms" / "topr" / "rep0" / "run" / "iter1" / "evaluation_completions.jsonl").exists()

    # A unit run with --drop-models loses its model as soon as it has finished.
    run_experiment("exp2", spec, experiment, arms, tmp_path / "exp2", uri, run_arm=runner, drop_models=True)
    assert not (tmp_path / "exp2" / "arms" / "topr" / "rep0" / "run" / "iter1" / "model").exists()
    assert all(FILES_REMOVED_TAG in version.tags for version in client.search_model_versions("name = 'exp2-topr'"))


def test_drop_models_also_takes_earlier_attempts_half_removed_versions_and_unregistered_copies(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from mlflow import MlflowClient

    from topr import retention
    from topr.tracking import FILES_REMOVED_TAG

    spec = ExperimentSpec(description="One arm.", arms={"rft": ["train.objective=rft"]})
    experiment, arms = arm_configs(spec, {}, [f"model.path={tiny_model_dir}", *TINY])
    folder, uri, runner = tmp_path / "exp", default_tracking_uri(tmp_path), ArmsThatRegisterModels(failing=set())
    client = MlflowClient(uri)
    # An interrupted first attempt of the unit: its pipeline run registered a model, then the process died.
    crashed = tmp_path / "crashed" / "run"
    named = arms["rft"].run.model_copy(update={"name": "rft", "registered_model": "exp-rft", "experiment": "experiment-exp"})
    runner(arms["rft"].model_copy(update={"run": named}), crashed, uri, "exp/rft/rep0", None)
    run_experiment("exp", spec, experiment, arms, folder, uri, run_arm=runner)
    local = folder / "arms" / "rft" / "rep0" / "run" / "iter1" / "verifier"  # a saved model no version names (as with an artifact store)
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(b"v" * 10)
    first, second = sorted(client.search_model_versions("name = 'exp-rft'"), key=lambda v: int(v.version))
    client.set_model_version_tag("exp-rft", second.version, FILES_REMOVED_TAG, "an earlier removal that failed halfway")

    monkeypatch.setattr(retention, "unit_models", lambda *args: (_ for _ in ()).throw(RuntimeError("tracking server down")))
    report = run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner, drop_models=True)
    assert report.exists() and "exp/rft/rep0: its models were not removed: RuntimeError: tracking server down" in caplog.text
    monkeypatch.undo()

    run_experiment("exp", spec, experiment, arms, folder, uri, resume=True, run_arm=runner, drop_models=True)
    assert not (crashed / "iter1" / "model").exists() and not local.exists()
    assert not (folder / "arms" / "rft" / "rep0" / "run" / "iter1" / "model").exists()
    assert all(FILES_REMOVED_TAG in version.tags for version in client.search_model_versions("name = 'exp-rft'"))
    assert runner.calls == ["rft/rep0", "rft/rep0"]  # the crashed attempt and the experiment's one; nothing ran again


def test_the_experiment_exits_non_zero_while_units_failed_and_resume_reruns_every_failed_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import functools
    import logging

    from topr import experiment as experiment_module
    from topr.cli import main

    spec = tmp_path / "three.yaml"
    spec.write_text("description: Three arms.\narms: {a: [], b: ['train.objective=rft'], c: ['train.objective=tis']}\n")
    command = ["experiment", str(spec), f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", *TINY]
    runners = []

    def run_with(failing: set[str], resume: bool = False) -> int:
        runners.append(ImportsALibraryFirst(failing))
        monkeypatch.setattr(experiment_module, "run_experiment", functools.partial(run_experiment, run_arm=runners[-1]))
        capsys.readouterr()
        return main([*command, *(["--resume"] if resume else [])])

    try:
        assert run_with(failing={"a", "b"}) == 1
        said = capsys.readouterr().err
        assert "2 of 3 unit(s) failed" in said and "three/a/rep0 (RuntimeError: curation left nothing to train on)" in said
        assert "three/b/rep0" in said and "three/c/rep0" not in said and "--resume" in said
        assert runners[-1].calls == ["a/rep0", "b/rep0", "c/rep0"]

        # Both failed units run again, each in its own capture of the same process; one fails again.
        assert run_with(failing={"b"}, resume=True) == 1
        assert runners[-1].calls == ["a/rep0", "b/rep0"]
        said = capsys.readouterr().err
        assert "1 of 3 unit(s) failed: three/b/rep0 (RuntimeError: curation left nothing to train on)" in said

        assert run_with(failing=set(), resume=True) == 0
        assert runners[-1].calls == ["b/rep0"]
        results = json.loads((tmp_path / "three" / "results.json").read_text())["units"]
        assert {arm: unit["rep0"]["status"] for arm, unit in results.items()} == {"a": "finished", "b": "finished", "c": "finished"}
        assert "a library's warning in three/b/rep0" in (tmp_path / "three" / "arms" / "b" / "rep0" / "run.log").read_text()
    finally:
        logging.getLogger(ImportsALibraryFirst.LIBRARY).handlers = []



def test_units_without_cut_verdicts_are_named():
    from topr.report import units_without

    finished = {"rft": {"rep0": {"pass_at_1": {0: 0.1, 1: 0.2}}, "rep1": {"pass_at_1": {0: 0.1, 1: 0.3}}}}
    correct = {1: {"rft": {"rep0": {"p0": True}}}}
    assert units_without(correct, finished) == ["rft/rep1"]
