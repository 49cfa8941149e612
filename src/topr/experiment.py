"""``topr experiment``: several arms of the loop on the same prompts and data, in replicates, compared.

An experiment is a spec (YAML): a description, overrides applied to every arm, the arms (each a
name and its own overrides), how many replicates to run and which arm the others are compared
with. The named specs in ``topr/experiments/`` hold this project's comparisons
(``topr experiment --list``); a path to a YAML file of the same shape runs your own.

A replicate draws its own training prompts, samples, curation choices and batch order (every seed
of the experiment plus the replicate's index: ``replicate_config``), and every arm of that
replicate uses the same ones; all replicates are scored on the same held-out problems. So arms
compare by their paired difference per replicate (``topr.stats``), not by one seed's luck.

Every arm × replicate is a whole run of the loop, in this process (``topr.inprocess``), tracked
in MLflow as one parent run with the layout of a pipeline run. The shared work is done once:

- the starting model is prepared once, and evaluated once on the held-out problems;
- each replicate's iteration-1 samples are drawn once from it and handed to every arm whose
  model, task and sample settings are the experiment's (``sample.first_iteration_samples``), so
  those arms train their first iteration on the very same completions; later iterations sample
  from each arm's own model, with the same seeds and the same sample budget.

The configuration of arm ``a`` is: the config file, then the spec's overrides, then the arm's,
then the command line's. An arm that fails is reported with its error and the others still run, and
``topr experiment`` exits 1 while any unit has failed (``failure_summary``); ``--resume`` keeps the
units an interrupted experiment had finished and runs every other one again.
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from topr import console
from topr.config import Config, ConfigError, apply_overrides, build_config, config_to_dict
from topr.inprocess import SharedStart, run_in_process
from topr.workflow import IterationFiles
from topr.records import write_json

log = logging.getLogger(__name__)

ArmRunner = Callable[[Config, Path, str, str, SharedStart | None], str]
"""Runs one arm × replicate: ``(config, run folder, tracking URI, run name, shared start or None)
-> parent MLflow run id`` (``topr.inprocess.run_in_process``; tests hand in their own)."""

SHARED_SECTIONS = ("model", "task", "sample")
"""The sections that decide iteration 1's data: arms that keep the experiment's share its samples."""


class ExperimentSpec(BaseModel):
    """What an experiment compares. Loaded from YAML; every field is checked."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What the experiment shows, one paragraph (goes into the report).")
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every arm.")
    arms: dict[str, list[str]] = Field(description="Arm name -> its section.field=value overrides.")
    replicates: int = Field(
        1,
        ge=1,
        le=100,
        description="Replicates of every arm, each with its own training prompts, samples and batch order "
        "(shared by the arms of that replicate); `--replicates N` overrides it.",
    )
    reference: str | None = Field(
        None, description="The arm every other arm is compared with (paired, per replicate); default: the first."
    )
    also_compared_with: list[str] = Field(
        default_factory=list,
        description="Further arms every other arm is compared with in the same way, each in its own table after the "
        "reference's: the arm an ablation departs from, say, where the reference is another method. Holm corrects "
        "within each table.",
    )
    equivalence_margin: float | None = Field(
        None,
        gt=0,
        le=1,
        description="A margin (a fraction: 0.05 = 5 points), set before the run, within which an arm counts as "
        "equivalent to the reference: the report then gives each comparison's TOST p-value (two one-sided "
        "t-tests over replicates), and only p < 0.05 supports a tie. None: no equivalence claim.",
    )
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

    @model_validator(mode="after")
    def _known_arms(self) -> ExperimentSpec:
        for field, names in (("reference", [self.reference] if self.reference else []), ("also_compared_with", self.also_compared_with)):
            unknown = [arm for arm in names if arm not in self.arms]
            if unknown:
                raise ValueError(f"{field} {', '.join(map(repr, unknown))} is not one of the arms ({', '.join(self.arms)})")
        return self

    @property
    def reference_arm(self) -> str:
        return self.reference or next(iter(self.arms))

    @property
    def references(self) -> list[str]:
        """The reference arm, then every further arm compared with, each once."""
        return list(dict.fromkeys([self.reference_arm, *self.also_compared_with]))

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


