from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def verifier_data(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    model: Input[Model],
    train_prompts: Input[Dataset],
    eval_prompts: Input[Dataset],
    verifier_data: Output[Dataset],
    metrics: Output[Metrics],
):
    """The final policy's solutions, labelled by the checker, as (question, solution) pairs for the verifier."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    summary = steps.verifier_data(context, model.path, train_prompts.path, eval_prompts.path, verifier_data.path)
    steps.report_metrics(metrics, summary)
