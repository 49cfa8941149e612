"""The gate reads the champion failing closed; promotion moves the alias as a compare-and-set.

Everything runs against a real (sqlite) MLflow store; a mock only injects a registry fault.
"""

from __future__ import annotations

import json
import os
import threading
import time

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from topr import promotion, steps
from topr.config import config_to_dict, load_config
from topr.gate import TaskMismatchError, check_same_task
from topr.lineage import UncommittedModelError
from topr.tracking import default_tracking_uri, stage_run

NAME, ALIAS = "topr-policy", "champion"
LOCK = NAME + promotion.LOCK_SUFFIX

FAULTS = {
    "unavailable": ("API request to endpoint /api/2.0/mlflow/registered-models/get failed with error code 503 != 200", "TEMPORARILY_UNAVAILABLE"),
    "timeout": ("API request to http://mlflow:5000/api/2.0/mlflow/registered-models/get failed with exception ReadTimeout", "INTERNAL_ERROR"),
    "unauthenticated": ("API request failed with error code 401 != 200", "UNAUTHENTICATED"),
    "forbidden": ("Permission denied for registered model", "PERMISSION_DENIED"),
    "proxy 404": ("API request to endpoint /api/2.0/mlflow/registered-models/get failed with error code 404 != 200", "ENDPOINT_NOT_FOUND"),
}


@pytest.fixture
def registry(tmp_path):
    """A sqlite store with a pipeline run (pass@1 0.5 at iteration 1, and the figures the gate's
    guardrails read) and versions 1-3 of the
    model, registered by a train stage that finished (so committed, with no artifact store)."""
    tracking_uri = default_tracking_uri(tmp_path)
    config_json = json.dumps(config_to_dict(load_config(None, [f"run.registered_model={NAME}"])))
    run_id = steps.start(config_json, tracking_uri, "promotion-test")
    client = mlflow.MlflowClient(tracking_uri)
    for key, value in {"pass_at_1": 0.5, "truncated_rate": 0.0, "parse_failure_rate": 0.0, "mean_completion_tokens": 20.0}.items():
        client.log_metric(run_id, key, value, step=1)  # what the evaluation logs, and the gate reads
    client.create_registered_model(NAME)
    with stage_run(tracking_uri, run_id, "train", 1) as train:
        for _ in range(3):
            client.create_model_version(NAME, str(tmp_path / "model"), run_id=train.run_id, tags={"topr.model_uri": str(tmp_path / "model")})
    return tracking_uri, config_json, run_id, client


def inject(monkeypatch, fault: str) -> None:
    """A brief outage: the next registry read of the alias (by alias, or through the registered
    model) fails with ``fault``; later calls reach the store."""
    message, code = FAULTS[fault]
    pending = [MlflowException(message, error_code=getattr(databricks_pb2, code))]
    for method in ("get_model_version_by_alias", "get_registered_model"):

        def flaky(self, *args, _read=getattr(mlflow.MlflowClient, method), **kwargs):
            if pending:
                raise pending.pop()
            return _read(self, *args, **kwargs)

        monkeypatch.setattr(mlflow.MlflowClient, method, flaky)


# 1. The gate fails closed.


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_registry_fault_fails_the_gate_instead_of_promoting(registry, monkeypatch, fault):
    tracking_uri, config_json, run_id, client = registry
    client.set_registered_model_alias(NAME, ALIAS, "1")
    inject(monkeypatch, fault)
    with pytest.raises(promotion.RegistryError) as raised:
        steps.gate(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id, 1), "2", "unused")
    message = str(raised.value)
    assert f"'{ALIAS}'" in message and f"'{NAME}'" in message and FAULTS[fault][1] in message
    assert "topr.gate" not in client.get_model_version(NAME, "2").tags
    assert "topr.gate" not in client.get_run(run_id).data.tags
    (gate_run,) = client.search_runs([client.get_run(run_id).info.experiment_id], "tags.`topr.stage` = 'gate'")
    assert gate_run.info.status == "FAILED"


