"""A whole run in this process: the pipeline's stages and tracking without Kubeflow's task processes.

``run_in_process`` runs the loop's description (``topr.workflow``) stage by stage, each through
its step (``topr.steps.<name>``) as its component would call it, so the run's MLflow layout is a
pipeline run's: a parent run with the config, a nested run per stage and iteration
(``iter1/sample`` …), datasets with digests, per-step training figures, the registered models
and their lineage. Every stage writes into its phase's folder under the run's folder (``iter0``
for the start, ``iter<i>``, ``finish``), under the file names the description gives.

``topr experiment`` runs every arm × replicate this way, with the gate off (``gate.enabled``:
arms are compared, not promoted). What it may hand in (``SharedStart``): the starting model and
its evaluation, which every arm shares (greedy decoding of the same model on the same
problems); the unit then logs those figures as its iteration 0, with the shared evaluation's
file as a param, in place of running ``prepare_model`` and the first ``evaluate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from topr import steps, workflow
from topr.config import Config


@dataclass(frozen=True)
class SharedStart:
    """What the arms of an experiment share before their first iteration: the prepared starting
    model and its evaluation on the held-out prompts (``evaluation.json`` beside
    ``evaluation_completions.jsonl``), made once instead of once per arm."""

    model_dir: str
    evaluation: Path


@dataclass
class LocalArtifact:
    """An artifact of an in-process run: its file or folder, and what its stage returned (a
    pipeline task's artifact carries the same in its metadata)."""

    path: str
    metadata: dict = field(default_factory=dict)


Scope = dict[str, object]
"""The artifacts (``LocalArtifact``, or a list of them for a sharded stage's) and returned values
made so far, by name."""

Substitute = Callable[[steps.StageContext], Scope]
"""Stands in for a stage (by its title) and returns what it would have put in scope."""


def run_in_process(config: Config, run_dir: str | Path, tracking_uri: str, run_name: str, shared: SharedStart | None = None) -> str:
    """Run ``config``'s whole loop here; return the parent MLflow run id. The run ends FAILED,
    and the error propagates, when a stage raises."""
    from topr.tracking import mlflow_client, start_pipeline_run

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps.check_services(tracking_uri, config.run.artifact_store)
    reason, start_version = steps.skip_reason(config, tracking_uri)
    parent_run_id = start_pipeline_run(tracking_uri, config, run_name)
    steps.mark_start(tracking_uri, parent_run_id, reason, start_version)
    try:
        if not reason:
            run_workflow(steps.StageContext(config, tracking_uri, parent_run_id), run_dir, _shared_start(shared) if shared else {})
    except BaseException:
        mlflow_client(tracking_uri).set_terminated(parent_run_id, "FAILED")
        raise
    mlflow_client(tracking_uri).set_terminated(parent_run_id, "FINISHED")
    return parent_run_id


def run_workflow(context: steps.StageContext, run_dir: Path, substitutes: Mapping[str, Substitute] = {}) -> Scope:
    """The description's phases in order: start, ``run.iterations`` iterations, finish."""
    iterations = context.config.run.iterations
    scope = run_phase(workflow.START, context.at(0), run_dir / "iter0", {}, substitutes)
    scope[workflow.BASE_MODEL] = scope[workflow.MODEL]
    for iteration in range(1, iterations + 1):
        made = run_phase(workflow.ITERATION, context.at(iteration), run_dir / f"iter{iteration}", dict(scope), substitutes)
        scope[workflow.MODEL] = made[workflow.TRAINED_MODEL]
    return run_phase(workflow.FINISH, context.at(iterations), run_dir / "finish", scope, substitutes)


def run_phase(stages, context: steps.StageContext, folder: Path, scope: Scope, substitutes: Mapping[str, Substitute]) -> Scope:
    """Run each enabled stage whose condition holds, in order, adding what it makes to ``scope``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if not stage.enabled(context.config) or (stage.runs_if and scope[stage.runs_if.value] != stage.runs_if.equals):
            continue
        if stage.title in substitutes:
            scope.update(substitutes[stage.title](context))
        elif stage.sharded_by:
            shards = workflow.config_value(context.config, stage.sharded_by)
            made = [run_stage(stage, context, folder, scope, shard, shards) for shard in range(shards)]
            scope.update({name: [artifacts[name] for artifacts in made] for name in stage.outputs})
        else:
            scope.update(run_stage(stage, context, folder, scope))
    return scope


def run_stage(stage: workflow.Stage, context: steps.StageContext, folder: Path, scope: Scope, shard: int | None = None, shards: int = 1) -> Scope:
    """One stage's step on the artifacts it reads; what it wrote and returned, by name."""
    paths = {name: folder / file for name, file in stage.outputs.items()}
    if shard is not None:
        paths = {name: path.with_name(f"{path.stem}.shard{shard}{path.suffix}") for name, path in paths.items()}
    arguments = {parameter: _read(scope, source) for parameter, source in stage.inputs.items()}
    arguments.update({name: str(path) for name, path in paths.items()})
    if shard is not None:
        arguments.update(shard=shard, shards=shards)
    returned = getattr(steps, stage.name)(context, **arguments)
    if stage.returns:
        return dict(zip(stage.results, returned if isinstance(returned, tuple) else (returned,), strict=True))
    return {name: LocalArtifact(str(path), dict(returned or {})) for name, path in paths.items()}


def _read(scope: Scope, source: str):
    """A path, a list of paths (a sharded stage's), or ``artifact.key``'s metadata value as text."""
    name, _, key = source.partition(".")
    value = scope[name]
    if key:
        return str(value.metadata[key])
    if isinstance(value, list):
        return [artifact.path for artifact in value]
    return value.path if isinstance(value, LocalArtifact) else value


def _shared_start(shared: SharedStart) -> dict[str, Substitute]:
    """An experiment's shared start in place of preparing and evaluating the starting model."""
    return {
        "prepare model": lambda context: {workflow.MODEL: LocalArtifact(shared.model_dir)},
        "evaluate starting model": lambda context: _log_shared_evaluation(context, shared),
    }


def _log_shared_evaluation(context: steps.StageContext, shared: SharedStart) -> Scope:
    """The starting model's evaluation, made once for every arm, logged as this run's iteration 0."""
    report = json.loads(shared.evaluation.read_text())
    with context.stage("evaluate") as (run, _):
        run.log_params({"model": report["model"], "evaluated_once_for_all_arms": str(shared.evaluation)})
        run.log_metrics(report["metrics"], on_parent=True)
    return {}
