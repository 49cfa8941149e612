from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    model: Input[Model],
    eval_prompts: Input[Dataset],
    completions: Output[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
    accuracy_page: Output[HTML],
):
    """Held-out pass@1 (greedy), pass@k and maj@k with 95% confidence intervals; the run so far
    (accuracy curve and table) as a page the pipeline UI shows."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.evaluate(context, model.path, eval_prompts.path, report.path, completions.path, accuracy_page.path)
    steps.report_metrics(metrics, summary)
