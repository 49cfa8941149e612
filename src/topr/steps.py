"""The pipeline's steps: each library stage wrapped with its MLflow tracking.

One function per Kubeflow component. A component hands its step a ``StageContext`` (the run's
configuration, tracking server, MLflow parent run and iteration) and its artifact paths, and
copies the returned metrics into its Metrics artifact, so everything a step does — the stage,
the datasets and models it publishes and logs, the figures it reports — is visible to library
tests. ``StageContext.stage`` opens a stage's MLflow run and its ``StageOutputs`` and commits
them; ``TrainedModel`` publishes and registers a trained model with its lineage.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from topr import console, promotion, storage
from topr.config import Config, build_config, config_to_dict, config_to_yaml
from topr.tracking import (
    EVALUATION_ARTIFACT,
    SKIPPED_TAG,
    START_VERSION_TAG,
    TRAIN_PROMPTS_TAG,
    StageRun,
    StepMetrics,
    check_tracking_server,
    finish_pipeline_run,
    flatten,
    metric_history,
    mlflow_client,
    stage_run,
    start_pipeline_run,
)

log = logging.getLogger(__name__)


def parse_config(config_json: str) -> Config:
    return build_config(json.loads(config_json), source="pipeline parameter config_json")


def report_metrics(metrics, figures: dict) -> None:
    """Copy a step's figures (the numbers among them) into its component's Metrics artifact, and
    into the artifact's file: kfp keeps a Metrics artifact's figures in its metadata alone, and
    kfp.local's cache takes a task whose output file is missing for one that never ran, so
    ``topr run --resume`` would run the stage again."""
    from topr.records import write_json

    numbers = {name: value for name, value in figures.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for name, value in numbers.items():
        metrics.log_metric(name, value)
    write_json(metrics.path, numbers)


def check_services(tracking_uri: str, artifact_store: str | None) -> None:
    """Fail before any expensive work if the tracking server or the object store is unreachable."""
    check_tracking_server(tracking_uri)
    if artifact_store is not None:
        storage.check_reachable(artifact_store)


@dataclass(frozen=True)
class StageContext:
    """What the pipeline hands every step: the run's configuration, its MLflow tracking URI, the
    pipeline run's MLflow run (the parent of every stage's run) and the iteration (0 for the
    stages before the first)."""

    config: Config
    tracking_uri: str
    parent_run_id: str
    iteration: int = 0

    @classmethod
    def from_pipeline(cls, config_json: str, tracking_uri: str, parent_run_id: str, iteration: int = 0) -> StageContext:
        """The context from a component's pipeline parameters (the configuration as JSON)."""
        return cls(parse_config(config_json), tracking_uri, parent_run_id, iteration)

    def at(self, iteration: int) -> StageContext:
        return replace(self, iteration=iteration)

    def published_uri(self, name: str, iteration: int | None = None) -> str | None:
        """Where a stage of this iteration (or of ``iteration``) publishes ``name``:
        ``<artifact_store>/<parent run id>/iter<i>/<name>``, or None without an artifact store.
        The run id and iteration make the key unique, so no iteration's artifact is overwritten."""
        if self.config.run.artifact_store is None:
            return None
        return storage.join(self.config.run.artifact_store, self.parent_run_id, f"iter{self.iteration if iteration is None else iteration}", name)

    @contextmanager
    def stage(self, name: str, part: str = "") -> Iterator[tuple[StageRun, StageOutputs]]:
        """The stage's MLflow run (``iter<i>/<name>[/<part>]``, ending FAILED if the block raises)
        and what it publishes, committed when the block ends without error. Its start and end,
        with the figures it logged, go to the console (``topr.console``)."""
        console.stage_started(name, self.iteration)
        started = time.perf_counter()
        run = None
        try:
            with stage_run(self.tracking_uri, self.parent_run_id, name, self.iteration, part) as run:
                outputs = StageOutputs(self, name, run)
                yield run, outputs
                outputs.commit()
        except BaseException:
            console.stage_ended(name, self.iteration, time.perf_counter() - started, run.logged if run else {}, failed=True)
            raise
        console.stage_ended(name, self.iteration, time.perf_counter() - started, run.logged)


