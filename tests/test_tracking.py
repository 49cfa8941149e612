"""MLflow tracking against a local sqlite store (one store for the module: migrating it is slow)."""

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import yaml

import topr
from topr.config import config_to_dict, load_config
from topr.records import write_records
from topr.storage import file_sha256
from topr.tracking import (
    CHECKPOINTS_TAG,
    ENDED_TAG,
    ITERATION_TAG,
    KFP_RUN_TAG,
    OWNER_ENV,
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_STARTED_TAG,
    RESUMED_TAG,
    STAGE_TAG,
    StepMetrics,
    default_tracking_uri,
    end_pipeline_run,
    find_pipeline_run,
    finished_stage_runs,
    finish_pipeline_run,
    flatten,
    local_artifact_root,
    metric_history,
    owned_runs,
    owner_environment,
    stage_run,
    start_pipeline_run,
)

EXPERIMENT = "topr-tests"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking_uri, store folder, working directory used while the module's runs are created)."""
    root = tmp_path_factory.mktemp("store")
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        yield default_tracking_uri(root), root, cwd


@pytest.fixture(scope="module")
def config():
    return load_config(overrides=[f"run.experiment={EXPERIMENT}", "train.objective=tis", "train.positive_bounds=[0,1]"])


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store[0])


@pytest.fixture(scope="module")
def parent(store, config):
    return start_pipeline_run(store[0], config, "parent-run", kfp_run_id="kfp-parent")


def test_default_tracking_uri_is_sqlite_in_output_dir(tmp_path):
    uri = default_tracking_uri(tmp_path / "runs")
    assert uri == f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [0, 1]}) == {"a.b": "1", "a.c.d": "None", "e": "[0, 1]"}


def test_start_pipeline_run(store, config, client, parent):
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "parent-run"
    assert run.data.params == flatten(config_to_dict(config))
    assert run.data.params["train.objective"] == "tis"
    assert run.data.params["train.positive_bounds"] == "[0.0, 1.0]"
    assert run.data.tags["topr.version"] == topr.__version__
    assert run.data.tags[KFP_RUN_TAG] == "kfp-parent"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert [f.path for f in client.list_artifacts(parent)] == ["config.yaml"]
    downloaded = client.download_artifacts(parent, "config.yaml", str(store[1]))
    assert yaml.safe_load(Path(downloaded).read_text()) == config_to_dict(config)


def test_start_pipeline_run_without_kfp_id_has_no_kfp_tag(store, config, client):
    run_id = start_pipeline_run(store[0], config, "no-kfp")
    assert KFP_RUN_TAG not in client.get_run(run_id).data.tags


def test_a_retried_start_of_a_kubeflow_run_continues_its_parent_run(store, config, client):
    first = start_pipeline_run(store[0], config, "retried", kfp_run_id="kfp-retried")
    assert start_pipeline_run(store[0], config, "retried", kfp_run_id="kfp-retried") == first
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(client.search_runs([experiment], f"tags.`{KFP_RUN_TAG}` = 'kfp-retried'")) == 1


def test_experiment_artifacts_live_beside_the_database(store, client, parent):
    uri, root, cwd = store
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    artifact_uri = client.get_run(parent).info.artifact_uri
    local = Path(url2pathname(urlparse(artifact_uri).path))
    assert local.is_relative_to(root / "mlartifacts")
    assert (local / "config.yaml").is_file()
    assert list(cwd.iterdir()) == []  # no mlruns/ or mlartifacts/ in the working directory


def test_stage_run_nested_and_finished(store, client, parent):
    with stage_run(store[0], parent, "train", 1) as run:
        run.log_params({"lr": 1e-5, "bounds": [0, 1]})
        run.log_metrics({"loss": 0.5, "flag": True, "name": "x", "count": 3}, step=2)
        run_id = run.run_id
        assert client.get_run(run_id).info.status == "RUNNING"
    stage = client.get_run(run_id)
    assert stage.info.status == "FINISHED"
    assert stage.info.run_name == "iter1/train"
    assert stage.info.experiment_id == client.get_run(parent).info.experiment_id
    assert stage.data.tags["mlflow.parentRunId"] == parent
    assert stage.data.tags[STAGE_TAG] == "train"
    assert stage.data.tags[ITERATION_TAG] == "1"
    assert stage.data.tags["topr.version"] == topr.__version__
    assert stage.data.params == {"lr": "1e-05", "bounds": "[0, 1]"}
    # Only real numbers are logged: bools and strings are skipped.
    assert stage.data.metrics == {"loss": 0.5, "count": 3.0}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2]
    # Without on_parent nothing reaches the parent.
    assert "loss" not in client.get_run(parent).data.metrics


