"""What starting a pipeline task costs: a container per task (``topr run --runner docker``) against
a process forked warm (the default) and a fresh interpreter (``--cold-tasks``).

Each measurement runs a kfp.local pipeline of ``--tasks`` tasks in a chain, each doing what every
stage does before its own work: import ``topr.steps`` and MLflow (torch and transformers come
with them). The wall time of the pipeline divided by the tasks is the cost of one task's start
and end, kfp.local's executor included. The runners alternate, ``--repeats`` rounds, medians.
The docker runner needs the image (``make image``) and an engine; it is secured as in a run
(user 1000, read-only root, no capabilities, the internal network), with no stack behind it.

    .venv/bin/python bench/task_starts.py                      # 8 tasks, 3 rounds
    .venv/bin/python bench/task_starts.py --tasks 4 --repeats 2 --json task_starts.json
"""


import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import common


def chain_pipeline(image: str, tasks: int):
    """A pipeline of ``tasks`` tasks, each importing what a stage imports and passing a number on."""
    from kfp import dsl

    @dsl.component(base_image=image, install_kfp_package=False)
    def stage_start(previous: int) -> int:
        import mlflow  # noqa: F401

        import topr.steps  # noqa: F401

        return previous + 1

    @dsl.pipeline(name="task-starts")
    def chain() -> int:
        task = stage_start(previous=0)
        for _ in range(tasks - 1):
            task = stage_start(previous=task.output)
        return task.output

    return chain


def seconds_per_task(runner_name: str, image: str, tasks: int, root: Path) -> float:
    """One pipeline of ``tasks`` tasks under ``runner_name``; its wall time per task."""
    from kfp import local

    from topr_pipelines import warm_tasks
    from topr_pipelines.docker_runner import ContainerSetup, docker_runner

    pipeline_root = root / f"{runner_name}-{time.monotonic_ns()}"
    if runner_name == "docker":
        context = docker_runner(image, "http://127.0.0.1:9", pipeline_root)  # no stack: nothing is tracked
    elif runner_name == "warm":
        context = warm_tasks.started()
    else:
        context = contextlib.nullcontext()
    with context as setup:
        runner = setup.runner if isinstance(setup, ContainerSetup) else local.SubprocessRunner(use_venv=False)
        local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        started = time.perf_counter()
        result = chain_pipeline(image, tasks)()
        elapsed = time.perf_counter() - started
    assert result.output == tasks, result.output
    return elapsed / tasks


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--tasks", type=int, default=8, help="tasks in each pipeline (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the runners (default: %(default)s)")
    parser.add_argument("--runners", default="warm,cold,docker", help="which runners, in order (default: %(default)s)")
    parser.add_argument("--image", default=None, help="the image of the docker runner (default: what 'make image' builds)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeats = 2, 1
    info = common.setup(args)

    from topr_pipelines.commands import local_image

    image = args.image or local_image()
    runners = args.runners.split(",")
    timings = {name: [] for name in runners}
    with tempfile.TemporaryDirectory(prefix="task-starts-") as folder:
        for round_ in range(args.repeats):
            for name in runners:
                timings[name].append(seconds_per_task(name, image, args.tasks, Path(folder)))
                print(f"round {round_ + 1}: {name} {timings[name][-1]:.2f} s per task", flush=True)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    rows = [
        {"runner": name, "median": medians[name], "rounds": ", ".join(f"{v:.2f}" for v in timings[name]),
         "ratio": medians[name] / medians["warm"] if "warm" in medians else None}
        for name in runners
    ]  # fmt: skip
    columns = [("runner", "runner", ""), ("median", "s per task (median)", ".2f"), ("rounds", "rounds", ""), ("ratio", "vs warm", ".2f")]
    text = f"image {image}, {args.tasks} tasks per pipeline, {args.repeats} rounds\n" + common.table(rows, columns)
    common.finish(args, "task_starts", info, {"image": image, "tasks": args.tasks, "seconds_per_task": timings}, text)


if __name__ == "__main__":
    main()
