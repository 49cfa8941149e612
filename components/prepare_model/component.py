from kfp import dsl
from kfp.dsl import Output, Model

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def prepare_model(config_json: str, tracking_uri: str, parent_run_id: str, model: Output[Model]):
    """Load the configured starting model once and save it as a Hugging Face directory."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id)
    model.metadata.update(steps.prepare_model(context, model.path))
