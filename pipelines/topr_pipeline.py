"""The TOPR loop as one Kubeflow Pipelines DAG, defined once for local and cluster runs.

    start_run ─▶ prepare_model, prompts ─▶ evaluate(model_0)
                  │
                  └▶ iteration 1: sample ▶ verify ▶ curate ▶ train ▶ evaluate ─▶ model_1
                     iteration 2: the same, from model_1                       ─▶ model_2
                     …
                     gate(model_N vs the registered champion) ─▶ if "promote": promote
    finish_run (exit handler: closes the MLflow run as FINISHED or FAILED)

KFP v2 has no loops over a run-time count, so ``build_pipeline(iterations)`` unrolls the
iterations at compile time, each a nested pipeline (``iteration-<i>``) taking the previous
iteration's Model.
"""


from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components.curate.component import curate
from components.evaluate.component import evaluate
from components.finish_run.component import finish_run
from components.gate.component import gate
from components.prepare_model.component import prepare_model
from components.promote.component import promote
from components.prompts.component import prompts
from components.sample.component import sample
from components.start_run.component import start_run
from components.train.component import train
from components.verify.component import verify


def iteration_pipeline(iteration: int):
    """The nested pipeline of one round: sample, verify, curate, train, evaluate.

    Each round gets its own pipeline definition (``iteration-<i>``) so that its tasks have
    their own component names, and so their own artifact folders under kfp.local, where a
    component reused by several rounds would write every round into the same folder.
    """

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
        sampled = sample(**tracking, model=model, train_prompts=train_prompts).set_display_name("sample")
        verified = verify(**tracking, samples=sampled.outputs["samples"]).set_display_name("verify")
        curated = curate(**tracking, verified=verified.outputs["verified"]).set_display_name("curate")
        trained = train(
            **tracking, model=model, train_set=curated.outputs["train_set"], samples=sampled.outputs["samples"]
        ).set_display_name("train")
        evaluate(**tracking, model=trained.outputs["trained_model"], eval_prompts=eval_prompts).set_display_name("evaluate")
        return trained.outputs["trained_model"]

    return one_round


def build_pipeline(iterations: int, pipeline_root: str | None = None):
    """The pipeline with ``iterations`` rounds unrolled; its parameters are strings.

    ``pipeline_root`` (e.g. ``s3://bucket/kfp``) becomes the compiled pipeline's default root for
    Kubeflow's own artifacts; a cluster run may still override it at submission.
    """
    rounds = [iteration_pipeline(iteration) for iteration in range(1, iterations + 1)]

    @dsl.pipeline(name="topr", description=f"Tapered Off-Policy REINFORCE, {iterations} iterations.", pipeline_root=pipeline_root)
    def topr(config_json: str, tracking_uri: str, run_name: str = "topr") -> str:
        started = start_run(
            config_json=config_json, tracking_uri=tracking_uri, run_name=run_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        ).set_display_name("start MLflow run")
        parent_run_id = started.output
        closing = finish_run(
            config_json=config_json, tracking_uri=tracking_uri, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        ).set_display_name("finish MLflow run")
        with dsl.ExitHandler(closing, name="topr loop"):
            tracking = {"config_json": config_json, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id}
            base = prepare_model(**tracking).set_display_name("prepare model")
            prompt_sets = prompts(**tracking).set_display_name("prompts")
            model = base.outputs["model"]
            evaluate(
                **tracking, iteration=0, model=model, eval_prompts=prompt_sets.outputs["eval_prompts"]
            ).set_display_name("evaluate starting model")
            for iteration, one_round in enumerate(rounds, start=1):
                model = one_round(
                    **tracking,
                    model=model,
                    train_prompts=prompt_sets.outputs["train_prompts"],
                    eval_prompts=prompt_sets.outputs["eval_prompts"],
                ).set_display_name(f"iteration {iteration}").output
            decision = gate(
                **tracking, iteration=iterations, model=model, eval_prompts=prompt_sets.outputs["eval_prompts"]
            ).set_display_name("promotion gate")
            with dsl.If(decision.output == "promote", name="gain above margin"):
                promote(**tracking, model=model).set_display_name("promote to champion")
        return parent_run_id

    return topr
