"""The ``topr`` command: each stage on files, experiments, the local stack, and (from the
pipeline's package, through the ``topr.commands`` entry points) the pipeline itself.

    topr run [--config FILE] [section.field=value ...]   the pipeline, locally, through kfp.local
    topr compile | submit | schedule                     the pipeline on Kubeflow Pipelines
    topr experiment NAME|SPEC [section.field=value ...]  several arms of the loop on the same data, compared
    topr sample | verify | curate | train | evaluate      one stage on files (local or s3://)
    topr up | down                                       SeaweedFS + MLflow server on this machine
    topr serve [manifest] MODEL                          a registered model on loopback, or its KServe manifest

The stage commands need only topr's core; the others need its ``workflow`` extra (kfp, MLflow,
boto3), and say so when it is missing. Every file or model argument of a stage command may be
an ``s3://bucket/key`` URI (which needs boto3, from that extra).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from topr.config import ConfigError, load_config, read_config_file, refuse_credentials
from topr.experiment import named_specs as named_experiments

log = logging.getLogger("topr")

CONFIG_HELP = "YAML configuration file (sections model, task, sample, curate, train, evaluate, gate, verifier, run, cluster)."
OVERRIDES_HELP = "Overrides of the form section.field=value, e.g. train.learning_rate=1e-5."


COMMAND_ENTRY_POINTS = "topr.commands"
"""Entry-point group of other packages' commands: each entry point names a sequence of Commands."""


@dataclass(frozen=True)
class Command:
    """One ``topr`` subcommand: its name, how to add its parser, and the function that runs it."""

    name: str
    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
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
    for command in (*_installed_commands(), *COMMANDS):
        command.add_parser(commands).set_defaults(run=command.run)
    return parser


def _installed_commands() -> list[Command]:
    """The commands other packages add (the pipeline's run, compile, submit and schedule); one
    that cannot be loaded is left out with a warning, so the others still work."""
    commands = []
    for entry_point in metadata.entry_points(group=COMMAND_ENTRY_POINTS):
        try:
            commands += entry_point.load()
        except Exception as error:  # noqa: BLE001 - whatever a broken plugin raises
            log.warning("left out the commands of entry point %s (%s): %s", entry_point.name, entry_point.value, error)
    return commands


