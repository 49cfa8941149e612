"""``topr schedule`` against a loopback HTTP server that records what the kfp client sends.

No Kubeflow API server can run here, so these tests check the requests themselves: the
endpoints, the six-field cron, the inline pipeline spec, and the parameters that make each
scheduled run start from the champion and read prompts from the S3 prefix.
"""

from __future__ import annotations

import json

import pytest

from topr.cli import main

def create_command(host: str, *changes: str, overrides: tuple[str, ...] = ("task.name=jsonl",)) -> list[str]:
    options = {
        "--host": host, "--cron": "0 0 3 * * *", "--prompts": "s3://data/prompts/",
        "--tracking-uri": "http://mlflow.mlops:5000", "--name": "nightly", "--pipeline-root": "s3://artifacts/kfp",
    }  # fmt: skip
    options.update(zip(changes[::2], changes[1::2]))
    return ["schedule", "create", *(part for option in options.items() for part in option), *overrides]


def test_create_sends_a_cron_recurring_run_that_starts_from_the_champion(kfp_api, capsys):
    host, requests = kfp_api
    assert main(create_command(host, overrides=("task.name=jsonl", "run.iterations=3"))) == 0
    assert "created recurring run rr-1" in capsys.readouterr().out
    endpoints = [(method, path.split("?")[0]) for method, path, _ in requests]
    assert endpoints == [
        ("GET", "/apis/v2beta1/healthz"),
        ("GET", "/apis/v2beta1/experiments"),  # the experiment is looked up by name, then created
        ("POST", "/apis/v2beta1/experiments"),
        ("POST", "/apis/v2beta1/recurringruns"),
    ]
    (sent,) = [body for method, path, body in requests if method == "POST" and path == "/apis/v2beta1/recurringruns"]
    assert sent["display_name"] == "nightly" and sent["experiment_id"] == "exp-1"
    assert sent["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert sent["max_concurrency"] == "1" or sent["max_concurrency"] == 1
    assert sent["no_catchup"] is True and sent["mode"] == "ENABLE"
    runtime = sent["runtime_config"]
    assert runtime["pipeline_root"] == "s3://artifacts/kfp"
    config = json.loads(runtime["parameters"]["config_json"])
    assert config["model"]["path"] == "models:/topr-jsonl-data-prompts-eval@champion"  # its dataset's registered model
    assert config["task"]["train_path"] == "s3://data/prompts/train.jsonl"
    assert config["task"]["eval_path"] == "s3://data/prompts/eval.jsonl"
    assert runtime["parameters"]["tracking_uri"] == "http://mlflow.mlops:5000"
    assert runtime["parameters"]["task_eval_path"] == "s3://data/prompts/eval.jsonl"  # typed, in the run form
    # The compiled pipeline travels inline, with its three unrolled iterations and the gate, which
    # run only when start_run finds training prompts the champion has not learnt.
    assert config["run"]["skip_unchanged_prompts"] is True
    components = sent["pipeline_spec"]["pipeline_spec"]["components"]
    (condition,) = components["comp-exit-handler-1"]["dag"]["tasks"].values()
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--start-run-skipped'] == ''"
    tasks = components[condition["componentRef"]["name"]]["dag"]["tasks"]
    assert {"iteration-1", "iteration-2", "iteration-3", "gate"} <= set(tasks)


def test_a_schedule_can_train_on_prompts_the_champion_learnt(kfp_api):
    host, requests = kfp_api
    assert main(create_command(host, overrides=("task.name=jsonl", "run.skip_unchanged_prompts=false"))) == 0
    (sent,) = [body for method, path, body in requests if method == "POST" and path == "/apis/v2beta1/recurringruns"]
    assert json.loads(sent["runtime_config"]["parameters"]["config_json"])["run"]["skip_unchanged_prompts"] is False
    assert {"iteration-1", "gate"} <= set(sent["pipeline_spec"]["pipeline_spec"]["components"]["comp-exit-handler-1"]["dag"]["tasks"])


def test_scheduled_runs_use_the_pipeline_service_account(kfp_api):
    # Without one, KFP's default runner account (broad rights) would run every scheduled run.
    host, requests = kfp_api
    assert main(create_command(host)) == 0
    assert main(create_command(host, "--service-account", "topr-nightly")) == 0
    sent = [body for method, path, body in requests if method == "POST" and path == "/apis/v2beta1/recurringruns"]
    assert [body.get("service_account") for body in sent] == ["topr-pipeline", "topr-nightly"]


def test_list_and_delete(kfp_api, capsys):
    host, requests = kfp_api
    assert main(["schedule", "list", "--host", host]) == 0
    assert "rr-1  nightly  cron 0 0 3 * * *  ENABLED" in capsys.readouterr().out
    assert main(["schedule", "delete", "--host", host, "rr-1"]) == 0
    assert ("DELETE", "/apis/v2beta1/recurringruns/rr-1", {}) in requests


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"changes": ("--cron", "0 3 * * *")}, "has 5 fields; Kubeflow wants six, seconds first"),
        ({"changes": ("--prompts", "/local/prompts")}, "--prompts must be an s3:// prefix"),
        ({"overrides": ("task.name=arithmetic",)}, "task.name=arithmetic reads no prompt files"),
    ],
)
def test_bad_schedules_are_refused_before_any_request(kfp_api, capsys, change, message):
    host, requests = kfp_api
    assert main(create_command(host, *change.get("changes", ()), overrides=change.get("overrides", ("task.name=jsonl",)))) == 2
    assert message in capsys.readouterr().err
    assert requests == []
