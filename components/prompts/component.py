from kfp import dsl
from kfp.dsl import Dataset, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def prompts(config_json: str, tracking_uri: str, parent_run_id: str, train_prompts: Output[Dataset], eval_prompts: Output[Dataset]):
    """Write the task's training prompts (all iterations) and held-out prompts as JSONL."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    counts = steps.prompts(context, train_prompts.path, eval_prompts.path)
    train_prompts.metadata["count"] = counts["train_prompts"]
    eval_prompts.metadata["count"] = counts["eval_prompts"]
