"""The ``topr`` command: the whole loop (``run``), its pipeline (``compile``), and each stage on files.

    topr run [--config FILE] [section.field=value ...]   the pipeline, locally, through kfp.local
    topr experiment NAME|SPEC [section.field=value ...]  several arms of it on the same data, compared
    topr compile --output FILE                           the pipeline as Kubeflow YAML
    topr submit --host URL --tracking-uri URI            one run of it on Kubeflow Pipelines
    topr schedule create|list|delete --host URL          recurring runs of it
    topr sample | verify | curate | train | evaluate      one stage on files (local or s3://)
    topr up | down                                       SeaweedFS + MLflow server on this machine

Every file or model argument of a stage command may be an ``s3://bucket/key`` URI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from topr.config import ConfigError, config_to_yaml, describe_fields, load_config, read_config_file, refuse_credentials
from topr.experiment import named_specs as named_experiments

log = logging.getLogger("topr")

CONFIG_HELP = "YAML configuration file (sections model, task, sample, curate, train, evaluate, gate, verifier, run, cluster)."
OVERRIDES_HELP = "Overrides of the form section.field=value, e.g. train.learning_rate=1e-5."


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topr",
        description="Fine-tune language models with Tapered Off-Policy REINFORCE (TOPR).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMAND_PARSERS:
        add_command(commands)
    return parser


def _add_run_command(commands) -> None:
    run = commands.add_parser(
        "run",
        help="Run the whole loop locally (the Kubeflow pipeline through kfp.local).",
        description="Run prompts → (sample → verify → curate → train → evaluate) × iterations on this "
        "machine, as the same Kubeflow pipeline a cluster runs, tracked in MLflow. With no arguments "
        "it fine-tunes the embedded SmolLM2-135M-Instruct on the built-in arithmetic task.\n\n"
        "Configuration fields (override any as section.field=value):\n\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--tracking-uri", type=_tracking_uri, help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (sets run.tracking_uri).")
    run.add_argument(
        "--from",
        dest="start_from",
        metavar="MODEL",
        help="Start from a registered model: an alias of run.registered_model (e.g. champion), "
        "name@alias or name/version (sets model.path=models:/...).",
    )
    _add_config_arguments(run)


def _add_experiment_command(commands) -> None:
    experiment = commands.add_parser(
        "experiment",
        help="Compare objectives, curation, baselines, ratio levels or the verifier: several runs on the same data.",
        description="Run every arm of an experiment in every replicate, in this process (the starting model "
        "and its evaluation shared; within a replicate, the training prompts, iteration 1's samples and the "
        "seeds shared by all arms; every replicate scored on the same held-out problems). Then write report.md "
        "with accuracy per arm and replicate, each arm's paired difference from the reference arm (mean with "
        "its 95% t-interval, sign-flip permutation p-value with Holm's correction, two-level bootstrap "
        "interval), training diagnostics and plots into <run.output_dir>/<experiment name>/, also logged to "
        "MLflow (experiment 'experiment-<name>', one run per arm and replicate). An arm's config: --config, "
        "then the spec's overrides, the arm's, and the command line's.\n\nNamed experiments:\n\n"
        + "\n".join(f"  {n}" for n in sorted(named_experiments())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiment.add_argument("spec", nargs="?", help="A named experiment (see --list) or a YAML spec file.")
    experiment.add_argument("--list", action="store_true", help="List the named experiments and what each compares.")
    experiment.add_argument("--arms", help="Run only these arms (comma-separated names).")
    experiment.add_argument("--replicates", type=int, metavar="N", help="Replicates of every arm (default: the spec's `replicates`).")
    experiment.add_argument("--reference", metavar="ARM", help="The arm the others are compared with (default: the spec's, else its first arm).")
    experiment.add_argument("--resume", action="store_true", help="Finish an interrupted experiment: keep its finished arm × replicate units.")
    experiment.add_argument("--tracking-uri", type=_tracking_uri, help="MLflow tracking URI (sets run.tracking_uri).")
    _add_config_arguments(experiment)


def _add_up_command(commands) -> None:
    up = commands.add_parser(
        "up",
        help="Start SeaweedFS (S3) and an MLflow server on loopback, in the background.",
        description="Start SeaweedFS and an MLflow server (sqlite backend, artifacts proxied to SeaweedFS) "
        "on 127.0.0.1, print their URLs and the environment a run needs; 'topr down' stops them.",
    )
    up.add_argument("--state-dir", default="runs/stack", help="Where data, logs and the record of what runs go.")
    up.add_argument("--s3-port", type=int, default=8333, help="SeaweedFS S3 port.")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port.")
    up.add_argument("--bucket", default="topr", help="Bucket to create for artifacts.")


def _add_lineage_command(commands) -> None:
    lineage = commands.add_parser(
        "lineage",
        help="Print where a model came from, back to the base model.",
        description="Print the chain model ← training run ← curated set ← samples ← sampling model ← … "
        "← base model of a registered model version, read from MLflow.",
    )
    lineage.add_argument("model", help="name@alias, name/version, models:/name/version, or the model's s3:// URI.")
    lineage.add_argument("--tracking-uri", type=_tracking_uri, help="MLflow tracking URI (default: the local store under runs/).")
    lineage.add_argument("--json", action="store_true", help="Print the chain as JSON.")
    lineage.add_argument("--verify", action="store_true", help="Re-read and re-hash every artifact in object storage; exit 1 on any problem.")


def _add_schedule_command(commands) -> None:
    schedule = commands.add_parser(
        "schedule",
        help="Kubeflow recurring runs: retrain the champion on a schedule.",
        description="Create, list or delete Kubeflow recurring runs of the compiled pipeline. Each run "
        "starts from the registered champion and reads <prefix>/train.jsonl and <prefix>/eval.jsonl.",
    )
    schedules = schedule.add_subparsers(dest="schedule_command", required=True)
    create = schedules.add_parser("create", help="Create a recurring run.")
    _add_endpoint_arguments(create)
    create.add_argument("--cron", required=True, help='Six-field cron, seconds first: "0 0 3 * * *" is 03:00 daily.')
    create.add_argument("--prompts", required=True, help="s3:// prefix holding train.jsonl and eval.jsonl.")
    create.add_argument("--tracking-uri", type=_tracking_uri, required=True, help="MLflow tracking server the pipeline's pods can reach.")
    create.add_argument("--name", default="topr-retraining", help="Name of the recurring run.")
    create.add_argument("--pipeline-root", help="Kubeflow pipeline root for artifacts (default: the deployment's).")
    create.add_argument(
        "--service-account", default="topr-pipeline", help="Kubernetes service account of the runs' pods (default: %(default)s)."
    )
    _add_config_arguments(create)
    listing = schedules.add_parser("list", help="List recurring runs.")
    _add_endpoint_arguments(listing)
    delete = schedules.add_parser("delete", help="Delete a recurring run.")
    _add_endpoint_arguments(delete)
    delete.add_argument("id", help="The recurring run's id (see 'topr schedule list').")


def _add_down_command(commands) -> None:
    down = commands.add_parser("down", help="Stop exactly what 'topr up' started.")
    down.add_argument("--state-dir", default="runs/stack", help="The state directory given to 'topr up'.")


def _add_compile_command(commands) -> None:
    compile_ = commands.add_parser(
        "compile",
        help="Write the pipeline as Kubeflow Pipelines YAML.",
        description="Compile the pipeline for the configuration's run.iterations, sample.shards and "
        "cluster settings (image, resources, GPUs, secrets, retries, timeouts) to YAML.",
    )
    compile_.add_argument("--output", default="pipelines/topr_pipeline.yaml", help="Where to write the YAML.")
    compile_.add_argument("--iterations", type=int, default=None, help="Iterations to unroll (default: run.iterations).")
    compile_.add_argument("--pipeline-root", help="Default pipeline root for Kubeflow's artifacts, e.g. s3://bucket/kfp.")
    _add_config_arguments(compile_)


def _add_submit_command(commands) -> None:
    submit = commands.add_parser(
        "submit",
        help="Compile the pipeline and start a run on Kubeflow Pipelines; print its URL.",
        description="Compile the pipeline for this configuration and start one run of it on a Kubeflow "
        "Pipelines endpoint, in the experiment run.experiment. Stages reach MLflow at --tracking-uri "
        "and object storage through the cluster's Secret and ConfigMap (cluster.* fields).",
    )
    _add_endpoint_arguments(submit)
    submit.add_argument("--tracking-uri", type=_tracking_uri, required=True, help="MLflow tracking server the pipeline's pods can reach.")
    submit.add_argument("--run-name", help="Name of the run (default: run.name or topr-<timestamp>).")
    submit.add_argument("--pipeline-root", help="Pipeline root for Kubeflow's artifacts (default: the deployment's).")
    submit.add_argument("--service-account", help="Kubernetes service account of the run's pods (e.g. topr-pipeline).")
    _add_config_arguments(submit)


def _add_sample_command(commands) -> None:
    sample = commands.add_parser("sample", help="Sample completions with behaviour log-probs.")
    sample.add_argument("--model", required=True, help="Model directory (or the embedded default's name).")
    sample.add_argument("--prompts", required=True, help="Prompt records (JSONL/Parquet): prompt_id, prompt, reference.")
    sample.add_argument("--output", required=True, help="Where to write the sample records.")
    sample.add_argument("--iteration", type=int, default=1, help="Which slice of task.train_size prompts to use.")
    _add_config_arguments(sample)


def _add_verify_command(commands) -> None:
    verify = commands.add_parser("verify", help="Score completions: add extracted, correct, reward.")
    verify.add_argument("--task", help="Task name (overrides task.name).")
    verify.add_argument("--input", required=True, help="Records with prompt_id, reference, completion.")
    verify.add_argument("--output", required=True, help="Where to write the verified records.")
    _add_config_arguments(verify)


def _add_curate_command(commands) -> None:
    curate = commands.add_parser("curate", help="Choose the training set and report its composition.")
    curate.add_argument("--input", required=True, help="Verified records.")
    curate.add_argument("--output", required=True, help="Where to write the training set.")
    curate.add_argument("--report", required=True, help="Where to write the composition report (JSON).")
    _add_config_arguments(curate)


def _add_train_command(commands) -> None:
    train = commands.add_parser("train", help="Train a policy on a curated set and save it.")
    train.add_argument("--model", required=True, help="Starting model directory.")
    train.add_argument("--data", required=True, help="Curated training records.")
    train.add_argument("--output", required=True, help="Directory for the trained model.")
    train.add_argument("--summary", help="Also write the summary, with every step's figures under 'history', here (JSON).")
    train.add_argument(
        "--checkpoint",
        help="Save the training state to this file every train.checkpoint_minutes, and resume from it if it "
        "holds this job's state (same data, model and settings); deleted when training ends.",
    )
    train.add_argument("--checkpoint-uri", help="Also upload the checkpoint to this s3:// URI, and fetch it from there.")
    _add_config_arguments(train)


def _add_evaluate_command(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="Held-out pass@1, pass@k, maj@k with 95%% CIs.")
    evaluate.add_argument("--model", required=True, help="Model directory (or the embedded default's name).")
    evaluate.add_argument("--prompts", required=True, help="Held-out prompt records.")
    evaluate.add_argument("--output", required=True, help="Where to write the report (JSON).")
    evaluate.add_argument("--completions", help="Where to write the evaluated completions (JSONL).")
    _add_config_arguments(evaluate)


COMMAND_PARSERS = (_add_run_command, _add_experiment_command, _add_up_command, _add_lineage_command, _add_schedule_command, _add_down_command, _add_compile_command, _add_submit_command, _add_sample_command, _add_verify_command, _add_curate_command, _add_train_command, _add_evaluate_command)
"""The subcommands, in the order ``topr --help`` lists them."""


def _tracking_uri(value: str) -> str:
    try:
        return refuse_credentials(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _RefuseTokenArgument(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--token: a token on the command line shows in ps; put it in $KF_PIPELINES_TOKEN or in a file given as --token-file")


def _token(args) -> str | None:
    if not args.token_file:
        return os.environ.get("KF_PIPELINES_TOKEN")
    try:
        return Path(args.token_file).read_text().strip()
    except OSError as error:
        raise ConfigError(f"--token-file {args.token_file}: {error.strerror}") from None


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The kfp client's connection and authentication options."""
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80.")
    parser.add_argument("--namespace", default="kubeflow", help="Kubernetes namespace (multi-user Kubeflow: your profile's).")
    parser.add_argument(
        "--token-file",
        help="File holding the bearer token (default: $KF_PIPELINES_TOKEN, else the client's own credentials).",
    )
    parser.add_argument("--token", action=_RefuseTokenArgument, help=argparse.SUPPRESS)
    parser.add_argument("--cookies", help="Cookies for an authenticating proxy, e.g. 'authservice_session=...'.")
    parser.add_argument("--ssl-ca-cert", help="CA bundle to verify the endpoint's TLS certificate.")
    parser.add_argument("--insecure", action="store_true", help="Do not verify the endpoint's TLS certificate.")
    parser.add_argument("--ui-host", help="Pipelines UI base URL for printed links (default: --host).")


