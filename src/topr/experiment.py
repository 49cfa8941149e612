"""``topr experiment``: several arms of the loop on the same prompts and data, compared in one report.

An experiment is a spec (YAML): a description, overrides applied to every arm, and the arms,
each a name and its own overrides. The named specs in ``topr/experiments/`` reproduce the paper's
comparisons (``topr experiment --list``); a path to a YAML file of the same shape runs your own.

Every arm is a whole ``topr run``: the same Kubeflow pipeline, run locally, tracked in MLflow as
one parent run. For the arms to compare, the experiment first does the shared work once:

- the starting model is prepared once (one HF directory, one weights digest for all arms);
- iteration 1's samples are drawn once from it and handed to every arm whose model, task and
  sample settings are the experiment's (``sample.first_iteration_samples``), so those arms
  train their first iteration on the very same completions; later iterations sample from each
  arm's own model, with the same seeds and the same sample budget;
- held-out prompts, evaluation seeds and training seeds are the same by construction.

The configuration of arm ``a`` is: the config file, then the spec's overrides, then the arm's,
then the command line's. An arm that fails is reported with its error and the others still run;
``--resume`` keeps the arms an interrupted experiment had finished.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from topr.config import Config, ConfigError, apply_overrides, build_config, config_to_dict
from topr.records import write_json

log = logging.getLogger(__name__)

ArmRunner = Callable[[Config, Path, str, str], str]
"""Runs one arm's pipeline: ``(config, run folder, tracking URI, run name) -> parent MLflow run id``."""

SHARED_SECTIONS = ("model", "task", "sample")
"""The sections that decide iteration 1's data: arms that keep the experiment's share its samples."""


class ExperimentSpec(BaseModel):
    """What an experiment compares. Loaded from YAML; every field is checked."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What the experiment shows, one paragraph (goes into the report).")
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every arm.")
    arms: dict[str, list[str]] = Field(description="Arm name -> its section.field=value overrides.")
    compare: str = Field(
        "iteration",
        description="The report's main plot: accuracy by 'iteration', or by "
        "'effective_positive_fraction' (the fraction of the training weight on positives).",
    )

    @field_validator("arms")
    @classmethod
    def _named_arms(cls, arms: dict[str, list[str]]) -> dict[str, list[str]]:
        if not arms:
            raise ValueError("an experiment needs at least one arm")
        for name in arms:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"arm name {name!r} must be letters, digits, '.', '-' or '_' (it names a folder)")
        return arms

    @field_validator("compare")
    @classmethod
    def _known_axis(cls, compare: str) -> str:
        if compare not in ("iteration", "effective_positive_fraction"):
            raise ValueError(f"compare must be 'iteration' or 'effective_positive_fraction', got {compare!r}")
        return compare


def named_specs() -> dict[str, Path]:
    """The experiments that ship with topr, by name."""
    folder = resources.files("topr") / "experiments"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def load_spec(name_or_path: str) -> tuple[str, ExperimentSpec]:
    """A named spec (``objectives``) or a YAML file; returns its name and the validated spec."""
    named = named_specs()
    path = named.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no experiment {name_or_path!r}: not a named one ({', '.join(sorted(named))}) nor a file")
    try:
        data = yaml.safe_load(path.read_text())
        return path.stem, ExperimentSpec.model_validate(data)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        raise ConfigError(f"{path}: invalid experiment spec: {problems}") from None


def arm_configs(spec: ExperimentSpec, base: dict, overrides: list[str]) -> tuple[Config, dict[str, Config]]:
    """The experiment's own config (spec + command line) and each arm's, all validated up front."""
    shared = _with_overrides(base, [*spec.overrides, *overrides], "the experiment's overrides")
    arms = {
        name: _with_overrides(base, [*spec.overrides, *arm_overrides, *overrides], f"arm {name!r}")
        for name, arm_overrides in spec.arms.items()
    }
    return shared, arms


def _with_overrides(base: dict, overrides: list[str], source: str) -> Config:
    data = json.loads(json.dumps(base))  # a deep copy: every arm starts from the same file
    try:
        apply_overrides(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return build_config(data, source)


def shares_first_iteration(arm: Config, experiment: Config) -> bool:
    """Whether ``arm`` would sample iteration 1 exactly as the experiment's shared data was sampled."""
    return all(getattr(arm, section) == getattr(experiment, section) for section in SHARED_SECTIONS)


