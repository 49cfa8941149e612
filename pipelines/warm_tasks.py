"""kfp.local's tasks started warm: forked from an interpreter that has imported the libraries once.

kfp.local's ``SubprocessRunner`` starts every task as ``sh -ec '... python3 -m
kfp.dsl.executor_main ...' <component source> <arguments>``: a fresh interpreter, which imports
torch, transformers, MLflow and its sqlite store again and tears them down at the end. On the
2-core machine that was about 5 of a light task's 7 seconds, and 137 s of the default run
(docs/performance.md). Within ``started()``, kfp.local runs such a task in a process forked from
a multiprocessing forkserver that has imported ``PRELOADED`` once: still a process of its own
(its own memory, exit and failure), the same executor entry point, its output streamed back
line by line as before, its environment that of this process when the task starts. The
forkserver is a fresh interpreter (not a fork of this one), so whatever this process has run
(an OpenMP pool, threads) never reaches the tasks. Commands of another shape (a ``pip install``,
another interpreter) go to kfp.local's own subprocess.

kfp is pinned (pyproject.toml): ``started`` replaces ``run_local_subprocess`` of kfp's
``subprocess_task_handler`` for the duration of the block, and ``task_of`` recognises the
command that kfp 2.17's ``component_factory`` writes for a lightweight component.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path

from kfp.local import subprocess_task_handler

PRELOADED = (
    "torch",
    "transformers",
    # What transformers imports lazily on a model's first load: its auto classes, the tokenizers
    # backend and the architecture of the embedded default model (others load as they come).
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
    "transformers.models.llama.modeling_llama",
    "accelerate",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "boto3",
    "kfp.dsl.executor_main",
    "topr.steps",
    "topr.sample",
    "topr.train",
    "topr.evaluate",
    "topr.curate",
    "topr_components",
)
"""What the forkserver imports before it forks any task: the imports every stage would repeat.
Imports only: nothing here runs a model or starts a thread, so forking stays safe."""

_SCRIPT = re.compile(
    r'program_path=\$\(mktemp -d\)\s+'
    r'printf "%s" "\$0" > "\$program_path/ephemeral_component\.py"\s+'
    r'_KFP_RUNTIME=true (?P<python>\S+) -m kfp\.dsl\.executor_main\s+'
    r'--component_module_path\s+"\$program_path/ephemeral_component\.py"\s+"\$@"\s*'
)
"""The shell script of a lightweight component's command (kfp ``component_factory``), after
kfp.local has put its interpreter in place of ``python3``."""


@dataclass(frozen=True)
class Task:
    """A lightweight component's run: its module's source and the executor's arguments."""

    source: str
    arguments: list[str]


def task_of(command: list[str]) -> Task | None:
    """The task that ``command`` would run with this interpreter, or None for any other command."""
    if len(command) < 4 or command[:2] != ["sh", "-ec"]:
        return None
    script = _SCRIPT.fullmatch(command[2])
    if script is None or script["python"] != sys.executable:
        return None
    return Task(source=command[3], arguments=command[4:])


@contextlib.contextmanager
def started() -> Iterator[None]:
    """Within the block, kfp.local's lightweight tasks run in processes forked from the forkserver."""
    original = subprocess_task_handler.run_local_subprocess

    def run_task(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        task = task_of(full_command)
        if task is None:
            return original(full_command, env_vars)
        return run_forked(task, {**os.environ, **(env_vars or {})})

    subprocess_task_handler.run_local_subprocess = run_task
    try:
        yield
    finally:
        subprocess_task_handler.run_local_subprocess = original


def _forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED))
    return context


def run_forked(task: Task, environment: dict[str, str]) -> int:
    """Run ``task`` in a forked process, print its output line by line as kfp.local does (its
    ``print``, which indents a task's lines), and return its exit code."""
    read_end, write_end = os.pipe()
    try:
        process = _forkserver().Process(target=_execute, args=(_Descriptor(write_end), task, environment), name="kfp-task")
        process.start()
    finally:
        os.close(write_end)  # the task holds the only write end: its exit ends the stream
    with open(read_end, encoding="utf-8", errors="replace") as output:
        for line in output:
            print(line, end="")
    print("\n")
    process.join()
    return process.exitcode


class _Descriptor:
    """A file descriptor handed to the forked task (multiprocessing sends it over the forkserver's socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(duplicate) -> int:
    return duplicate.detach()


def _execute(output: int, task: Task, environment: dict[str, str]) -> None:
    """In the forked process: what the component's shell script does, then the executor's main."""
    from kfp.dsl import executor_main

    for stream in (1, 2):
        os.dup2(output, stream)
    os.close(output)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(environment, _KFP_RUNTIME="true")
    with tempfile.TemporaryDirectory() as program_path:
        module = Path(program_path) / "ephemeral_component.py"
        module.write_text(task.source, encoding="utf-8")
        sys.argv = [executor_main.__file__, "--component_module_path", str(module), *task.arguments]
        executor_main.executor_main()
