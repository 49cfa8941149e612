from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def train(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    model: Input[Model],
    train_set: Input[Dataset],
    samples: Input[Dataset],
    trained_model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the policy with the configured objective (TOPR by default) on the curated set; register it.

    ``samples`` (what the curated set was chosen from) is recorded as the model's lineage.
    """
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.train(context, model.path, train_set.path, samples.path, trained_model.path)
    trained_model.metadata.update({key: summary.pop(key) for key in ("weights_sha256", "registered_version")})
    steps.report_metrics(metrics, summary)
