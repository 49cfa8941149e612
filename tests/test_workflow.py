"""The loop's one description (``topr.workflow``), and both runners reading it: the Kubeflow
pipeline (``pipelines/topr_pipeline.py``) and the in-process run (``topr.inprocess``).

A stage is a library module, a step, a component and its entries in the description: the last
test adds one from those alone and finds it in the compiled pipeline and in an in-process run."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import yaml

from topr import steps, workflow
from topr.config import build_config
from topr.inprocess import LocalArtifact, run_phase, run_workflow
from topr.steps import StageContext

STAGES = [stage for phase in workflow.PHASES.values() for stage in phase]


def component(name: str):
    from topr_pipelines.topr_pipeline import component

    return component(name)


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.title)
def test_every_stage_has_a_step_and_a_component_with_the_described_artifacts(stage):
    step = inspect.signature(getattr(steps, stage.name)).parameters
    assert set(stage.inputs) | set(stage.outputs) <= set(step), f"steps.{stage.name} takes every input and output by its name"
    spec = component(stage.name).component_spec
    artifacts = {source.split(".")[0] if "." in source else parameter for parameter, source in stage.inputs.items()}
    assert artifacts <= set(spec.inputs), f"components/{stage.name} takes {sorted(artifacts)}"
    assert set(stage.outputs) | set(stage.results.values()) <= set(spec.outputs or {})
    assert stage.name in workflow.POD_DEFAULTS


def test_titles_are_unique_and_every_pod_default_is_a_task():
    titles = [stage.title for stage in STAGES]
    assert len(titles) == len(set(titles))
    assert set(workflow.POD_DEFAULTS) == {*workflow.stage_names(), "start_run", "finish_run"}


def test_an_iteration_reads_the_policy_and_both_prompt_sets_from_outside():
    assert workflow.iteration_inputs() == {"model", "train_prompts", "eval_prompts"}


def test_reads_and_writes_name_parameters_artifacts_and_files():
    evaluate, gate = workflow.ITERATION[-1], workflow.FINISH[0]
    assert evaluate.inputs == {"model": "trained_model", "eval_prompts": "eval_prompts"}
    assert evaluate.outputs == {"completions": "evaluation_completions.jsonl", "report": "evaluation.json"}
    assert gate.inputs["version"] == "model.registered_version"
    assert gate.results == {"decision": "Output", "champion_version": "champion_version"}


class Recorder:
    """Stands in for every step: records (stage, iteration, arguments) and writes each output file."""

    def __init__(self, monkeypatch, decision: str = "keep"):
        self.calls: list[tuple[str, int, dict]] = []
        self.decision = decision
        for name in workflow.stage_names():
            monkeypatch.setattr(steps, name, self._step(name))

    def _step(self, name: str):
        def step(context: StageContext, **arguments):
            self.calls.append((name, context.iteration, arguments))
            if name == "gate":
                return self.decision, "3"
            if name == "train":
                return {"registered_version": 7}
            return {}

        return step

    def names(self) -> list[str]:
        return [f"{name}@{iteration}" for name, iteration, _ in self.calls]


def context(*overrides: str) -> StageContext:
    from topr.config import apply_overrides

    data: dict = {}
    apply_overrides(data, ["run.iterations=2", *overrides])
    return StageContext(build_config(data), "http://127.0.0.1:1", "parent")


def test_in_process_runs_the_phases_in_order_and_hands_each_stage_what_it_reads(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, decision="promote")

    run_workflow(context("sample.shards=2"), tmp_path)

    iteration = ["sample", "sample", "collect_samples", "verify", "curate", "train", "evaluate"]
    assert recorder.names() == [
        "prepare_model@0", "prompts@0", "evaluate@0",
        *(f"{name}@1" for name in iteration), *(f"{name}@2" for name in iteration),
        "gate@2", "promote@2",
    ]
    calls = {(name, iteration): arguments for name, iteration, arguments in recorder.calls if name != "sample"}
    assert calls[("collect_samples", 1)]["shards"] == [str(tmp_path / "iter1" / f"samples.shard{shard}.jsonl") for shard in (0, 1)]
    assert calls[("train", 2)]["model"] == str(tmp_path / "iter1" / "model")  # the previous iteration's model
    assert calls[("evaluate", 2)]["model"] == str(tmp_path / "iter2" / "model")
    assert calls[("gate", 2)] == {"version": "7", "eval_prompts": str(tmp_path / "iter0" / "eval_prompts.jsonl")}
    assert calls[("promote", 2)] == {"version": "7", "champion_version": "3"}


def test_in_process_promotes_only_when_the_gate_says_so_and_runs_the_verifier_when_enabled(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, decision="keep")

    run_workflow(context("verifier.enabled=true"), tmp_path)

    finish = [name for name in recorder.names() if name.endswith("@2")][-4:]
    assert finish == ["gate@2", "verifier_data@2", "train_verifier@2", "evaluate_verifier@2"]
    train_verifier = next(arguments for name, _, arguments in recorder.calls if name == "train_verifier")
    assert train_verifier["base_model"] == str(tmp_path / "iter0" / "model")  # the starting model, not the last


def test_without_the_gate_nothing_is_gated_or_promoted(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, decision="promote")

    run_workflow(context("gate.enabled=false"), tmp_path)

    assert not {"gate", "promote"} & {name for name, _, _ in recorder.calls}


def test_a_substitute_stands_in_for_a_stage(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch)
    shared = LocalArtifact("/shared/model")

    run_workflow(context("run.iterations=1"), tmp_path, {"prepare model": lambda context: {"model": shared}})

    assert "prepare_model@0" not in recorder.names()
    train = next(arguments for name, _, arguments in recorder.calls if name == "train")
    assert train["model"] == "/shared/model"


def test_the_pipeline_leaves_out_the_gate_when_disabled(tmp_path):
    from kfp import compiler

    from topr_pipelines.topr_pipeline import build_pipeline

    compiled = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(build_config({"gate": {"enabled": False}})), str(compiled))
    executors = next(yaml.safe_load_all(compiled.read_text()))["deploymentSpec"]["executors"]
    assert "exec-evaluate" in executors and not {"exec-gate", "exec-promote"} & set(executors)


COMPONENT = '''
from kfp import dsl
from kfp.dsl import Dataset, Input, Output


@dsl.component(base_image="topr:test", install_kfp_package=False)
def dedupe(config_json: str, tracking_uri: str, parent_run_id: str, iteration: int, verified: Input[Dataset], unique: Output[Dataset]):
    """Drop repeated completions."""
    from topr import steps

    steps.dedupe(steps.StageContext.from_pipeline(config_json, tracking_uri, parent_run_id, iteration), verified.path, unique.path)
'''


@pytest.fixture
def new_stage(monkeypatch, tmp_path):
    """A stage ``dedupe`` added as its author would: a step, a component in its own folder, and its
    entries in the description (after ``verify``, reading ``verified``) and in the pod defaults."""
    import topr_components

    folder = tmp_path / "components"
    (folder / "dedupe").mkdir(parents=True)
    (folder / "dedupe" / "component.py").write_text(COMPONENT)
    monkeypatch.setattr(topr_components, "__path__", [*topr_components.__path__, str(folder)])

    def dedupe(context: StageContext, verified: str, unique: str) -> dict:
        lines = Path(verified).read_text().splitlines()
        Path(unique).write_text("".join(f"{line}\n" for line in dict.fromkeys(lines)))
        return {"kept": len(set(lines))}

    monkeypatch.setattr(steps, "dedupe", dedupe, raising=False)
    stage = workflow.Stage("dedupe", "dedupe", reads=("verified",), writes=("unique:unique.jsonl",))
    at = [stage.name for stage in workflow.ITERATION].index("verify") + 1
    monkeypatch.setattr(workflow, "ITERATION", (*workflow.ITERATION[:at], stage, *workflow.ITERATION[at:]))
    monkeypatch.setitem(workflow.POD_DEFAULTS, "dedupe", {"cpu": "3", "memory": "2Gi", "retries": 1})
    yield stage
    for name in [name for name in sys.modules if name.startswith("topr_components.dedupe")]:
        del sys.modules[name]


def test_a_new_stage_needs_its_step_its_component_and_its_entries_only(new_stage, tmp_path):
    from kfp import compiler

    from topr_pipelines.topr_pipeline import build_pipeline

    compiled = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(build_config({"run": {"iterations": 2}})), str(compiled))
    spec = next(yaml.safe_load_all(compiled.read_text()))
    resources = spec["deploymentSpec"]["executors"]["exec-dedupe"]["container"]["resources"]
    assert resources["resourceCpuRequest"] == "3" and resources["resourceMemoryRequest"] == "2Gi"
    for iteration in (1, 2):
        tasks = spec["components"][f"comp-iteration-{iteration}"]["dag"]["tasks"]
        assert tasks["dedupe"]["inputs"]["artifacts"]["verified"]["taskOutputArtifact"]["producerTask"] == "verify"

    folder = tmp_path / "iter1"
    folder.mkdir()
    (folder / "verified.jsonl").write_text('{"a": 1}\n{"a": 1}\n{"a": 2}\n')
    scope = {"verified": LocalArtifact(str(folder / "verified.jsonl"))}
    made = run_phase((new_stage,), context().at(1), folder, scope, {})
    assert made["unique"].path == str(folder / "unique.jsonl") and made["unique"].metadata == {"kept": 2}
    assert [json.loads(line) for line in Path(made["unique"].path).read_text().splitlines()] == [{"a": 1}, {"a": 2}]
