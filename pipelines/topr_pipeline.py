"""The TOPR loop as one Kubeflow Pipelines DAG, compiled from the loop's description (``topr.workflow``).

    start_run ─▶ start phase: prepare_model, prompts ─▶ evaluate(model_0)
                 iteration 1: sample ×shards ▶ collect ▶ verify ▶ curate ▶ train ▶ evaluate ─▶ model_1
                 iteration 2: the same, from model_1                                        ─▶ model_2
                 …
                 finish phase: gate(model_N) ─▶ if "promote": promote ▶ serve;  verifier_data ▶ train_verifier ▶ evaluate_verifier
    finish_run (exit handler: closes the MLflow run as FINISHED or FAILED)

Every stage of the description becomes a task of its component (``components/<name>/``), which
``component`` finds by the stage's name; ``topr.inprocess`` runs the same description in one
process. KFP v2 has no loops over a run-time count, so ``build_pipeline(config)`` unrolls the
``run.iterations`` iterations at compile time, each a nested pipeline (``iteration-<i>``) taking
the previous iteration's Model, and fans a sharded stage out over its shards' pods
(``dsl.ParallelFor``, read back with ``dsl.Collected``). Stages a config disables
(``enabled_by``) are left out at compile time; a stage that ``runs_if`` an earlier stage's
value sits in a ``dsl.If``. Every task gets its ``cluster`` settings (image, resources, GPUs,
secrets, retries, timeouts), which only a cluster run uses.
"""


import contextlib
import inspect
import json
from importlib import import_module
from itertools import groupby

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from topr import workflow
from topr.config import RUN_FORM, Config, form_field, form_parameter, form_type, form_values
from topr_components.finish_run.component import finish_run
from topr_components.start_run.component import start_run
from topr_pipelines.cluster_settings import on_cluster


def component(stage: str):
    """The component of a stage: ``topr_components.<stage>.component.<stage>``."""
    return getattr(import_module(f"topr_components.{stage}.component"), stage)


def add_phase(stages, scope: dict, tracking: dict, iteration: int, config: Config) -> dict:
    """Add the phase's enabled stages as tasks, in order, each reading what earlier ones made;
    returns ``scope`` with their outputs (task output channels) by name. Consecutive stages with
    the same condition share one ``dsl.If``: a task may read another's output only inside it."""
    enabled = [stage for stage in stages if stage.enabled(config)]
    for condition, group in groupby(enabled, key=lambda stage: stage.runs_if):
        with dsl.If(scope[condition.value] == condition.equals, name=condition.title) if condition else contextlib.nullcontext():
            for stage in group:
                add_stage(stage, scope, tracking, iteration, config)
    return scope


def add_stage(stage: workflow.Stage, scope: dict, tracking: dict, iteration: int, config: Config) -> None:
    """One stage's task (one per shard in a ``dsl.ParallelFor`` for a sharded stage), with its cluster settings."""
    op = component(stage.name)
    arguments = dict(tracking)
    if "iteration" in op.component_spec.inputs:
        arguments["iteration"] = iteration
    for parameter, source in stage.inputs.items():
        name, _, key = source.partition(".")
        arguments[name if key else parameter] = scope[name]  # a metadata value: the component reads it from the artifact
    if stage.sharded_by:
        shards = workflow.config_value(config, stage.sharded_by)
        with dsl.ParallelFor(list(range(shards)), name=f"{stage.title} shards") as shard:
            task = on_cluster(op(**arguments, shard=shard, shards=shards).set_display_name(stage.title), config.cluster)
        scope.update({name: dsl.Collected(task.outputs[name]) for name in stage.outputs})
    else:
        task = on_cluster(op(**arguments).set_display_name(stage.title), config.cluster)
        scope.update({name: task.outputs[name] for name in stage.outputs})
        scope.update({value: task.outputs[output] for value, output in stage.results.items()})


def iteration_pipeline(iteration: int, config: Config):
    """The nested pipeline of one round (``topr.workflow.ITERATION``).

    Each round gets its own pipeline definition (``iteration-<i>``) so that its tasks have
    their own component names, and so their own artifact folders under kfp.local, where a
    component reused by several rounds would write every round into the same folder.
    """
    if workflow.iteration_inputs() != {"model", "train_prompts", "eval_prompts"}:
        raise ValueError(f"an iteration reads {sorted(workflow.iteration_inputs())}: give iteration_pipeline those inputs")

    @dsl.pipeline(name=f"iteration-{iteration}", description=f"Round {iteration}: sample, verify, curate, train, evaluate.")
    def one_round(
        config_json: str,
        tracking_uri: str,
        parent_run_id: str,
        model: Input[Model],
        train_prompts: Input[Dataset],
        eval_prompts: Input[Dataset],
    ) -> Model:
        tracking = {"config_json": config_json, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id}
        scope = {"model": model, "train_prompts": train_prompts, "eval_prompts": eval_prompts}
        return add_phase(workflow.ITERATION, scope, tracking, iteration, config)[workflow.TRAINED_MODEL]

    return one_round


