from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def verify(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    samples: Input[Dataset],
    verified: Output[Dataset],
    metrics: Output[Metrics],
):
    """Check every completion with the task's checker: add extracted, correct and reward."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.verify(context, samples.path, verified.path)
    steps.report_metrics(metrics, summary)
