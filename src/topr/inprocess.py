"""A whole run in this process: the pipeline's stages and tracking without Kubeflow's task processes.

``topr experiment`` runs every arm × replicate this way. Each stage goes through ``topr.steps``,
as a component would call it, so an arm's MLflow run has the layout of a pipeline run: a parent
run with the config, a nested run per stage and iteration (``iter1/sample`` …), datasets with
digests, per-step training figures, the registered model and its lineage. What it leaves out:
Kubeflow's task processes (about 5 s of start-up each), the promotion gate (arms are compared,
not promoted) and, when the experiment hands it in, the starting model's preparation and
evaluation, which every arm shares (greedy decoding of the same model on the same problems): the
unit then logs those figures as its iteration 0, with the shared evaluation's file as a param.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from topr import steps
from topr.config import Config
from topr.loop import IterationFiles, run_iteration


@dataclass
class TrackedStages:
    """The loop's stages (``topr.loop.Stages``) as ``topr.steps`` calls into one parent MLflow run."""

    context: steps.StageContext

    def sample(self, model_dir: str, prompts: Path, output: Path, iteration: int) -> dict:
        """One shard, then the collecting step that publishes and logs the samples, as in the pipeline."""
        shard = output.with_name(f"{output.stem}.shard0{output.suffix}")
        summary = steps.sample(self.context.at(iteration), model_dir, str(prompts), str(shard))
        steps.collect_samples(self.context.at(iteration), [str(shard)], str(output))
        return summary

    def verify(self, samples: Path, output: Path, iteration: int) -> dict:
        return steps.verify(self.context.at(iteration), str(samples), str(output))

    def curate(self, verified: Path, output: Path, report: Path, iteration: int) -> dict:
        return steps.curate(self.context.at(iteration), str(verified), str(output), str(report))

    def train(self, model_dir: str, train_set: Path, samples: Path, output: Path, iteration: int) -> dict:
        return steps.train(self.context.at(iteration), model_dir, str(train_set), str(samples), str(output))

    def evaluate(self, model_dir: str, prompts: Path, report: Path, completions: Path, iteration: int) -> dict:
        return steps.evaluate(self.context.at(iteration), model_dir, str(prompts), str(report), str(completions))


@dataclass(frozen=True)
class SharedStart:
    """What the arms of an experiment share before their first iteration: the prepared starting
    model and its evaluation on the held-out prompts (``evaluation.json`` beside
    ``evaluation_completions.jsonl``), made once instead of once per arm."""

    model_dir: str
    evaluation: Path


def run_in_process(config: Config, run_dir: str | Path, tracking_uri: str, run_name: str, shared: SharedStart | None = None) -> str:
    """Run ``config``'s iterations (and the verifier branch when enabled) here; return the parent
    MLflow run id. The run ends FAILED, and the error propagates, when a stage raises."""
    from topr.tracking import mlflow_client, start_pipeline_run

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps.check_services(tracking_uri, config.run.artifact_store)
    parent_run_id = start_pipeline_run(tracking_uri, config, run_name)
    try:
        _run_loop(steps.StageContext(config, tracking_uri, parent_run_id), run_dir, shared)
    except BaseException:
        mlflow_client(tracking_uri).set_terminated(parent_run_id, "FAILED")
        raise
    mlflow_client(tracking_uri).set_terminated(parent_run_id, "FINISHED")
    return parent_run_id


def _run_loop(context: steps.StageContext, run_dir: Path, shared: SharedStart | None) -> None:
    start = run_dir / "iter0"
    start.mkdir(exist_ok=True)
    train_prompts, eval_prompts = start / "train_prompts.jsonl", start / "eval_prompts.jsonl"
    steps.prompts(context, str(train_prompts), str(eval_prompts))
    if shared is None:
        base_model = str(start / "model")
        steps.prepare_model(context, base_model)
        steps.evaluate(context, base_model, str(eval_prompts), str(start / "evaluation.json"), str(start / "evaluation_completions.jsonl"))
    else:
        base_model = shared.model_dir
        _log_shared_evaluation(context, shared)
    stages, model_dir = TrackedStages(context), base_model
    for iteration in range(1, context.config.run.iterations + 1):
        folder = run_dir / f"iter{iteration}"
        run_iteration(stages, model_dir, train_prompts, iteration, folder, eval_prompts)
        model_dir = str(IterationFiles(folder).model)
    if context.config.verifier.enabled:
        verifier = run_dir / "verifier"
        data, trained = verifier / "data", verifier / "model"
        steps.verifier_data(context, model_dir, str(train_prompts), str(eval_prompts), str(data))
        steps.train_verifier(context, base_model, str(data), str(trained))
        steps.evaluate_verifier(context, base_model, str(trained), str(data), str(verifier / "evaluation.json"))


def _log_shared_evaluation(context: steps.StageContext, shared: SharedStart) -> None:
    """The starting model's evaluation, made once for every arm, logged as this run's iteration 0."""
    report = json.loads(shared.evaluation.read_text())
    with context.stage("evaluate") as (run, _):
        run.log_params({"model": report["model"], "evaluated_once_for_all_arms": str(shared.evaluation)})
        run.log_metrics(report["metrics"], on_parent=True)