def never_cached(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A task that opens or closes the MLflow run: it must run in every pipeline run, but its
    cache key would not tell one run from the next (the run-id placeholder is a constant until
    the task runs), so no cache may hand back another run's id."""
    return task.set_caching_options(enable_caching=False)


def unless_skipped(config: Config, skipped):
    """The loop's tasks run only when ``start_run`` found no reason to skip them
    (``run.skip_unchanged_prompts``: prompts the starting model was trained on); without that
    option, no condition."""
    if not config.run.skip_unchanged_prompts:
        return contextlib.nullcontext()
    return dsl.If(skipped == "", name="new training prompts")


def run_form(config: Config) -> list[inspect.Parameter]:
    """The run form's typed parameters (``topr.config.RUN_FORM``), each defaulting to ``config``'s value."""
    values = form_values(config)
    return [
        inspect.Parameter(form_parameter(dotted), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[form_parameter(dotted)], annotation=form_type(dotted))
        for dotted in RUN_FORM
    ]


def _form_docstring(iterations: int) -> str:
    """The pipeline's description, and each parameter's for the run form (KFP reads ``Args:``)."""
    described = {
        "config_json": "The whole configuration as JSON (topr compile's config); the typed parameters below are written over it where they differ from their defaults.",
        "tracking_uri": "MLflow tracking server, e.g. http://mlflow.topr:5000.",
        "run_name": "The MLflow run's name.",
        "resume_run_id": "An ended MLflow run to continue (topr run --resume); empty for a new run.",
        **{form_parameter(dotted): f"{dotted}: {form_field(dotted).description}" for dotted in RUN_FORM},
    }
    arguments = "\n".join(f"    {name}: {text}" for name, text in described.items())
    return f"Tapered Off-Policy REINFORCE, {iterations} iterations.\n\nArgs:\n{arguments}\n"


def build_pipeline(config: Config, pipeline_root: str | None = None):
    """The pipeline for ``config``'s iterations, shards and cluster settings. Its parameters:
    ``config_json``, ``tracking_uri``, ``run_name``, ``resume_run_id``, then the run form's typed
    ones (``run_form``), which default to ``config``'s values.

    ``pipeline_root`` (e.g. ``s3://bucket/kfp``) becomes the compiled pipeline's default root for
    Kubeflow's own artifacts; a cluster run may still override it at submission. ``resume_run_id``
    (``topr run --resume``) names an ended parent run for ``start_run`` to continue instead of
    creating one, so that every task's inputs are those of the run it resumes.
    """
    iterations, cluster = config.run.iterations, config.cluster
    rounds = [iteration_pipeline(iteration, config) for iteration in range(1, iterations + 1)]

    form = run_form(config)

    def topr(config_json: str, tracking_uri: str, run_name: str = "topr", resume_run_id: str = "", *typed) -> str:
        started = start_run(
            config_json=config_json,
            tracking_uri=tracking_uri,
            run_name=run_name,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            resume_run_id=resume_run_id,
            form_defaults=json.dumps({parameter.name: parameter.default for parameter in form}),
            skippable=config.run.skip_unchanged_prompts,
            **{parameter.name: value for parameter, value in zip(form, typed, strict=True)},
        )
        never_cached(on_cluster(started.set_display_name("start MLflow run"), cluster))
        parent_run_id, run_config = started.outputs["parent_run_id"], started.outputs["config_json"]
        closing = finish_run(config_json=config_json, tracking_uri=tracking_uri, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        never_cached(on_cluster(closing.set_display_name("finish MLflow run"), cluster))
        with dsl.ExitHandler(closing, name="topr loop"), unless_skipped(config, started.outputs["skipped"]):
            tracking = {"config_json": run_config, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id}
            scope = add_phase(workflow.START, {}, tracking, 0, config)
            scope[workflow.BASE_MODEL] = scope[workflow.MODEL]
            for iteration, one_round in enumerate(rounds, start=1):
                inputs = {name: scope[name] for name in ("model", "train_prompts", "eval_prompts")}
                scope[workflow.MODEL] = one_round(**tracking, **inputs).set_display_name(f"iteration {iteration}").output
            add_phase(workflow.FINISH, scope, tracking, iterations, config)
        return parent_run_id

    # KFP reads a pipeline's parameters from its signature: the fixed ones, then the run form's.
    fixed = list(inspect.signature(topr).parameters.values())[:4]
    topr.__signature__ = inspect.Signature([*fixed, *form], return_annotation=str)
    topr.__doc__ = _form_docstring(iterations)
    return dsl.pipeline(name="topr", pipeline_root=pipeline_root)(topr)