def test_a_missing_model_or_alias_is_no_champion(registry):
    tracking_uri, config_json, run_id, client = registry
    assert promotion.alias_version(client, "never-registered", ALIAS) is None
    assert promotion.alias_version(client, NAME, ALIAS) is None
    client.set_registered_model_alias(NAME, ALIAS, "2")
    assert promotion.alias_version(client, NAME, ALIAS) == "2"


def test_a_champion_of_another_task_fails_the_gate_before_any_comparison(registry):
    """A run on task arithmetic, told to register into a model whose champion learnt gsm8k."""
    tracking_uri, config_json, run_id, client = registry
    client.set_model_version_tag(NAME, "1", "topr.task", "gsm8k")
    client.set_registered_model_alias(NAME, ALIAS, "1")
    with pytest.raises(TaskMismatchError, match=f"{NAME}/1 was trained on task 'gsm8k' and this run's task is 'arithmetic'"):
        steps.gate(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id, 1), "2", "unused")
    assert "topr.gate" not in client.get_model_version(NAME, "2").tags
    assert client.get_registered_model(NAME).aliases == {ALIAS: 1}


def test_the_task_check_passes_the_same_task_and_versions_that_predate_it():
    check_same_task("m/1", "arithmetic", "arithmetic")
    check_same_task("m/1", None, "arithmetic")
    with pytest.raises(TaskMismatchError, match="run.registered_model"):
        check_same_task("m/1", "math", "arithmetic")


def test_with_no_champion_the_gate_promotes_and_says_it_beat_none(registry):
    tracking_uri, config_json, run_id, client = registry
    assert steps.gate(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id, 1), "2", "unused") == ("promote", "")
    assert client.get_model_version(NAME, "2").tags["topr.gate"] == "promote: no champion yet"


# 2. Promotion is a compare-and-set.


def test_a_promotion_moves_the_alias_and_records_each_move(registry):
    tracking_uri, config_json, run_id, client = registry
    steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "1", "")
    steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "3", "1")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "3"
    history = promotion.alias_history(client, NAME, ALIAS)
    assert [(move["version"], move["previous"], move["run_id"]) for move in history] == [("1", None, run_id), ("3", "1", run_id)]
    assert all(move["time"].endswith("+00:00") for move in history)
    assert client.get_run(run_id).data.tags["topr.promoted"] == f"{NAME}/3"
    assert client.search_registered_models(f"name = '{LOCK}'") == []  # the lock is released


def test_a_retried_promotion_whose_first_attempt_moved_the_alias_succeeds(registry):
    tracking_uri, config_json, run_id, client = registry
    steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "1", "")
    steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "1", "")  # Kubeflow retries the task
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "1"
    assert [(move["version"], move["previous"]) for move in promotion.alias_history(client, NAME, ALIAS)] == [("1", None)]


def test_a_version_whose_train_stage_failed_is_never_promoted(registry, tmp_path):
    tracking_uri, config_json, run_id, client = registry
    with pytest.raises(RuntimeError, match="the upload failed"):
        with stage_run(tracking_uri, run_id, "train", 2) as train:
            client.create_model_version(NAME, str(tmp_path / "model"), run_id=train.run_id, tags={"topr.model_uri": str(tmp_path / "model")})
            raise RuntimeError("the upload failed")
    with pytest.raises(UncommittedModelError, match=f"{NAME}/4: the stage run .* that registered it is FAILED, not FINISHED"):
        steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "4", "")
    assert client.get_registered_model(NAME).aliases == {}


def test_a_promotion_refuses_when_the_alias_moved_since_the_gate(registry):
    tracking_uri, config_json, run_id, client = registry
    client.set_registered_model_alias(NAME, ALIAS, "2")  # moved after the gate saw version 1
    with pytest.raises(promotion.PromotionRefused, match=f"{NAME}@{ALIAS} is now version 2; the gate beat version 1"):
        steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "3", "1")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "2"
    assert promotion.alias_history(client, NAME, ALIAS) == []
    assert client.get_run(run_id).data.tags["topr.promotion"].startswith("refused: ")
    assert client.get_model_version(NAME, "3").tags["topr.promotion"].startswith("refused: ")
    assert client.search_registered_models(f"name = '{LOCK}'") == []


