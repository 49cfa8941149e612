"""The in-process runner (``topr.inprocess``) runs the loop's whole description against the real
stack, the gate included: a first run with no champion promotes its model; the same run again
is gated against that champion; ``topr promote --rollback`` then moves the champion by hand."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from test_experiment_run import TINY
from topr import promotion
from topr.cli import main
from topr.config import load_config
from topr.inprocess import run_in_process


@pytest.mark.slow
def test_a_run_in_process_is_gated_and_promotes_like_a_pipeline_run(stack, tmp_path, tiny_model_dir, capsys):
    config = load_config(
        None,
        [f"model.path={tiny_model_dir}", f"run.artifact_store=s3://{stack.bucket}/inprocess", "run.registered_model=inprocess-gate", "run.iterations=1", *TINY],
    )
    client = MlflowClient(stack.tracking_uri)

    first = run_in_process(config, tmp_path / "first", stack.tracking_uri, "first")

    champion = client.get_model_version_by_alias("inprocess-gate", "champion")
    assert client.get_run(first).data.tags["topr.promoted"] == f"inprocess-gate/{champion.version}"
    stage_runs = client.search_runs(
        [client.get_run(first).info.experiment_id], f"tags.mlflow.parentRunId = '{first}'", max_results=50
    )
    names = {run.info.run_name for run in stage_runs}
    assert {"iter0/prepare_model", "iter0/prompts", "iter0/evaluate", "iter1/train", "iter1/evaluate", "iter1/gate"} <= names

    second = run_in_process(config, tmp_path / "second", stack.tracking_uri, "second")

    gate = client.get_run(second).data.tags["topr.gate"]
    assert gate.startswith(("promote", "keep")) and client.get_run(second).data.metrics["gate_champion_pass_at_1"] >= 0

    # The platform team moves the champion by hand: to the other version, then back.
    before = str(client.get_model_version_by_alias("inprocess-gate", "champion").version)
    (other,) = {"1", "2"} - {before}
    promote = ["promote", "--rollback", "--tracking-uri", stack.tracking_uri, "run.registered_model=inprocess-gate"]
    capsys.readouterr()
    assert main([*promote, "--to", other]) == 0
    assert f"inprocess-gate@champion: version {before} -> version {other} (rollback run " in capsys.readouterr().out
    assert main(promote) == 0
    assert str(client.get_model_version_by_alias("inprocess-gate", "champion").version) == before
    history = promotion.alias_history(client, "inprocess-gate", "champion")
    assert [(entry["version"], entry["action"]) for entry in history[-2:]] == [(other, "rollback"), (before, "rollback")]
