"""Submit the pipeline to a Kubeflow Pipelines endpoint, and the client options both submitting
and scheduling share (the kfp client's usual authentication: token, cookies, CA, namespace)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from topr.config import Config, config_to_dict, form_values
from topr_pipelines.runner import compile_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach Kubeflow Pipelines (``kfp.Client``'s arguments)."""

    host: str
    namespace: str = "kubeflow"
    existing_token: str | None = None
    cookies: str | None = None
    ssl_ca_cert: str | None = None
    ui_host: str | None = None
    verify_ssl: bool | None = None

    def client(self):
        from kfp import Client

        return Client(
            host=self.host,
            namespace=self.namespace,
            existing_token=self.existing_token,
            cookies=self.cookies,
            ssl_ca_cert=self.ssl_ca_cert,
            ui_host=self.ui_host,
            verify_ssl=self.verify_ssl,
        )

    def run_url(self, run_id: str) -> str:
        return f"{(self.ui_host or self.host).rstrip('/')}/#/runs/details/{run_id}"


def submit_run(
    endpoint: Endpoint,
    config: Config,
    tracking_uri: str,
    run_name: str,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> tuple[str, str]:
    """Compile ``config``'s pipeline and start one run of it; returns ``(run id, run URL)``."""
    client = endpoint.client()
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(config, Path(scratch, "topr.yaml"), pipeline_root)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments={"config_json": json.dumps(config_to_dict(config)), "tracking_uri": tracking_uri, "run_name": run_name, **form_values(config)},
            run_name=run_name,
            experiment_name=config.run.experiment,
            namespace=endpoint.namespace,
            pipeline_root=pipeline_root,
            service_account=service_account,
        )
    url = endpoint.run_url(result.run_id)
    log.info("submitted run %s: %s", result.run_id, url)
    return result.run_id, url
