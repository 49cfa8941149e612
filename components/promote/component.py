from kfp import dsl
from kfp.dsl import Input, Model

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def promote(config_json: str, tracking_uri: str, parent_run_id: str, model: Input[Model], champion_version: str) -> str:
    """Point the champion alias at the new model's registered version, if it still holds
    ``champion_version``, the version the gate beat ("" for none); refuse otherwise. Returns the
    version promoted."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    return steps.promote(context, str(int(model.metadata["registered_version"])), champion_version)