def test_a_registry_fault_during_promotion_moves_nothing_and_releases_the_lock(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    inject(monkeypatch, "unavailable")
    with pytest.raises(promotion.RegistryError):
        steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), "1", "")
    assert client.get_registered_model(NAME).aliases == {}
    assert client.search_registered_models(f"name = '{LOCK}'") == []


def test_two_promotions_at_once_exactly_one_wins(registry, promotion_race):
    """Two runs gated against the same (absent) champion promote at the same moment."""
    tracking_uri, config_json, run_id, client = registry
    runs = {"1": run_id, "2": steps.start(config_json, tracking_uri, "second-run")}
    winner, refusal = promotion_race(lambda version: steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, runs[version]), version, ""), ("1", "2"))
    assert f"{NAME}@{ALIAS} is now version {winner}; the gate beat no champion" in refusal
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == winner
    assert [move["version"] for move in promotion.alias_history(client, NAME, ALIAS)] == [winner]


def test_a_promotion_waits_for_the_lock_then_sees_the_move_made_under_it(registry):
    tracking_uri, config_json, run_id, client = registry
    outcome = []
    with promotion.promotion_lock(client, NAME, "another-run"):
        thread = threading.Thread(target=lambda: outcome.append(_refusal(config_json, tracking_uri, run_id, "3", "")))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not outcome  # waiting for the lock, not reading the alias yet
        client.set_registered_model_alias(NAME, ALIAS, "2")
    thread.join()
    assert f"{NAME}@{ALIAS} is now version 2; the gate beat no champion" in outcome[0]


def test_a_lock_held_past_the_wait_refuses_naming_its_holder(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 0.5)
    with promotion.promotion_lock(client, NAME, "run-that-died"):
        refusal = _refusal(config_json, tracking_uri, run_id, "1", "")
    assert "run-that-died" in refusal and LOCK in refusal
    assert client.get_registered_model(NAME).aliases == {}


def _refusal(config_json: str, tracking_uri: str, run_id: str, version: str, champion: str) -> str:
    with pytest.raises(promotion.PromotionRefused) as raised:
        steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), version, champion)
    return str(raised.value)


def promoted(registry, *moves: tuple[str, str]) -> None:
    """Promote each (version, the champion the gate beat) in turn, as pipeline runs do."""
    tracking_uri, config_json, run_id, _ = registry
    for version, beaten in moves:
        steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), version, beaten)


def test_a_rollback_moves_the_alias_back_as_a_recorded_move_and_a_second_undoes_it(registry):
    tracking_uri, _, run_id, client = registry
    promoted(registry, ("1", ""), ("3", "1"))

    move = promotion.roll_back(tracking_uri, NAME, ALIAS, "topr")

    assert (move.version, move.previous, move.action) == ("1", "3", "rollback")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "1"
    history = promotion.alias_history(client, NAME, ALIAS)
    assert [(entry["version"], entry["previous"], entry.get("action")) for entry in history] == [
        ("1", None, "promote"), ("3", "1", "promote"), ("1", "3", "rollback"),
    ]  # fmt: skip
    rollback_run = client.get_run(move.run_id)
    assert (rollback_run.info.run_name, rollback_run.info.status) == (f"rollback {NAME}@{ALIAS}", "FINISHED")
    assert rollback_run.data.tags["topr.promoted"] == f"{NAME}/1"
    assert rollback_run.data.tags["topr.owner.pid"] == str(os.getpid())  # 'topr gc' ends it if it is killed holding the lock
    assert client.get_model_version(NAME, "1").tags["topr.promotion"].startswith(f"promoted: {NAME}@{ALIAS} by the rollback run {move.run_id}")
    assert client.get_model_version(NAME, "3").tags["topr.promotion"].startswith(f"rolled back: {NAME}@{ALIAS} moved back to version 1")
    assert client.search_registered_models(f"name = '{LOCK}'") == []
    assert promotion.roll_back(tracking_uri, NAME, ALIAS, "topr").version == "3"  # the second undoes the first
    assert promotion.roll_back(tracking_uri, NAME, ALIAS, "topr", to="2").version == "2"


