"""The champion alias over the real MLflow server's REST API: read failing closed, moved as a compare-and-set."""

from __future__ import annotations

import mlflow
import pytest

from topr import promotion

ALIAS = "champion"


def test_over_rest_only_a_missing_model_or_alias_is_no_champion(stack):
    client, name = mlflow.MlflowClient(stack.tracking_uri), "rest-read"
    assert promotion.alias_version(client, name, ALIAS) is None
    client.create_registered_model(name)
    assert promotion.alias_version(client, name, ALIAS) is None
    # A path that is not MLflow's API answers a bare 404: not an answer about the model.
    wrong = mlflow.MlflowClient(f"{stack.tracking_uri}/not-mlflow")
    with pytest.raises(promotion.RegistryError, match=f"alias '{ALIAS}' of registered model '{name}' \\(ENDPOINT_NOT_FOUND"):
        promotion.alias_version(wrong, name, ALIAS)


def test_two_promotions_through_the_server_exactly_one_wins(stack, promotion_race):
    client, name = mlflow.MlflowClient(stack.tracking_uri), "rest-race"
    client.create_registered_model(name)
    versions = tuple(str(client.create_model_version(name, f"s3://{stack.bucket}/{name}/model{i}").version) for i in (1, 2))

    def promote(version: str) -> None:  # each with its own client, as two runs would be
        promotion.promote(mlflow.MlflowClient(stack.tracking_uri), name, ALIAS, version, None, f"run-{version}")

    winner, refusal = promotion_race(promote, versions)
    assert f"{name}@{ALIAS} is now version {winner}; the gate beat no champion" in refusal
    assert promotion.alias_version(client, name, ALIAS) == winner
    assert [(move["version"], move["run_id"]) for move in promotion.alias_history(client, name, ALIAS)] == [(winner, f"run-{winner}")]
    assert client.search_registered_models(f"name = '{name}{promotion.LOCK_SUFFIX}'") == []
