"""The ``topr`` commands that run the pipeline: ``run`` (locally, through kfp.local), ``compile``,
``submit`` and ``schedule`` (Kubeflow Pipelines).

They reach the ``topr`` command through the entry-point group ``topr.commands`` (pyproject.toml),
so the library's CLI never imports this floor. This module imports no kfp itself: ``topr --help``
lists these commands even where the workflow extra is not installed, and running one there says
what to install.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from topr.cli import Command, add_config_arguments, command_config, tracking_uri_argument
from topr.config import Config, ConfigError, config_to_yaml, describe_fields

def _add_run_command(commands) -> argparse.ArgumentParser:
    run = commands.add_parser(
        "run",
        help="Run the whole loop locally (the Kubeflow pipeline through kfp.local).",
        description="Run prompts → (sample → verify → curate → train → evaluate) × iterations on this "
        "machine, as the same Kubeflow pipeline a cluster runs, tracked in MLflow. With no arguments "
        "it fine-tunes the embedded SmolLM2-135M-Instruct on the built-in arithmetic task.\n\n"
        "Configuration fields (override any as section.field=value):\n\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--tracking-uri", type=tracking_uri_argument, help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (sets run.tracking_uri).")
    run.add_argument(
        "--verbose",
        dest="show_output",
        action="store_true",
        help="Show every task's output and Kubeflow's executor log on the console too (always in <run folder>/run.log).",
    )
    run.add_argument(
        "--cold-tasks",
        action="store_true",
        help="Start every task in a fresh Python interpreter, as kfp.local does by itself, instead of forking it "
        "from one that has imported torch, transformers and MLflow once (about 5 s more per task on 2 cores).",
    )
    run.add_argument(
        "--runner",
        choices=("process", "docker"),
        default="process",
        help="process (default): every task a process on this machine. docker: every task in its own container "
        "of --image, as a cluster's pod runs it (user 1000, read-only root filesystem, no capabilities, no network "
        "but the MLflow server and S3 store of 'topr up', which --tracking-uri must name).",
    )
    run.add_argument(
        "--image",
        help="The image of --runner docker (sets cluster.image; default: topr:<version>-cpu, what 'make image' builds).",
    )
    run.add_argument(
        "--from",
        dest="start_from",
        metavar="MODEL",
        help="Start from a registered model: an alias of run.registered_model (e.g. champion), "
        "name@alias or name/version (sets model.path=models:/...).",
    )
    run.add_argument(
        "--resume",
        metavar="RUN",
        help="Continue RUN, a run that was interrupted or failed (its name under run.output_dir, or its folder), in "
        "its own MLflow run and with its own configuration (<run folder>/config.yaml; no other overrides): every "
        "stage that finished is kept, the others run. --runner process only.",
    )
    add_config_arguments(run)
    return run


def _add_compile_command(commands) -> argparse.ArgumentParser:
    compile_ = commands.add_parser(
        "compile",
        help="Write the pipeline as Kubeflow Pipelines YAML.",
        description="Compile the pipeline for the configuration's run.iterations, sample.shards and "
        "cluster settings (image, resources, GPUs, secrets, retries, timeouts) to YAML.",
    )
    compile_.add_argument("--output", default="pipelines/topr_pipeline.yaml", help="Where to write the YAML.")
    compile_.add_argument("--iterations", type=int, default=None, help="Iterations to unroll (default: run.iterations).")
    compile_.add_argument("--pipeline-root", help="Default pipeline root for Kubeflow's artifacts, e.g. s3://bucket/kfp.")
    add_config_arguments(compile_)
    return compile_


def _add_submit_command(commands) -> argparse.ArgumentParser:
    submit = commands.add_parser(
        "submit",
        help="Compile the pipeline and start a run on Kubeflow Pipelines; print its URL.",
        description="Compile the pipeline for this configuration and start one run of it on a Kubeflow "
        "Pipelines endpoint, in the experiment run.experiment. Stages reach MLflow at --tracking-uri "
        "and object storage through the cluster's Secret and ConfigMap (cluster.* fields).",
    )
    _add_endpoint_arguments(submit)
    submit.add_argument("--tracking-uri", type=tracking_uri_argument, required=True, help="MLflow tracking server the pipeline's pods can reach.")
    submit.add_argument("--run-name", help="Name of the run (default: run.name or topr-<timestamp>).")
    submit.add_argument("--pipeline-root", help="Pipeline root for Kubeflow's artifacts (default: the deployment's).")
    submit.add_argument("--service-account", help="Kubernetes service account of the run's pods (e.g. topr-pipeline).")
    add_config_arguments(submit)
    return submit


def _add_schedule_command(commands) -> argparse.ArgumentParser:
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
    create.add_argument("--tracking-uri", type=tracking_uri_argument, required=True, help="MLflow tracking server the pipeline's pods can reach.")
    create.add_argument("--name", default="topr-retraining", help="Name of the recurring run.")
    create.add_argument("--pipeline-root", help="Kubeflow pipeline root for artifacts (default: the deployment's).")
    create.add_argument(
        "--service-account", default="topr-pipeline", help="Kubernetes service account of the runs' pods (default: %(default)s)."
    )
    add_config_arguments(create)
    listing = schedules.add_parser("list", help="List recurring runs.")
    _add_endpoint_arguments(listing)
    delete = schedules.add_parser("delete", help="Delete a recurring run.")
    _add_endpoint_arguments(delete)
    delete.add_argument("id", help="The recurring run's id (see 'topr schedule list').")
    return schedule


class _RefuseSecretArgument(argparse.Action):
    """A credential given on the command line, where ``ps`` shows it: refused, naming where it goes."""

    def __call__(self, parser, namespace, values, option_string=None):
        variable, file_flag = SECRETS[option_string]
        parser.error(f"{option_string}: a credential on the command line shows in ps; put it in ${variable} or in a file given as {file_flag}")


SECRETS = {"--token": ("KF_PIPELINES_TOKEN", "--token-file"), "--cookies": ("KF_PIPELINES_COOKIES", "--cookies-file")}
"""Each credential of the kfp client: the environment variable and the file option it comes from."""


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The kfp client's connection and authentication options."""
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80.")
    parser.add_argument("--namespace", default="kubeflow", help="Kubernetes namespace (multi-user Kubeflow: your profile's).")
    parser.add_argument(
        "--token-file",
        help="File holding the bearer token (default: $KF_PIPELINES_TOKEN, else the client's own credentials).",
    )
    parser.add_argument(
        "--cookies-file",
        help="File holding the cookies for an authenticating proxy, e.g. 'authservice_session=...' (default: $KF_PIPELINES_COOKIES).",
    )
    for refused in SECRETS:
        parser.add_argument(refused, action=_RefuseSecretArgument, help=argparse.SUPPRESS)
    parser.add_argument("--ssl-ca-cert", help="CA bundle to verify the endpoint's TLS certificate.")
    parser.add_argument("--insecure", action="store_true", help="Do not verify the endpoint's TLS certificate.")
    parser.add_argument("--ui-host", help="Pipelines UI base URL for printed links (default: --host).")


