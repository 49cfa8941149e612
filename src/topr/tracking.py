"""MLflow tracking: one parent run per ``topr run``, a nested run per stage and iteration.

The parent run is created by the pipeline's first task and its id is handed to every later
task, so the same layout appears whether the pipeline runs locally or on a cluster. Per-iteration
figures (held-out accuracy, dataset composition) are also logged on the parent run with
``step = iteration``, which is what the end-of-run table and MLflow's charts read.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import topr
from topr.config import Config, config_to_dict, config_to_yaml
from topr.storage import file_sha256, is_s3

log = logging.getLogger(__name__)

STAGE_TAG, ITERATION_TAG = "topr.stage", "topr.iteration"
EVALUATION_ARTIFACT = "evaluation.json"
"""What an evaluate stage run logs: its metrics and each held-out problem's greedy correctness."""
KFP_RUN_TAG = "kfp.pipeline_run_id"
OWNER_ENV = "TOPR_RUN_OWNER"
"""Who runs the pipeline, in the environment ``topr run`` gives its tasks: "<host> <pid> <start
time>" of that ``topr run`` process (``owner_environment``), which the parent run records as
the owner tags (a cluster run has none)."""
OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_STARTED_TAG = "topr.owner.host", "topr.owner.pid", "topr.owner.started"
ENDED_TAG = "topr.ended"
"""Why a run was ended by something other than its own code: a signal, an error of ``topr run``,
or its ``topr run`` found gone (``end_pipeline_run``, ``topr.gc``)."""
CHECKPOINTS_TAG = "topr.checkpoints"
"""Set by ``topr.gc`` on an ended run once no training checkpoint of it is left."""
FILES_REMOVED_TAG = "topr.files_removed"
"""Set by ``topr.retention`` on a registered version before its files are removed: when and by what."""
RESUMED_TAG = "topr.resumed"
TRAIN_PROMPTS_TAG = "topr.train_prompts_sha256"
"""On a parent run, and on every model version it trained: its training prompts' digest."""
SKIPPED_TAG = "topr.skipped"
"""On a parent run that trained nothing, why (``topr.steps.skip_reason``)."""
START_VERSION_TAG = "topr.start_version"
"""On a parent run that starts from a registered model and may skip its loop: that version, "name/N"."""
"""How many times ``topr run --resume`` continued a parent run; ``topr.resumed.<n>`` says why
it had ended before the n-th."""


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """A local sqlite store shared by all runs under ``output_dir`` (no server needed)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class TrackingError(RuntimeError):
    """A tracking server that cannot be reached."""


def http_ok(url: str, timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_tracking_server(tracking_uri: str) -> None:
    """For an ``http(s)://`` tracking URI, fail at once (not after MLflow's minutes of retries) if
    the server does not answer its health check."""
    if tracking_uri.startswith(("http://", "https://")) and not http_ok(f"{tracking_uri.rstrip('/')}/health"):
        raise TrackingError(f"the MLflow tracking server at {tracking_uri} is not reachable (GET /health failed)")


def mlflow_client(tracking_uri: str):
    # A bar per artifact read back (reports, lineage) would only clutter topr's console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri)


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of the MLflow experiment ``name``, created (artifacts beside a local store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # Keep a local store's artifacts beside its database, not in the working directory.
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


IMAGE_TAGS = {"TOPR_IMAGE_REF": "topr.image", "TOPR_IMAGE_DIGEST": "topr.image.digest", "TOPR_REVISION": "topr.image.revision"}
"""What a container of topr's image knows of it (set by the Dockerfile and ``topr run --runner
docker``), and the run tag each becomes."""


def code_version() -> dict[str, str]:
    """The package version and, when the source is a git checkout, its commit; in a container of
    topr's image, the image (tag, digest where known, and the commit it was built from)."""
    version = {"topr.version": topr.__version__}
    version.update({tag: os.environ[name] for name, tag in IMAGE_TAGS.items() if os.environ.get(name)})
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(topr.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        version["topr.git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def start_pipeline_run(tracking_uri: str, config: Config, run_name: str, kfp_run_id: str = "", resume_run_id: str = "") -> str:
    """Create the parent run (left RUNNING until ``finish_pipeline_run``), or continue the ended
    run ``resume_run_id`` (``resume_pipeline_run``); return its id.

    A retried start of the same Kubeflow run (``kfp_run_id``) continues the run its first
    attempt created or resumed, so a pipeline run never has two parent runs.
    """
    client = mlflow_client(tracking_uri)
    run_id = find_pipeline_run(tracking_uri, config.run.experiment, kfp_run_id) if kfp_run_id else None
    if run_id is None and resume_run_id:
        run_id = resume_pipeline_run(client, resume_run_id, run_name, kfp_run_id)
    elif run_id is None:
        tags = {**code_version(), **owner_tags(), "mlflow.runName": run_name, **({KFP_RUN_TAG: kfp_run_id} if kfp_run_id else {})}
        run_id = client.create_run(experiment_id(client, config.run.experiment, tracking_uri), run_name=run_name, tags=tags).info.run_id
    else:
        log.info("MLflow run %s already belongs to Kubeflow run %s: continuing it", run_id, kfp_run_id)
    params = flatten(config_to_dict(config))
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in params.items()])
    client.log_text(run_id, config_to_yaml(config), "config.yaml")
    log.info("MLflow run %s in experiment %s (%s)", run_id, config.run.experiment, tracking_uri)
    return run_id