def _add_experiment_command(commands) -> argparse.ArgumentParser:
    experiment = commands.add_parser(
        "experiment",
        help="Compare objectives, curation, baselines, ratio levels or the verifier: several runs on the same data.",
        description="Run every arm of an experiment in every replicate, in this process (the starting model "
        "and its evaluation shared; within a replicate, the training prompts, iteration 1's samples and the "
        "seeds shared by all arms; every replicate scored on the same held-out problems). Then write report.md "
        "with accuracy per arm and replicate, each arm's paired difference from the reference arm (mean with "
        "its 95% t-interval, sign-flip permutation p-value with Holm's correction, joint bootstrap interval and, with the "
        "spec's equivalence_margin, the TOST p-value of a tie"
        "), training diagnostics and plots into <run.output_dir>/<experiment name>/, also logged to "
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
    experiment.add_argument(
        "--drop-models",
        action="store_true",
        help="Remove each unit's trained models once it has finished (every copy: its run folder's, a published one and MLflow's; the registered "
        "versions stay, tagged topr.files_removed): the report needs only evaluations and figures, and each model is "
        "~0.5 GB (the default model). With --resume, also those of the units kept.",
    )
    experiment.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI (sets run.tracking_uri).")
    experiment.add_argument(
        "--verbose",
        dest="show_output",
        action="store_true",
        help="Show the units' whole output on the console too (always in each unit's run.log).",
    )
    add_config_arguments(experiment)
    return experiment



def _add_up_command(commands) -> argparse.ArgumentParser:
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
    return up



def _add_lineage_command(commands) -> argparse.ArgumentParser:
    lineage = commands.add_parser(
        "lineage",
        help="Print where a model came from, back to the base model.",
        description="Print the chain model ← training run ← curated set ← samples ← sampling model ← … "
        "← base model of a registered model version, read from MLflow.",
    )
    lineage.add_argument("model", help="name@alias, name/version, models:/name/version, or the model's s3:// URI.")
    lineage.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI (default: the local store under runs/).")
    lineage.add_argument("--json", action="store_true", help="Print the chain as JSON.")
    lineage.add_argument("--verify", action="store_true", help="Re-read and re-hash every artifact in object storage; exit 1 on any problem.")
    return lineage



def _add_gc_command(commands) -> argparse.ArgumentParser:
    gc = commands.add_parser(
        "gc",
        help="End the runs whose 'topr run' was killed; list (--delete: remove) what nothing needs and what it frees.",
        description="End as KILLED every RUNNING run of this host's 'topr run's on the tracking server whose process "
        "is gone (killed outright: SIGKILL, out of memory), with its stage runs still RUNNING, tagged topr.ended. "
        "Then list, with the bytes each frees: the training checkpoints these runs and the runs 'topr run' ended on a "
        "signal or error left (under $TMPDIR/topr-checkpoints/<run id>/ and <run.artifact_store>/<run id>/iter<i>/); "
        "the local copies (<run folder>/pipeline_root) of FINISHED runs under --output-dir that published everything "
        "to an artifact store; and, with --keep-versions N, the files of every registered version that holds no alias, "
        "is not among its model's newest N, is no ancestor of a kept version and whose run is not running (tagged "
        "topr.files_removed first, so nothing reads it after). Runs of other hosts and of clusters are left alone; "
        "samples, curated sets, evaluations and experiments' folders are never removed.",
    )
    gc.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI (default: the local store under runs/).")
    gc.add_argument("--output-dir", default="runs", help="Where the run folders are (run.output_dir; default: runs).")
    gc.add_argument("--keep-versions", type=int, metavar="N", help="Also list the versions beyond each model's newest N that nothing needs (default: keep every version).")
    gc.add_argument("--delete", action="store_true", help="Remove what is listed (a run resumed after that trains its stage from the start).")
    return gc


def _add_promote_command(commands) -> argparse.ArgumentParser:
    promote = commands.add_parser(
        "promote",
        help="Move the champion alias back: --rollback (to the version before), or --rollback --to VERSION.",
        description="Point gate.alias (default champion) of run.registered_model back at the version it held before "
        "its last move (a second rollback undoes the first), or at --to VERSION: through the same lock and "
        "compare-and-set as a pipeline's promotion, recorded in the alias history (action rollback) and by an MLflow "
        "run of its own in run.experiment. A version whose stage never committed it, or that was trained on another "
        "task than the champion's, is refused.",
    )
    promote.add_argument("--rollback", action="store_true", required=True, help="Move the alias back (the only move made by hand).")
    promote.add_argument("--to", metavar="VERSION", help="The version to move it to (default: the one it held before its last move).")
    promote.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI (default: run.tracking_uri, else the local store under run.output_dir).")
    add_config_arguments(promote)
    return promote


def _add_serve_command(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve",
        help="Try a registered model on an OpenAI-compatible endpoint here, or write its KServe InferenceService.",
        description="topr serve MODEL: fetch a registered version (name@alias, name/version or models:/…), check "
        "every file against its manifest and the manifest against the digest MLflow recorded, and serve it on "
        "loopback with transformers serve (an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
        "/v1/models), the model named after the registered model; needs topr[serve]. "
        "topr serve manifest MODEL: write the KServe InferenceService (Hugging Face runtime: vLLM with "
        "cluster.serve.gpus > 0, its Hugging Face backend on CPU) and the ServiceAccount that hands KServe "
        "cluster.s3_secret, for the version's files in object storage, pinned to its manifest's digest; as the "
        "pipeline's serve stage writes them (cluster.serve.* settings).",
    )
    serve.add_argument("words", nargs="+", metavar="[manifest] MODEL [section.field=value ...]", help="What to serve, e.g. topr-arithmetic@champion; overrides of the config after it.")
    serve.add_argument("--config", help=CONFIG_HELP)
    serve.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI (default: run.tracking_uri, else the local store under run.output_dir).")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: loopback only).")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    serve.add_argument("--device", default="cpu", help="Where the model runs: cpu, cuda, auto.")
    serve.add_argument("--output", "-o", help="manifest: the YAML file to write (default: print it).")
    serve.add_argument("--s3-endpoint", help="manifest: the object store's endpoint for KServe (default: $AWS_ENDPOINT_URL).")
    serve.set_defaults(overrides=[])  # those after an option arrive here (main)
    return serve


def _add_down_command(commands) -> argparse.ArgumentParser:
    down = commands.add_parser("down", help="Stop exactly what 'topr up' started.")
    down.add_argument("--state-dir", default="runs/stack", help="The state directory given to 'topr up'.")
    return down



def _add_sample_command(commands) -> argparse.ArgumentParser:
    sample = commands.add_parser("sample", help="Sample completions with behaviour log-probs.")
    sample.add_argument("--model", required=True, help="Model directory (or the embedded default's name).")
    sample.add_argument("--prompts", required=True, help="Prompt records (JSONL/Parquet): prompt_id, prompt, reference.")
    sample.add_argument("--output", required=True, help="Where to write the sample records.")
    sample.add_argument("--iteration", type=int, default=1, help="Which slice of task.train_size prompts to use.")
    add_config_arguments(sample)
    return sample



