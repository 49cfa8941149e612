"""The loop, described once: which stage runs when, what it reads and what it writes.

    start        prepare_model ─▶ model        prompts ─▶ train_prompts, eval_prompts
                 evaluate(model)                                   the starting model, iteration 0
    iteration    sample ×shards ─▶ collect_samples ─▶ verify ─▶ curate ─▶ train ─▶ evaluate
                 (run.iterations times; each trained_model is the next iteration's model)
    finish       gate ─▶ promote ─▶ serve, if the gate says "promote"                (gate.enabled,
                                                                        serve: cluster.serve.enabled)
                 verifier_data ─▶ train_verifier ─▶ evaluate_verifier           (verifier.enabled)

Two runners read this description and nothing else about the loop's shape:
``pipelines/topr_pipeline.py`` compiles it into the Kubeflow DAG, one task per stage, and
``topr.inprocess`` runs it in this process (the units of ``topr experiment``). A stage has one
name everywhere: its step ``topr.steps.<name>`` (the stage with its tracking), its component
``components/<name>/component.py``, its pod settings ``cluster.stages.<name>`` (defaults in
``POD_DEFAULTS`` below). Adding a stage is its library module, its step, its component and its
entries here (``tests/test_workflow.py`` adds one from those alone).

Artifacts are named by the components' parameters. ``reads`` names a stage's inputs: ``"samples"``
is the artifact ``samples`` in scope, ``"model=trained_model"`` passes the artifact
``trained_model`` as the parameter ``model``, and ``"version=model.registered_version"`` passes a
value of the artifact ``model``'s metadata (what its stage returned), which the component reads
from the artifact itself. ``writes`` names its outputs with the file they are written to in the
phase's folder when it runs in process (``"train_set:train_set.jsonl"``). A component may have
outputs besides these (Metrics, HTML and Markdown for Kubeflow's UI), which only it fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

MODEL, BASE_MODEL, TRAINED_MODEL = "model", "base_model", "trained_model"
"""In scope, ``model`` is the policy a phase starts from; after the start phase the prepared
model is also ``base_model``; each iteration's ``trained_model`` becomes the next ``model``."""

SAMPLES, VERIFIED, TRAIN_SET, COMPOSITION = "samples.jsonl", "verified.jsonl", "train_set.jsonl", "composition.json"
EVALUATION, COMPLETIONS, MODEL_DIR = "evaluation.json", "evaluation_completions.jsonl", "model"


@dataclass(frozen=True)
class RunsIf:
    """A stage that runs only when a value an earlier stage returned equals ``equals``."""

    value: str
    equals: str
    title: str


@dataclass(frozen=True)
class Stage:
    """One stage's place in the loop (see the module's docstring for ``reads`` and ``writes``).

    ``title`` is its task's name in the pipeline UI (unique); ``returns`` names the values its
    step returns, in order (the gate's decision; ``"value=Output"`` where the component's output
    has another name); ``enabled_by`` is a boolean config field
    (``section.field``) without which the stage is left out; ``sharded_by`` is an integer config
    field: the stage then runs once per shard (``shard``, ``shards``) and a later stage reads
    all the shards' outputs as a list.
    """

    name: str
    title: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    enabled_by: str | None = None
    runs_if: RunsIf | None = None
    sharded_by: str | None = None

    @property
    def inputs(self) -> dict[str, str]:
        """Parameter name → what it reads: an artifact, or ``artifact.metadata_key``."""
        return dict(read.split("=") if "=" in read else (read, read) for read in self.reads)

    @property
    def results(self) -> dict[str, str]:
        """Returned value → the component's output that holds it (``"decision=Output"``)."""
        return dict(value.split("=") if "=" in value else (value, value) for value in self.returns)

    @property
    def outputs(self) -> dict[str, str]:
        """Output artifact → its file name in the phase's folder."""
        return dict(write.split(":") for write in self.writes)

    def enabled(self, config) -> bool:
        return self.enabled_by is None or bool(config_value(config, self.enabled_by))


def config_value(config, dotted: str) -> Any:
    """The value of a dotted config field, e.g. ``sample.shards`` or ``cluster.serve.enabled``."""
    return reduce(getattr, dotted.split("."), config)


START = (
    Stage("prepare_model", "prepare model", writes=(f"{MODEL}:{MODEL_DIR}",)),
    Stage("prompts", "prompts", writes=("train_prompts:train_prompts.jsonl", "eval_prompts:eval_prompts.jsonl")),
    Stage(
        "evaluate",
        "evaluate starting model",
        reads=(MODEL, "eval_prompts"),
        writes=(f"completions:{COMPLETIONS}", f"report:{EVALUATION}"),
    ),
)

ITERATION = (
    Stage("sample", "sample", reads=(MODEL, "train_prompts"), writes=(f"samples:{SAMPLES}",), sharded_by="sample.shards"),
    Stage("collect_samples", "collect samples", reads=("shards=samples",), writes=(f"samples:{SAMPLES}",)),
    Stage("verify", "verify", reads=("samples",), writes=(f"verified:{VERIFIED}",)),
    Stage("curate", "curate", reads=("verified",), writes=(f"train_set:{TRAIN_SET}", f"report:{COMPOSITION}")),
    Stage("train", "train", reads=(MODEL, "train_set", "samples"), writes=(f"{TRAINED_MODEL}:{MODEL_DIR}",)),
    Stage(
        "evaluate",
        "evaluate",
        reads=(f"{MODEL}={TRAINED_MODEL}", "eval_prompts"),
        writes=(f"completions:{COMPLETIONS}", f"report:{EVALUATION}"),
    ),
)

PROMOTED = RunsIf("decision", "promote", "the gate says promote")

