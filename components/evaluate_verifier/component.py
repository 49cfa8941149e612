from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def evaluate_verifier(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    base_model: Input[Model],
    verifier: Input[Model],
    verifier_data: Input[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Held-out judgment accuracy (starting vs trained verifier) and the verifier-weighted vote vs maj@k."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    summary = steps.evaluate_verifier(context, base_model.path, verifier.path, verifier_data.path, report.path)
    steps.report_metrics(metrics, summary)