def resume_pipeline_run(client, run_id: str, run_name: str, kfp_run_id: str = "") -> str:
    """Make the ended parent run ``run_id`` (KILLED or FAILED, named ``run_name``) RUNNING again
    for the pipeline run that resumes it: tagged with that run's Kubeflow id and owner (so that
    ``finish_pipeline_run`` and ``topr gc`` find it), its ``topr.ended`` reason moved to
    ``topr.resumed.<n>``; returns its id."""
    run = client.get_run(run_id)
    if run.info.run_name != run_name or run.info.status not in ("KILLED", "FAILED"):
        raise ValueError(
            f"MLflow run {run_id} ({run.info.run_name}) is {run.info.status}: only an ended (KILLED or FAILED) run named {run_name!r} can be resumed"
        )
    resumed = int(run.data.tags.get(RESUMED_TAG, "0")) + 1
    why = run.data.tags.get(ENDED_TAG, f"ended {run.info.status}")
    tags = {RESUMED_TAG: str(resumed), f"{RESUMED_TAG}.{resumed}": f"after: {why}"[:5000], **owner_tags()}
    if kfp_run_id:
        tags[KFP_RUN_TAG] = kfp_run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for stale in (ENDED_TAG, CHECKPOINTS_TAG, SKIPPED_TAG):
        if stale in run.data.tags:
            client.delete_tag(run_id, stale)
    client.update_run(run_id, status="RUNNING")
    log.info("MLflow run %s resumed (%d): %s", run_id, resumed, why)
    return run_id


def owner_environment() -> dict[str, str]:
    """What ``topr run`` puts in its tasks' environment to say who runs them (``OWNER_ENV``): its
    host, pid and start time (seconds since the epoch, which tells it from a later process given
    the same pid)."""
    import psutil

    return {OWNER_ENV: f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.3f}"}


def owner_tags(owner: str | None = None) -> dict[str, str]:
    """The owner tags of a parent run started under ``topr run`` (from ``OWNER_ENV``, or the
    ``owner`` given in its form); none else."""
    owner = (os.environ.get(OWNER_ENV, "") if owner is None else owner).split()
    if len(owner) not in (2, 3):
        return {}
    return dict(zip((OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_STARTED_TAG), owner))


def owned_runs(
    tracking_uri: str, host: str, pid: int | None = None, run_name: str | None = None, status: str | None = "RUNNING", tagged: str | None = None
) -> list:
    """The parent runs, in every experiment of the tracking server, that a ``topr run`` on ``host``
    started; only those of ``pid``, named ``run_name``, with ``status`` and having the tag
    ``tagged``, for each of these given."""
    client = mlflow_client(tracking_uri)
    clauses = [f"tags.`{OWNER_HOST_TAG}` = '{host}'"]
    if pid is not None:
        clauses.append(f"tags.`{OWNER_PID_TAG}` = '{pid}'")
    if status:
        clauses.append(f"attributes.status = '{status}'")
    if tagged:
        clauses.append(f"tags.`{tagged}` LIKE '%'")
    experiments, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiments += [experiment.experiment_id for experiment in page]
        token = page.token
        if not token:
            break
    runs = []
    for first in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[first : first + 100], " and ".join(clauses), max_results=1000, page_token=token)
            runs += [run for run in page if run_name is None or run.info.run_name == run_name]
            token = page.token
            if not token:
                break
    return runs


