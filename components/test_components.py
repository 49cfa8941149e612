"""Every stage folder holds one component with typed artifacts, and its body only calls ``topr.steps``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import topr.steps
from topr.config import RUN_FORM, form_parameter, form_type

MODEL, DATASET, METRICS, ARTIFACT, HTML, MARKDOWN = (
    f"system.{kind}@0.0.1" for kind in ("Model", "Dataset", "Metrics", "Artifact", "HTML", "Markdown")
)
TRACKED = {"config_json": "String", "tracking_uri": "String", "parent_run_id": "String"}
STAGE = {**TRACKED, "iteration": "Integer"}

# The run form's typed parameters (topr.config.RUN_FORM), as start_run takes them.
RUN_FORM_INPUTS = {form_parameter(dotted): {str: "String", float: "Float", int: "Integer"}[form_type(dotted)] for dotted in RUN_FORM}

# component name: (inputs, outputs)
INTERFACES = {
    "start_run": (
        {
            "config_json": "String",
            "tracking_uri": "String",
            "run_name": "String",
            "kfp_run_id": "String",
            "resume_run_id": "String",
            "form_defaults": "String",
            "skippable": "Boolean",
            **RUN_FORM_INPUTS,
        },
        {"parent_run_id": "String", "config_json": "String", "skipped": "String"},
    ),
    "finish_run": ({"config_json": "String", "tracking_uri": "String", "kfp_run_id": "String", "status": "PipelineTaskFinalStatus"}, {"run_page": HTML}),
    "prepare_model": (TRACKED, {"model": MODEL}),
    "prompts": (TRACKED, {"train_prompts": DATASET, "eval_prompts": DATASET}),
    "sample": ({**STAGE, "shard": "Integer", "shards": "Integer", "model": MODEL, "train_prompts": DATASET}, {"samples": DATASET, "metrics": METRICS}),
    "collect_samples": ({**STAGE, "shards": DATASET}, {"samples": DATASET, "metrics": METRICS}),
    "verify": ({**STAGE, "samples": DATASET}, {"verified": DATASET, "metrics": METRICS}),
    "curate": ({**STAGE, "verified": DATASET}, {"train_set": DATASET, "report": ARTIFACT, "composition": METRICS}),
    "train": ({**STAGE, "model": MODEL, "train_set": DATASET, "samples": DATASET}, {"trained_model": MODEL, "metrics": METRICS}),
    "evaluate": (
        {**STAGE, "model": MODEL, "eval_prompts": DATASET},
        {"completions": DATASET, "report": ARTIFACT, "metrics": METRICS, "accuracy_page": HTML},
    ),
    "gate": (
        {**STAGE, "model": MODEL, "eval_prompts": DATASET},
        {"Output": "String", "champion_version": "String", "decision_report": MARKDOWN},
    ),
    "promote": ({**TRACKED, "model": MODEL, "champion_version": "String"}, {"Output": "String"}),
    "serve": ({**STAGE, "version": "String"}, {"manifest": ARTIFACT}),
    "verifier_data": (
        {**TRACKED, "model": MODEL, "train_prompts": DATASET, "eval_prompts": DATASET},
        {"verifier_data": DATASET, "metrics": METRICS},
    ),
    "train_verifier": ({**TRACKED, "base_model": MODEL, "verifier_data": DATASET}, {"verifier": MODEL, "metrics": METRICS}),
    "evaluate_verifier": (
        {**TRACKED, "base_model": MODEL, "verifier": MODEL, "verifier_data": DATASET},
        {"report": ARTIFACT, "metrics": METRICS},
    ),
}


def _component(name: str):
    return getattr(importlib.import_module(f"topr_components.{name}.component"), name)


def test_every_component_folder_is_listed():
    folders = {p.parent.name for p in Path(__file__).parent.glob("*/component.py")}
    assert folders == set(INTERFACES)


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_component_interface(name):
    spec = _component(name).component_spec
    inputs, outputs = INTERFACES[name]
    assert {key: value.type for key, value in (spec.inputs or {}).items()} == inputs
    assert {key: value.type for key, value in (spec.outputs or {}).items()} == outputs


def test_collect_samples_takes_a_list_of_shards():
    assert _component("collect_samples").component_spec.inputs["shards"].is_artifact_list


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_component_body_delegates_to_the_library(name):
    source = inspect.getsource(_component(name).python_func)
    body = source.split('"""')[-1]
    assert "from topr import steps" in body
    called = {line.split("steps.")[1].split("(")[0].split(".")[0] for line in body.splitlines() if "steps." in line}
    step = called - {"StageContext", "report_metrics"}
    assert len(step) == 1 and hasattr(topr.steps, step.pop())
    # A stage's step gets one context built from the pipeline's parameters; starting and finishing
    # the pipeline's MLflow run come before and after any stage.
    assert ("StageContext" in called) == (name not in ("start_run", "finish_run"))
    assert len(body.strip().splitlines()) <= 8, "a component body stays a few lines: logic belongs in the library"


def test_every_component_folder_is_a_stage_with_pod_defaults():
    from topr.workflow import POD_DEFAULTS

    folders = sorted(path.parent.name for path in Path(__file__).parent.glob("*/component.py"))
    assert folders == sorted(POD_DEFAULTS) == sorted(INTERFACES)


def test_a_metrics_output_holds_its_figures_in_its_file_too(tmp_path):
    """kfp.local's cache (``topr run --resume``) takes a task whose output file is missing for one
    that never ran; kfp keeps a Metrics artifact's figures in its metadata only."""
    import json

    from kfp.dsl import Metrics

    metrics = Metrics(uri=str(tmp_path / "task" / "metrics"))
    topr.steps.report_metrics(metrics, {"pass_at_1": 0.5, "count": 3, "converged": True, "task": "arithmetic"})
    assert metrics.metadata == {"pass_at_1": 0.5, "count": 3}
    assert json.loads(Path(metrics.path).read_text()) == {"pass_at_1": 0.5, "count": 3}