def _secret(flag: str, path: str | None) -> str | None:
    """The credential ``flag`` names (``--token``, ``--cookies``): from its file, else its environment variable."""
    variable, file_flag = SECRETS[flag]
    if not path:
        return os.environ.get(variable)
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(f"{file_flag} {path}: {error.strerror}") from None


def _endpoint(args):
    from topr_pipelines.submit import Endpoint

    return Endpoint(
        host=args.host,
        namespace=args.namespace,
        existing_token=_secret("--token", args.token_file),
        cookies=_secret("--cookies", args.cookies_file),
        ssl_ca_cert=args.ssl_ca_cert,
        ui_host=args.ui_host,
        verify_ssl=False if args.insecure else None,
    )


def _run_flags(args) -> list[str]:
    """``topr run``'s own flags as configuration overrides."""
    overrides = [f"run.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    if args.runner == "docker":
        overrides.append(f"cluster.image={args.image or local_image()}")
    if args.start_from:
        registered = args.start_from
        if "@" not in registered and "/" not in registered:
            registered = f"{command_config(args).run.registered_model}@{registered}"
        overrides.append(f"model.path=models:/{registered}")
    return overrides


def local_image() -> str:
    """The tag 'make image' gives the CPU image it builds."""
    from topr import __version__

    return f"topr:{__version__}-cpu"


def cmd_run(args) -> int:
    """``topr run``, and every MLflow run it starts ends. SIGTERM and SIGINT stop the run's tasks,
    end its parent run and every stage run still RUNNING as KILLED, then exit with 128 + the
    signal; an error of ``topr run`` itself (a full disk, kfp.local) ends them FAILED. Each gets
    the tag ``topr.ended`` saying why. The parent run records who runs it (``OWNER_ENV``), so a
    run whose ``topr run`` is killed outright is found and ended later: by ``topr gc``, and as
    the next ``topr run`` starts (``_end_abandoned_runs``)."""
    from topr.tracking import OWNER_ENV, owner_environment
    from topr_pipelines.runner import Interrupted, interruptible

    ending: dict[str, str] = {}  # the tracking URI and run name, once the pipeline may start runs
    saved = os.environ.get(OWNER_ENV)
    os.environ.update(owner_environment())
    try:
        with interruptible():
            return _run(args, ending)
    except Interrupted as stop:
        why = f"{stop.name} received by topr run (pid {os.getpid()} on {socket.gethostname()})"
        if not (ending and _end_runs(ending, "KILLED", why)):
            print(f"topr run: {why}", file=sys.stderr)
        _say_how_to_resume(ending)
        return 128 + stop.signum
    except BaseException as error:
        if ending:
            _end_runs(ending, "FAILED", f"topr run failed: {type(error).__name__}: {error}")
            _say_how_to_resume(ending)
        raise
    finally:
        if saved is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = saved


def _end_runs(ending: dict[str, str], status: str, why: str) -> bool:
    """End what still runs of this ``topr run``'s MLflow runs as ``status``, tagged with ``why``,
    and say so with the checkpoints they leave; whether any was ended. Best-effort: the error
    that stopped the run goes on whatever happens here."""
    from topr import gc

    try:
        ended = gc.end_runs_of_this_process(ending["tracking_uri"], ending["run_name"], status, why)
    except Exception as error:  # noqa: BLE001 - an unreachable tracking server among others
        print(f"topr run: {why}; could not end its MLflow runs ({error}): 'topr gc' ends them once this process is gone", file=sys.stderr)
        return True
    for item, run in ended:
        stages = [name for name in item.ended if name != item.name]
        if item.name in item.ended:
            what = f"MLflow run {item.name} ({item.run_id})" + (f" and {', '.join(stages)}" if stages else "")
        else:
            what = f"the stage runs {', '.join(stages)} of MLflow run {item.name} ({item.run_id})"
        print(f"topr run: {why}: ended {what} as {status}", file=sys.stderr)
        try:
            left, _ = gc.checkpoints(run)
        except Exception:  # noqa: BLE001 - listing them is a courtesy; 'topr gc' lists them too
            left = {}
        for location, state in left.items():
            print(f"  checkpoint {location} ({state})", file=sys.stderr)
    return bool(ended)


def _say_how_to_resume(ending: dict[str, str]) -> None:
    if ending:
        print(f"topr run: to go on from its last finished stages: topr run --resume {ending['run_dir']}", file=sys.stderr)


def _end_abandoned_runs(tracking_uri: str) -> None:
    """What every ``topr run`` checks first: this host's runs whose ``topr run`` is gone are
    ended KILLED, and their checkpoints listed (``topr gc``, which also removes them). Best-effort:
    it never keeps a run from starting."""
    from topr import gc

    try:
        found = gc.collect(tracking_uri, finder=f"topr run (pid {os.getpid()})", abandoned_only=True)
    except Exception as error:  # noqa: BLE001 - an old server, a store that cannot be read
        print(f"topr run: could not look for abandoned runs ({error}); 'topr gc' looks again", file=sys.stderr)
        return
    for item in found:
        print("abandoned run " + "\n".join(item.lines()), flush=True)


def _run(args, ending: dict[str, str]) -> int:
    from topr.report import write_run_report
    from topr.steps import check_services
    from topr.tracking import default_tracking_uri
    from topr_pipelines.runner import log_path, run_local

    if args.resume:
        config, run_dir = _run_to_resume(args)
        run_name = run_dir.name
    else:
        config = command_config(args, _run_flags(args))
        run_name = config.run.name or time.strftime("topr-%Y%m%d-%H%M%S")
        run_dir = Path(config.run.output_dir) / run_name
        if run_dir.exists():
            raise ConfigError(f"run folder {run_dir} already exists: choose another run.name, or continue it with --resume {run_dir}")
    tracking_uri = config.run.tracking_uri or default_tracking_uri(run_dir.parent)
    if args.runner == "docker":
        from topr_pipelines.docker_runner import preflight

        preflight(config.cluster.image, tracking_uri)
    check_services(tracking_uri, config.run.artifact_store)
    _end_abandoned_runs(tracking_uri)
    if args.resume:
        resume_run_id = _parent_to_resume(tracking_uri, config, run_name)
    else:
        resume_run_id = ""
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(config))
    print(f"topr run {run_name}: {config.run.iterations} iteration(s), tracking {tracking_uri}\nlog: {log_path(run_dir)}", flush=True)

    started = time.perf_counter()
    ending.update(tracking_uri=tracking_uri, run_name=run_name, run_dir=str(run_dir))
    try:
        image = config.cluster.image if args.runner == "docker" else None
        parent_run_id = run_local(
            config, run_dir, tracking_uri, run_name, args.show_output, warm=not args.cold_tasks, image=image, resume_run_id=resume_run_id
        )
    except RuntimeError as error:
        raise RuntimeError(f"{error} (the whole log: {log_path(run_dir)})") from error
    minutes = (time.perf_counter() - started) / 60
    table = write_run_report(run_dir, tracking_uri, parent_run_id, minutes)
    print(table)
    print(f"\n{minutes:.1f} min · MLflow run {parent_run_id} · {tracking_uri}\nreport: {run_dir / 'report.md'}")
    return 0


