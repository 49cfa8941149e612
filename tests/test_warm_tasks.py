"""kfp.local tasks started warm (topr_pipelines.warm_tasks), run for real through kfp.local."""

# No `from __future__ import annotations`: kfp reads the components' annotations as types.
import json
import logging
import os
import sys

import pytest
from kfp import dsl, local

from topr_pipelines import warm_tasks


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def describe_process(label: str) -> str:
    import json
    import os
    import sys

    print(f"task {label} says hello")
    return json.dumps(
        {
            "pid": os.getpid(),
            "torch_imported": "torch" in sys.modules,
            "variable": os.environ.get("TOPR_WARM_TASK_TEST"),
            "kfp_runtime": os.environ.get("_KFP_RUNTIME"),
            "cwd": os.getcwd(),
        }
    )


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fail_loudly() -> str:
    raise ValueError("the task's own failure")


@dsl.component(base_image="python:3.11", install_kfp_package=False, packages_to_install=["nothing-to-install"])
def with_packages() -> str:
    return "never run"


@pytest.fixture
def local_runner(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)


def _command(component) -> list[str]:
    """The command kfp.local's subprocess runner would start for ``component``."""
    container = component.component_spec.implementation.container
    return [part.replace("python3", sys.executable) for part in container.command] + list(container.args)


