"""The real stack for integration tests: SeaweedFS and an MLflow server (proxying artifacts to it),
started once per session with the same code as ``topr up`` and stopped at the end."""

from __future__ import annotations

import os

import pytest

from topr import stack as topr_stack
from topr.stack import free_port


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("stack")
    started = topr_stack.up(state_dir, s3_port=free_port(), mlflow_port=free_port())
    saved = {name: os.environ.get(name) for name in started.environment()}
    os.environ.update(started.environment())
    yield started
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    topr_stack.down(state_dir)
