from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def train_verifier(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    base_model: Input[Model],
    verifier_data: Input[Dataset],
    verifier: Output[Model],
    metrics: Output[Metrics],
):
    """Train the starting model to judge the pairs (Yes/No) with the policy's objective; register it."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    summary = steps.train_verifier(context, base_model.path, verifier_data.path, verifier.path)
    verifier.metadata.update({key: summary.pop(key) for key in ("weights_sha256", "registered_version")})
    steps.report_metrics(metrics, summary)
