from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def collect_samples(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    shards: Input[List[Dataset]],
    samples: Output[Dataset],
    metrics: Output[Metrics],
):
    """Join the sample shards (in shard order) into the iteration's samples; publish and log them."""
    from topr import steps

    ordered = sorted(shards, key=lambda shard: shard.metadata["shard"])
    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    summary = steps.collect_samples(context, [shard.path for shard in ordered], samples.path)
    steps.report_metrics(metrics, summary)
