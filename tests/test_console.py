"""The console of a run: events from the stages become stage lines and a bar; every line reaches the log."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from topr import console


def event_line(kind: str, **fields) -> str:
    return console.EVENT_PREFIX + json.dumps({"kind": kind, **fields}) + "\n"


def make_console(verbose=False):
    log, shown, bars = io.StringIO(), io.StringIO(), io.StringIO()
    return console.RunConsole(log, shown, bars, verbose), log, shown, bars


def test_stage_events_become_one_line_each_with_the_stage_figures():
    stream, log, shown, _ = make_console()
    stream.write("Executing task 'train'\n")
    stream.write("    " + event_line("stage_started", stage="train", iteration=2))  # kfp.local indents a task's lines
    stream.write(event_line("stage_ended", stage="train", iteration=2, seconds=75.4, figures={"steps": 3, "final_loss": 0.3125}, failed=False))
    stream.write(event_line("stage_ended", stage="evaluate", iteration=2, seconds=5, figures={"pass_at_1": 0.5, "pass_at_1_ci_low": 0.25, "pass_at_1_ci_high": 0.75}, failed=True))
    assert shown.getvalue().splitlines() == [
        "iter 2  train             started",
        "iter 2  train             done in 1 min 15 s: 3 steps, final loss 0.312",
        "iter 2  evaluate          FAILED after 5 s: pass@1 50.0% [25.0%, 75.0%]",
    ]
    assert stream.lines_shown == 3
    assert log.getvalue().count("\n") == 4 and "Executing task 'train'" in log.getvalue()


def test_other_lines_reach_the_console_only_when_verbose():
    for verbose in (False, True):
        stream, log, shown, _ = make_console(verbose)
        stream.write("Executing task 'verify'\nhalf a line")
        stream.write(" and the rest\n")
        assert log.getvalue() == "Executing task 'verify'\nhalf a line and the rest\n"
        assert shown.getvalue() == (log.getvalue() if verbose else "")


def test_progress_events_draw_one_bar_that_a_stage_line_closes():
    stream, _, shown, bars = make_console()
    for n in (0, 32, 96):
        stream.write(event_line("progress", source="1-1", desc="sampling", n=n, total=96, unit="seq", postfix="tokens_per_s=80"))
    assert "96/96" in bars.getvalue() and "tokens_per_s=80" in bars.getvalue()
    stream.write(event_line("stage_ended", stage="sample", iteration=1, seconds=3, figures={}, failed=False))
    assert shown.getvalue() == "iter 1  sample            done in 3 s\n"


def test_a_bar_in_a_stage_process_sends_its_state_as_events(monkeypatch, capsys):
    monkeypatch.setenv(console.EVENTS_ENV, "1")
    bar = console.progress_bar(total=4, desc="training", unit="step", mininterval=0)
    bar.update(4)
    bar.set_postfix(loss="0.5")
    bar.close()
    events = [json.loads(line.removeprefix(console.EVENT_PREFIX)) for line in capsys.readouterr().out.splitlines()]
    assert events[0] == {"kind": "progress", "source": f"{os.getpid()}-{id(bar)}", "desc": "training", "n": 0, "total": 4, "unit": "step", "postfix": ""}
    assert events[-1]["n"] == 4 and events[-1]["postfix"] == "loss=0.5"


def test_without_a_listener_a_stage_sends_nothing(monkeypatch, capsys):
    monkeypatch.delenv(console.EVENTS_ENV, raising=False)
    console.stage_started("verify", 1)
    console.progress_bar(total=2, desc="sampling", disable=True).close()
    assert capsys.readouterr().out == ""


def test_only_the_figures_the_console_shows_travel():
    assert console.describe({"accuracy": 0.25, "learning_rate": 1e-5, "train.objective": "topr"}) == "sampled accuracy 25.0%"
    assert console.describe({"decision": "keep", "reason": "gain +0.0100 <= margin 0.0200"}) == "keep: gain +0.0100 <= margin 0.0200"
    assert console.describe({"samples": "many", "prompts": 3}) == ""  # not a number: left out, not an error


def test_capture_sends_everything_to_the_log_and_restores_the_process(tmp_path, capsys):
    log_path = tmp_path / "run.log"
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("topr.test_console")
    logger.addHandler(handler)
    try:
        with console.capture(log_path):
            print("a task's line")
            logger.warning("a library warning")
            console.stage_started("curate", 1)
            # A stage process started here reports through the same stream.
            code = "from topr import console; console.stage_ended('curate', 1, 2.0, {'curated_count': 4, 'curated_positives': 1, 'curated_negatives': 3})"
            child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            sys.stdout.write(child.stdout)
        assert handler.stream is sys.stderr and os.environ.get(console.EVENTS_ENV) is None
    finally:
        logger.removeHandler(handler)
    shown = capsys.readouterr()
    assert shown.out.splitlines() == ["iter 1  curate            started", "iter 1  curate            done in 2 s: curated 4 (+1/−3)"]
    assert shown.err == ""
    logged = log_path.read_text()
    assert "a task's line\n" in logged and "a library warning\n" in logged and logged.count(console.EVENT_PREFIX) == 2


@pytest.mark.parametrize(("seconds", "shown"), [(0.4, "0 s"), (59.4, "59 s"), (59.6, "1 min 00 s"), (754.0, "12 min 34 s")])
def test_durations_read_as_minutes_and_seconds(seconds, shown):
    assert console.duration(seconds) == shown


def test_parallel_shards_add_up_in_one_bar():
    stream, _, _, bars = make_console()
    for source, n in (("shard-0", 16), ("shard-1", 8), ("shard-0", 48), ("shard-1", 48)):
        stream.write(event_line("progress", source=source, desc="sampling", n=n, total=48, unit="seq", postfix=""))
    drawn = [state for state in bars.getvalue().split("\r") if "sampling" in state]
    assert [state.split("|")[-1].split()[0] for state in drawn[-4:]] == ["16/48", "24/96", "56/96", "96/96"]


def test_a_line_that_only_looks_like_an_event_is_a_plain_line():
    stream, log, shown, _ = make_console(verbose=True)
    for text in ("[1, 2]", '{"kind": "progress"}', '{"no kind": 1}', "{broken"):
        stream.write(console.EVENT_PREFIX + text + "\n")
    assert shown.getvalue() == log.getvalue() and log.getvalue().count("\n") == 4


def test_a_handler_a_library_makes_during_the_run_writes_to_stderr_afterwards(tmp_path, capsys):
    logger = logging.getLogger("topr.test_console.late")
    with console.capture(tmp_path / "nested" / "run.log"):
        handler = logging.StreamHandler()  # like transformers on its first import: bound to sys.stderr now
        logger.addHandler(handler)
    try:
        logger.warning("after the run")
        assert handler.stream is sys.stderr
        assert "after the run" in capsys.readouterr().err
    finally:
        logger.removeHandler(handler)


def test_the_process_is_restored_when_the_run_fails(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="a stage failed"):
        with console.capture(tmp_path / "run.log"):
            raise RuntimeError("a stage failed")
    assert (sys.stdout, sys.stderr) == (stdout, stderr) and console.EVENTS_ENV not in os.environ


def test_a_second_capture_works_after_a_library_bound_a_handler_to_the_first(tmp_path, capsys):
    logger = logging.getLogger("topr.test_console.bound")
    with console.capture(tmp_path / "first" / "run.log"):
        # Like transformers on its first import: a handler on sys.stderr, its flush that of sys.stderr then.
        handler = logging.StreamHandler()
        handler.flush = sys.stderr.flush
        logger.addHandler(handler)
    try:
        logger.warning("between the runs")
        with console.capture(tmp_path / "second" / "run.log"):
            logger.warning("in the second run")
        logger.warning("after both")
    finally:
        logger.removeHandler(handler)
    shown = capsys.readouterr().err
    assert "Logging error" not in shown and "between the runs" in shown and "after both" in shown
    assert "in the second run" in (tmp_path / "second" / "run.log").read_text()


class FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")


def test_the_process_is_restored_when_the_log_cannot_be_flushed(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("topr.test_console.full")
    logger.addHandler(handler)
    try:
        with pytest.raises(OSError, match="No space left"), console.capture(tmp_path / "run.log") as run:
            run.log = FullDisk()  # the disk fills up during the run: the error is told, the process restored all the same
        assert handler.stream is sys.stderr and (sys.stdout, sys.stderr) == (stdout, stderr)
        assert console.EVENTS_ENV not in os.environ
    finally:
        logger.removeHandler(handler)
