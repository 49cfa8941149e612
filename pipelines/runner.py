"""Run the pipeline on this machine with ``kfp.local``, or compile it to YAML for a cluster.

``topr run`` calls ``run_local``: the very DAG that a cluster would run, executed by kfp's
SubprocessRunner in processes of this Python environment (no container, no venv per task),
started warm (``warm_tasks``) unless asked otherwise; or, given an image, by kfp's DockerRunner
with every task in a container of that image, secured as a pod (``docker_runner``).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from kfp import compiler, local

from topr import console
from topr.config import Config, config_to_dict
from topr_pipelines import warm_tasks
from topr_pipelines.topr_pipeline import build_pipeline

log = logging.getLogger(__name__)


def compile_pipeline(config: Config, output_path: str | Path, pipeline_root: str | None = None) -> Path:
    """Write the pipeline for ``config`` (iterations, shards, cluster settings) as Kubeflow YAML."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(config, pipeline_root), str(output_path))
    return output_path


def run_local(
    config: Config,
    run_dir: str | Path,
    tracking_uri: str,
    run_name: str,
    verbose: bool = False,
    warm: bool = True,
    image: str | None = None,
    resume_run_id: str = "",
) -> str:
    """Execute the whole pipeline locally; return the parent MLflow run id.

    kfp.local keeps its pipeline root on local disk (``<run_dir>/pipeline_root``); stage outputs
    reach object storage through ``run.artifact_store``. Kubeflow's executor log and every
    task's output go to ``<run_dir>/run.log``; the console shows a line as each stage starts and
    ends and a bar for the long ones (``topr.console``), or, ``verbose``, everything as well.
    ``warm``: fork each task from an interpreter that has imported the libraries once
    (``warm_tasks``); else a fresh interpreter per task, as kfp.local does. ``image``: run each
    task in a container of this image instead (``docker_runner``; the config's ``cluster.image``
    must name it, as every task's image comes from there). ``resume_run_id``: continue that
    ended parent run (``topr run --resume``): kfp.local's cache under ``<run_dir>/pipeline_root``
    hands back the outputs of every task that succeeded in this run folder before, as every
    task's inputs are the same (the configuration, the parent run id, the artifacts of the tasks
    before it), and runs the rest.

    Raises RuntimeError (from kfp) when a task fails; the exit handler has then already
    closed the MLflow run as FAILED.
    """
    # The cluster settings (resources, GPUs, secrets) are in the spec but mean nothing here;
    # kfp.local warns about each for every task, which would bury the run's own log.
    warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
    pipeline_root = Path(run_dir).resolve() / "pipeline_root"
    with failure_shown(log_path(run_dir)), console.capture(log_path(run_dir), verbose), print_restored(), _tasks(warm, image, tracking_uri, pipeline_root) as (runner, task_tracking_uri):
        local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True, enable_caching=True)
        pipeline = local_pipeline(config)
        config_json = json.dumps(config_to_dict(config))  # the same string as before for a resumed run: every cache key holds it
        task = pipeline(config_json=config_json, tracking_uri=task_tracking_uri, run_name=run_name, resume_run_id=resume_run_id)
    return task.output


def local_pipeline(config: Config):
    """The pipeline as ``run_local`` runs it: that of ``config`` without the cluster's retries,
    and with every stage's outputs cached, for ``topr run --resume``: a cache entry's key holds
    the parent run's id, so only a resume of the same run can find it.

    kfp.local (kfp 2.17, ``kfp.local.orchestrator.task_executor.execute_single_task``) honours a
    task's retry policy as a cluster does: it runs a failed task again after the backoff (60 s,
    then 120 s, ...: 1 to 7 minutes), whatever made it fail. Neither can tell a failure certain to
    repeat (a bad record, a prompt longer than the context, a refused promotion) from a transient
    one: KFP's retry policy has no condition on the error or exit code. Here the transient faults
    the cluster retries for (a lost node, an evicted pod) do not happen, boto3 and MLflow retry
    their own requests, and a train stage without an artifact store has no checkpoint to resume
    from: a local task runs once, and its first failure ends the run.
    """
    local_config = config.model_copy(deep=True)
    local_config.cluster.caching = True
    for stage in local_config.cluster.stages.values():
        stage.retries = 0
    return build_pipeline(local_config)


@contextlib.contextmanager
def _tasks(warm: bool, image: str | None, tracking_uri: str, pipeline_root: Path):
    """kfp.local's runner for the tasks, and the tracking URI as the tasks reach it."""
    if image:
        from topr_pipelines.docker_runner import docker_runner

        with docker_runner(image, tracking_uri, pipeline_root) as containers:
            yield containers.runner, containers.tracking_uri
        return
    with warm_tasks.started() if warm else contextlib.nullcontext():
        yield local.SubprocessRunner(use_venv=False), tracking_uri