@pytest.mark.parametrize(
    ("moves", "to", "refusal"),
    [
        ((), None, f"{NAME}@{ALIAS} is not set: there is no champion to roll back"),
        ((("1", ""),), None, f"{NAME}@{ALIAS}: version 1 was its first version, there is none before it: name one with --to VERSION"),
        ((("1", ""),), "1", f"{NAME}@{ALIAS} already holds version 1"),
        ((("1", ""),), "9", f"{NAME} has no version 9"),
        ((("1", ""),), "2", f"{NAME}/2 was trained on task 'gsm8k', the champion \\(version 1\\) on 'arithmetic': refusing to roll back across tasks"),
    ],
    ids=["no champion", "nothing before", "the champion itself", "no such version", "another task"],
)
def test_a_rollback_refuses_what_it_cannot_move_to_and_moves_nothing(registry, moves, to, refusal):
    tracking_uri, _, _, client = registry
    client.set_model_version_tag(NAME, "1", "topr.task", "arithmetic")
    client.set_model_version_tag(NAME, "2", "topr.task", "gsm8k")
    promoted(registry, *moves)
    aliases = client.get_registered_model(NAME).aliases
    with pytest.raises(promotion.PromotionRefused, match=refusal):
        promotion.roll_back(tracking_uri, NAME, ALIAS, "topr", to=to)
    assert client.get_registered_model(NAME).aliases == aliases
    assert len(promotion.alias_history(client, NAME, ALIAS)) == len(moves)


def test_a_rollback_to_a_version_whose_stage_never_committed_is_refused(registry, tmp_path):
    tracking_uri, _, run_id, client = registry
    promoted(registry, ("1", ""))
    with pytest.raises(RuntimeError, match="the upload failed"):
        with stage_run(tracking_uri, run_id, "train", 2) as train:
            client.create_model_version(NAME, str(tmp_path / "model"), run_id=train.run_id, tags={"topr.model_uri": str(tmp_path / "model")})
            raise RuntimeError("the upload failed")
    with pytest.raises(UncommittedModelError, match=f"{NAME}/4: the stage run .* that registered it is FAILED"):
        promotion.roll_back(tracking_uri, NAME, ALIAS, "topr", to="4")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "1"


def test_two_rollbacks_at_once_exactly_one_moves_the_alias(registry, promotion_race):
    """Two people roll the champion (version 3) back at the same moment, to versions 1 and 2."""
    tracking_uri, config_json, _, client = registry
    promoted(registry, ("1", ""), ("3", "1"))
    runs = {version: steps.start(config_json, tracking_uri, f"rollback-{version}") for version in ("1", "2")}
    winner, refusal = promotion_race(lambda version: promotion.rollback(client, NAME, ALIAS, version, "3", runs[version]), ("1", "2"))
    assert f"{NAME}@{ALIAS} is now version {winner}; the rollback was asked against version 3. Nothing moved" in refusal
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == winner
    assert [entry["version"] for entry in promotion.alias_history(client, NAME, ALIAS)] == ["1", "3", winner]
    assert client.search_registered_models(f"name = '{LOCK}'") == []


# 3. A promotion interrupted at any instant leaves a state the next one finishes or undoes.


def _lost(method: str, monkeypatch, *, after: bool, retried: bool = False, times: int = 1) -> None:
    """The server is lost around the next ``times`` calls of ``method``: the request reaches the
    store (``after``) or not, and no reply comes back; with ``retried``, MLflow's client sends the
    request again, as it does by default, and that second reply is what the caller sees."""
    real, pending = getattr(mlflow.MlflowClient, method), [times]

    def flaky(self, *args, **kwargs):
        if pending[0] <= 0:
            return real(self, *args, **kwargs)
        pending[0] -= 1
        if after:
            real(self, *args, **kwargs)
        if retried:
            return real(self, *args, **kwargs)
        raise MlflowException(f"API request to {method} failed with exception ConnectionError: reply lost", error_code=databricks_pb2.INTERNAL_ERROR)

    monkeypatch.setattr(mlflow.MlflowClient, method, flaky)