def test_stage_run_failed_when_block_raises(store, client, parent):
    with pytest.raises(RuntimeError, match="stage broke"):
        with stage_run(store[0], parent, "sample", 2) as run:
            run_id = run.run_id
            raise RuntimeError("stage broke")
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.info.run_name == "iter2/sample"
    assert failed.data.tags[ITERATION_TAG] == "2"


def test_stage_run_failed_on_keyboard_interrupt(store, client, parent):
    with pytest.raises(KeyboardInterrupt):
        with stage_run(store[0], parent, "evaluate", 3) as run:
            run_id = run.run_id
            raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "FAILED"


def test_log_metrics_on_parent_at_iteration_step(store, client, config):
    parent = start_pipeline_run(store[0], config, "metrics-parent")
    for iteration, accuracy in ((1, 0.25), (2, 0.75)):
        with stage_run(store[0], parent, "verify", iteration) as run:
            run.log_metrics({"sample_accuracy": accuracy}, on_parent=True)
            run.log_metrics({"only_here": 1.0})
    assert metric_history(store[0], parent, "sample_accuracy") == {1: 0.25, 2: 0.75}
    assert "only_here" not in client.get_run(parent).data.metrics
    # On the stage run itself the metric is logged at the given step (0 by default).
    stage_runs = client.search_runs([client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(stage_runs) == 2
    for stage in stage_runs:
        assert [m.step for m in client.get_metric_history(stage.info.run_id, "sample_accuracy")] == [0]


def test_metric_history_keeps_latest_value_per_step(store, client, config):
    parent = start_pipeline_run(store[0], config, "history-parent")
    with stage_run(store[0], parent, "evaluate", 1) as run:
        run.log_metrics({"pass_at_1": 0.1}, on_parent=True)
    import time

    time.sleep(0.01)
    with stage_run(store[0], parent, "evaluate", 1) as run:
        run.log_metrics({"pass_at_1": 0.3}, on_parent=True)
    assert metric_history(store[0], parent, "pass_at_1") == {1: 0.3}
    assert metric_history(store[0], parent, "missing") == {}


def test_log_dataset(store, client, parent, tmp_path):
    path = tmp_path / "train_set.jsonl"
    write_records(path, [{"prompt_id": "p1", "reward": 1.0}])
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    with stage_run(store[0], parent, "curate", 1) as run:
        digest = run.log_dataset(path, "train_set_iter1", "training")
        run_id = run.run_id
    assert digest == expected == file_sha256(path)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "train_set_iter1"
    assert dataset.digest == expected[:16]
    assert str(path.resolve()) in dataset.source
    assert {tag.key: tag.value for tag in inputs[0].tags} == {"mlflow.data.context": "training"}


def test_log_artifacts(store, client, parent, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with stage_run(store[0], parent, "train", 4) as run:
        run.log_artifact(report)
        run.log_artifacts(model, "model")
        run_id = run.run_id
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["model", "report.json"]
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/config.json"]


def test_a_folder_logged_to_a_local_store_is_one_stored_copy(store, client, parent, tmp_path):
    """Hard links: a model in the run folder and in MLflow's local artifacts takes its bytes once."""
    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w" * 4096)
    (model / "nested" / "tokenizer.json").write_text("{}")
    with stage_run(store[0], parent, "train", 6) as run:
        run.log_artifacts(model, "model")
    logged = Path(client.download_artifacts(run.run_id, "model", str(tmp_path / "download")))
    assert (logged / "nested" / "tokenizer.json").read_text() == "{}"
    root = local_artifact_root(client.get_run(run.run_id).info.artifact_uri)
    for name in ("model.safetensors", "nested/tokenizer.json"):
        assert (root / "model" / name).stat().st_ino == (model / name).stat().st_ino
        assert (model / name).stat().st_nlink == 2


def test_a_folder_is_logged_whole_or_not_at_all(store, client, parent, tmp_path, monkeypatch):
    """A full disk halfway through a model's weights (the artifact store's disk) leaves no part
    of the folder logged: no half-copied model.safetensors for anyone to register or download."""
    import errno
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 4096)
    copyfile = shutil.copyfile

    def disk_fills_halfway(source, target, *args, **kwargs):
        if Path(source).name != "model.safetensors":
            return copyfile(source, target, *args, **kwargs)
        Path(target).write_bytes(Path(source).read_bytes()[:2048])
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    def across_file_systems(source, target, **_):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with pytest.raises(OSError, match="No space left"):
        with stage_run(store[0], parent, "train", 5) as run:
            run.log_artifact(model / "config.json")
            monkeypatch.setattr(shutil, "copyfile", disk_fills_halfway)
            monkeypatch.setattr(os, "link", across_file_systems)  # so the files are copied
            run.log_artifacts(model, "model")
    assert [f.path for f in client.list_artifacts(run.run_id)] == ["config.json"]
    assert client.get_run(run.run_id).info.status == "FAILED"


@pytest.mark.parametrize("status", ["FINISHED", "FAILED"])
def test_finish_pipeline_run_by_kfp_tag(store, config, client, status):
    kfp_id = f"kfp-finish-{status.lower()}"
    other = start_pipeline_run(store[0], config, "other", kfp_run_id="kfp-other")
    run_id = start_pipeline_run(store[0], config, "to-finish", kfp_run_id=kfp_id)
    assert find_pipeline_run(store[0], EXPERIMENT, kfp_id) == run_id
    finish_pipeline_run(store[0], EXPERIMENT, kfp_id, status)
    run = client.get_run(run_id)
    assert run.info.status == status
    assert run.info.end_time is not None
    assert client.get_run(other).info.status == "RUNNING"


def test_finish_pipeline_run_without_a_run_does_not_raise(store, client, parent):
    assert find_pipeline_run(store[0], EXPERIMENT, "kfp-never-started") is None
    finish_pipeline_run(store[0], EXPERIMENT, "kfp-never-started", "FAILED")
    assert find_pipeline_run(store[0], "no-such-experiment", "kfp-parent") is None
    finish_pipeline_run(store[0], "no-such-experiment", "kfp-parent", "FAILED")
    assert client.get_run(parent).info.status == "RUNNING"


def test_training_figures_outlast_a_tracking_outage(store, client, parent, monkeypatch, caplog):
    """MLflow fails twice (past its own retries) while training logs its steps: training goes on,
    the figures wait, and every step reaches MLflow once it is back."""
    from mlflow.exceptions import MlflowException

    with stage_run(store[0], parent, "train", 3) as run:
        step_metrics, send = StepMetrics(run, every_s=0), run.client.log_batch
        outage = [MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 503 != 200")] * 2

        def flaky(*args, **kwargs):
            if outage:
                raise outage.pop()
            return send(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_batch", flaky)
        step_metrics(0, {"loss": 1.0, "grad_norm": 2.0})
        step_metrics(1, {"loss": 0.5, "grad_norm": 1.0})
        assert len(step_metrics.pending) == 2 and "could not log 2 steps' training figures" in caplog.text
        step_metrics(2, {"loss": 0.25, "grad_norm": 0.5})
        assert step_metrics.pending == [] and step_metrics.flush()
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_parent_run_records_the_topr_run_that_runs_it(store, config, client, monkeypatch):
    """``topr run`` puts who it is in its tasks' environment; the parent run keeps it as tags,
    which is how a run whose ``topr run`` was killed is found later (``topr gc``)."""
    import os
    import socket

    environment = owner_environment()
    host, pid, started = environment[OWNER_ENV].split(" ")
    assert (host, int(pid)) == (socket.gethostname(), os.getpid()) and float(started) > 0
    monkeypatch.setenv(OWNER_ENV, environment[OWNER_ENV])
    owned = client.get_run(start_pipeline_run(store[0], config, "owned")).data.tags
    assert (owned[OWNER_HOST_TAG], owned[OWNER_PID_TAG], owned[OWNER_STARTED_TAG]) == (host, pid, started)
    assert [run.info.run_id for run in owned_runs(store[0], host, int(pid), run_name="owned")] == [
        client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.mlflow.runName = 'owned'")[0].info.run_id
    ]
    monkeypatch.delenv(OWNER_ENV)
    unowned = client.get_run(start_pipeline_run(store[0], config, "unowned")).data.tags
    assert OWNER_HOST_TAG not in unowned and OWNER_PID_TAG not in unowned  # a cluster run: no topr run owns it


def test_end_pipeline_run_ends_what_still_runs_with_the_reason(store, config, client):
    parent = start_pipeline_run(store[0], config, "to-end")
    with stage_run(store[0], parent, "curate", 1) as done:
        pass
    experiment = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, STAGE_TAG: "train", ITERATION_TAG: "1"}
    running = client.create_run(experiment, run_name="iter1/train", tags=tags).info.run_id  # a stage whose process was killed

    ended = end_pipeline_run(store[0], parent, "KILLED", "SIGTERM received by topr run (pid 1)")

    assert ended == ["iter1/train", "to-end"]
    for run_id in (running, parent):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert run.data.tags[ENDED_TAG] == "SIGTERM received by topr run (pid 1)"
    finished = client.get_run(done.run_id)
    assert finished.info.status == "FINISHED" and ENDED_TAG not in finished.data.tags
    # Ending it again changes nothing: a run ends once.
    assert end_pipeline_run(store[0], parent, "FAILED", "again") == []
    assert client.get_run(parent).info.status == "KILLED"


def test_an_ended_run_resumes_as_the_same_run_under_its_new_owner(store, config, client, monkeypatch):
    """``topr run --resume``: the ended parent run becomes RUNNING again under the new pipeline
    run's id and owner, why it had ended moved to ``topr.resumed.<n>``; a retried start of that
    pipeline run continues it, and a run that is not ended, or another run's id, is refused."""
    parent = start_pipeline_run(store[0], config, "to-resume", kfp_run_id="kfp-first")
    end_pipeline_run(store[0], parent, "KILLED", "SIGTERM received by topr run (pid 1)")
    client.set_tag(parent, CHECKPOINTS_TAG, "none left")
    monkeypatch.setenv(OWNER_ENV, "host-b 4242 17.000")

    assert start_pipeline_run(store[0], config, "to-resume", kfp_run_id="kfp-second", resume_run_id=parent) == parent
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    tags = run.data.tags
    assert (tags[RESUMED_TAG], tags[f"{RESUMED_TAG}.1"]) == ("1", "after: SIGTERM received by topr run (pid 1)")
    assert (tags[KFP_RUN_TAG], tags[OWNER_HOST_TAG], tags[OWNER_PID_TAG]) == ("kfp-second", "host-b", "4242")
    assert ENDED_TAG not in tags and CHECKPOINTS_TAG not in tags
    assert start_pipeline_run(store[0], config, "to-resume", kfp_run_id="kfp-second", resume_run_id=parent) == parent  # a retried start
    with pytest.raises(ValueError, match="is RUNNING: only an ended"):
        start_pipeline_run(store[0], config, "to-resume", kfp_run_id="kfp-third", resume_run_id=parent)
    finish_pipeline_run(store[0], EXPERIMENT, "kfp-second", "FAILED")
    with pytest.raises(ValueError, match=r"\(to-resume\) is FAILED: only an ended \(KILLED or FAILED\) run named 'other'"):
        start_pipeline_run(store[0], config, "other", resume_run_id=parent)
    assert start_pipeline_run(store[0], config, "to-resume", resume_run_id=parent) == parent
    assert client.get_run(parent).data.tags[f"{RESUMED_TAG}.2"] == "after: ended FAILED"


def test_the_latest_of_a_stage_that_finished_twice_is_the_one_read(store, config, client):
    """A resumed run re-runs a stage that had finished in the instant before the signal (its
    kfp task had not yet recorded it): readers take the later run, whose outputs went on."""
    parent = start_pipeline_run(store[0], config, "finished-twice")
    for _ in range(2):
        with stage_run(store[0], parent, "evaluate", 1) as run:
            pass
    assert finished_stage_runs(store[0], parent, "evaluate") == {1: run.run_id}