def shares_start(arm: Config, experiment: Config) -> bool:
    """Whether ``arm`` starts from the experiment's model and would evaluate it exactly as the
    shared evaluation did (same model, task and evaluation settings)."""
    return all(getattr(arm, section) == getattr(experiment, section) for section in ("model", "task", "evaluate"))


REPLICATE_SEED_STRIDE = 100_000
"""Replicate r samples with seed + 100,000·r: beyond what iterations (≤ 50) and shards (1,000·s,
s < 64) add, so no two replicates ever draw with the same seed."""


def replicate_config(config: Config, replicate: int) -> Config:
    """``config`` for replicate ``replicate`` (0-based): its training prompts, curation and training
    seeds each moved on by the replicate's index, its sampling seed by ``REPLICATE_SEED_STRIDE``
    times it. Held-out prompts (``task.seed``) and the evaluation seed stay, so every replicate is
    scored on the same problems; replicate 0 is ``config`` itself."""
    if replicate == 0:
        return config
    train_seed = config.task.seed if config.task.train_seed is None else config.task.train_seed
    return config.model_copy(
        update={
            "task": config.task.model_copy(update={"train_seed": train_seed + replicate}),
            "sample": config.sample.model_copy(update={"seed": config.sample.seed + REPLICATE_SEED_STRIDE * replicate}),
            "curate": config.curate.model_copy(update={"seed": config.curate.seed + replicate}),
            "train": config.train.model_copy(update={"seed": config.train.seed + replicate}),
        }
    )


def replicate_name(replicate: int) -> str:
    return f"rep{replicate}"


def prepare_shared(experiment: Config, folder: Path, tracking_uri: str, replicates: int) -> dict:
    """Made once for all arms: the starting model (a path or a registered ``models:/`` one), its
    evaluation on the held-out prompts, and each replicate's training prompts and verified
    iteration-1 samples (``<folder>/rep<r>/``)."""
    from topr.evaluate import run_evaluate
    from topr.models import prepare_base_model
    from topr.prompts import run_prompts
    from topr.sample import run_sample
    from topr.steps import registered_model_source
    from topr.verify import run_verify

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    model_dir, eval_prompts, start = folder / "base_model", folder / "eval_prompts.jsonl", IterationFiles(folder / "start")
    if not (model_dir / "config.json").exists():  # save_policy renames a complete folder into place
        source, manifest_sha256 = registered_model_source(tracking_uri, experiment.model.path)
        prepare_base_model(source, model_dir, manifest_sha256)
    by_replicate = {}
    for replicate in range(replicates):
        config, files = replicate_config(experiment, replicate), IterationFiles(folder / replicate_name(replicate))
        files.folder.mkdir(exist_ok=True)
        train_prompts = files.folder / "train_prompts.jsonl"
        counts = run_prompts(config, train_prompts, eval_prompts)
        if not files.samples.exists():
            run_sample(config, str(model_dir), train_prompts, files.samples, iteration=1)
        summary = run_verify(config.task, files.samples, files.verified)
        by_replicate[replicate_name(replicate)] = {"samples": str(files.samples), "samples_accuracy": summary["accuracy"], "samples_count": summary["count"]}
    if not start.evaluation.exists():
        start.folder.mkdir(exist_ok=True)
        run_evaluate(experiment, str(model_dir), eval_prompts, start.evaluation, start.completions)
    timing = folder / "minutes.json"  # how long the first, complete preparation took; a resume keeps it
    if not timing.exists():
        write_json(timing, {"minutes": (time.perf_counter() - started) / 60})
    return {
        "model_dir": str(model_dir),
        "start_evaluation": str(start.evaluation),
        "eval_prompts": counts["eval_prompts"],
        "replicates": by_replicate,
        "minutes": json.loads(timing.read_text())["minutes"],
    }


