"""Where a model came from: the chain back to the base model, read from MLflow, checkable in storage.

    model ← training run ← curated set ← samples ← sampling model ← training run ← … ← base model

Each trained model is a registered version whose tags (``topr.*``, written by
``topr.steps.train``) name its published files, its parent model's weights digest,
its training set and samples; the parent is the registered version with that digest, or, at
the end of the chain, the ``prepare_model`` run that converted the configured base model.
A published model's tags (the base model's run parameters) also hold the SHA-256 of its
manifest, which ``verify`` checks: files rewritten together with their manifest are caught.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from topr import storage
from topr.tracking import FILES_REMOVED_TAG, mlflow_client


class LineageError(LookupError):
    """A model reference that names no registered model version."""


class UncommittedModelError(LineageError):
    """A registered model version whose stage did not finish: no reader may use it."""


@dataclass
class Link:
    kind: str  # model, adapter (LoRA), training run, curated set, samples, sampling model, base model
    name: str
    uri: str
    digest: str = ""
    manifest_sha256: str = ""  # a published model's manifest, as recorded in MLflow
    commit_uri: str = ""  # a registered model's commit record (``committed_model``)
    version: str = ""  # its registered version


def resolve_version(client, reference: str):
    """``name@alias``, ``name/version``, ``models:/…`` or a published model URI → a model version."""
    from mlflow.exceptions import MlflowException

    reference = reference.removeprefix("models:/")
    try:
        if storage.is_s3(reference):
            found = client.search_model_versions(f"tags.`topr.model_uri` = '{reference.rstrip('/')}'")
            if found:
                return found[0]
        elif "@" in reference:
            return client.get_model_version_by_alias(*reference.split("@", 1))
        elif "/" in reference:
            return client.get_model_version(*reference.rsplit("/", 1))
    except MlflowException as error:
        raise LineageError(f"no registered model version {reference!r}: {error.message}") from None
    raise LineageError(f"{reference!r} names no registered model version (use name@alias, name/version or a model URI)")


def committed_model(client, version) -> tuple[str, str | None]:
    """Where a registered version's files are and the SHA-256 of their manifest, once its stage is
    known to have committed it (and ``topr gc`` has not removed its files, ``topr.retention``):
    the commit record its ``topr.commit_uri`` tag names lists it (see
    ``topr.steps.StageOutputs``), or, for a version registered without an artifact store (no
    record), the stage run that registered it FINISHED. A stage that registers a model and then
    fails leaves a version that no reader (the gate, promotion, a run starting from it) accepts.
    """
    tags, named = version.tags, f"{version.name}/{version.version}"
    if FILES_REMOVED_TAG in tags:
        raise UncommittedModelError(f"{named}: its files were removed ({tags[FILES_REMOVED_TAG]}): nothing needed it")
    model_uri, commit_uri = tags["topr.model_uri"], tags.get("topr.commit_uri")
    if commit_uri:
        problem = commit_problem(commit_uri, model_uri, str(version.version))
        if problem:
            raise UncommittedModelError(f"{named}: {problem}")
    else:
        status = client.get_run(version.run_id).info.status
        if status != "FINISHED":
            raise UncommittedModelError(f"{named}: the stage run {version.run_id} that registered it is {status}, not FINISHED")
    return model_uri, tags.get("topr.manifest_sha256")


def commit_problem(commit_uri: str, model_uri: str, version: str = "") -> str | None:
    """Why the commit record at ``commit_uri`` does not vouch for ``model_uri`` (registered as
    ``version``, when given), or None when it does."""
    record = storage.read_commit(commit_uri)
    if record is None:
        return f"the stage that registered it did not finish (no commit record at {commit_uri})"
    if not any(out.get("uri") == model_uri and (not version or out.get("registered_version") == version) for out in record["outputs"].values()):
        return f"the commit record {commit_uri} does not list it (a retried stage registered another version)"
    return None


def _dataset_digest(run, name: str) -> str:
    for dataset_input in run.inputs.dataset_inputs:
        if dataset_input.dataset.name == name:
            return dataset_input.dataset.digest
    return ""


def trace(tracking_uri: str, reference: str) -> list[Link]:
    """The chain from the model named by ``reference`` back to its base model."""
    client = mlflow_client(tracking_uri)
    version = resolve_version(client, reference)
    chain: list[Link] = []
    while version is not None:
        tags = version.tags
        run = client.get_run(version.run_id)
        iteration = run.data.tags.get("topr.iteration", "?")
        chain.append(
            Link(
                "model", f"{version.name}/{version.version}", tags["topr.model_uri"], tags["topr.weights_sha256"],
                tags.get("topr.manifest_sha256", ""), tags.get("topr.commit_uri", ""), str(version.version),
            )
        )  # fmt: skip
        if tags.get("topr.adapter_path"):
            chain.append(_adapter(tags))
        chain.append(Link("training run", f"{run.info.run_name} ({run.info.run_id})", f"runs:/{run.info.run_id}"))
        chain.append(Link("curated set", f"iteration {iteration}", tags["topr.train_set_uri"], _dataset_digest(run, f"train_set_iter{iteration}")))
        samples_digest = _dataset_digest(run, f"samples_iter{iteration}")
        chain.append(Link("samples", f"iteration {iteration}", tags["topr.samples_uri"], samples_digest))
        sampling_models = tags.get("topr.sampling_models", "")
        short_names = ", ".join(model[: len("sha256:") + 12] for model in sampling_models.split(","))
        chain.append(Link("sampling model", short_names, "", sampling_models.removeprefix("sha256:")))
        parent_digest = tags["topr.parent_weights_sha256"]
        version = _parent_version(client, version, parent_digest)
        if version is None:
            chain.append(_base_model(client, run, parent_digest, tags["topr.parent_model_uri"]))
    return chain


def _adapter(tags: dict[str, str]) -> Link:
    """The LoRA adapter a model was merged from (``topr.lora``): its weights file, on the parent's weights."""
    base = tags["topr.parent_weights_sha256"][:12]
    uri = storage.join(tags["topr.model_uri"], tags["topr.adapter_path"], "adapter_model.safetensors")
    return Link("adapter", f"LoRA rank {tags.get('topr.lora_rank', '?')} on sha256:{base}", uri, tags["topr.adapter_weights_sha256"])


