from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def sample(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    shard: int,
    shards: int,
    model: Input[Model],
    train_prompts: Input[Dataset],
    samples: Output[Dataset],
    metrics: Output[Metrics],
):
    """Sample n completions per prompt of shard ``shard`` of this iteration's prompts, with behaviour log-probs."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.sample(context, model.path, train_prompts.path, samples.path, shard, shards)
    samples.metadata["shard"] = shard
    steps.report_metrics(metrics, summary)
