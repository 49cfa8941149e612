from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def gate(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    model: Input[Model],
    eval_prompts: Input[Dataset],
) -> str:
    """Compare the new model with the registered champion on the same held-out prompts; return "promote" or "keep"."""
    from topr import steps

    version = str(int(model.metadata["registered_version"]))
    return steps.gate(config_json, tracking_uri, parent_run_id, iteration, version, eval_prompts.path)
