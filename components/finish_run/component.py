from kfp import dsl
from kfp.dsl import HTML, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def finish_run(config_json: str, tracking_uri: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus, run_page: Output[HTML]):
    """Exit handler: close this pipeline run's MLflow run as FINISHED or FAILED, whatever happened,
    and draw the whole run (start, iterations, gains, the gate's decision) as the page the UI shows.

    An exit task may not consume other tasks' outputs, so the MLflow run is found by its
    ``kfp.pipeline_run_id`` tag.
    """
    from topr import steps

    steps.finish(config_json, tracking_uri, kfp_run_id, failed=status.state != "SUCCEEDED", run_page=run_page.path)
