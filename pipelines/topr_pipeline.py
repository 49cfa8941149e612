"""The TOPR loop as one Kubeflow Pipelines DAG, defined once for local and cluster runs.

    start_run ─▶ prepare_model, prompts ─▶ evaluate(model_0)
                  │
                  └▶ iteration 1: sample ×shards ▶ collect ▶ verify ▶ curate ▶ train ▶ evaluate ─▶ model_1
                     iteration 2: the same, from model_1                       ─▶ model_2
                     …
                     gate(model_N vs the registered champion) ─▶ if "promote": promote (if the champion is unchanged)
                     verifier (verifier.enabled): verifier_data(model_N) ▶ train_verifier(model_0) ▶ evaluate_verifier
    finish_run (exit handler: closes the MLflow run as FINISHED or FAILED)

KFP v2 has no loops over a run-time count, so ``build_pipeline(config)`` unrolls the
``run.iterations`` iterations at compile time, each a nested pipeline (``iteration-<i>``) taking
the previous iteration's Model, and fans sampling out over ``sample.shards`` pods
(``dsl.ParallelFor``). Every task gets its ``cluster`` settings (image, resources, GPUs,
secrets, retries, timeouts), which only a cluster run uses.
"""


from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from topr.config import Config
from topr_components.collect_samples.component import collect_samples
from topr_components.curate.component import curate
from topr_components.evaluate.component import evaluate
from topr_components.evaluate_verifier.component import evaluate_verifier
from topr_components.finish_run.component import finish_run
from topr_components.gate.component import gate
from topr_components.prepare_model.component import prepare_model
from topr_components.promote.component import promote
from topr_components.prompts.component import prompts
from topr_components.sample.component import sample
from topr_components.start_run.component import start_run
from topr_components.train.component import train
from topr_components.train_verifier.component import train_verifier
from topr_components.verifier_data.component import verifier_data
from topr_components.verify.component import verify
from topr_pipelines.cluster_settings import on_cluster


def iteration_pipeline(iteration: int, config: Config):
    """The nested pipeline of one round: sample (sharded), collect, verify, curate, train, evaluate.

    Each round gets its own pipeline definition (``iteration-<i>``) so that its tasks have
    their own component names, and so their own artifact folders under kfp.local, where a
    component reused by several rounds would write every round into the same folder.
    """
    cluster, shards = config.cluster, config.sample.shards

    @dsl.pipeline(name=f"iteration-{iteration}", description=f"Round {iteration}: sample, verify, curate, train, evaluate.")
    def one_round(
        config_json: str,
        tracking_uri: str,
        parent_run_id: str,
        model: Input[Model],
        train_prompts: Input[Dataset],
        eval_prompts: Input[Dataset],
    ) -> Model:
        tracking = {"config_json": config_json, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "iteration": iteration}
        with dsl.ParallelFor(list(range(shards)), name="sample shards") as shard:
            sampled = sample(**tracking, shard=shard, shards=shards, model=model, train_prompts=train_prompts)
            on_cluster(sampled.set_display_name("sample"), cluster)
        collected = collect_samples(**tracking, shards=dsl.Collected(sampled.outputs["samples"]))
        on_cluster(collected.set_display_name("collect samples"), cluster)
        samples = collected.outputs["samples"]
        verified = on_cluster(verify(**tracking, samples=samples).set_display_name("verify"), cluster)
        curated = on_cluster(curate(**tracking, verified=verified.outputs["verified"]).set_display_name("curate"), cluster)
        trained = train(**tracking, model=model, train_set=curated.outputs["train_set"], samples=samples)
        on_cluster(trained.set_display_name("train"), cluster)
        evaluated = evaluate(**tracking, model=trained.outputs["trained_model"], eval_prompts=eval_prompts)
        on_cluster(evaluated.set_display_name("evaluate"), cluster)
        return trained.outputs["trained_model"]

    return one_round


def verifier_branch(tracking: dict, base_model, final_model, train_prompts, eval_prompts, config: Config) -> None:
    """The generative verifier (``topr.verifier``): the final policy's solutions are labelled, the
    starting model learns to judge them, and its judgments weight a vote over held-out solutions."""
    cluster = config.cluster
    data = verifier_data(**tracking, model=final_model, train_prompts=train_prompts, eval_prompts=eval_prompts)
    pairs = on_cluster(data.set_display_name("verifier data"), cluster).outputs["verifier_data"]
    trained = train_verifier(**tracking, base_model=base_model, verifier_data=pairs)
    on_cluster(trained.set_display_name("train verifier"), cluster)
    evaluated = evaluate_verifier(**tracking, base_model=base_model, verifier=trained.outputs["verifier"], verifier_data=pairs)
    on_cluster(evaluated.set_display_name("evaluate verifier"), cluster)


def build_pipeline(config: Config, pipeline_root: str | None = None):
    """The pipeline for ``config``'s iterations, shards and cluster settings; its parameters are strings.

    ``pipeline_root`` (e.g. ``s3://bucket/kfp``) becomes the compiled pipeline's default root for
    Kubeflow's own artifacts; a cluster run may still override it at submission.
    """
    iterations, cluster = config.run.iterations, config.cluster
    rounds = [iteration_pipeline(iteration, config) for iteration in range(1, iterations + 1)]

    @dsl.pipeline(name="topr", description=f"Tapered Off-Policy REINFORCE, {iterations} iterations.", pipeline_root=pipeline_root)
    def topr(config_json: str, tracking_uri: str, run_name: str = "topr") -> str:
        started = start_run(
            config_json=config_json, tracking_uri=tracking_uri, run_name=run_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        )
        parent_run_id = on_cluster(started.set_display_name("start MLflow run"), cluster).output
        closing = finish_run(config_json=config_json, tracking_uri=tracking_uri, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        on_cluster(closing.set_display_name("finish MLflow run"), cluster)
        with dsl.ExitHandler(closing, name="topr loop"):
            tracking = {"config_json": config_json, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id}
            base = on_cluster(prepare_model(**tracking).set_display_name("prepare model"), cluster)
            prompt_sets = on_cluster(prompts(**tracking).set_display_name("prompts"), cluster)
            model, eval_prompts = base.outputs["model"], prompt_sets.outputs["eval_prompts"]
            first = evaluate(**tracking, iteration=0, model=model, eval_prompts=eval_prompts)
            on_cluster(first.set_display_name("evaluate starting model"), cluster)
            for iteration, one_round in enumerate(rounds, start=1):
                model = one_round(
                    **tracking, model=model, train_prompts=prompt_sets.outputs["train_prompts"], eval_prompts=eval_prompts
                ).set_display_name(f"iteration {iteration}").output
            decision = gate(**tracking, iteration=iterations, model=model, eval_prompts=eval_prompts)
            on_cluster(decision.set_display_name("promotion gate"), cluster)
            with dsl.If(decision.outputs["Output"] == "promote", name="gain above margin"):
                promoted = promote(**tracking, model=model, champion_version=decision.outputs["champion_version"])
                on_cluster(promoted.set_display_name("promote to champion"), cluster)
            if config.verifier.enabled:
                verifier_branch(tracking, base.outputs["model"], model, prompt_sets.outputs["train_prompts"], eval_prompts, config)
        return parent_run_id

    return topr