def _run_to_resume(args) -> tuple[Config, Path]:
    """The configuration and folder of the run ``--resume`` names: a run folder, or a run's name
    under run.output_dir. Nothing else may change: every finished stage is kept because its
    inputs are the same."""
    from topr.config import load_config

    if args.runner != "process":
        raise ConfigError("--resume: only --runner process runs can be resumed (a container reaches MLflow through a port that changes per run)")
    given = [flag for flag, value in (("--config", args.config), ("--from", args.start_from), ("--image", args.image), ("--tracking-uri", args.tracking_uri)) if value]
    given += [override for override in args.overrides if not override.startswith("run.output_dir=")]
    if given:
        raise ConfigError(f"--resume: {', '.join(given)}: a resumed run keeps its own configuration (its folder's config.yaml)")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        run_dir = Path(command_config(args).run.output_dir) / args.resume
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"--resume {args.resume}: no run folder with a config.yaml there or at {run_dir} (give the run's folder, or its run.output_dir)")
    return load_config(str(config_file), []), run_dir


def _parent_to_resume(tracking_uri: str, config: Config, run_name: str) -> str:
    """The MLflow run that ``topr run --resume`` continues: the latest parent run named
    ``run_name`` that a ``topr run`` of this host started with this run folder's configuration,
    which must have ended KILLED or FAILED; "" if none was started (the run begins afresh)."""
    from topr.tracking import ENDED_TAG, OWNER_PID_TAG, mlflow_client, owned_runs

    runs = [
        run
        for run in owned_runs(tracking_uri, socket.gethostname(), run_name=run_name, status=None)
        if run.data.params.get("run.output_dir") == config.run.output_dir and run.data.params.get("run.experiment") == config.run.experiment
    ]
    if not runs:
        print(f"resuming {run_name}: it never started an MLflow run on {tracking_uri}; starting it from the beginning", flush=True)
        return ""
    run = max(runs, key=lambda each: each.info.start_time)
    where = f"MLflow run {run.info.run_id} ({run_name})"
    if run.info.status == "RUNNING":
        raise ConfigError(f"--resume: {where} is still running, under topr run pid {run.data.tags.get(OWNER_PID_TAG)}: stop it first")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume: {where} finished: nothing to resume")
    client = mlflow_client(tracking_uri)
    finished = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    print(f"resuming {where}, which ended {run.info.status}: {run.data.tags.get(ENDED_TAG, 'no reason recorded')}", flush=True)
    print(f"  kept, as they finished: {', '.join(stage.info.run_name for stage in finished) or 'no stage'}", flush=True)
    return run.info.run_id


def cmd_compile(args) -> int:
    from topr_pipelines.runner import compile_pipeline

    config = command_config(args, [f"run.iterations={args.iterations}"] if args.iterations else [])
    print(compile_pipeline(config, args.output, args.pipeline_root))
    return 0


def cmd_submit(args) -> int:
    from topr_pipelines.submit import submit_run

    config = command_config(args)
    run_name = args.run_name or config.run.name or time.strftime("topr-%Y%m%d-%H%M%S")
    endpoint = _endpoint(args)
    run_id, url = submit_run(endpoint, config, args.tracking_uri, run_name, args.pipeline_root, args.service_account)
    print(f"submitted run {run_id} ({run_name}, {config.run.iterations} iterations)\n{url}")
    return 0


def cmd_schedule(args) -> int:
    from topr_pipelines import schedule

    if args.schedule_command == "create":
        config = command_config(args, schedule.prompt_overrides(args.prompts))
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


COMMANDS = (
    Command("run", _add_run_command, cmd_run),
    Command("compile", _add_compile_command, cmd_compile),
    Command("submit", _add_submit_command, cmd_submit),
    Command("schedule", _add_schedule_command, cmd_schedule),
)
"""The pipeline's commands, in the order ``topr --help`` lists them (before the library's)."""