def _add_verify_command(commands) -> argparse.ArgumentParser:
    verify = commands.add_parser("verify", help="Score completions: add extracted, correct, reward.")
    verify.add_argument("--task", help="Task name (overrides task.name).")
    verify.add_argument("--input", required=True, help="Records with prompt_id, reference, completion.")
    verify.add_argument("--output", required=True, help="Where to write the verified records.")
    add_config_arguments(verify)
    return verify



def _add_curate_command(commands) -> argparse.ArgumentParser:
    curate = commands.add_parser("curate", help="Choose the training set and report its composition.")
    curate.add_argument("--input", required=True, help="Verified records.")
    curate.add_argument("--output", required=True, help="Where to write the training set.")
    curate.add_argument("--report", required=True, help="Where to write the composition report (JSON).")
    add_config_arguments(curate)
    return curate



def _add_train_command(commands) -> argparse.ArgumentParser:
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
    add_config_arguments(train)
    return train



def _add_evaluate_command(commands) -> argparse.ArgumentParser:
    evaluate = commands.add_parser("evaluate", help="Held-out pass@1, pass@k, maj@k with 95%% CIs.")
    evaluate.add_argument("--model", required=True, help="Model directory (or the embedded default's name).")
    evaluate.add_argument("--prompts", required=True, help="Held-out prompt records.")
    evaluate.add_argument("--output", required=True, help="Where to write the report (JSON).")
    evaluate.add_argument("--completions", help="Where to write the evaluated completions (JSONL).")
    add_config_arguments(evaluate)
    return evaluate