def end_pipeline_run(tracking_uri: str, run_id: str, status: str, reason: str) -> list[str]:
    """End a parent run that its pipeline will not end: each of its stage runs still RUNNING, then
    itself if it still runs, as ``status`` (KILLED, FAILED), each tagged ``ENDED_TAG`` with
    ``reason``. Returns the names of the runs ended, the stage runs first."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(run_id)
    stages = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'", max_results=1000
    )
    ended = []
    for run in [*stages, parent]:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, ENDED_TAG, reason[:5000])
            client.set_terminated(run.info.run_id, status)
            ended.append(run.info.run_name)
    return ended


def find_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str) -> str | None:
    """The parent run tagged with this Kubeflow run id, or None if it was never created."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def finish_pipeline_run(tracking_uri: str, experiment: str, kfp_run_id: str, status: str) -> str | None:
    """Close the parent run of a pipeline run and return its id; a run that was never started is
    only logged (None)."""
    run_id = find_pipeline_run(tracking_uri, experiment, kfp_run_id)
    if run_id is None:
        log.warning("no MLflow run tagged %s=%s to close", KFP_RUN_TAG, kfp_run_id)
        return None
    mlflow_client(tracking_uri).set_terminated(run_id, status)
    log.info("MLflow run %s closed as %s", run_id, status)
    return run_id


def local_artifact_root(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when MLflow keeps them on this machine's disk (a local
    store, or a server without ``--serve-artifacts`` writing to a shared path), else None."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def link_tree(source: Path, target: Path) -> None:
    """``source``'s files under ``target`` as hard links, one stored copy for both (a 135M-parameter
    model is 540 MB, logged once per trained model); copied where a link cannot be made (another
    file system). Safe because nothing rewrites a file in place: every artifact is written to a
    new file and renamed (``topr.records``, ``topr.models``)."""
    import shutil

    if not source.is_dir():
        raise FileNotFoundError(f"no folder to log: {source}")
    for folder, _, files in os.walk(source, followlinks=True):
        for name in files:
            file = Path(folder, name)
            destination = target / file.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, destination, follow_symlinks=True)
            except OSError:
                shutil.copy2(file, destination)


