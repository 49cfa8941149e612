"""The pipeline's steps: each library stage wrapped with its MLflow tracking.

One function per Kubeflow component. A component only passes its artifact paths here and
copies the returned metrics into its Metrics artifact, so everything a step does — the stage,
the datasets and models it logs, the figures it reports — is visible to library tests.
"""

from __future__ import annotations

import json
import logging
from topr.config import Config, build_config
from topr.tracking import finish_pipeline_run, stage_run, start_pipeline_run

log = logging.getLogger(__name__)


def parse_config(config_json: str) -> Config:
    return build_config(json.loads(config_json), source="pipeline parameter config_json")


def start(config_json: str, tracking_uri: str, run_name: str, kfp_run_id: str = "") -> str:
    """Create the parent MLflow run; its id is handed to every later step."""
    return start_pipeline_run(tracking_uri, parse_config(config_json), run_name, kfp_run_id)


def finish(config_json: str, tracking_uri: str, kfp_run_id: str, failed: bool) -> None:
    """Close the MLflow run of a pipeline run (found by its Kubeflow run id)."""
    experiment = parse_config(config_json).run.experiment
    finish_pipeline_run(tracking_uri, experiment, kfp_run_id, "FAILED" if failed else "FINISHED")


def prepare_model(config_json: str, tracking_uri: str, parent_run_id: str, model_dir: str) -> dict:
    from topr.models import prepare_base_model

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "prepare_model", 0) as run:
        digest = prepare_base_model(config.model.path, model_dir)
        run.log_params({"source": config.model.path, "weights_sha256": digest})
    return {"weights_sha256": digest}


def prompts(config_json: str, tracking_uri: str, parent_run_id: str, train_path: str, eval_path: str) -> dict:
    from topr.prompts import run_prompts

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "prompts", 0) as run:
        counts = run_prompts(config, train_path, eval_path)
        run.log_dataset(train_path, "train_prompts", "training")
        run.log_dataset(eval_path, "eval_prompts", "evaluation")
        run.log_metrics(counts)
    return counts


def sample(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, model_dir: str, prompts_path: str, output_path: str) -> dict:
    from topr.sample import run_sample

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "sample", iteration) as run:
        run.log_params(config.sample.model_dump())
        summary = run_sample(config, model_dir, prompts_path, output_path, iteration)
        run.log_dataset(output_path, f"samples_iter{iteration}", "sampling")
        run.log_metrics(summary)
    return summary


def verify(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, input_path: str, output_path: str) -> dict:
    from topr.verify import run_verify

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "verify", iteration) as run:
        summary = run_verify(config.task, input_path, output_path)
        run.log_dataset(output_path, f"verified_iter{iteration}", "verification")
        run.log_metrics(summary)
        run.log_metrics({"sample_accuracy": summary["accuracy"]}, on_parent=True)
    return summary


def curate(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, input_path: str, output_path: str, report_path: str) -> dict:
    from topr.curate import run_curate

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "curate", iteration) as run:
        run.log_params(config.curate.model_dump())
        report = run_curate(config, input_path, output_path, report_path)
        run.log_dataset(output_path, f"train_set_iter{iteration}", "training")
        run.log_artifact(report_path)
        composition = {f"curated_{key}": report[key] for key in ("count", "positives", "negatives")}
        composition.update(positive_fraction=report["positive_fraction"], effective_positive_fraction=report["effective_positive_fraction"])
        run.log_metrics(composition, on_parent=True)
    return report


def train(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, model_dir: str, data_path: str, output_dir: str) -> dict:
    from topr.train import run_train

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "train", iteration) as run:
        run.log_params(config.train.model_dump())
        run.log_dataset(data_path, f"train_set_iter{iteration}", "training")
        summary = run_train(config, model_dir, data_path, output_dir, on_step=lambda step, stats: run.log_metrics(stats, step))
        run.log_artifacts(output_dir, "model")
        run.log_metrics({k: v for k, v in summary.items() if k != "weights_sha256"})
        run.log_params({"weights_sha256": summary["weights_sha256"]})
    return summary


def evaluate(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, model_dir: str, prompts_path: str, report_path: str, samples_path: str) -> dict:
    from topr.evaluate import run_evaluate

    config = parse_config(config_json)
    with stage_run(tracking_uri, parent_run_id, "evaluate", iteration) as run:
        metrics = run_evaluate(config, model_dir, prompts_path, report_path, samples_path)
        run.log_dataset(prompts_path, "eval_prompts", "evaluation")
        run.log_artifact(report_path)
        run.log_metrics(metrics, on_parent=True)
    return metrics