class StageOutputs:
    """What one stage publishes under ``<artifact_store>/<parent run>/iter<i>/``, and its commit
    record ``<stage>.commit.json`` there, written last (``commit``): the outputs with their
    digests. A retried stage finds its earlier attempt's outputs: the same content counts as
    published; other content is replaced if that attempt never committed, else refused. Without an
    artifact store nothing is published and the stage run's FINISHED status is the only record;
    a stage that published nothing commits nothing.
    """

    def __init__(self, context: StageContext, stage: str, run):
        self.context, self.stage, self.run = context, stage, run
        self.commit_uri = context.published_uri(f"{stage}.commit.json")
        self.outputs: dict[str, dict[str, str]] = {}
        self._replace_uncommitted: bool | None = None

    @property
    def replace_uncommitted(self) -> bool:
        """Whether an earlier attempt's outputs may be replaced: it never committed (read once)."""
        if self._replace_uncommitted is None:
            self._replace_uncommitted = self.commit_uri is None or storage.read_commit(self.commit_uri) is None
        return self._replace_uncommitted

    def file(self, local: str | Path, name: str) -> str | None:
        """Publish a file as ``name``; its URI, or None without an artifact store."""
        uri = self.context.published_uri(name)
        if uri is not None:
            storage.publish_file(local, uri, self.replace_uncommitted)
            self.outputs[name] = {"uri": uri, "sha256": storage.file_sha256(local)}
        return uri

    def directory(self, local: str | Path, name: str) -> str | None:
        """Publish a directory (its manifest last) as ``name``; its URI, or None without an artifact store."""
        uri = self.context.published_uri(name)
        if uri is not None:
            manifest = storage.publish_directory(local, uri, self.replace_uncommitted)
            self.outputs[name] = {"uri": uri, "manifest_sha256": storage.manifest_sha256(manifest)}
        return uri

    def model(self, local: str | Path, name: str) -> dict[str, str]:
        """Publish a model directory as ``name``: what its registration records, ``model_uri``,
        ``manifest_sha256`` (so that readers can check the manifest, ``storage.fetch_directory``)
        and ``commit_uri`` (so that they can require the commit, ``lineage.committed_model``);
        without an artifact store, only the local directory."""
        uri = self.directory(local, name)
        if uri is None:
            return {"model_uri": str(local)}
        return {"model_uri": uri, "manifest_sha256": self.outputs[name]["manifest_sha256"], "commit_uri": self.commit_uri}

    def registered(self, name: str, version: str) -> None:
        """Record in the commit that the output ``name`` was registered as ``version``."""
        if name in self.outputs:
            self.outputs[name]["registered_version"] = str(version)

    def commit(self) -> None:
        """The stage's last act: its commit record (see ``storage.commit``)."""
        if self.commit_uri is not None and self.outputs:
            storage.commit(self.commit_uri, self.stage, self.context.iteration, self.run.run_id, self.outputs)


def start(config_json: str, tracking_uri: str, run_name: str, kfp_run_id: str = "", resume_run_id: str = "") -> str:
    """Create the parent MLflow run (or continue the ended run ``resume_run_id``); its id is
    handed to every later step."""
    config = parse_config(config_json)
    check_services(tracking_uri, config.run.artifact_store)
    return start_pipeline_run(tracking_uri, config, run_name, kfp_run_id, resume_run_id)


def start_with_form(config_json: str, tracking_uri: str, run_name: str, kfp_run_id: str, resume_run_id: str, form_defaults: str, skippable: bool, **form) -> tuple[str, str, str]:
    """``start_run``'s step: write the run form's typed parameters over ``config_json``
    (``topr.config.apply_run_form``; refused before any run is created when a value is invalid),
    then ``start``. Returns the parent run's id, the run's configuration, which every later task
    reads, and why the run trains nothing ("" when it trains: ``skip_reason``). Only a pipeline
    compiled to skip its loop (``skippable``) asks; a resumed run, or one whose form changed a
    parameter, always trains."""
    from topr.config import apply_run_form

    applied = apply_run_form(config_json, json.loads(form_defaults), form)
    config = parse_config(applied)
    reason, start_version = skip_reason(config, tracking_uri) if skippable and applied == config_json and not resume_run_id else ("", "")
    parent_run_id = start(applied, tracking_uri, run_name, kfp_run_id, resume_run_id)
    mark_start(tracking_uri, parent_run_id, reason, start_version)
    return parent_run_id, applied, reason


