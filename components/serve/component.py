from kfp import dsl
from kfp.dsl import Artifact, Output

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def serve(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, version: str, manifest: Output[Artifact]):
    """Write the KServe InferenceService (and its ServiceAccount) for the champion, registered
    ``version``, pinned to its manifest's digest; apply them when the cluster serves KServe's API
    (``cluster.serve``)."""
    from topr import steps

    context = steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration)
    steps.serve(context, version, manifest.path)
