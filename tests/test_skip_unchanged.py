"""A scheduled run on the prompts its starting model learnt trains nothing (run.skip_unchanged_prompts)."""

import pytest
from mlflow import MlflowClient

from topr.config import load_config
from topr.inprocess import run_in_process
from topr.prompts import prompts_digest, run_prompts, training_prompts
from topr.records import read_records
from topr.steps import skip_reason
from topr.tracking import SKIPPED_TAG, TRAIN_PROMPTS_TAG, default_tracking_uri, start_pipeline_run

NAME = "skipper"
SCHEDULED = [f"run.registered_model={NAME}", f"model.path=models:/{NAME}@champion", "run.skip_unchanged_prompts=true", "run.experiment=topr-skip-tests"]


@pytest.fixture
def champion(tmp_path):
    """A champion trained on the default arithmetic prompts: (tracking URI, client)."""
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    learnt = prompts_digest(training_prompts(load_config(None, SCHEDULED)))
    version = client.create_model_version(NAME, str(tmp_path / "model"), tags={TRAIN_PROMPTS_TAG: learnt})
    client.set_registered_model_alias(NAME, "champion", version.version)
    return uri, client


def test_the_prompts_stage_records_the_digest_a_later_run_compares(tmp_path):
    config = load_config()
    counts = run_prompts(config, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert counts["train_prompts_sha256"] == prompts_digest(training_prompts(config))
    assert counts["train_prompts"] == len(read_records(tmp_path / "train.jsonl"))
    other = load_config(None, ["task.seed=1"])
    assert prompts_digest(training_prompts(other)) != counts["train_prompts_sha256"]


def test_a_run_on_the_prompts_its_starting_model_learnt_trains_nothing_and_says_why(champion):
    uri, client = champion
    config = load_config(None, SCHEDULED)
    parent = start_pipeline_run(uri, config, "scheduled")
    reason = skip_reason(config, uri, parent)
    assert reason.startswith("the training prompts (sha256 ") and f"are those {NAME}/1 was trained on" in reason
    assert "run.skip_unchanged_prompts=false trains anyway" in reason
    assert client.get_run(parent).data.tags[SKIPPED_TAG] == reason


@pytest.mark.parametrize("change", ["task.seed=1", "run.skip_unchanged_prompts=false", "model.path=embedded:smollm2-135m-instruct"])
def test_new_prompts_the_option_off_or_a_model_not_from_the_registry_trains(champion, change):
    uri, client = champion
    config = load_config(None, [*SCHEDULED, change])
    parent = start_pipeline_run(uri, config, "scheduled")
    assert skip_reason(config, uri, parent) == ""
    assert SKIPPED_TAG not in client.get_run(parent).data.tags


def test_the_in_process_runner_ends_a_skipped_run_finished_with_no_stage(champion, tmp_path):
    uri, client = champion
    parent = run_in_process(load_config(None, SCHEDULED), tmp_path / "run", uri, "scheduled")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and SKIPPED_TAG in run.data.tags
    assert client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'") == []
