"""A scheduled run on the prompts its starting model learnt trains nothing (run.skip_unchanged_prompts)."""

import json

import pytest
from mlflow import MlflowClient

from topr.config import config_to_dict, form_values, load_config
from topr.inprocess import run_in_process
from topr.prompts import prompts_digest, run_prompts, training_prompts
from topr.records import read_records
from topr.steps import mark_start, skip_reason, start_with_form
from topr.tracking import SKIPPED_TAG, START_VERSION_TAG, TRAIN_PROMPTS_TAG, default_tracking_uri, start_pipeline_run

NAME = "skipper"
SCHEDULED = [f"run.registered_model={NAME}", f"model.path=models:/{NAME}@champion", "run.skip_unchanged_prompts=true", "run.experiment=topr-skip-tests"]


def learnt_digest(*overrides: str) -> str:
    return prompts_digest(training_prompts(load_config(None, [*SCHEDULED, *overrides])))


@pytest.fixture
def champion(tmp_path):
    """A champion trained on the default arithmetic prompts: (tracking URI, client)."""
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, str(tmp_path / "model"), tags={TRAIN_PROMPTS_TAG: learnt_digest()})
    client.set_registered_model_alias(NAME, "champion", version.version)
    return uri, client


def test_the_prompts_stage_records_the_digest_a_later_run_compares(tmp_path):
    config = load_config()
    counts = run_prompts(config, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert counts["train_prompts_sha256"] == prompts_digest(training_prompts(config))
    assert counts["train_prompts"] == len(read_records(tmp_path / "train.jsonl"))
    assert learnt_digest("task.seed=1") != learnt_digest()


def test_a_run_on_the_prompts_its_starting_model_learnt_trains_nothing_and_says_why(champion):
    uri, client = champion
    reason, start_version = skip_reason(load_config(None, SCHEDULED), uri)
    assert start_version == f"{NAME}/1"
    assert reason.startswith("the training prompts (sha256 ") and f"are those {NAME}/1 was trained on" in reason
    assert reason.endswith("nothing new to learn, so nothing was trained (run.skip_unchanged_prompts=false trains anyway)")


@pytest.mark.parametrize("change", ["task.seed=1", "run.skip_unchanged_prompts=false", "model.path=embedded:smollm2-135m-instruct"])
def test_new_prompts_the_option_off_or_a_model_not_from_the_registry_trains(champion, change):
    uri, _ = champion
    assert skip_reason(load_config(None, [*SCHEDULED, change]), uri)[0] == ""


def test_prompts_a_finished_run_already_trained_the_champion_on_are_not_trained_again(champion):
    """Its gate kept the champion, whose own prompts are older: the next night would repeat it."""
    uri, client = champion
    config = load_config(None, [*SCHEDULED, "task.seed=1"])
    earlier = start_pipeline_run(uri, config, "night-1")
    client.set_tag(earlier, START_VERSION_TAG, f"{NAME}/1")
    client.set_tag(earlier, TRAIN_PROMPTS_TAG, learnt_digest("task.seed=1"))
    client.set_tag(earlier, "topr.gate", "keep: gain -0.0100")
    assert skip_reason(config, uri)[0] == ""  # that run has not finished
    client.set_terminated(earlier, "FINISHED")
    reason, _ = skip_reason(config, uri)
    assert f"run night-1 ({earlier}) already trained {NAME}/1 on these training prompts" in reason and "'keep: gain -0.0100'" in reason


def test_the_start_tags_why_and_a_start_that_now_trains_removes_a_stale_reason(champion):
    uri, client = champion
    parent = start_pipeline_run(uri, load_config(None, SCHEDULED), "scheduled")
    mark_start(uri, parent, "the reason", f"{NAME}/1")
    assert client.get_run(parent).data.tags[SKIPPED_TAG] == "the reason"
    mark_start(uri, parent, "", f"{NAME}/1")
    tags = client.get_run(parent).data.tags
    assert SKIPPED_TAG not in tags and tags[START_VERSION_TAG] == f"{NAME}/1"


@pytest.mark.parametrize(("skippable", "form_change", "skipped"), [(True, {}, True), (False, {}, False), (True, {"train_learning_rate": 2e-5}, False)])
def test_only_a_pipeline_compiled_to_skip_skips_and_a_changed_run_form_always_trains(champion, skippable, form_change, skipped):
    uri, client = champion
    config = load_config(None, SCHEDULED)
    defaults = form_values(config)
    parent, _, reason = start_with_form(json.dumps(config_to_dict(config)), uri, "scheduled", "", "", json.dumps(defaults), skippable, **{**defaults, **form_change})
    assert bool(reason) is skipped and (SKIPPED_TAG in client.get_run(parent).data.tags) is skipped


def test_the_in_process_runner_ends_a_skipped_run_finished_with_no_stage(champion, tmp_path):
    uri, client = champion
    parent = run_in_process(load_config(None, SCHEDULED), tmp_path / "run", uri, "scheduled")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and SKIPPED_TAG in run.data.tags
    assert client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'") == []