FINISH = (
    Stage(
        "gate",
        "promotion gate",
        reads=(f"version={MODEL}.registered_version", "eval_prompts"),
        returns=("decision=Output", "champion_version"),  # kfp.local tests a dsl.If only on "Output"
        enabled_by="gate.enabled",
    ),
    Stage(
        "promote",
        "promote to champion",
        reads=(f"version={MODEL}.registered_version", "champion_version"),
        returns=("promoted=Output",),
        enabled_by="gate.enabled",
        runs_if=PROMOTED,
    ),
    Stage(
        "serve",
        "serve champion",
        reads=("version=promoted",),
        writes=("manifest:inference_service.yaml",),
        enabled_by="cluster.serve.enabled",
        runs_if=PROMOTED,
    ),
    Stage(
        "verifier_data",
        "verifier data",
        reads=(MODEL, "train_prompts", "eval_prompts"),
        writes=("verifier_data:verifier_data",),
        enabled_by="verifier.enabled",
    ),
    Stage(
        "train_verifier",
        "train verifier",
        reads=(BASE_MODEL, "verifier_data"),
        writes=("verifier:verifier",),
        enabled_by="verifier.enabled",
    ),
    Stage(
        "evaluate_verifier",
        "evaluate verifier",
        reads=(BASE_MODEL, "verifier", "verifier_data"),
        writes=("report:verifier_evaluation.json",),
        enabled_by="verifier.enabled",
    ),
)

PHASES = {"start": START, "iteration": ITERATION, "finish": FINISH}


def _pod(**fields: Any) -> dict[str, Any]:
    return fields


POD_DEFAULTS: dict[str, dict[str, Any]] = {
    # The pipeline run's bookends: open and close its MLflow run (no stage of their own in-process).
    "start_run": _pod(cpu="500m", memory="1Gi", retries=2, timeout_minutes=10, ephemeral_storage="1Gi"),
    "finish_run": _pod(cpu="500m", memory="1Gi", retries=2, timeout_minutes=10, ephemeral_storage="1Gi"),
    # Copies the base model (several GiB) through /tmp when it comes from S3 or the registry.
    "prepare_model": _pod(cpu="2", memory="32Gi", retries=2, timeout_minutes=60, ephemeral_storage="50Gi"),
    "prompts": _pod(cpu="1", memory="4Gi", retries=2, timeout_minutes=30),
    "sample": _pod(cpu="8", memory="64Gi", gpus=1, retries=2, timeout_minutes=360, ephemeral_storage="20Gi"),
    "collect_samples": _pod(cpu="1", memory="8Gi", retries=2, timeout_minutes=30),
    "verify": _pod(cpu="4", memory="8Gi", retries=2, timeout_minutes=60),
    "curate": _pod(cpu="1", memory="8Gi", retries=1, timeout_minutes=30),
    # Resumes from its checkpoint, staged in /tmp: ~16 bytes per parameter (weights, grads, Adam),
    # two of them while one replaces the other.
    "train": _pod(cpu="8", memory="64Gi", gpus=1, retries=1, timeout_minutes=1440, ephemeral_storage="150Gi"),
    "evaluate": _pod(cpu="8", memory="64Gi", gpus=1, retries=2, timeout_minutes=180, ephemeral_storage="20Gi"),
    # Downloads the champion into /tmp to evaluate it again.
    "gate": _pod(cpu="8", memory="64Gi", gpus=1, retries=2, timeout_minutes=180, ephemeral_storage="50Gi"),
    "promote": _pod(cpu="500m", memory="1Gi", retries=2, timeout_minutes=10, ephemeral_storage="1Gi"),
    # Reads the champion's manifest back and applies its InferenceService (cluster.serve).
    "serve": _pod(cpu="500m", memory="1Gi", retries=2, timeout_minutes=10, ephemeral_storage="1Gi"),
    "verifier_data": _pod(cpu="8", memory="64Gi", gpus=1, retries=2, timeout_minutes=360, ephemeral_storage="20Gi"),
    "train_verifier": _pod(cpu="8", memory="64Gi", gpus=1, retries=0, timeout_minutes=1440, ephemeral_storage="50Gi"),
    "evaluate_verifier": _pod(cpu="8", memory="64Gi", gpus=1, retries=2, timeout_minutes=180, ephemeral_storage="20Gi"),
}
"""Every task of the pipeline, named as its component and its step, with its pod's defaults
(``topr.cluster``); ``cluster.stages.<name>`` overrides them."""


def stage_names() -> list[str]:
    """Every stage of the description, once, in the order they first run."""
    return list(dict.fromkeys(stage.name for phase in PHASES.values() for stage in phase))


def iteration_inputs() -> set[str]:
    """What an iteration reads from outside itself: the artifacts no earlier stage of it writes."""
    written, needed = set(), set()
    for stage in ITERATION:
        needed |= {artifact.split(".")[0] for artifact in stage.inputs.values()} - written
        written |= set(stage.outputs)
    return needed


@dataclass(frozen=True)
class IterationFiles:
    """Where one iteration's stages write in process, inside its folder (the ``writes`` above)."""

    folder: Path

    @property
    def samples(self) -> Path:
        return self.folder / SAMPLES

    @property
    def verified(self) -> Path:
        return self.folder / VERIFIED

    @property
    def train_set(self) -> Path:
        return self.folder / TRAIN_SET

    @property
    def composition(self) -> Path:
        return self.folder / COMPOSITION

    @property
    def model(self) -> Path:
        return self.folder / MODEL_DIR

    @property
    def evaluation(self) -> Path:
        return self.folder / EVALUATION

    @property
    def completions(self) -> Path:
        """The held-out completions, one greedy record per problem with its ``correct``."""
        return self.folder / COMPLETIONS
