"""Scheduled retraining: Kubeflow recurring runs of the compiled pipeline.

A scheduled run starts from the registered champion (``model.path=models:/<name>@<alias>``)
and reads its prompts from an S3 prefix (``<prefix>/train.jsonl`` and ``<prefix>/eval.jsonl``),
so each run retrains the current champion on the newest prompts and the gate decides whether
the result replaces it. The pipeline is compiled here and sent inline with the request.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from topr.config import Config, build_config, config_to_dict, form_values
from topr.tasks import registered_tasks, task_class
from topr_pipelines.runner import compile_pipeline
from topr_pipelines.submit import Endpoint

log = logging.getLogger(__name__)

DEFAULT_SERVICE_ACCOUNT = "topr-pipeline"  # k8s/base/rbac.yaml


def check_cron(cron: str) -> str:
    """Kubeflow's cron has six fields, seconds first: ``"0 0 3 * * *"`` is 03:00 every day."""
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(
            f"cron {cron!r} has {len(fields)} fields; Kubeflow wants six, seconds first "
            '(e.g. "0 0 3 * * *" for 03:00 every day)'
        )
    return " ".join(fields)


def prompt_overrides(prompts_prefix: str) -> list[str]:
    """``task.train_path``/``task.eval_path`` overrides for the files under an S3 prefix."""
    if not prompts_prefix.startswith("s3://"):
        raise ValueError(f"--prompts must be an s3:// prefix, got {prompts_prefix!r}")
    prefix = prompts_prefix.rstrip("/")
    return [f"task.train_path={prefix}/train.jsonl", f"task.eval_path={prefix}/eval.jsonl"]


def scheduled_config(config: Config) -> Config:
    """The configuration of every scheduled run: start from the champion (prompts: ``prompt_overrides``)."""
    if not task_class(config.task.name).needs_task_files:
        file_tasks = [name for name, task in registered_tasks().items() if task.needs_task_files]
        raise ValueError(f"task.name={config.task.name} reads no prompt files; a schedule needs one of {', '.join(file_tasks)}")
    data = config_to_dict(config)
    data["model"]["path"] = f"models:/{config.run.registered_model}@{config.gate.alias}"
    if "skip_unchanged_prompts" not in config.run.model_fields_set:  # prompts the champion learnt: nothing to do
        data["run"]["skip_unchanged_prompts"] = True
    return build_config(data, source="schedule")


def create_schedule(
    endpoint: Endpoint,
    cron: str,
    config: Config,
    tracking_uri: str,
    name: str,
    pipeline_root: str | None = None,
    service_account: str = DEFAULT_SERVICE_ACCOUNT,
):
    """Create a recurring run (one at a time, no catch-up) of ``config`` made a scheduled one,
    whose pods run as ``service_account`` (KFP's default runner account has far broader rights)."""
    cron = check_cron(cron)
    config = scheduled_config(config)
    client = endpoint.client()
    experiment = client.create_experiment(name=config.run.experiment)
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(config, Path(scratch, "topr.yaml"))
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=name,
            description=f"TOPR retraining from {config.model.path} on {config.task.train_path}",
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            params={"config_json": json.dumps(config_to_dict(config)), "tracking_uri": tracking_uri, "run_name": name, **form_values(config)},
            pipeline_package_path=str(package),
            pipeline_root=pipeline_root,
            service_account=service_account,
        )
    log.info("recurring run %s (%s) created: %s", recurring.recurring_run_id, name, cron)
    return recurring


def list_schedules(endpoint: Endpoint) -> list:
    return endpoint.client().list_recurring_runs(page_size=100).recurring_runs or []


def delete_schedule(endpoint: Endpoint, recurring_run_id: str) -> None:
    endpoint.client().delete_recurring_run(recurring_run_id)