class Interrupted(BaseException):
    """A signal that stopped ``topr run`` (raised by ``interruptible``). Not an Exception, so that
    nothing between the signal and ``topr run`` (kfp.local) takes it for a failed task."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"{self.name} received")


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), grace_s: float = 5.0) -> Iterator[None]:
    """Within the block, each of ``signals`` stops the tasks the block started, then raises
    Interrupted in the main thread; a second signal ends the process at once, as by default.

    The tasks are every process this one started since the block began, their children
    included (warm tasks are the forkserver's children, a training's workers the task's): all
    are sent SIGTERM as the signal comes, before anything unwinds (the forkserver's children
    would be lost from the tree once it stops), then whatever starts while kfp.local winds down,
    and as the block ends the run waits for them all to end, SIGKILL after ``grace_s``. Only then
    may the run's MLflow runs be ended: no task is left to write to them. Outside the main
    thread (where no signal handler can be set) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import psutil

    earlier = {child.pid for child in psutil.Process().children(recursive=True)}
    stopping = threading.Event()

    def stop(signum, frame):
        for each in signals:
            signal.signal(each, signal.SIG_DFL)
        _terminate(_processes_since(earlier))
        stopping.set()
        threading.Thread(target=_keep_stopping, args=(earlier, stopping), name="stop-tasks", daemon=True).start()
        raise Interrupted(signum)

    previous = {each: signal.signal(each, stop) for each in signals}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)
        if stopping.is_set():
            _wait_for_tasks(earlier, grace_s)
            stopping.clear()


def _processes_since(earlier: set[int]) -> list:
    """The processes this one started (children's children too) but those in ``earlier``, still
    running; but multiprocessing's resource tracker, which ignores SIGTERM, writes to no run, and
    ends by itself with this process."""
    import psutil

    tasks = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid in earlier or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if not any("multiprocessing.resource_tracker" in part for part in process.cmdline()):
                tasks.append(process)
        except psutil.NoSuchProcess:
            pass
    return tasks


def _terminate(processes: list, kill: bool = False) -> None:
    import psutil

    for process in processes:
        try:
            process.kill() if kill else process.terminate()
        except psutil.NoSuchProcess:
            pass


def _keep_stopping(earlier: set[int], stopping: threading.Event) -> None:
    """While the run winds down after a signal, stop each task that still starts."""
    while stopping.is_set():
        _terminate(_processes_since(earlier))
        time.sleep(0.1)


def _wait_for_tasks(earlier: set[int], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while (left := _processes_since(earlier)) and time.monotonic() < deadline:
        _terminate(left)
        time.sleep(0.1)
    if left:
        log.warning("killing %d task process(es) that did not end %.0f s after SIGTERM", len(left), grace_s)
        _terminate(left, kill=True)


def log_path(run_dir: str | Path) -> Path:
    """Where ``run_local`` writes the run's whole log."""
    return Path(run_dir) / "run.log"


FAILED_TASK = re.compile(r"Task '(?P<task>.+?)' finished with status FAILURE")
"""kfp.local's executor log line for a task that failed (its colour codes taken out)."""

COLOURS = re.compile(r"\x1b\[[0-9;]*m")
TASK_INDENT = " " * 4
"""kfp.local streams a task's output indented by four spaces (``logging_utils.indented_print``)."""


@contextlib.contextmanager
def failure_shown(log: Path, count: int = 10):
    """When the run fails, show on the console which task failed and the last ``count`` lines of
    its output (its traceback's end, its error), before the error goes on: kfp's own message
    names the task only ("Inner task failed: 'curate'"), and its output is in ``log`` alone."""
    try:
        yield
    except RuntimeError:
        failure = failed_task_output(log, count)
        if failure is not None:
            task, lines = failure
            sys.stderr.write(f"stage '{task}' failed; the last lines of its output:\n" + "".join(f"{TASK_INDENT}{line}\n" for line in lines))
            sys.stderr.flush()
        raise


def failed_task_output(log: Path, count: int = 10) -> tuple[str, list[str]] | None:
    """The last task that ``log`` says failed and the last ``count`` lines of what it printed since
    kfp.local started it (blank lines and console events left out); None if no task failed."""
    try:
        lines = COLOURS.sub("", Path(log).read_text(encoding="utf-8", errors="replace")).splitlines()
    except OSError:
        return None
    end = next((index for index in range(len(lines) - 1, -1, -1) if FAILED_TASK.search(lines[index])), None)
    if end is None:
        return None
    task = FAILED_TASK.search(lines[end])["task"]
    start = next((index for index in range(end - 1, -1, -1) if f"Executing task '{task}'" in lines[index]), -1)
    output = [
        line.removeprefix(TASK_INDENT)
        for line in lines[start + 1 : end]
        if line.startswith(TASK_INDENT) and line.strip() and not line.strip().startswith(console.EVENT_PREFIX)
    ]
    return (task, output[-count:]) if output else None


@contextlib.contextmanager
def print_restored():
    """Give the interpreter its own ``print`` back when the block ends.

    kfp.local indents each task's streamed log by swapping ``builtins.print`` for the task's
    duration. Sample shards (``dsl.ParallelFor``) run in threads, so their swaps interleave and
    an indenting ``print`` can outlive the run: every later print of the process (the CLI's
    tables, the next run's log) would start with stray spaces.
    """
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original
