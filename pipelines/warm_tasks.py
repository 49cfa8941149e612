"""kfp.local's tasks started warm: forked from an interpreter that has imported the libraries once.

kfp.local's ``SubprocessRunner`` starts every task as ``sh -ec '... python3 -m
kfp.dsl.executor_main ...' <component source> <arguments>``: a fresh interpreter, which imports
torch, transformers, MLflow and its sqlite store again and tears them down at the end. On the
2-core machine that was about 5 of a light task's 7 seconds, and 137 s of the default run
(docs/performance.md). Within ``started()``, kfp.local runs such a task in a process forked from
a multiprocessing forkserver that has imported ``PRELOADED`` once: still a process of its own
(its own memory, exit and failure), the same executor entry point, its output streamed back
line by line as before, its environment that of this process and the task when it starts.

What differs from a fresh interpreter: modules are imported before the task's environment is
in place, so the forkserver starts with the first task's environment (one forkserver for each
``started`` block, a run) and a task that asks for other values of the variables libraries read at import (``IMPORT_TIME_SETTINGS``) starts cold;
atexit handlers do not run (logging is flushed). The forkserver is a fresh interpreter (not a
fork of this one), so whatever this process has run (an OpenMP pool, threads) never reaches the
tasks. Commands of another shape (a ``pip install``, another interpreter) and tasks that cannot
be started warm go to kfp.local's own subprocess.

kfp is pinned (pyproject.toml): ``started`` replaces ``run_local_subprocess`` of kfp's
``subprocess_task_handler`` for the duration of the block, and ``task_of`` recognises the
command that kfp 2.17's ``component_factory`` writes for a lightweight component. Both are
kfp's internals: where they no longer have the shape written for (``private_function_changed``,
``cold_reason``), or the forkserver fails, tasks start cold, as kfp.local starts them, and the
run logs why as a warning, once for each reason (``_ColdStarts``): a run whose tasks all start
cold takes minutes longer.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import forkserver, reduction
from pathlib import Path

import kfp
from kfp.local import subprocess_task_handler

log = logging.getLogger(__name__)

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


def cold_reason(command: list[str]) -> tuple[str, str]:
    """Why ``command``, which ``task_of`` does not start warm, starts cold: a short key (one
    warning a run for each) and the reason in words."""
    if any("pip install" in part for part in command):
        return "packages", "the component installs packages first (packages_to_install)"
    script = _SCRIPT.fullmatch(command[2]) if len(command) >= 4 and command[:2] == ["sh", "-ec"] else None
    if script is not None:
        return "interpreter", f"the task's interpreter is {script['python']}, not this process's {sys.executable} (SubprocessRunner(use_venv=True)?)"
    return "script", (
        "kfp.local's command for a lightweight component is not the script that kfp 2.17's "
        f"component_factory generates (warm_tasks._SCRIPT): it begins {' '.join(command[:3])[:160]!r}"
    )


def private_function_changed() -> str | None:
    """Why kfp.local's private ``subprocess_task_handler.run_local_subprocess`` cannot be
    replaced as written for kfp 2.17 (a function ``(full_command, env_vars) -> exit code`` that
    ``SubprocessTaskHandler.run`` looks up in its module as it runs), or None when it can."""
    original = getattr(subprocess_task_handler, "run_local_subprocess", None)
    if not callable(original):
        return "kfp.local.subprocess_task_handler has no function run_local_subprocess"
    try:
        parameters = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        parameters = None
    if parameters != ["full_command", "env_vars"]:
        return f"kfp.local's run_local_subprocess takes {parameters}, not ['full_command', 'env_vars']"
    run = getattr(getattr(subprocess_task_handler, "SubprocessTaskHandler", None), "run", None)
    if "run_local_subprocess" not in getattr(getattr(run, "__code__", None), "co_names", ()):
        return "kfp.local's SubprocessTaskHandler.run no longer calls run_local_subprocess by its module's name"
    return None


class _ColdStarts:
    """A run's reasons for starting tasks cold (kfp.local's own subprocess, a fresh interpreter):
    each is logged once, as a warning, however many tasks it sends cold."""

    def __init__(self):
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def fall_back(self, key: str, reason: str) -> None:
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        log.warning(
            "tasks start cold, in fresh interpreters (seconds more each): %s (kfp %s; logged once a run)", reason, kfp.__version__
        )


IMPORT_TIME_SETTINGS = re.compile(r"(HF_|HUGGINGFACE_|TRANSFORMERS_|TORCH|PYTORCH_|OMP_|MKL_|KMP_|MLFLOW_|TMPDIR$|DO_NOT_TRACK$)")
"""Environment variables that libraries may read once, as they are imported (huggingface_hub's
offline mode and cache paths, OpenMP's threads, the temporary folder): the forkserver starts
with those of the first task, and a task that asks for other values starts cold."""


@contextlib.contextmanager
def started() -> Iterator[None]:
    """Within the block, kfp.local's lightweight tasks run in processes forked from a forkserver,
    started with the block's first task and stopped when the block ends. Tasks that cannot
    start so start cold, and the run logs why (once for each reason)."""
    cold = _ColdStarts()
    changed = private_function_changed()
    if changed:
        cold.fall_back("private function", changed)
        yield
        return
    original = subprocess_task_handler.run_local_subprocess

    def run_task(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        task = task_of(full_command)
        if task is None:
            cold.fall_back(*cold_reason(full_command))
        environment = {**os.environ, **(env_vars or {})}
        context = _forkserver(environment, cold) if task else None
        code = run_forked(context, task, environment, cold) if context else None
        return original(full_command, env_vars) if code is None else code

    subprocess_task_handler.run_local_subprocess = run_task
    try:
        yield
    finally:
        subprocess_task_handler.run_local_subprocess = original
        _stop_forkserver()


_server_lock = threading.Lock()
_server_settings: dict[str, str] | None = None  # the import-time settings the forkserver started with


def _import_time_settings(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if IMPORT_TIME_SETTINGS.match(name)}


def _forkserver(environment: dict[str, str], cold: _ColdStarts) -> multiprocessing.context.BaseContext | None:
    """The forkserver (started with ``environment`` if it is not running yet), or None (and
    ``cold`` told why) when it does not start or runs with other import-time settings than
    ``environment`` has."""
    global _server_settings
    context = multiprocessing.get_context("forkserver")
    with _server_lock:
        if _server_settings is None:
            context.set_forkserver_preload(list(PRELOADED))
            try:
                with _environment(environment):
                    forkserver.ensure_running()
            except Exception as error:
                cold.fall_back("forkserver", f"could not start the forkserver ({type(error).__name__}: {error})")
                return None
            _server_settings = _import_time_settings(environment)
    if _import_time_settings(environment) != _server_settings:
        cold.fall_back("settings", "a task asks for other import-time settings (IMPORT_TIME_SETTINGS) than the forkserver started with")
        return None
    return context


def _stop_forkserver() -> None:
    """Stop the forkserver that ``started`` began, so that the next block starts its own with its
    own first task's environment. (``_stop`` is CPython's own way to stop it, which its tests use.)"""
    global _server_settings
    with _server_lock:
        if _server_settings is not None:
            forkserver._forkserver._stop()
            _server_settings = None


@contextlib.contextmanager
def _environment(environment: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is ``environment`` within the block (a process started in it inherits it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_forked(
    context: multiprocessing.context.BaseContext, task: Task, environment: dict[str, str], cold: _ColdStarts | None = None
) -> int | None:
    """Run ``task`` in a process forked by ``context``'s forkserver, print its output line by line
    as kfp.local does (its ``print``, which indents a task's lines), and return its exit code;
    None when the process could not be started (the task has then not run; ``cold`` is told why)."""
    read_end, write_end = os.pipe()
    try:
        process = context.Process(target=_execute, args=(_Descriptor(write_end), task, environment), name="kfp-task")
        process.start()
    except Exception as error:  # the forkserver failed to start or died
        os.close(read_end)
        (cold or _ColdStarts()).fall_back("fork", f"could not start a task warm ({type(error).__name__}: {error})")
        return None
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
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, as in a fresh interpreter
    try:
        with tempfile.TemporaryDirectory() as program_path:
            module = Path(program_path) / "ephemeral_component.py"
            module.write_text(task.source, encoding="utf-8")
            sys.argv = [executor_main.__file__, "--component_module_path", str(module), *task.arguments]
            executor_main.executor_main()
    finally:
        logging.shutdown()  # multiprocessing ends the process without running atexit: flush the handlers here