def _endpoint(args):
    from topr_pipelines.submit import Endpoint

    return Endpoint(
        host=args.host,
        namespace=args.namespace,
        existing_token=_token(args),
        cookies=args.cookies,
        ssl_ca_cert=args.ssl_ca_cert,
        ui_host=args.ui_host,
        verify_ssl=False if args.insecure else None,
    )


def _config(args, extra: list[str] = ()):
    return load_config(args.config, list(args.overrides) + list(extra))


def _print_json(payload: dict) -> None:
    import json

    print(json.dumps(payload, indent=2, default=str))


def _run_flags(args) -> list[str]:
    """``topr run``'s own flags as configuration overrides."""
    overrides = [f"run.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    if args.start_from:
        registered = args.start_from
        if "@" not in registered and "/" not in registered:
            registered = f"{_config(args).run.registered_model}@{registered}"
        overrides.append(f"model.path=models:/{registered}")
    return overrides


def cmd_run(args) -> int:
    from topr.report import write_run_report
    from topr.steps import check_services
    from topr.tracking import default_tracking_uri

    config = _config(args, _run_flags(args))
    run_name = config.run.name or time.strftime("topr-%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / run_name
    if run_dir.exists():
        raise ConfigError(f"run folder {run_dir} already exists: choose another run.name")
    tracking_uri = config.run.tracking_uri or default_tracking_uri(config.run.output_dir)
    check_services(tracking_uri, config.run.artifact_store)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    log.info("run %s: %d iterations, folder %s, tracking %s", run_name, config.run.iterations, run_dir, tracking_uri)

    from topr_pipelines.runner import run_local

    started = time.perf_counter()
    parent_run_id = run_local(config, run_dir, tracking_uri, run_name)
    minutes = (time.perf_counter() - started) / 60
    table = write_run_report(run_dir, tracking_uri, parent_run_id, minutes)
    print(table)
    print(f"\n{minutes:.1f} min · MLflow run {parent_run_id} · {tracking_uri}\nreport: {run_dir / 'report.md'}")
    return 0


def cmd_experiment(args) -> int:
    from topr.experiment import arm_configs, load_spec, run_experiment
    from topr.steps import check_services
    from topr.tracking import default_tracking_uri

    if args.list or not args.spec:
        for name, path in sorted(named_experiments().items()):
            _, spec = load_spec(str(path))
            print(
                f"{name}\n    {' '.join(spec.description.split())}\n    arms: {', '.join(spec.arms)}; "
                f"{spec.replicates} replicate(s), compared with {spec.reference_arm}\n"
            )
        if not args.list:
            print("topr experiment: name one of these experiments or a spec file", file=sys.stderr)
        return 0 if args.list else 2
    name, spec = load_spec(args.spec)
    if args.arms:
        spec = _with_arms(spec, name, args.arms.split(","))
    spec = _with_replicates_and_reference(spec, args.replicates, args.reference)
    base = read_config_file(args.config) if args.config else {}
    overrides = list(args.overrides) + ([f"run.tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    experiment, arms = arm_configs(spec, base, overrides)
    name = experiment.run.name or name
    tracking_uri = experiment.run.tracking_uri or default_tracking_uri(experiment.run.output_dir)
    check_services(tracking_uri, experiment.run.artifact_store)
    report = run_experiment(name, spec, experiment, arms, Path(experiment.run.output_dir) / name, tracking_uri, args.resume)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _with_arms(spec, name: str, wanted: list[str]):
    """The spec with only the ``wanted`` arms; without its reference arm, the first of them is the reference."""
    from topr.experiment import ExperimentSpec

    unknown = sorted(set(wanted) - set(spec.arms))
    if unknown:
        raise ConfigError(f"no arm(s) {', '.join(unknown)} in experiment {name} (arms: {', '.join(spec.arms)})")
    reference = spec.reference if spec.reference in wanted else None
    return ExperimentSpec.model_validate({**spec.model_dump(), "arms": {arm: spec.arms[arm] for arm in wanted}, "reference": reference})


def _with_replicates_and_reference(spec, replicates: int | None, reference: str | None):
    """The spec with the command line's replicate count and reference arm, validated again."""
    from topr.experiment import ExperimentSpec

    update = {key: value for key, value in (("replicates", replicates), ("reference", reference)) if value is not None}
    if reference is not None and reference not in spec.arms:
        raise ConfigError(f"--reference {reference}: no such arm (arms: {', '.join(spec.arms)})")
    if replicates is not None and replicates < 1:
        raise ConfigError(f"--replicates must be at least 1, got {replicates}")
    return ExperimentSpec.model_validate({**spec.model_dump(), **update}) if update else spec


def cmd_compile(args) -> int:
    from topr_pipelines.runner import compile_pipeline

    config = _config(args, [f"run.iterations={args.iterations}"] if args.iterations else [])
    print(compile_pipeline(config, args.output, args.pipeline_root))
    return 0


def cmd_submit(args) -> int:
    from topr_pipelines.submit import submit_run

    config = _config(args)
    run_name = args.run_name or config.run.name or time.strftime("topr-%Y%m%d-%H%M%S")
    endpoint = _endpoint(args)
    run_id, url = submit_run(endpoint, config, args.tracking_uri, run_name, args.pipeline_root, args.service_account)
    print(f"submitted run {run_id} ({run_name}, {config.run.iterations} iterations)\n{url}")
    return 0


def cmd_up(args) -> int:
    from topr.stack import up

    stack = up(args.state_dir, args.s3_port, args.mlflow_port, args.bucket)
    exports = " ".join(f"{name}={value}" for name, value in stack.environment().items())
    print(f"SeaweedFS S3   {stack.s3_endpoint}  (bucket {stack.bucket})")
    print(f"MLflow server  {stack.tracking_uri}  (artifacts in s3://{stack.bucket}/mlflow, served by proxy)")
    print(f"\nexport {exports}")
    print(f"topr run --tracking-uri {stack.tracking_uri} run.artifact_store=s3://{stack.bucket}/runs")
    print(f"\nStop both with: topr down --state-dir {args.state_dir}")
    return 0


def cmd_lineage(args) -> int:
    from topr import lineage
    from topr.tracking import check_tracking_server, default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri("runs")
    check_tracking_server(tracking_uri)
    chain = lineage.trace(tracking_uri, args.model)
    print(lineage.chain_json(chain) if args.json else lineage.format_chain(chain))
    if not args.verify:
        return 0
    problems = lineage.verify(chain)
    for problem in problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    print(f"verified {sum(1 for link in chain if link.uri.startswith('s3://'))} stored artifacts: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def cmd_schedule(args) -> int:
    from topr_pipelines import schedule

    if args.schedule_command == "create":
        config = _config(args, schedule.prompt_overrides(args.prompts))
        created = schedule.create_schedule(
            _endpoint(args), args.cron, config, args.tracking_uri, args.name, args.pipeline_root, args.service_account
        )
        print(f"created recurring run {created.recurring_run_id} ({args.name}, cron {args.cron})")
    elif args.schedule_command == "list":
        for recurring in schedule.list_schedules(_endpoint(args)):
            cron = recurring.trigger.cron_schedule.cron if recurring.trigger and recurring.trigger.cron_schedule else "-"
            print(f"{recurring.recurring_run_id}  {recurring.display_name}  cron {cron}  {recurring.status}")
    else:
        schedule.delete_schedule(_endpoint(args), args.id)
        print(f"deleted recurring run {args.id}")
    return 0


def cmd_down(args) -> int:
    from topr.stack import down

    for service in down(args.state_dir):
        print(f"stopped {service.name} (pid {service.pid}, {service.url})")
    return 0


def _local_copies(stack: ExitStack, args, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Replace each ``s3://`` argument with a local path: inputs downloaded, outputs uploaded on success.

    ``inputs``/``outputs`` map an argument name to ``"file"`` or ``"directory"``.
    """
    from topr import storage

    opener = {
        ("in", "file"): storage.local_file,
        ("in", "directory"): storage.local_directory,
        ("out", "file"): storage.output_file,
        ("out", "directory"): storage.output_directory,
    }
    for direction, arguments in (("in", inputs), ("out", outputs)):
        for name, kind in arguments.items():
            value = getattr(args, name)
            if value is not None and storage.is_s3(value):
                setattr(args, name, str(stack.enter_context(opener[direction, kind](value))))


def cmd_sample(args) -> int:
    from topr.sample import run_sample

    with ExitStack() as stack:
        _local_copies(stack, args, {"model": "directory", "prompts": "file"}, {"output": "file"})
        _print_json(run_sample(_config(args), args.model, args.prompts, args.output, args.iteration))
    return 0


def cmd_verify(args) -> int:
    from topr.verify import run_verify

    # Scoring needs the task's checker, not its prompt files.
    config = load_config(args.config, [*args.overrides, *([f"task.name={args.task}"] if args.task else [])], prompt_files=False)
    with ExitStack() as stack:
        _local_copies(stack, args, {"input": "file"}, {"output": "file"})
        _print_json(run_verify(config.task, args.input, args.output))
    return 0


def cmd_curate(args) -> int:
    from topr.curate import run_curate

    with ExitStack() as stack:
        _local_copies(stack, args, {"input": "file"}, {"output": "file", "report": "file"})
        _print_json(run_curate(_config(args), args.input, args.output, args.report))
    return 0


def cmd_train(args) -> int:
    """Train here, or in torchrun workers (train.processes > 1), or as one of them under torchrun.

    Under torchrun every rank reads its own local copies of s3:// inputs; only rank 0 writes
    (and uploads) the model and the summary.
    """
    from topr.checkpoint import TrainCheckpoint
    from topr.distributed import current_ranks, under_torchrun
    from topr.train import launch_train, write_summary

    config = _config(args)
    checkpoint = None
    if args.checkpoint and config.train.checkpoint_minutes is not None:
        checkpoint = TrainCheckpoint(args.checkpoint, args.checkpoint_uri, config.train.checkpoint_minutes)
    main_rank = current_ranks().main
    if not main_rank:  # rank 0 speaks for all
        from transformers.utils import logging as transformers_logging

        logging.getLogger().setLevel(logging.WARNING)
        transformers_logging.disable_progress_bar()
    history: list[dict] = []
    with ExitStack() as stack:
        outputs = {"output": "directory", "summary": "file"} if main_rank else {}
        _local_copies(stack, args, {"model": "directory", "data": "file"}, outputs)
        summary = launch_train(config, args.model, args.data, args.output, lambda step, stats: history.append(stats), checkpoint)
        if main_rank:
            if args.summary:
                write_summary(args.summary, summary, history)
            _print_json(summary)
    # Once the model is where it goes (an s3:// output uploads as the block above ends); torchrun's
    # workers leave it to the command that launched them.
    if checkpoint and not under_torchrun():
        checkpoint.remove()
    return 0


def cmd_evaluate(args) -> int:
    from topr.evaluate import format_report, run_evaluate

    args.completions = args.completions or args.output.removesuffix(".json") + ".completions.jsonl"
    with ExitStack() as stack:
        _local_copies(stack, args, {"model": "directory", "prompts": "file"}, {"output": "file", "completions": "file"})
        report = run_evaluate(_config(args), args.model, args.prompts, args.output, args.completions)
    print(format_report(report))
    return 0


COMMANDS = {
    "run": cmd_run,
    "experiment": cmd_experiment,
    "compile": cmd_compile,
    "sample": cmd_sample,
    "verify": cmd_verify,
    "curate": cmd_curate,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "up": cmd_up,
    "down": cmd_down,
    "lineage": cmd_lineage,
    "schedule": cmd_schedule,
    "submit": cmd_submit,
}


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals in one run, so overrides after an option (`topr experiment
    # objectives --arms topr train.epochs=2`) arrive here; any other leftover is an error.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, OSError, RuntimeError, LookupError) as error:
        print(f"topr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