def arm_config(name: str, experiment_name: str, arm: Config, experiment: Config, shared: dict, replicate: int = 0) -> Config:
    """The arm's config as it runs in ``replicate``: that replicate's seeds, the shared starting
    model and data where they apply, its own names, and no gate (arms are compared, not promoted)."""
    arm, experiment = replicate_config(arm, replicate), replicate_config(experiment, replicate)
    update = {
        "run": arm.run.model_copy(update={"name": name, "registered_model": f"{experiment_name}-{name}", "experiment": f"experiment-{experiment_name}"}),
        "gate": arm.gate.model_copy(update={"enabled": False}),
    }
    if arm.model == experiment.model:
        update["model"] = arm.model.model_copy(update={"path": shared["model_dir"]})
    if shares_first_iteration(arm, experiment):
        samples = shared["replicates"][replicate_name(replicate)]["samples"]
        update["sample"] = arm.sample.model_copy(update={"first_iteration_samples": samples})
    return arm.model_copy(update=update)


def run_experiment(
    name: str,
    spec: ExperimentSpec,
    experiment: Config,
    arms: dict[str, Config],
    folder: Path,
    tracking_uri: str,
    resume: bool = False,
    run_arm: ArmRunner = run_in_process,
    verbose: bool = False,
    drop_models: bool = False,
) -> Path:
    """Run every arm in every replicate (replicate by replicate, so that an interrupted experiment
    holds whole replicates), skipping the units a resumed experiment had finished; write and log
    the report. A unit's whole output goes to ``run.log`` in its folder; the console shows its
    stages' lines (``topr.console``), or everything when ``verbose``. With ``drop_models``, each
    finished unit's trained models are removed (``drop_unit_models``)."""
    from topr.report import write_experiment_report

    if folder.exists() and not resume:
        raise ConfigError(f"experiment folder {folder} already exists: pass --resume to finish it, or choose another run.name")
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / "experiment.yaml"  # before the arms' shared paths replace model.path
    if settings.exists():
        refuse_changed_config(name, settings, experiment)
    else:
        settings.write_text(yaml.safe_dump(config_to_dict(experiment), sort_keys=False))
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    log.info("experiment %s: %d arm(s) %s × %d replicate(s), folder %s", name, len(arms), ", ".join(arms), spec.replicates, folder)
    shared = prepare_shared(experiment, folder / "shared", tracking_uri, spec.replicates)
    start = SharedStart(shared["model_dir"], Path(shared["start_evaluation"]))
    running = {arm_name: arm_config(arm_name, name, arm, experiment, shared) for arm_name, arm in arms.items()}
    results: dict[str, dict[str, dict]] = {arm_name: {} for arm_name in arms}
    for replicate in range(spec.replicates):
        for arm_name, arm in arms.items():
            config = arm_config(arm_name, name, arm, experiment, shared, replicate)
            unit = f"{name}/{arm_name}/{replicate_name(replicate)}"
            unit_folder = folder / "arms" / arm_name / replicate_name(replicate)
            unit_start = start if shares_start(arm, experiment) else None  # its own model or evaluation: made by the unit
            result = _run_one_unit(unit, config, run_arm, unit_folder, tracking_uri, unit_start, verbose)
            if drop_models and result["status"] == "finished":
                drop_unit_models(unit, tracking_uri, result["run_id"], unit_folder)
            results[arm_name][replicate_name(replicate)] = result
    context = {"name": name, "spec": spec, "shared": shared, "machine": machine_description(), "folder": folder}
    return write_experiment_report(folder, tracking_uri, experiment, running, results, context)


