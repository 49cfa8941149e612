from typing import NamedTuple

from kfp import dsl

from topr_components import TOPR_IMAGE


@dsl.component(base_image=TOPR_IMAGE, install_kfp_package=False)
def start_run(
    config_json: str,
    tracking_uri: str,
    run_name: str,
    kfp_run_id: str,
    resume_run_id: str,
    form_defaults: str,
    skippable: bool,
    # The run form (topr.config.RUN_FORM): typed parameters written over config_json where they
    # differ from the compiled defaults (form_defaults). skippable: compiled to skip the loop
    # (run.skip_unchanged_prompts).
    model_path: str,
    task_train_path: str,
    task_eval_path: str,
    train_learning_rate: float,
    train_baseline: float,
    sample_samples_per_prompt: int,
    sample_temperature: float,
    gate_margin: float,
    run_registered_model: str,
) -> NamedTuple("Started", [("parent_run_id", str), ("config_json", str), ("skipped", str)]):
    """Create the parent MLflow run of this pipeline run (or continue the ended one
    ``resume_run_id`` names) with the run form applied; return its id, the configuration, and
    why the run trains nothing ("" when it trains)."""
    arguments = dict(locals())  # the parameters, before the import binds another name
    from topr import steps

    return steps.start_with_form(**arguments)
