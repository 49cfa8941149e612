from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def curate(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    verified: Input[Dataset],
    train_set: Output[Dataset],
    report: Output[Artifact],
    composition: Output[Metrics],
):
    """Choose the training set (Anna Karenina, uniform or all) and report its composition."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.curate(context, verified.path, train_set.path, report.path)
    steps.report_metrics(composition, summary)