def skip_reason(config: Config, tracking_uri: str) -> tuple[str, str]:
    """Why this run should train nothing ("" when it should), and the registered version it starts
    from ("name/N", "" for none): with ``run.skip_unchanged_prompts`` (what ``topr schedule``
    sets), a run from a registered model trains nothing when its training prompts
    (``topr.prompts.prompts_digest``) are those that version was trained on, or those a finished
    run already trained it on (whose gate then kept the champion: training again would repeat it)."""
    if not (config.run.skip_unchanged_prompts and config.model.path.startswith("models:/")):
        return "", ""
    from topr.lineage import resolve_version
    from topr.prompts import prompts_digest, training_prompts

    client = mlflow_client(tracking_uri)
    version = resolve_version(client, config.model.path)
    start_version, digest = f"{version.name}/{version.version}", prompts_digest(training_prompts(config))
    anyway = "nothing new to learn, so nothing was trained (run.skip_unchanged_prompts=false trains anyway)"
    if version.tags.get(TRAIN_PROMPTS_TAG) == digest:
        return f"the training prompts (sha256 {digest[:16]}) are those {start_version} was trained on: {anyway}", start_version
    experiment = client.get_experiment_by_name(config.run.experiment)
    earlier = experiment and client.search_runs(
        [experiment.experiment_id],
        f"tags.`{START_VERSION_TAG}` = '{start_version}' and tags.`{TRAIN_PROMPTS_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if earlier:
        run = earlier[0]
        decision = run.data.tags.get("topr.gate", "no gate")
        return f"run {run.info.run_name} ({run.info.run_id}) already trained {start_version} on these training prompts (sha256 {digest[:16]}), and its gate said {decision!r}: {anyway}", start_version
    return "", start_version


def mark_start(tracking_uri: str, parent_run_id: str, reason: str, start_version: str) -> None:
    """Tag the parent run with the registered version it starts from, and why it trains nothing
    (``topr.skipped``, which a retried start that now trains removes)."""
    client = mlflow_client(tracking_uri)
    if start_version:
        client.set_tag(parent_run_id, START_VERSION_TAG, start_version)
    if reason:
        client.set_tag(parent_run_id, SKIPPED_TAG, reason)
        log.info("skipping the run: %s", reason)
    elif SKIPPED_TAG in client.get_run(parent_run_id).data.tags:
        client.delete_tag(parent_run_id, SKIPPED_TAG)


def finish(config_json: str, tracking_uri: str, kfp_run_id: str, failed: bool, run_page: str = "") -> None:
    """Close the MLflow run of a pipeline run (found by its Kubeflow run id). With ``run_page``,
    write the whole run there as an HTML page for Kubeflow's UI: drawn last, it has the starting
    model, every iteration, the gains over the start and the gate's decision, whichever of the
    tasks finished first (the pages the evaluations draw show the run so far)."""
    from topr.config import RunConfig
    from topr.report import run_html

    status = "FAILED" if failed else "FINISHED"
    # Read, not validated: the run may have failed on this very configuration (a bad value that
    # start_run refused), and its MLflow run must be closed all the same.
    try:
        experiment = json.loads(config_json)["run"]["experiment"]
    except (ValueError, KeyError, TypeError):
        experiment = RunConfig().experiment
    run_id = finish_pipeline_run(tracking_uri, experiment, kfp_run_id, status)
    if not run_page:
        return
    title = f"Kubeflow run {kfp_run_id}: {status}"
    if run_id is None:
        page = f"<p>{html.escape(title)}: no MLflow run was started.</p>\n"
    else:
        try:  # best-effort: the run is closed whatever the page does
            run = mlflow_client(tracking_uri).get_run(run_id)
            title = f"{run.info.run_name}: the run, {status}"
            skipped = run.data.tags.get(SKIPPED_TAG)
            page = f"<h2>{html.escape(title)}</h2><p>skipped: {html.escape(skipped)}</p>\n" if skipped else run_html(tracking_uri, run_id, title)
        except Exception as error:  # noqa: BLE001 - whatever broke, the run stands
            log.warning("could not draw the run's page for the pipeline UI: %s", error)
            page = f"<p>{html.escape(title)}: the page could not be drawn ({html.escape(str(error))}); the run's figures are in MLflow.</p>\n"
    Path(run_page).write_text(page)


def registered_model_source(tracking_uri: str, model_path: str) -> tuple[str, str | None]:
    """Where a ``models:/name@alias`` (or ``models:/name/version``) model's files are (other paths
    as given), and the SHA-256 of its manifest recorded when it was registered (None when none
    was: a path, or a model registered without an artifact store)."""
    if not model_path.startswith("models:/"):
        return model_path, None
    from topr.lineage import committed_model, resolve_version

    client = mlflow_client(tracking_uri)
    version = resolve_version(client, model_path)
    model_uri, manifest_sha256 = committed_model(client, version)
    log.info("%s is %s version %s at %s", model_path, version.name, version.version, model_uri)
    return model_uri, manifest_sha256


def prepare_model(context: StageContext, model: str) -> dict:
    """Copy (or convert) the configured starting model into the directory ``model`` and publish it."""
    from topr.models import prepare_base_model

    with context.stage("prepare_model") as (run, outputs):
        source, manifest_sha256 = registered_model_source(context.tracking_uri, context.config.model.path)
        digest = prepare_base_model(source, model, manifest_sha256)
        published = outputs.model(model, "model")
        run.log_params({"source": context.config.model.path, "resolved_source": source, "weights_sha256": digest, **published})
    return {"weights_sha256": digest}


def prompts(context: StageContext, train_prompts: str, eval_prompts: str) -> dict:
    from topr.prompts import run_prompts

    with context.stage("prompts") as (run, outputs):
        counts = run_prompts(context.config, train_prompts, eval_prompts)
        run.tag_parent(TRAIN_PROMPTS_TAG, counts["train_prompts_sha256"])
        for path, name, use in ((train_prompts, "train_prompts", "training"), (eval_prompts, "eval_prompts", "evaluation")):
            run.log_dataset(path, name, use, source=outputs.file(path, f"{name}.jsonl"))
        run.log_metrics(counts)
    return counts


def sample(context: StageContext, model: str, train_prompts: str, samples: str, shard: int = 0, shards: int = 1) -> dict:
    """Sample one shard of the iteration's prompts (``collect_samples`` publishes the whole set)."""
    from topr.sample import run_sample

    config = context.config
    with context.stage("sample", f"shard{shard}of{shards}" if shards > 1 else "") as (run, _):
        run.log_params({**config.sample.model_dump(), "shard": shard, "shards": shards})
        summary = run_sample(config, model, train_prompts, samples, context.iteration, shard, shards)
        run.log_metrics(summary)
    return summary


def collect_samples(context: StageContext, shards: list[str], samples: str) -> dict:
    """Join the shards' samples in shard order, then publish and log them as the iteration's samples."""
    from topr.sample import collect_shards

    with context.stage("collect_samples") as (run, outputs):
        summary = collect_shards(shards, samples)
        uri = outputs.file(samples, "samples.jsonl")
        run.log_dataset(samples, f"samples_iter{context.iteration}", "sampling", source=uri)
        run.log_metrics(summary)
    return summary


def verify(context: StageContext, samples: str, verified: str) -> dict:
    from topr.verify import run_verify

    with context.stage("verify") as (run, outputs):
        summary = run_verify(context.config.task, samples, verified)
        uri = outputs.file(verified, "verified.jsonl")
        run.log_dataset(verified, f"verified_iter{context.iteration}", "verification", source=uri)
        run.log_metrics(summary)
        run.log_metrics({"sample_accuracy": summary["accuracy"]}, on_parent=True)
    return summary


def curate(context: StageContext, verified: str, train_set: str, report: str) -> dict:
    """Curate the verified samples into ``train_set``; ``report`` receives the composition."""
    from topr.curate import run_curate

    with context.stage("curate") as (run, outputs):
        run.log_params(context.config.curate.model_dump())
        composition = run_curate(context.config, verified, train_set, report)
        uri = outputs.file(train_set, "train_set.jsonl")
        outputs.file(report, "composition.json")
        run.log_dataset(train_set, f"train_set_iter{context.iteration}", "training", source=uri)
        run.log_artifact(report)
        counts = {f"curated_{key}": composition[key] for key in ("count", "positives", "negatives")}
        counts.update(positive_fraction=composition["positive_fraction"], effective_positive_fraction=composition["effective_positive_fraction"])
        run.log_metrics(counts, on_parent=True)
    return composition


def training_set_facts(data_path: str, baseline: float) -> tuple[list[str], str | None]:
    """In one read of a training set: the models that generated its samples (offline data may
    come from older ones), and ``topr.curate.one_sided_warning`` if it lacks positives or negatives
    (reward - ``baseline`` >= 0, or not)."""
    from topr.curate import is_positive, one_sided_warning
    from topr.records import iter_records

    models, positives, count = set(), 0, 0
    for record in iter_records(data_path):
        models.add(str(record.get("behavior_model", "unknown")))
        positives += is_positive(record, baseline)
        count += 1
    return sorted(models), one_sided_warning(positives, count)


def train(context: StageContext, model: str, train_set: str, samples: str, trained_model: str) -> dict:
    """Train, publish and register the model, recording where it came from (see ``topr.lineage``).

    With ``train.processes`` > 1 (default: one per GPU) training runs in torchrun workers
    (``topr.train.launch_train``); their per-step figures are logged here when they finish.
    With an artifact store, training checkpoints there (``train_checkpoint``), a retried stage
    resumes from the last checkpoint, and the checkpoint is deleted once the stage commits.
    """
    from topr.train import launch_train

    config, iteration = context.config, context.iteration
    with context.stage("train") as (run, outputs):
        run.log_params(flatten(config_to_dict(config)))
        train_set_uri, samples_uri = context.published_uri("train_set.jsonl"), context.published_uri("samples.jsonl")
        run.log_dataset(train_set, f"train_set_iter{iteration}", "training", source=train_set_uri)
        run.log_dataset(samples, f"samples_iter{iteration}", "sampling", source=samples_uri)
        step_metrics = StepMetrics(run)
        checkpoint = train_checkpoint(context)
        summary = launch_train(config, model, train_set, trained_model, step_metrics, checkpoint)
        step_metrics.flush()
        run.log_metrics({k: v for k, v in summary.items() if k != "weights_sha256"})
        run.log_metrics({k: summary[k] for k in ("mean_weight_negative", "final_logprob_negative", "final_logprob_positive", "first_step_log_ratio_per_token", "positive_weight_share", "final_ratio_negative_p50") if k in summary}, on_parent=True)
        run.log_text(config_to_yaml(config), "config.yaml")
        sampling_models, warning = training_set_facts(train_set, config.train.baseline)
        lineage = {
            "task": config.task.name,
            "parent_model_uri": context.published_uri("model", iteration - 1) or model,
            "train_set_uri": train_set_uri or train_set,
            "samples_uri": samples_uri or samples,
            "sampling_models": ",".join(sampling_models),
            "train_prompts_sha256": run.parent_tags().get(TRAIN_PROMPTS_TAG, ""),
            **_adapter_lineage(config, trained_model),
        }
        trained = TrainedModel(run, outputs, trained_model, model, summary["weights_sha256"])
        summary["registered_version"] = trained.register(config.run.registered_model, "model", lineage, warning)
    if checkpoint:
        remove_checkpoint(checkpoint)
    return summary


def _adapter_lineage(config: Config, model_dir: str) -> dict[str, str]:
    """A LoRA-trained model's adapter (``topr.lora``): its folder inside the model's, its rank and
    its weights' digest; its base is the parent model (``parent_weights_sha256``)."""
    from topr.lora import ADAPTER_DIR
    from topr.models import weights_digest

    if not config.train.lora_rank:
        return {}
    return {"adapter_path": ADAPTER_DIR, "lora_rank": str(config.train.lora_rank), "adapter_weights_sha256": weights_digest(Path(model_dir, ADAPTER_DIR))}


def remove_checkpoint(checkpoint) -> None:
    """Delete a committed stage's checkpoint, best-effort: failing here must not fail the stage."""
    try:
        checkpoint.remove()
    except (OSError, storage.StorageError) as error:
        log.warning("could not delete the training checkpoint %s: %s", checkpoint.remote or checkpoint.path, error)


def train_checkpoint(context: StageContext):
    """The train stage's checkpoint, ``<store>/<run>/iter<i>/train.checkpoint.pt`` staged in the
    temporary folder; None without an artifact store (nothing retries a local run) or when
    ``train.checkpoint_minutes`` is null."""
    from topr.checkpoint import TrainCheckpoint

    remote = context.published_uri("train.checkpoint.pt")
    if remote is None or context.config.train.checkpoint_minutes is None:
        return None
    local = Path(tempfile.gettempdir(), "topr-checkpoints", context.parent_run_id, f"iter{context.iteration}-train.checkpoint.pt")
    return TrainCheckpoint(local, remote, context.config.train.checkpoint_minutes)


class TrainedModel:
    """A model a stage trained (the policy or the verifier) on its way to the registry."""

    def __init__(self, run, outputs: StageOutputs, output_dir: str, parent_model_dir: str, weights_sha256: str):
        self.run, self.outputs, self.output_dir = run, outputs, output_dir
        self.parent_model_dir, self.weights_sha256 = parent_model_dir, weights_sha256

    def register(self, name: str, output: str, lineage: dict[str, str], warning: str | None = None) -> int:
        """Publish the model as ``output`` and register it, from its published copy, as a new
        version of ``name``: its lineage (``topr.lineage`` reads it back) becomes params of the
        stage run and ``topr.*`` tags of the version, with the published files and both models'
        weights digests; a ``warning`` is tagged on both, where whoever promotes it sees it. The
        version goes into the stage's commit record; returns it."""
        from topr.models import model_identity

        published = self.outputs.model(self.output_dir, output)
        source = _model_source(self.run, self.output_dir, published)
        lineage = {
            **published,
            "weights_sha256": self.weights_sha256,
            "parent_weights_sha256": model_identity(self.parent_model_dir).removeprefix("sha256:"),
            **lineage,
        }
        self.run.log_params(lineage)
        tags = {f"topr.{key}": value for key, value in lineage.items()}
        if warning:
            self.run.set_tag("topr.warning", warning)
            tags["topr.warning"] = warning
        version = self.run.register_model(name, source, tags)
        self.outputs.registered(output, version)
        return int(version)


def _model_source(run, output_dir: str, published: dict[str, str]) -> str:
    """What a trained model is registered from: its published copy, or, without an artifact
    store, a copy logged to the stage run (``model``)."""
    if storage.is_s3(published["model_uri"]):
        return published["model_uri"]
    run.log_artifacts(output_dir, "model")
    return "model"


def evaluate(context: StageContext, model: str, eval_prompts: str, report: str, completions: str, accuracy_page: str = "") -> dict:
    """Evaluate the model on the held-out prompts; with ``accuracy_page``, also write the run so far
    there as an HTML page (``topr.report.run_html``), for Kubeflow's UI."""
    from topr.evaluate import run_evaluate
    from topr.report import run_html

    with context.stage("evaluate") as (run, outputs):
        metrics = run_evaluate(context.config, model, eval_prompts, report, completions)
        outputs.file(report, "evaluation.json")
        outputs.file(completions, "evaluation_completions.jsonl")
        run.log_dataset(eval_prompts, "eval_prompts", "evaluation", source=context.published_uri("eval_prompts.jsonl", 0))
        run.log_text(Path(report).read_text(), EVALUATION_ARTIFACT)
        run.log_metrics(metrics, on_parent=True)
    if accuracy_page:  # after the commit, so best-effort: a failure here must not fail a committed stage
        title = f"{context.config.run.registered_model}: held-out accuracy after iteration {context.iteration}"
        try:
            Path(accuracy_page).write_text(run_html(context.tracking_uri, context.parent_run_id, title))
        except Exception as error:  # noqa: BLE001 - whatever broke, the evaluation stands
            log.warning("could not write the run's page for the pipeline UI: %s", error)
    return metrics


def gate(context: StageContext, version: str, eval_prompts: str, decision_report: str = "") -> tuple[str, str]:
    """Compare the new model (registered ``version``) with the champion; return the decision
    ("promote" or "keep") and the champion version compared against ("" for none), which
    ``promote`` requires to still hold the alias. With ``decision_report``, the decision is also
    written there in Markdown, for Kubeflow's UI.

    The new model's figures (pass@1 and those the guardrails limit, ``topr.gate``) are its last
    evaluation in this run; the champion is evaluated again on the same prompts with the same
    settings. The decision and its figures are recorded on the gate's run, the parent run and
    the model version. A registry that cannot be read fails the gate
    (``topr.promotion.alias_version``).
    """
    from topr.gate import GATE_METRICS, check_same_task, decide

    config, parent_run_id = context.config, context.parent_run_id
    name, alias = config.run.registered_model, config.gate.alias
    client = mlflow_client(context.tracking_uri)
    with context.stage("gate") as (run, _):
        new = {key: metric_history(context.tracking_uri, parent_run_id, key)[context.iteration] for key in GATE_METRICS}
        champion = promotion.alias_version(client, name, alias)
        champion_metrics = None
        if champion is not None:
            champion_version = client.get_model_version(name, champion)
            check_same_task(f"{name}/{champion}", champion_version.tags.get("topr.task"), config.task.name)
            champion_metrics = _evaluate_registered(config, client, champion_version, eval_prompts)
        decision = decide(new, champion_metrics, config.gate)
        run.log_params({"model": f"{name}/{version}", "champion": f"{name}/{champion}" if champion else "none", "decision": decision.label, "reason": decision.reason})
        run.log_metrics(decision.figures(), on_parent=True)
        for key, value in decision.tags().items():
            client.set_tag(parent_run_id, key, value)
            client.set_model_version_tag(name, version, key, value)
    log.info("gate: %s %s/%s (%s)", decision.label, name, version, decision.reason)
    if decision_report:
        Path(decision_report).write_text(decision.markdown(f"{name}/{version}", f"{name}/{champion}" if champion else None))
    return decision.label, champion or ""


def _evaluate_registered(config: Config, client, version, prompts_path: str) -> dict[str, float]:
    from topr.evaluate import run_evaluate

    from topr.lineage import committed_model

    with storage.local_directory(*committed_model(client, version)) as model_dir, tempfile.TemporaryDirectory() as scratch:
        return run_evaluate(config, str(model_dir), prompts_path, Path(scratch, "report.json"), Path(scratch, "completions.jsonl"))


def promote(context: StageContext, version: str, champion_version: str) -> str:
    """Point the gate's alias at ``version`` if it still holds ``champion_version``, the version
    the gate beat ("" for none); a compare-and-set under a lock (``topr.promotion``). Returns
    ``version``, now the champion (what ``serve`` serves).

    A refusal (the alias moved since the gate) is tagged on the parent run and the model
    version, then raised, so the stage fails rather than look like a promotion. A version whose
    stage did not commit is never promoted (``topr.lineage.committed_model``).
    """
    from topr.lineage import committed_model

    config, parent_run_id = context.config, context.parent_run_id
    name, alias = config.run.registered_model, config.gate.alias
    client = mlflow_client(context.tracking_uri)
    committed_model(client, client.get_model_version(name, version))
    try:
        promotion.promote(client, name, alias, version, champion_version or None, parent_run_id)
    except promotion.PromotionRefused as refusal:
        client.set_tag(parent_run_id, "topr.promotion", f"refused: {refusal}")
        client.set_model_version_tag(name, version, "topr.promotion", f"refused: {refusal}")
        raise
    client.set_tag(parent_run_id, "topr.promoted", f"{name}/{version}")
    log.info("%s@%s is now version %s", name, alias, version)
    return version


def serve(context: StageContext, version: str, manifest: str) -> dict:
    """Write the KServe manifests that serve registered ``version`` (``topr.serve``) to
    ``manifest``, log them on the stage's run and tag the version; apply them when this runs in a
    Kubernetes pod (a cluster without KServe fails the stage, naming the missing API).
    """
    from topr import serve as serving

    config, client = context.config, mlflow_client(context.tracking_uri)
    model = serving.served_model(context.tracking_uri, f"{config.run.registered_model}/{version}")
    documents = serving.manifests(serving.checked(model), config.cluster, storage.endpoint_url())
    with context.stage("serve") as (run, _):
        serving.write_manifests(documents, manifest)
        run.log_artifact(manifest)
        where = "written; not applied: not running in a Kubernetes pod"
        if serving.in_cluster():
            applied = serving.apply(documents, serving.pod_namespace())
            where = "applied: " + ", ".join(applied)
        run.log_params({"model": model.reference, "inference_service": documents[-1]["metadata"]["name"], "manifest": where})
        client.set_model_version_tag(model.registered_model, model.version, "topr.serving", where)
    log.info("serve %s: %s", model.reference, where)
    return {}


def verifier_data(context: StageContext, model: str, train_prompts: str, eval_prompts: str, verifier_data: str) -> dict:
    """Sample and label the final policy's solutions for the verifier (see ``topr.verifier``);
    the verifier's stages count as the last iteration's."""
    from topr.verifier import SOLUTIONS_EVAL, SOLUTIONS_TRAIN, VERIFIER_EVAL, VERIFIER_TRAIN, run_verifier_data

    context = context.at(context.config.run.iterations)
    datasets = (
        (SOLUTIONS_TRAIN, "verifier_solutions_train", "sampling"),
        (SOLUTIONS_EVAL, "verifier_solutions_eval", "sampling"),
        (VERIFIER_TRAIN, "verifier_train", "training"),
        (VERIFIER_EVAL, "verifier_eval", "evaluation"),
    )
    with context.stage("verifier_data") as (run, outputs):
        run.log_params(context.config.verifier.model_dump())
        summary = run_verifier_data(context.config, model, train_prompts, eval_prompts, verifier_data)
        uri = outputs.directory(verifier_data, "verifier_data")
        for file, name, use in datasets:
            run.log_dataset(Path(verifier_data, file), name, use, source=uri and storage.join(uri, file))
        run.log_metrics(summary)
    return summary


def train_verifier(context: StageContext, base_model: str, verifier_data: str, verifier: str) -> dict:
    """Train the starting model (``base_model``) as the verifier; publish it and register it as a
    version of ``<run.registered_model>-verifier`` with the lineage tags of ``train``.

    The intermediate judgments and training set are kept as artifacts of the stage's run (and
    published), since the folder they are written to is temporary.
    """
    from topr.workflow import IterationFiles
    from topr.models import model_identity
    from topr.verifier import data_files, run_train_verifier, verifier_config

    context = context.at(context.config.run.iterations)
    config = context.config
    with context.stage("train_verifier") as (run, outputs), tempfile.TemporaryDirectory(prefix="topr-verifier-") as work:
        run.log_text(config_to_yaml(verifier_config(config, *data_files(verifier_data))), "verifier_config.yaml")
        step_metrics = StepMetrics(run)
        summary = run_train_verifier(config, base_model, verifier_data, verifier, work, on_step=step_metrics)
        step_metrics.flush()
        kept, files = {}, IterationFiles(Path(work))
        for path, name, use in ((files.samples, "verifier_judgments", "sampling"), (files.train_set, "verifier_train_set", "training")):
            run.log_artifact(path)
            uri = outputs.file(path, f"{name}.jsonl")
            run.log_dataset(path, name, use, source=uri)
            kept[name] = uri or f"runs:/{run.run_id}/{path.name}"
        run.log_artifact(files.composition)
        run.log_metrics({k: v for k, v in summary.items() if k != "weights_sha256"})
        lineage = {
            "task": "verifier",
            "parent_model_uri": context.published_uri("model", 0) or base_model,
            "train_set_uri": kept["verifier_train_set"],
            "samples_uri": kept["verifier_judgments"],
            "sampling_models": model_identity(base_model),
        }
        trained = TrainedModel(run, outputs, verifier, base_model, summary["weights_sha256"])
        summary["registered_version"] = trained.register(f"{config.run.registered_model}-verifier", "verifier_model", lineage)
    return summary


def evaluate_verifier(context: StageContext, base_model: str, verifier: str, verifier_data: str, report: str) -> dict:
    """Held-out judgment accuracy of the starting and the trained verifier, and the votes they weight."""
    from topr.verifier import VERIFIER_EVAL, run_evaluate_verifier

    context = context.at(context.config.run.iterations)
    with context.stage("evaluate_verifier") as (run, outputs):
        metrics = run_evaluate_verifier(context.config, base_model, verifier, verifier_data, report)
        outputs.file(report, "verifier_evaluation.json")
        data_uri = context.published_uri("verifier_data")
        run.log_dataset(Path(verifier_data, VERIFIER_EVAL), "verifier_eval", "evaluation", source=data_uri and storage.join(data_uri, VERIFIER_EVAL))
        run.log_artifact(report)
        run.log_metrics(metrics, on_parent=True)
    return metrics