def test_a_warm_task_runs_in_a_process_of_its_own_with_the_libraries_imported(local_runner, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with warm_tasks.started():
        first = json.loads(describe_process(label="one").output)
        monkeypatch.setenv("TOPR_WARM_TASK_TEST", "set after the first task")
        second = json.loads(describe_process(label="two").output)

    assert first["torch_imported"] and second["torch_imported"]
    assert len({first["pid"], second["pid"], os.getpid()}) == 3
    assert first["variable"] is None and second["variable"] == "set after the first task"
    assert first["kfp_runtime"] == second["kfp_runtime"] == "true"
    assert second["cwd"] == str(tmp_path)
    output = capsys.readouterr().out
    assert "task one says hello" in output and "task two says hello" in output


def test_a_task_that_asks_for_other_import_time_settings_starts_cold(local_runner, monkeypatch):
    with warm_tasks.started():
        warm = json.loads(describe_process(label="warm").output)
        monkeypatch.setenv("HF_TOPR_WARM_TASK_TEST", "a value the forkserver did not start with")
        cold = json.loads(describe_process(label="cold").output)
    assert warm["torch_imported"] and not cold["torch_imported"]


def test_each_run_starts_its_own_forkserver_with_its_first_tasks_environment(local_runner, monkeypatch):
    for value in ("first run", "second run"):
        monkeypatch.setenv("HF_TOPR_WARM_TASK_TEST", value)
        with warm_tasks.started():
            assert json.loads(describe_process(label=value).output)["torch_imported"]


def test_a_task_that_cannot_be_forked_runs_cold_and_leaves_no_descriptor_open(local_runner, monkeypatch, cold_start_warnings):
    from multiprocessing.context import ForkServerProcess

    def broken_start(process):
        raise OSError("the forkserver is gone")

    with warm_tasks.started():
        describe_process(label="warm")  # the forkserver runs
        monkeypatch.setattr(ForkServerProcess, "start", broken_start)
        descriptors = len(os.listdir("/proc/self/fd"))
        described = [json.loads(describe_process(label=label).output) for label in ("cold", "cold again")]
        assert len(os.listdir("/proc/self/fd")) == descriptors
    assert not any(task["torch_imported"] for task in described)
    (warning,) = cold_start_warnings()
    assert "the forkserver is gone" in warning


def test_without_a_forkserver_tasks_run_cold(local_runner, monkeypatch, cold_start_warnings):
    from multiprocessing import forkserver

    def broken_server():
        raise OSError("no forkserver here")

    monkeypatch.setattr(warm_tasks, "_server_settings", None)
    monkeypatch.setattr(forkserver, "ensure_running", broken_server)
    with warm_tasks.started():
        described = [json.loads(describe_process(label=label).output) for label in ("cold", "cold again")]
    assert not any(task["torch_imported"] for task in described)
    (warning,) = cold_start_warnings()
    assert "no forkserver here" in warning


@pytest.fixture
def cold_start_warnings(caplog, monkeypatch):
    """The warnings ``warm_tasks`` logs, as a function. kfp.local swaps the root logger's handlers
    (caplog's among them) while a task runs, so caplog's handler listens on warm_tasks' own logger."""
    monkeypatch.setattr(warm_tasks.log, "propagate", False)
    warm_tasks.log.addHandler(caplog.handler)
    yield lambda: [record.getMessage() for record in caplog.records if record.name == warm_tasks.log.name and record.levelno == logging.WARNING]
    warm_tasks.log.removeHandler(caplog.handler)


def _with_another_script(monkeypatch) -> None:
    """kfp.local hands the task handler a lightweight component's script of another shape than
    kfp 2.17's (one line more), which still runs the task."""
    from kfp.local import subprocess_task_handler

    replace = subprocess_task_handler.replace_python_executable

    def replaced(full_command, new_executable):
        command = replace(full_command, new_executable)
        return command[:2] + ["export TOPR_ANOTHER_SHAPE=1\n" + command[2]] + command[3:] if command[:2] == ["sh", "-ec"] else command

    monkeypatch.setattr(subprocess_task_handler, "replace_python_executable", replaced)


def test_a_script_of_another_shape_starts_every_task_cold_with_one_warning_a_run(local_runner, monkeypatch, cold_start_warnings):
    import kfp

    _with_another_script(monkeypatch)
    with warm_tasks.started():
        first_run = [json.loads(describe_process(label=label).output) for label in ("one", "two")]
    assert len(cold_start_warnings()) == 1
    with warm_tasks.started():
        second_run = json.loads(describe_process(label="three").output)
    assert not any(task["torch_imported"] for task in [*first_run, second_run])
    warnings = cold_start_warnings()
    assert len(warnings) == 2  # once a run, not once a task
    assert "script" in warnings[0] and f"kfp {kfp.__version__}" in warnings[0]


def test_a_private_function_of_another_shape_is_left_alone_and_every_task_starts_cold_with_one_warning(local_runner, monkeypatch, cold_start_warnings):
    import kfp
    from kfp.local import subprocess_task_handler

    original = subprocess_task_handler.run_local_subprocess

    def another_shape(full_command, env_vars=None, timeout=None):
        return original(full_command, env_vars)

    monkeypatch.setattr(subprocess_task_handler, "run_local_subprocess", another_shape)
    with warm_tasks.started():
        assert subprocess_task_handler.run_local_subprocess is another_shape
        described = [json.loads(describe_process(label=label).output) for label in ("one", "two")]
    assert not any(task["torch_imported"] for task in described)
    (warning,) = cold_start_warnings()
    assert "run_local_subprocess" in warning and f"kfp {kfp.__version__}" in warning


def test_a_missing_private_function_starts_every_task_cold_with_one_warning(monkeypatch, cold_start_warnings):
    from kfp.local import subprocess_task_handler

    monkeypatch.delattr(subprocess_task_handler, "run_local_subprocess")
    with warm_tasks.started():
        assert not hasattr(subprocess_task_handler, "run_local_subprocess")
    (warning,) = cold_start_warnings()
    assert "run_local_subprocess" in warning


def test_a_cold_task_starts_a_fresh_interpreter(local_runner):
    described = json.loads(describe_process(label="cold").output)
    assert not described["torch_imported"]
    assert described["pid"] != os.getpid()


def test_a_failing_warm_task_fails_the_run_with_its_traceback_in_the_output(local_runner, capsys):
    with warm_tasks.started(), pytest.raises(RuntimeError, match="fail-loudly"):
        fail_loudly()
    assert "ValueError: the task's own failure" in capsys.readouterr().out


def test_only_a_plain_lightweight_component_command_is_started_warm():
    task = warm_tasks.task_of(_command(describe_process))
    assert task is not None
    assert "def describe_process(label: str) -> str:" in task.source
    assert task.arguments[0] == "--executor_input" and task.arguments[-2:] == ["--function_to_execute", "describe_process"]

    assert warm_tasks.task_of(_command(with_packages)) is None  # a pip install first: kfp.local's own subprocess
    other_interpreter = [part.replace(sys.executable, "/usr/bin/python3") for part in _command(describe_process)]
    assert warm_tasks.task_of(other_interpreter) is None
    assert warm_tasks.task_of(["sh", "-c", "echo hello"]) is None
