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
import warnings
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
) -> str:
    """Execute the whole pipeline locally; return the parent MLflow run id.

    kfp.local keeps its pipeline root on local disk (``<run_dir>/pipeline_root``); stage outputs
    reach object storage through ``run.artifact_store``. Kubeflow's executor log and every
    task's output go to ``<run_dir>/run.log``; the console shows a line as each stage starts and
    ends and a bar for the long ones (``topr.console``), or, ``verbose``, everything as well.
    ``warm``: fork each task from an interpreter that has imported the libraries once
    (``warm_tasks``); else a fresh interpreter per task, as kfp.local does. ``image``: run each
    task in a container of this image instead (``docker_runner``; the config's ``cluster.image``
    must name it, as every task's image comes from there).

    Raises RuntimeError (from kfp) when a task fails; the exit handler has then already
    closed the MLflow run as FAILED.
    """
    # The cluster settings (resources, GPUs, secrets) are in the spec but mean nothing here;
    # kfp.local warns about each for every task, which would bury the run's own log.
    warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner")
    pipeline_root = Path(run_dir).resolve() / "pipeline_root"
    with console.capture(log_path(run_dir), verbose), print_restored(), _tasks(warm, image, tracking_uri, pipeline_root) as (runner, task_tracking_uri):
        local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        pipeline = build_pipeline(config)
        task = pipeline(config_json=json.dumps(config_to_dict(config)), tracking_uri=task_tracking_uri, run_name=run_name)
    return task.output


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


def log_path(run_dir: str | Path) -> Path:
    """Where ``run_local`` writes the run's whole log."""
    return Path(run_dir) / "run.log"


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
