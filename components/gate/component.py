from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def gate(
    config_json: str,
    tracking_uri: str,
    parent_run_id: str,
    iteration: int,
    model: Input[Model],
    eval_prompts: Input[Dataset],
    decision_report: Output[Markdown],
) -> NamedTuple("GateOutputs", [("Output", str), ("champion_version", str)]):
    """Compare the new model with the registered champion on the same held-out prompts: the
    decision ("promote" or "keep") and the champion version compared against ("" for none).

    The decision keeps the name ``Output``: kfp.local (2.17.0) resolves a ``dsl.If`` condition
    only on an output so named, and takes any other for false, so promote would never run locally.
    """
    from topr import steps

    version = str(int(model.metadata["registered_version"]))
    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    return steps.gate(context, version, eval_prompts.path, decision_report.path)