def prepare_shared(experiment: Config, folder: Path, tracking_uri: str) -> dict:
    """The starting model (a path or a registered ``models:/`` one), the prompts and iteration 1's
    verified samples, made once for all arms."""
    from topr.models import prepare_base_model
    from topr.prompts import run_prompts
    from topr.sample import run_sample
    from topr.steps import registered_model_location
    from topr.verify import run_verify

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    model_dir, samples = folder / "base_model", folder / "iter1_samples.jsonl"
    train_prompts, eval_prompts = folder / "train_prompts.jsonl", folder / "eval_prompts.jsonl"
    if not (model_dir / "config.json").exists():  # save_policy renames a complete folder into place
        prepare_base_model(registered_model_location(tracking_uri, experiment.model.path), model_dir)
    prompt_counts = run_prompts(experiment, train_prompts, eval_prompts)
    if not samples.exists():
        run_sample(experiment, str(model_dir), train_prompts, samples, iteration=1)
    summary = run_verify(experiment.task, samples, folder / "iter1_verified.jsonl")
    timing = folder / "minutes.json"  # how long the first, complete preparation took; a resume keeps it
    if not timing.exists():
        write_json(timing, {"minutes": (time.perf_counter() - started) / 60})
    return {
        "model_dir": str(model_dir),
        "samples": str(samples),
        "samples_accuracy": summary["accuracy"],
        "samples_count": summary["count"],
        "eval_prompts": prompt_counts["eval_prompts"],
        "minutes": json.loads(timing.read_text())["minutes"],
    }


def arm_config(name: str, experiment_name: str, arm: Config, experiment: Config, shared: dict) -> Config:
    """The arm's config as it runs: the shared starting model and data where they apply, its own names."""
    update = {
        "run": arm.run.model_copy(update={"name": name, "registered_model": f"{experiment_name}-{name}", "experiment": f"experiment-{experiment_name}"}),
    }
    if arm.model == experiment.model:
        update["model"] = arm.model.model_copy(update={"path": shared["model_dir"]})
    if shares_first_iteration(arm, experiment):
        update["sample"] = arm.sample.model_copy(update={"first_iteration_samples": shared["samples"]})
    return arm.model_copy(update=update)


def run_experiment(
    name: str,
    spec: ExperimentSpec,
    experiment: Config,
    arms: dict[str, Config],
    run_arm: ArmRunner,
    folder: Path,
    tracking_uri: str,
    resume: bool = False,
) -> Path:
    """Run every arm (skipping those a resumed experiment had finished); write and log the report."""
    from topr.report import write_experiment_report

    if folder.exists() and not resume:
        raise ConfigError(f"experiment folder {folder} already exists: pass --resume to finish it, or choose another run.name")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    log.info("experiment %s: %d arm(s) %s, folder %s", name, len(arms), ", ".join(arms), folder)
    shared = prepare_shared(experiment, folder / "shared", tracking_uri)
    running = {arm_name: arm_config(arm_name, name, arm, experiment, shared) for arm_name, arm in arms.items()}
    results = {
        arm_name: _run_one_arm(f"{name}/{arm_name}", config, run_arm, folder / "arms" / arm_name, tracking_uri)
        for arm_name, config in running.items()
    }
    context = {"name": name, "spec": spec, "shared": shared, "machine": machine_description()}
    return write_experiment_report(folder, tracking_uri, experiment, running, results, context)


def _run_one_arm(name: str, config: Config, run_arm: ArmRunner, folder: Path, tracking_uri: str) -> dict:
    """Run one arm unless a previous attempt finished it; its result (run id or error) is kept in
    ``result.json``, written only once the arm has ended."""
    result_path = folder / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["status"] == "finished":
            log.info("arm %s: finished earlier (MLflow run %s), kept", name, result["run_id"])
            return result
    if folder.exists():  # a failed or interrupted attempt: start the arm again from scratch
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log.info("arm %s: starting (%s)", name, folder)
    started = time.perf_counter()
    try:
        run_id = run_arm(config, folder / "run", tracking_uri, name)
        result = {"status": "finished", "run_id": run_id}
    except Exception as error:  # an arm's failure is a result too; the others still run
        log.error("arm %s failed: %s", name, error)
        result = {"status": "failed", "run_id": None, "error": f"{type(error).__name__}: {error}"}
    result["minutes"] = (time.perf_counter() - started) / 60
    write_json(result_path, result)
    return result


def machine_description() -> str:
    """The CPU, the GPU if any, Python and torch: where an experiment's wall time was measured."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores, no GPU"
    return f"{platform.processor() or platform.machine()}, {device}, Python {platform.python_version()}, torch {torch.__version__}"