def tracking_uri_argument(value: str) -> str:
    """An argparse type: a tracking URI without credentials in it."""
    try:
        return refuse_credentials(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def command_config(args, extra: list[str] = ()):
    """The configuration of a command: its --config file, its overrides, then ``extra``."""
    return load_config(args.config, list(args.overrides) + list(extra))


def _print_json(payload: dict) -> None:
    import json

    print(json.dumps(payload, indent=2, default=str))


def cmd_experiment(args) -> int:
    from topr.experiment import arm_configs, failure_summary, load_spec, run_experiment
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
    folder = Path(experiment.run.output_dir) / name
    report = run_experiment(name, spec, experiment, arms, folder, tracking_uri, args.resume, verbose=args.show_output, drop_models=args.drop_models)
    print(report.read_text())
    print(f"report: {report}")
    failed = failure_summary(name, folder)
    if failed:
        print(f"topr experiment: {failed}", file=sys.stderr)
        return 1
    return 0


def _with_arms(spec, name: str, wanted: list[str]):
    """The spec with only the ``wanted`` arms; without its reference arm, the first of them is the reference."""
    from topr.experiment import ExperimentSpec

    unknown = sorted(set(wanted) - set(spec.arms))
    if unknown:
        raise ConfigError(f"no arm(s) {', '.join(unknown)} in experiment {name} (arms: {', '.join(spec.arms)})")
    reference = spec.reference if spec.reference in wanted else None
    also = [arm for arm in spec.also_compared_with if arm in wanted]
    return ExperimentSpec.model_validate({**spec.model_dump(), "arms": {arm: spec.arms[arm] for arm in wanted}, "reference": reference, "also_compared_with": also})


def _with_replicates_and_reference(spec, replicates: int | None, reference: str | None):
    """The spec with the command line's replicate count and reference arm, validated again."""
    from topr.experiment import ExperimentSpec

    update = {key: value for key, value in (("replicates", replicates), ("reference", reference)) if value is not None}
    if reference is not None and reference not in spec.arms:
        raise ConfigError(f"--reference {reference}: no such arm (arms: {', '.join(spec.arms)})")
    if replicates is not None and replicates < 1:
        raise ConfigError(f"--replicates must be at least 1, got {replicates}")
    return ExperimentSpec.model_validate({**spec.model_dump(), **update}) if update else spec


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


def cmd_gc(args) -> int:
    from topr import gc, retention
    from topr.tracking import check_tracking_server, default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri("runs")
    check_tracking_server(tracking_uri)
    if args.keep_versions is not None and args.keep_versions < 0:
        raise ValueError(f"--keep-versions {args.keep_versions}: give 0 or more")
    found = gc.collect(tracking_uri, delete=args.delete)
    for item in found:
        print("\n".join(item.lines()))
    unneeded = retention.collect(tracking_uri, args.output_dir, args.keep_versions, delete=args.delete)
    for item in unneeded:
        print("\n".join(item.lines()))
    ended = sum(item.abandoned for item in found)
    count = sum(len(item.checkpoints) for item in found)
    done = "removed" if args.delete else "listed"
    freed = retention.format_bytes(sum(item.freed_bytes for item in unneeded if item.removed or not args.delete))
    print(f"topr gc: {ended} abandoned run(s) ended; {count} checkpoint(s) {done}; {len(unneeded)} unneeded item(s) {done}: {freed} {'freed' if args.delete else 'to free'}")
    return 1 if any(item.problems for item in unneeded) else 0


def cmd_promote(args) -> int:
    from topr.promotion import roll_back
    from topr.tracking import check_tracking_server, default_tracking_uri

    config = command_config(args)
    tracking_uri = args.tracking_uri or config.run.tracking_uri or default_tracking_uri(config.run.output_dir)
    check_tracking_server(tracking_uri)
    name, alias = config.run.registered_model, config.gate.alias
    move = roll_back(tracking_uri, name, alias, config.run.experiment, args.to)
    print(f"{name}@{alias}: version {move.previous} -> version {move.version} (rollback run {move.run_id}, {move.time})")
    return 0


def cmd_serve(args) -> int:
    from topr import serve, storage
    from topr.tracking import check_tracking_server, default_tracking_uri

    words = [word for word in args.words if "=" not in word]
    manifest = bool(words) and words[0] == "manifest"
    if len(words) != 1 + manifest:
        raise ValueError(f"expected [manifest] MODEL, got {' '.join(words) or 'nothing'}")
    args.overrides = [*(word for word in args.words if "=" in word), *args.overrides]
    config = command_config(args)
    tracking_uri = args.tracking_uri or config.run.tracking_uri or default_tracking_uri(config.run.output_dir)
    check_tracking_server(tracking_uri)
    model = serve.served_model(tracking_uri, words[-1])
    if not manifest:
        return serve.serve_locally(model, args.host, args.port, args.device)
    documents = serve.manifests(serve.checked(model), config.cluster, args.s3_endpoint or storage.endpoint_url())
    if args.output:
        print(f"wrote {serve.write_manifests(documents, args.output)} ({model.reference}: kubectl apply -f it)")
    else:
        import yaml

        print(yaml.safe_dump_all(documents, sort_keys=False), end="")
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
        _print_json(run_sample(command_config(args), args.model, args.prompts, args.output, args.iteration))
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
        _print_json(run_curate(command_config(args), args.input, args.output, args.report))
    return 0


def cmd_train(args) -> int:
    """Train here, or in torchrun workers (train.processes > 1), or as one of them under torchrun.

    Under torchrun every rank reads its own local copies of s3:// inputs; only rank 0 writes
    (and uploads) the model and the summary.
    """
    from topr.checkpoint import TrainCheckpoint
    from topr.distributed import current_ranks, under_torchrun
    from topr.train import launch_train, write_summary

    config = command_config(args)
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
        report = run_evaluate(command_config(args), args.model, args.prompts, args.output, args.completions)
    print(format_report(report))
    return 0


COMMANDS = (
    Command("experiment", _add_experiment_command, cmd_experiment),
    Command("up", _add_up_command, cmd_up),
    Command("down", _add_down_command, cmd_down),
    Command("lineage", _add_lineage_command, cmd_lineage),
    Command("gc", _add_gc_command, cmd_gc),
    Command("promote", _add_promote_command, cmd_promote),
    Command("serve", _add_serve_command, cmd_serve),
    Command("sample", _add_sample_command, cmd_sample),
    Command("verify", _add_verify_command, cmd_verify),
    Command("curate", _add_curate_command, cmd_curate),
    Command("train", _add_train_command, cmd_train),
    Command("evaluate", _add_evaluate_command, cmd_evaluate),
)
"""The library's commands, in the order ``topr --help`` lists them (after the installed ones)."""


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra of topr (as declared in its package metadata) whose requirements provide the
    module that ``error`` did not find, if any: a requirement's import name is taken to be its
    distribution name up to the first hyphen (kfp-kubernetes installs kfp.kubernetes)."""
    from packaging.requirements import Requirement

    missing = (error.name or "").split(".")[0].lower()
    for text in metadata.requires("topr") or ():
        requirement = Requirement(text)
        if requirement.marker is None or requirement.name.split("-")[0].lower() != missing:
            continue
        for extra in metadata.metadata("topr").get_all("Provides-Extra") or ():
            if requirement.marker.evaluate({"extra": extra}):
                return extra
    return None


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
        return args.run(args)
    except ModuleNotFoundError as error:
        extra = missing_extra(error)
        if extra is None:
            raise
        print(f"topr {args.command}: error: this needs {error.name}, from topr's {extra} extra: pip install 'topr[{extra}]'", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, OSError, RuntimeError, LookupError) as error:
        print(f"topr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
