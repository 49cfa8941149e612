"""Disk that does not fill: what ``topr gc`` may remove because nothing needs it, and what that frees.

Three kinds of files outlive their use:

- **Local copies of a published run.** ``topr run`` keeps kfp.local's artifacts under
  ``<run folder>/pipeline_root`` (a copy of every model a stage passes on). With an artifact
  store, every one of them is also published there, and lineage, the registry and the gate read
  that copy. Once the run is FINISHED (a stopped or failed run is resumed from its pipeline root,
  ``topr run --resume``), the local copies serve nothing: ``published_run_copies``.
- **Retired versions** (only with ``keep_versions``): a registered version that holds no alias,
  is not among the newest ``keep_versions`` of its model, is no ancestor of a kept version (its
  lineage: the parent's weights digest) and whose pipeline run is not RUNNING. Its files (its
  published folder, local or in object storage, and its MLflow copy) are removed, and the version
  is tagged ``topr.files_removed`` *before* they are, so that no reader (the gate, a promotion,
  a run starting from it, ``topr serve``) takes a half-removed model:
  ``topr.lineage.committed_model`` refuses it naming when and why.
- **An experiment's trained models** (only with ``topr experiment --drop-models``): once a unit
  has finished, its report needs its evaluations and figures, never its weights:
  ``unit_models``, removed the same way, versions tagged first.

Nothing else is touched: samples, curated sets and evaluations (small, and what lineage and
reports read), the rest of experiments' folders, and the shared start of an experiment, which
``--resume`` needs. Each item says how many bytes removing it frees: a file hard linked from elsewhere
(MLflow's copy of a local model, ``topr.tracking.link_tree``) frees nothing until its last link goes.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import yaml

from topr import storage
from topr.promotion import LOCK_SUFFIX
from topr.tracking import FILES_REMOVED_TAG, mlflow_client


@dataclass
class Removable:
    """Files that nothing needs, why, and the bytes removing them frees."""

    what: str
    why: str
    locations: list[str]
    freed_bytes: int = 0
    version: tuple[str, str] | None = None  # a retired registered version (name, version)
    removed: bool = False
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        state = "removed" if self.removed else "kept: topr gc --delete removes it"
        head = f"{self.what}: {format_bytes(self.freed_bytes)} ({state}; {self.why})"
        return [head, *(f"  {location}" for location in self.locations), *(f"  not removed: {problem}" for problem in self.problems)]


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def local_bytes(paths: list[Path]) -> int:
    """The bytes removing every path in ``paths`` frees: a file counts once, and only when all of
    its hard links are among them."""
    links: dict[tuple[int, int], list[os.stat_result]] = defaultdict(list)
    for root in paths:
        for path in [root] if root.is_file() else (item for item in root.rglob("*") if item.is_file() and not item.is_symlink()):
            stat = path.stat()
            links[(stat.st_dev, stat.st_ino)].append(stat)
    return sum(stats[0].st_size for stats in links.values() if len(stats) >= stats[0].st_nlink)


def object_bytes(uri: str) -> int:
    bucket, prefix = storage.split_s3(uri.rstrip("/") + "/")
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(item["Size"] for page in pages for item in page.get("Contents", []))


def remove_objects(uri: str) -> None:
    bucket, prefix = storage.split_s3(uri.rstrip("/") + "/")
    client = storage.s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def published_run_copies(tracking_uri: str, output_dir: str | Path) -> list[Removable]:
    """The pipeline roots of FINISHED ``topr run``s under ``output_dir`` that published everything
    to an artifact store (their ``config.yaml`` names one)."""
    client, found = mlflow_client(tracking_uri), []
    for root in sorted(Path(output_dir).glob("*/pipeline_root")):
        folder = root.parent
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
        store = ((config or {}).get("run") or {}).get("artifact_store")
        if not store:
            continue
        runs = _parent_runs(client, folder.name)
        if runs and all(run.info.status == "FINISHED" for run in runs):
            why = f"run {folder.name} FINISHED; every artifact is published under {store}"
            found.append(Removable(f"local copies of run {folder.name}", why, [str(root)], local_bytes([root])))
    return found


def _parent_runs(client, run_name: str, experiments: list[str] | None = None) -> list:
    """The pipeline (parent) runs named ``run_name`` in ``experiments`` (default: any)."""
    experiments = experiments or [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, f"attributes.run_name = '{run_name}'")
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


def retired_versions(tracking_uri: str, keep_versions: int) -> list[Removable]:
    """Every registered version nothing needs (see the module's docstring), with its files."""
    client, found = mlflow_client(tracking_uri), []
    for registered in client.search_registered_models():
        if LOCK_SUFFIX in registered.name:  # a promotion lock, or the record of a reclaimed one
            continue
        versions = {str(version.version): version for version in client.search_model_versions(f"name = '{registered.name}'")}
        kept = _kept(client, client.get_registered_model(registered.name).aliases, versions, keep_versions)
        for number in sorted(set(versions) - kept, key=int):
            version = versions[number]
            if FILES_REMOVED_TAG not in version.tags:
                found.append(_version_removable(version, f"no alias, not among the newest {keep_versions}, no kept version descends from it"))
    return found


def unit_models(tracking_uri: str, run_id: str, folder: Path) -> list[Removable]:
    """The trained models of an experiment's unit whose pipeline run is ``run_id``, for an experiment
    that keeps a unit's evaluations and not its models (``topr experiment --drop-models``): the
    files of every version registered by a run of the unit (its earlier, interrupted attempts
    too: the pipeline runs of the same name in the same experiment), and any saved model left in
    the unit's ``folder`` (the local copy, where an artifact store holds the published one)."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    attempts = [attempt.info.run_id for attempt in _parent_runs(client, run.info.run_name, [run.info.experiment_id])]
    stages = [stage.info.run_id for attempt in attempts for stage in client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{attempt}'")]
    found = []
    if stages:
        for version in client.search_model_versions("run_id IN ({})".format(", ".join(f"'{stage}'" for stage in stages))):
            item = _version_removable(version, f"trained by {run.info.run_name}, whose evaluations the experiment keeps")
            if item.locations or FILES_REMOVED_TAG not in version.tags:  # tagged and gone: nothing left to do
                found.append(item)
    listed = {location for item in found for location in item.locations}
    for model in sorted(path.parent for path in folder.rglob("config.json") if any(path.parent.glob("*.safetensors"))):
        if str(model) not in listed:
            found.append(Removable(f"local copy {model.name}", f"a model saved by {run.info.run_name}", [str(model)], local_bytes([model])))
    return found


def _version_removable(version, why: str) -> Removable:
    locations = _version_files(version)
    return Removable(f"model {version.name}/{version.version}", why, locations, _bytes(locations), (version.name, str(version.version)))


def _kept(client, aliases: dict[str, str], versions: dict, keep_versions: int) -> set[str]:
    """The versions to keep: aliased, the newest ``keep_versions``, those of a RUNNING pipeline
    run, and every ancestor of these (the versions with their parents' weights)."""
    newest = sorted(versions, key=int, reverse=True)[:keep_versions]
    kept = {str(version) for version in aliases.values()}
    kept |= set(newest) | {number for number, version in versions.items() if _pipeline_running(client, version)}
    by_weights = defaultdict(list)
    for number, version in versions.items():
        by_weights[version.tags.get("topr.weights_sha256")].append(number)
    pending = list(kept)
    while pending:
        parent = versions[pending.pop()].tags.get("topr.parent_weights_sha256")
        for number in by_weights.get(parent, []) if parent else []:
            if number not in kept:
                kept.add(number)
                pending.append(number)
    return {str(number) for number in kept}


def _pipeline_running(client, version) -> bool:
    """Whether the pipeline run that trained ``version`` (its stage run's parent) still runs."""
    from mlflow.exceptions import MlflowException

    try:
        stage = client.get_run(version.run_id)
        parent_id = stage.data.tags.get("mlflow.parentRunId")
        return stage.info.status == "RUNNING" or (parent_id is not None and client.get_run(parent_id).info.status == "RUNNING")
    except MlflowException:
        return False


def _version_files(version) -> list[str]:
    """A version's published folder and, when it differs, its MLflow copy (local folders only)."""
    locations = [version.tags.get("topr.model_uri", "")]
    source = urlparse(version.source)
    if source.scheme in ("", "file") and Path(source.path).exists():
        locations.append(source.path)
    return list(dict.fromkeys(location for location in locations if location and (storage.is_s3(location) or Path(location).exists())))


def _bytes(locations: list[str]) -> int:
    local = [Path(location) for location in locations if not storage.is_s3(location)]
    return local_bytes(local) + sum(object_bytes(location) for location in locations if storage.is_s3(location))


def remove(tracking_uri: str, item: Removable, reason: str) -> None:
    """Remove ``item``'s files; a retired version is tagged ``topr.files_removed`` first, so that no
    reader takes it while its files go. What could not be removed is listed in ``item.problems``."""
    if item.version:
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        mlflow_client(tracking_uri).set_model_version_tag(*item.version, FILES_REMOVED_TAG, f"{when} by {reason}")
    for location in item.locations:
        try:
            if storage.is_s3(location):
                remove_objects(location)
            else:
                shutil.rmtree(location)
        except (storage.StorageError, OSError) as error:
            item.problems.append(f"{location}: {error}")
    item.removed = not item.problems


def collect(tracking_uri: str, output_dir: str | Path, keep_versions: int | None, delete: bool = False) -> list[Removable]:
    """What nothing needs: the local copies of published runs under ``output_dir`` and, with
    ``keep_versions``, the retired versions; removed with ``delete``."""
    found = published_run_copies(tracking_uri, output_dir)
    if keep_versions is not None:
        found += retired_versions(tracking_uri, keep_versions)
    if delete:
        for item in found:
            remove(tracking_uri, item, f"topr gc --keep-versions {keep_versions}" if item.version else "topr gc")
    return found