def _parent_version(client, version, parent_digest: str):
    """The latest version registered before ``version`` with the parent's weights, or None. Only
    earlier versions count, so the walk ends even where digests repeat (a step that changed no
    weight makes a model its own parent)."""
    found = client.search_model_versions(f"name = '{version.name}' and tags.`topr.weights_sha256` = '{parent_digest}'")
    earlier = [candidate for candidate in found if int(candidate.version) < int(version.version)]
    return max(earlier, key=lambda candidate: int(candidate.version)) if earlier else None


def _base_model(client, run, digest: str, uri: str) -> Link:
    """The base model at ``uri``, named by the ``prepare_model`` run that published it there (or
    any with its weights digest). Only the run that published ``uri`` vouches for its manifest:
    another run's copy of the same weights may differ in its other files."""
    wanted = f"tags.`topr.stage` = 'prepare_model' and params.weights_sha256 = '{digest}'"
    for condition in (f"{wanted} and params.model_uri = '{uri}'", wanted):
        found = client.search_runs([run.info.experiment_id], condition, max_results=1)
        if found:
            break
    params = found[0].data.params if found else {}
    source = params.get("source", "") if found else "unknown (no prepare_model run with this digest)"
    published_here = params.get("model_uri") == uri
    manifest_sha256, commit_uri = (params.get("manifest_sha256", ""), params.get("commit_uri", "")) if published_here else ("", "")
    return Link("base model", source, uri, digest, manifest_sha256, commit_uri)


def verify(chain: list[Link]) -> list[str]:
    """Re-read every artifact of the chain from storage, re-hash it; return what is missing or changed
    (a published model's manifest against the digest recorded in MLflow, when one was), and every
    registered model whose stage did not commit it."""
    problems = []
    for link in chain:
        if not storage.is_s3(link.uri):
            continue
        if link.commit_uri:
            problem = commit_problem(link.commit_uri, link.uri, link.version)
            problems += [f"{link.name}: {problem}"] if problem else []
        if link.kind in ("model", "base model"):
            problems += storage.check_directory(link.uri, link.manifest_sha256 or None)
        elif not storage.exists(link.uri):
            problems.append(f"{link.uri}: missing")
        elif link.digest:
            with storage.local_file(link.uri) as local:
                if not storage.file_sha256(local).startswith(link.digest):
                    problems.append(f"{link.uri}: SHA-256 differs from the digest logged in MLflow ({link.digest})")
    return problems


def format_chain(chain: list[Link]) -> str:
    rows = [(("← " if index else "  ") + link.kind, link.name, link.uri, link.digest[:16]) for index, link in enumerate(chain)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    header = ("  what", "name", "where", "digest")
    widths = [max(width, len(title)) for width, title in zip(widths, header)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)


def chain_json(chain: list[Link]) -> str:
    return json.dumps([asdict(link) for link in chain], indent=2)


