from kfp import dsl

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def start_run(config_json: str, tracking_uri: str, run_name: str, kfp_run_id: str, resume_run_id: str = "") -> str:
    """Create the parent MLflow run of this pipeline run (or continue the ended one
    ``resume_run_id`` names); return its id."""
    from topr import steps

    return steps.start(config_json, tracking_uri, run_name, kfp_run_id, resume_run_id)