class StageRun:
    """A nested run for one stage of one iteration; thin over ``MlflowClient``."""

    def __init__(self, client, run_id: str, parent_run_id: str, iteration: int):
        self.client, self.run_id = client, run_id
        self.parent_run_id, self.iteration = parent_run_id, iteration
        self.logged: dict[str, Any] = {}  # the metrics (step 0) and params logged, for the console

    def log_metrics(self, metrics: dict[str, float], step: int = 0, on_parent: bool = False) -> None:
        """Log numeric metrics here (and on the parent run at ``step = iteration`` if asked)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numeric = _numeric(metrics)
        if step == 0:
            self.logged.update(numeric)
        entries = [Metric(key, value, now, step) for key, value in numeric.items()]
        self.client.log_batch(self.run_id, metrics=entries)
        if on_parent:
            parent = [Metric(key, value, now, self.iteration) for key, value in numeric.items()]
            self.client.log_batch(self.parent_run_id, metrics=parent)

    def log_steps(self, steps: list[tuple[int, int, dict[str, float]]]) -> None:
        """Log several steps' figures in one request: ``(step, time in ms, figures)`` each."""
        from mlflow.entities import Metric

        entries = [Metric(key, value, timestamp, step) for step, timestamp, figures in steps for key, value in figures.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.logged.update(params)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_dataset(self, path: str | os.PathLike, name: str, context: str, source: str | None = None) -> str:
        """Log a record file as a dataset input with its SHA-256 digest; return the digest.

        ``source`` is where the file is kept (an ``s3://`` URI once published); default: ``path``.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        digest = file_sha256(path)
        dataset = MetaDataset(resolve_dataset_source(source or str(Path(path).resolve())), name=name, digest=digest[:16])
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
        return digest

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str) -> None:
        """Log a folder's files under ``artifact_path``, whole or not at all: a failure partway (a
        full disk, a lost server) deletes what was logged of it before the error goes on, so no
        half-copied model is left on the run for anyone to register or download. A process killed
        partway leaves its part on a run that ends KILLED, which nothing registers."""
        try:
            local_root = local_artifact_root(self.client.get_run(self.run_id).info.artifact_uri)
            if local_root is None:
                self.client.log_artifacts(self.run_id, str(directory), artifact_path)
            else:
                link_tree(Path(directory), local_root / artifact_path)
        except BaseException:
            self._delete_artifacts(artifact_path)
            raise

    def _delete_artifacts(self, artifact_path: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri).delete_artifacts(artifact_path)
        except Exception as error:  # noqa: BLE001 - the logging error goes on; this one is only reported
            log.warning("could not delete the partly logged artifacts %s of run %s: %s", artifact_path, self.run_id, error)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def tag_parent(self, key: str, value: str) -> None:
        """Tag the pipeline's run, for the stages after this one (``parent_tags``)."""
        self.client.set_tag(self.parent_run_id, key, value)

    def parent_tags(self) -> dict[str, str]:
        return self.client.get_run(self.parent_run_id).data.tags

    def register_model(self, name: str, source: str, tags: dict[str, str]) -> str:
        """Register ``source`` as a new version of ``name``; return the version. ``source`` is a
        published copy (an ``s3://`` URI), registered where it is rather than uploaded again
        through MLflow, or an artifact path of this run."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if not is_s3(source):
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{source}"
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=tags)
        log.info("registered %s version %s (%s)", name, version.version, source)
        return version.version


class StepMetrics:
    """Training's per-step figures, logged best-effort: kept in memory and sent in one batch every
    ``every_s`` seconds and at ``flush``. A tracking server that is down for a while (past
    MLflow's own retries) costs a warning, not the training run: what could not be sent is kept
    and sent with the next batch. Each failed send still waits out those retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``) before training goes on."""

    BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, run: StageRun, every_s: float = 30.0):
        self.run, self.every_s = run, every_s
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # (step, time in ms, figures)
        self.sent_at = time.monotonic()

    def __call__(self, step: int, stats: dict[str, float]) -> None:
        self.pending.append((step, int(time.time() * 1000), _numeric(stats)))
        if time.monotonic() - self.sent_at >= self.every_s:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; False (with a warning) if the server could not take it."""
        from mlflow.exceptions import MlflowException

        self.sent_at = time.monotonic()
        while self.pending:
            count, size = 0, 0
            while count < len(self.pending) and (count == 0 or size + len(self.pending[count][2]) <= self.BATCH):
                size += len(self.pending[count][2])
                count += 1
            try:
                self.run.log_steps(self.pending[:count])
            except (MlflowException, OSError) as error:
                log.warning("could not log %d steps' training figures to MLflow, keeping them for the next try: %s", len(self.pending), error)
                return False
            del self.pending[:count]
        return True


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextmanager
def stage_run(tracking_uri: str, parent_run_id: str, stage: str, iteration: int, part: str = "") -> Iterator[StageRun]:
    """Open a nested run named ``iter<i>/<stage>`` (``iter<i>/<stage>/<part>`` for one part of a
    sharded stage); it ends FAILED if the block raises."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    tags = {
        "mlflow.parentRunId": parent_run_id,
        STAGE_TAG: stage,
        ITERATION_TAG: str(iteration),
        **code_version(),
    }
    run = client.create_run(parent.info.experiment_id, run_name="/".join(filter(None, (f"iter{iteration}", stage, part))), tags=tags)
    try:
        yield StageRun(client, run.info.run_id, parent_run_id, iteration)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def metric_history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    """``{step: value}`` of a parent-run metric (the latest value for each step)."""
    return {m.step: m.value for m in sorted(mlflow_client(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def finished_stage_runs(tracking_uri: str, parent_run_id: str, stage: str) -> dict[int, str]:
    """The ids of ``stage``'s finished nested runs under ``parent_run_id``, by iteration: the
    latest where a stage finished twice (a resumed run re-runs a stage that finished in the
    instant before the signal, and its later tasks read the second's outputs)."""
    client = mlflow_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    return {int(run.data.tags[ITERATION_TAG]): run.info.run_id for run in runs}


def load_json_artifact(tracking_uri: str, run_id: str, name: str) -> dict | None:
    """A run's JSON artifact ``name``, or None when the run has none."""
    import json
    import tempfile

    client = mlflow_client(tracking_uri)
    if name not in {entry.path for entry in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(run_id, name, folder)).read_text())


def log_run_artifact(tracking_uri: str, run_id: str, path: str | os.PathLike) -> None:
    mlflow_client(tracking_uri).log_artifact(run_id, str(path))