def _promote(config_json: str, tracking_uri: str, run_id: str, version: str, champion: str) -> None:
    steps.promote(steps.StageContext.from_pipeline(config_json, tracking_uri, run_id), version, champion)


def _consistent(client, *versions: str) -> None:
    """The alias holds the last version, the history lists exactly these moves, done, each version
    is tagged promoted, and no lock is left."""
    history = promotion.alias_history(client, NAME, ALIAS)
    assert [(move["version"], move.get("state")) for move in history] == [(version, None) for version in versions]
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == versions[-1]
    assert all(client.get_model_version(NAME, version).tags["topr.promotion"].startswith(f"promoted: {NAME}@{ALIAS}") for version in versions)
    assert client.search_registered_models(f"name = '{LOCK}'") == []


def test_a_lock_create_whose_reply_was_lost_and_retried_is_this_promotions_own(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 0.5)
    _lost("create_registered_model", monkeypatch, after=True, retried=True)  # the retry meets ALREADY_EXISTS
    _promote(config_json, tracking_uri, run_id, "1", "")
    _consistent(client, "1")


def test_a_lock_create_whose_reply_was_lost_is_released_and_the_next_run_proceeds(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    _lost("create_registered_model", monkeypatch, after=True)
    with pytest.raises(MlflowException, match="reply lost"):
        _promote(config_json, tracking_uri, run_id, "1", "")
    assert client.search_registered_models(f"name = '{LOCK}'") == [] and client.get_registered_model(NAME).aliases == {}
    _promote(config_json, tracking_uri, steps.start(config_json, tracking_uri, "next"), "2", "")
    _consistent(client, "2")


def test_a_move_lost_after_the_alias_moved_is_finished_by_a_retry_or_by_the_next_run(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    _lost("set_registered_model_alias", monkeypatch, after=True)
    with pytest.raises(MlflowException, match="reply lost"):
        _promote(config_json, tracking_uri, run_id, "1", "")
    assert [move["state"] for move in promotion.alias_history(client, NAME, ALIAS)] == ["moving"]
    _promote(config_json, tracking_uri, run_id, "1", "")  # Kubeflow retries the task
    _consistent(client, "1")
    _promote(config_json, tracking_uri, steps.start(config_json, tracking_uri, "next"), "3", "1")
    _consistent(client, "1", "3")


def test_a_move_lost_before_the_alias_moved_is_dropped_by_the_next_run(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    _lost("set_registered_model_alias", monkeypatch, after=False)
    with pytest.raises(MlflowException, match="reply lost"):
        _promote(config_json, tracking_uri, run_id, "1", "")
    client.set_terminated(run_id, "FAILED")
    _promote(config_json, tracking_uri, steps.start(config_json, tracking_uri, "next"), "2", "")
    _consistent(client, "2")
    assert "topr.promotion" not in client.get_model_version(NAME, "1").tags


def test_a_lock_left_by_an_ended_run_is_reclaimed_with_a_record(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 0.5)
    _lost("delete_registered_model", monkeypatch, after=False)  # the server is lost as the lock is released
    _promote(config_json, tracking_uri, run_id, "1", "")  # promoted all the same
    assert client.get_registered_model(LOCK).tags["holder"] == run_id
    client.set_terminated(run_id, "FAILED")

    _promote(config_json, tracking_uri, steps.start(config_json, tracking_uri, "next"), "2", "1")

    _consistent(client, "1", "2")
    (record,) = client.search_registered_models(f"name LIKE '{LOCK}.reclaimed.{run_id}.%'")
    assert record.tags["holder"] == run_id and f"holder run {run_id} is FAILED" in record.tags["reclaimed"]


def test_a_lock_whose_holder_still_runs_is_not_reclaimed(registry, monkeypatch):
    tracking_uri, config_json, run_id, client = registry
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 0.5)
    with promotion.promotion_lock(client, NAME, steps.start(config_json, tracking_uri, "holder")):
        refusal = _refusal(config_json, tracking_uri, run_id, "1", "")
    assert "once that run has ended the next promotion reclaims the lock" in refusal
    assert client.get_registered_model(NAME).aliases == {}