def _run_one_unit(
    name: str, config: Config, run_arm: ArmRunner, folder: Path, tracking_uri: str, start: SharedStart | None, verbose: bool = False
) -> dict:
    """Run one arm × replicate unless a previous attempt finished it; its result (run id or error)
    is kept in ``result.json``, written only once the unit has ended."""
    result_path = folder / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["status"] == "finished":
            refuse_changed_config(name, folder / "config.yaml", config)
            log.info("%s: finished earlier (MLflow run %s), kept", name, result["run_id"])
            return result
    if folder.exists():  # a failed or interrupted attempt: start the unit again from scratch
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    log.info("%s: starting (%s), log %s", name, folder, folder / "run.log")
    started = time.perf_counter()
    try:
        with console.capture(folder / "run.log", verbose):
            run_id = run_arm(config, folder / "run", tracking_uri, name, start)
        result = {"status": "finished", "run_id": run_id}
    except Exception as error:  # a unit's failure is a result too; the others still run
        log.error("%s failed: %s", name, error)
        result = {"status": "failed", "run_id": None, "error": f"{type(error).__name__}: {error}"}
    result["minutes"] = (time.perf_counter() - started) / 60
    write_json(result_path, result)
    return result


def drop_unit_models(name: str, tracking_uri: str, run_id: str, folder: Path) -> None:
    """Remove the models a finished unit trained (``topr.retention.unit_models``: every registered
    version's files, each version tagged ``topr.files_removed`` first, and any saved model left in
    the unit's folder): the report reads the unit's evaluations and figures, never its weights, and
    a 135M-parameter model is ~0.5 GB. A resumed experiment drops those of the units it keeps, too.
    What cannot be removed is logged and kept; the experiment goes on."""
    from topr.retention import format_bytes, remove, unit_models

    try:
        for item in unit_models(tracking_uri, run_id, folder):
            remove(tracking_uri, item, "topr experiment --drop-models")
            if item.problems:
                log.warning("%s: %s not wholly removed: %s", name, item.what, "; ".join(item.problems))
            else:
                log.info("%s: removed %s, %s freed", name, item.what, format_bytes(item.freed_bytes))
    except Exception as error:  # the unit's results stand; its models stay for topr gc or a later --resume
        log.warning("%s: its models were not removed: %s: %s", name, type(error).__name__, error)


def failure_summary(name: str, folder: Path) -> str | None:
    """What to tell when units of the experiment's last report (``results.json``) failed: how many,
    each with its error, and where their logs are; None when every unit finished."""
    units = json.loads((folder / "results.json").read_text())["units"]
    failed = [
        f"{name}/{arm}/{replicate} ({result.get('error', 'no error recorded')})"
        for arm, by_replicate in units.items()
        for replicate, result in by_replicate.items()
        if result["status"] != "finished"
    ]
    if not failed:
        return None
    total = sum(len(by_replicate) for by_replicate in units.values())
    return (
        f"{len(failed)} of {total} unit(s) failed: {', '.join(failed)}. Each unit's output is in its run.log under "
        f"{folder / 'arms'}; --resume runs the failed units again and keeps the finished ones"
    )


UNCOMPARED_ON_RESUME = ("cluster.", "run.tracking_uri", "run.output_dir")
"""Settings that do not change what a unit computes (a cluster's pods, where results are kept)."""


def refuse_changed_config(name: str, saved_path: Path, config: Config) -> None:
    """A finished unit (or the experiment's own settings) is kept only if it ran with the
    configuration it would run with now: a spec, an override or a default changed since would
    mix two experiments in one report. Fields that did not exist then are not compared."""
    from topr.tracking import flatten

    saved = flatten(yaml.safe_load(saved_path.read_text()))
    now = flatten(config_to_dict(config))
    compared = sorted(key for key in saved.keys() & now.keys() if not key.startswith(UNCOMPARED_ON_RESUME))
    changed = [f"{key}: {saved[key]} then, {now[key]} now" for key in compared if saved[key] != now[key]]
    if changed:
        raise ConfigError(
            f"cannot resume: {name} ran with another configuration ({'; '.join(changed)}). "
            "The spec, the overrides or a default changed; choose another run.name to run it anew"
        )


def machine_description() -> str:
    """The CPU, the GPU if any, Python and torch: where an experiment's wall time was measured."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores, no GPU"
    return f"{platform.processor() or platform.machine()}, {device}, Python {platform.python_version()}, torch {torch.__version__}"
