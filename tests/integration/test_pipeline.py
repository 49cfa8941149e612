"""The pipeline, compiled and really run through kfp.local, tracked in a real (sqlite) MLflow store."""

from __future__ import annotations

import builtins
import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from topr_pipelines.runner import compile_pipeline, run_local
from topr import promotion
from topr.config import EMBEDDED_MODEL, load_config
from topr.gate import GATE_METRICS
from topr.models import PROVENANCE_FILE
from topr.records import SAMPLE_FIELDS, VERIFIED_FIELDS, read_records
from topr.sample import run_sample
from topr.tracking import KFP_RUN_TAG, default_tracking_uri

STAGES = ("sample", "verify", "curate", "train", "evaluate")
TINY_RUN = [
    "task.train_size=3",
    "task.eval_size=3",
    "sample.samples_per_prompt=2",
    "sample.max_new_tokens=6",
    "evaluate.max_new_tokens=6",
    "evaluate.samples_per_prompt=2",
    "train.batch_size=2",
]


def test_compiled_pipeline_unrolls_iterations(tmp_path):
    spec, _ = yaml.safe_load_all(compile_pipeline(load_config(None, ["run.iterations=3"]), tmp_path / "topr.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"start-run", "finish-run", "exit-handler-1"} <= set(tasks)
    assert tasks["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    loop = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"iteration-1", "iteration-2", "iteration-3", "prepare-model", "prompts", "evaluate"} <= set(loop)
    # Each iteration trains from the previous iteration's model.
    for iteration in (2, 3):
        model = loop[f"iteration-{iteration}"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert model["producerTask"] == f"iteration-{iteration - 1}"
    # Every round has its own components, so no two rounds share an artifact folder.
    stage_components = [
        task["componentRef"]["name"]
        for iteration in (1, 2, 3)
        for task in spec["components"][f"comp-iteration-{iteration}"]["dag"]["tasks"].values()
    ]
    # sample runs inside the shard loop; the round's own tasks are the loop and the other stages.
    assert len(stage_components) == len(set(stage_components)) == 3 * (len(STAGES) + 1)


def _runs_by_name(tracking_uri: str, parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {run.info.run_name: run for run in children}


def _artifact(pipeline_root: Path, task: str, output: str) -> Path:
    """The single artifact ``output`` of the local task folder named ``task`` (e.g. train-2)."""
    (path,) = pipeline_root.glob(f"*/{task}/{output}")
    return path


@pytest.mark.slow
def test_local_run_two_iterations(tmp_path, tiny_model_dir):
    config = load_config(None, [f"model.path={tiny_model_dir}", "run.iterations=2", "sample.shards=2", *TINY_RUN])
    tracking_uri = default_tracking_uri(tmp_path)
    interpreter_print = builtins.print
    parent_run_id = run_local(config, tmp_path / "run", tracking_uri, "pipeline-test")
    assert builtins.print is interpreter_print  # kfp.local's threaded shards swap print; none outlives the run

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[KFP_RUN_TAG]
    assert parent.data.params["train.objective"] == "topr"
    history = client.get_metric_history(parent_run_id, "pass_at_1")
    assert sorted(m.step for m in history) == [0, 1, 2]

    runs = _runs_by_name(tracking_uri, parent_run_id)
    expected = {f"iter{i}/{stage}" for i in (1, 2) for stage in STAGES if stage != "sample"}
    expected |= {f"iter{i}/sample/shard{s}of2" for i in (1, 2) for s in (0, 1)} | {"iter1/collect_samples", "iter2/collect_samples"}
    expected |= {"iter0/evaluate", "iter0/prepare_model", "iter0/prompts", "iter2/gate"}
    assert expected <= set(runs)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    train_run = runs["iter2/train"]
    assert any(d.dataset.name == "train_set_iter2" for d in train_run.inputs.dataset_inputs)
    assert "loss" in train_run.data.metrics
    logged = [a.path for a in client.list_artifacts(train_run.info.run_id, "model")]
    assert "model/model.safetensors" in logged

    root = tmp_path / "run" / "pipeline_root"
    for task in ("collect-samples", "collect-samples-2"):
        samples = read_records(_artifact(root, task, "samples"), required=SAMPLE_FIELDS)
        assert len(samples) == 3 * 2
    # Two shards give what one engine over all the prompts gives: same fields, count and prompt order.
    collected = read_records(_artifact(root, "collect-samples", "samples"))
    one_shard = tmp_path / "one_shard.jsonl"
    run_sample(config, str(_artifact(root, "prepare-model", "model")), _artifact(root, "prompts", "train_prompts"), one_shard)
    unsharded = read_records(one_shard)
    assert [set(r) for r in collected] == [set(r) for r in unsharded]
    assert [(r["prompt_id"], r["sample_index"]) for r in collected] == [(r["prompt_id"], r["sample_index"]) for r in unsharded]
    verified = read_records(_artifact(root, "verify-2", "verified"), required=VERIFIED_FIELDS)
    assert {r["reward"] for r in verified} <= {1.0, -1.0}
    # Each round's model names the model it was trained from.
    base, first, second = (
        json.loads((_artifact(root, task, output) / PROVENANCE_FILE).read_text())
        for task, output in (("prepare-model", "model"), ("train", "trained_model"), ("train-2", "trained_model"))
    )
    assert first["parent"] == "sha256:" + base["weights_sha256"]
    assert second["parent"] == "sha256:" + first["weights_sha256"]
    assert samples[0]["behavior_model"] == "sha256:" + first["weights_sha256"]

    # Both models are registered; with no champion yet, the gate promotes the last one.
    versions = client.search_model_versions("name = 'topr-arithmetic'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert int(client.get_model_version_by_alias("topr-arithmetic", "champion").version) == 2
    assert client.get_run(parent_run_id).data.tags["topr.gate"] == "promote: no champion yet"
    # What the pipeline UI shows: the run so far after each evaluation, and the gate's decision.
    page = _artifact(root, "evaluate-3", "accuracy_page").read_text()  # iteration 2's
    assert "<h2>topr-arithmetic: held-out accuracy after iteration 2</h2>" in page
    assert "<img alt='held-out accuracy by iteration' src='data:image/png;base64," in page
    assert "curated (+/-)" in page and "\n        2 " in page
    assert _artifact(root, "gate", "decision_report").read_text().startswith("## Gate: promote\n\nno champion yet.")
    # The exit handler's page, drawn last: the start, both iterations, their gains and the decision.
    page = _artifact(root, "finish-run", "run_page").read_text()
    assert "<h2>pipeline-test: the run, FINISHED</h2>" in page
    assert all(f"\n        {iteration} " in page for iteration in (0, 1, 2))
    assert "held-out gain over iteration 0" in page and "gate: promote: no champion yet" in page


@pytest.mark.slow
def test_gate_keeps_or_moves_the_champion_and_runs_start_from_it(tmp_path, tiny_model_dir, capsys):
    """Run 1 becomes champion; run 2 starts from it and, needing a gain of 1.0, keeps it;
    run 3 accepts any result (margin −1) and takes its place. Lineage crosses the runs."""
    from topr.cli import main

    common = [f"run.output_dir={tmp_path}", "run.iterations=1", "run.registered_model=gated", *TINY_RUN]
    assert main(["run", "--verbose", "run.name=first", f"model.path={tiny_model_dir}", *common]) == 0
    assert "Executing task" in capsys.readouterr().out  # --verbose: Kubeflow's executor log on the console too
    assert main(["run", "--from", "champion", "run.name=second", "gate.margin=1.0", *common]) == 0
    assert main(["run", "--from", "gated@champion", "run.name=third", "gate.margin=-1.0", *common]) == 0

    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    assert int(client.get_model_version_by_alias("gated", "champion").version) == 3
    decisions = {str(v.version): v.tags["topr.gate"] for v in client.search_model_versions("name = 'gated'")}
    assert decisions["1"] == "promote: no champion yet"
    assert decisions["2"].startswith("keep: gain +0.0000") and "<= margin 1.0000" in decisions["2"]
    assert decisions["3"].startswith("promote: gain +0.0000") and "> margin -1.0000" in decisions["3"]
    # Against a champion, every guardrail's figures are on the version too.
    third = client.get_model_version("gated", "3").tags
    assert all(third[f"topr.gate.{metric}"].split(" holds: ")[1].startswith("new ") for metric in GATE_METRICS[1:])
    # Each move of the alias is kept on the registered model, from the version the gate beat.
    moves = promotion.alias_history(client, "gated", "champion")
    assert [(move["version"], move["previous"]) for move in moves] == [("1", None), ("3", "1")]
    second = client.search_runs([client.get_experiment_by_name("topr").experiment_id], "tags.mlflow.runName = 'second'")[0]
    assert second.data.params["model.path"] == "models:/gated@champion"
    assert second.data.metrics["gate_champion_pass_at_1"] == second.data.metrics["gate_new_pass_at_1"] - second.data.metrics["gate_gain"]

    capsys.readouterr()
    assert main(["lineage", "--tracking-uri", default_tracking_uri(tmp_path), "--json", "gated@champion"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [link["name"] for link in chain if link["kind"] == "model"] == ["gated/3", "gated/1"]
    assert chain[-1]["kind"] == "base model" and chain[-1]["name"] == tiny_model_dir


@pytest.mark.slow
def test_failed_stage_fails_the_run_and_registers_nothing(tmp_path, tiny_model_dir):
    # Every completion is longer than one token, so curation leaves nothing to train on.
    config = load_config(None, [f"model.path={tiny_model_dir}", "run.iterations=1", "curate.max_completion_tokens=1", *TINY_RUN])
    tracking_uri = default_tracking_uri(tmp_path)
    with pytest.raises(RuntimeError):
        run_local(config, tmp_path / "run", tracking_uri, "failing-run")

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(config.run.experiment)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.mlflow.runName = 'failing-run'")
    assert [run.info.status for run in parents] == ["FAILED"]
    runs = _runs_by_name(tracking_uri, parents[0].info.run_id)
    assert runs["iter1/curate"].info.status == "FAILED"
    assert "iter1/train" not in runs
    root = tmp_path / "run" / "pipeline_root"
    assert not list(root.glob("*/train/trained_model"))
    assert not list(root.glob("*/curate/train_set"))


@pytest.mark.slow
def test_topr_run_with_the_embedded_model(tmp_path, capsys):
    """The README's main command on a tiny budget, with the real default model."""
    from topr.cli import main

    overrides = [f"run.output_dir={tmp_path}", "run.name=embedded", "run.iterations=1", *TINY_RUN]
    assert load_config(None, overrides).model.path == EMBEDDED_MODEL
    assert main(["run", *overrides]) == 0
    console = capsys.readouterr()
    printed = console.out
    assert "pass@1" in printed and "start" in printed
    # The console: a line as each stage starts and ends, with its figures; the executor log only in the file.
    assert (console.out + console.err).count("\n") < 60  # lines on a terminal: a bar redraws itself with carriage returns
    assert f"log: {tmp_path / 'embedded' / 'run.log'}" in printed
    assert re.search(r"^iter 1  train +done in .*\b\d+ steps, final loss", printed, re.M), printed
    assert re.search(r"^iter 1  evaluate +done in .*: pass@1 \d+\.\d% \[", printed, re.M), printed
    assert "Executing task" not in printed + console.err
    assert "Executing task" in (tmp_path / "embedded" / "run.log").read_text()
    report = (tmp_path / "embedded" / "report.md").read_text()
    assert report.count("\n        ") >= 2  # a row for the starting model and one per iteration
    assert (tmp_path / "embedded" / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_a_typed_parameter_changed_in_the_run_form_reaches_every_stage(tmp_path, tiny_model_dir):
    """As Kubeflow's run form sends it: a typed parameter beside the compiled config_json."""
    from kfp import local

    from topr_pipelines.runner import local_pipeline
    from topr.config import config_to_dict
    from topr.tracking import finished_stage_runs

    config = load_config(None, [f"model.path={tiny_model_dir}", "run.iterations=1", "gate.enabled=false", *TINY_RUN])
    tracking_uri = default_tracking_uri(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    pipeline = local_pipeline(config)
    parent_run_id = pipeline(config_json=json.dumps(config_to_dict(config)), tracking_uri=tracking_uri, run_name="form", sample_temperature=0.9).output

    client = mlflow.MlflowClient(tracking_uri)
    train_run = client.get_run(finished_stage_runs(tracking_uri, parent_run_id, "train")[1])
    assert train_run.data.params["sample.temperature"] == "0.9" and config.sample.temperature == 0.5
    assert client.get_run(parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_run_on_the_prompts_its_champion_learnt_trains_nothing(tmp_path, tiny_model_dir, capsys):
    """What a scheduled run does when no new prompts arrived (run.skip_unchanged_prompts)."""
    from topr.cli import main
    from topr.tracking import SKIPPED_TAG, TRAIN_PROMPTS_TAG

    common = [f"run.output_dir={tmp_path}", "run.iterations=1", "run.registered_model=steady", *TINY_RUN]
    assert main(["run", "run.name=first", f"model.path={tiny_model_dir}", *common]) == 0
    assert main(["run", "--from", "champion", "run.name=again", "run.skip_unchanged_prompts=true", *common]) == 0
    assert "skipped: the training prompts (sha256 " in capsys.readouterr().out

    client = mlflow.MlflowClient(default_tracking_uri(tmp_path))
    (first,) = client.search_model_versions("name = 'steady'")  # nothing registered by the second run
    again = client.search_runs([client.get_experiment_by_name("topr").experiment_id], "tags.mlflow.runName = 'again'")[0]
    assert again.info.status == "FINISHED" and "are those steady/1 was trained on" in again.data.tags[SKIPPED_TAG]
    assert first.tags[TRAIN_PROMPTS_TAG] == client.search_runs([again.info.experiment_id], "tags.mlflow.runName = 'first'")[0].data.tags[TRAIN_PROMPTS_TAG]
    assert client.search_runs([again.info.experiment_id], f"tags.`mlflow.parentRunId` = '{again.info.run_id}'") == []
    page = _artifact(tmp_path / "again" / "pipeline_root", "finish-run", "run_page").read_text()
    assert "<h2>again: the run, FINISHED</h2><p>skipped: the training prompts" in page
