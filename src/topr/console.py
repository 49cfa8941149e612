"""What a run shows a person: a line when each stage starts and ends, with its key figures, and a
progress bar for the long ones, also when the stages run in other processes.

The pipeline's tasks run in subprocesses whose output kfp.local streams back line by line,
together with its own executor log. With ``TOPR_EVENTS=1`` in their environment (``topr run``
sets it) the library reports to the parent in event lines on stdout, ``topr-event {json}``:
a stage's start and end (``stage_started``/``stage_ended``) and its progress bars' state
(``progress_bar`` returns a bar that sends events instead of drawing). In the parent,
``RunConsole`` takes the whole stream: every line goes to the run's log file, events become
console lines and one progress bar, and the rest reaches the console only when asked
(``--verbose``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from weakref import WeakSet

from tqdm.std import tqdm

EVENTS_ENV = "TOPR_EVENTS"
EVENT_PREFIX = "topr-event "

FIGURES = (
    (("train_prompts", "eval_prompts"), "{train_prompts:.0f} training and {eval_prompts:.0f} held-out prompts"),
    (("samples", "prompts"), "{samples:.0f} completions of {prompts:.0f} prompts"),
    (("tokens_per_second",), "{tokens_per_second:.0f} tokens/s"),
    (("accuracy",), "sampled accuracy {accuracy:.1%}"),
    (("curated_count", "curated_positives", "curated_negatives"), "curated {curated_count:.0f} (+{curated_positives:.0f}/−{curated_negatives:.0f})"),
    (("steps", "final_loss"), "{steps:.0f} steps, final loss {final_loss:.3f}"),
    (("pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high"), "pass@1 {pass_at_1:.1%} [{pass_at_1_ci_low:.1%}, {pass_at_1_ci_high:.1%}]"),
    (("decision", "reason"), "{decision}: {reason}"),
)
"""The figures a stage's line shows, by the names it logs them under (``StageRun.logged``)."""

FIGURE_NAMES = frozenset(name for names, _ in FIGURES for name in names)


def events_on() -> bool:
    return os.environ.get(EVENTS_ENV) == "1"


def emit(kind: str, **fields: Any) -> None:
    """Send an event to the parent process, when there is one listening (``TOPR_EVENTS=1``)."""
    if events_on():
        sys.stdout.write(EVENT_PREFIX + json.dumps({"kind": kind, **fields}, default=str) + "\n")
        sys.stdout.flush()


def stage_started(stage: str, iteration: int) -> None:
    emit("stage_started", stage=stage, iteration=iteration)


def stage_ended(stage: str, iteration: int, seconds: float, logged: dict[str, Any], failed: bool = False) -> None:
    """``logged``: what the stage logged (metrics and params); the event carries its ``FIGURES``."""
    figures = {name: value for name, value in logged.items() if name in FIGURE_NAMES}
    emit("stage_ended", stage=stage, iteration=iteration, seconds=seconds, figures=figures, failed=failed)


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar (``tqdm(**options)``); in a pipeline task, one that reports to the parent."""
    return (EventBar if events_on() else tqdm)(**options)


class EventBar(tqdm):
    """A tqdm bar that draws nothing: each refresh (at most every ``mininterval`` seconds, and
    when it closes) becomes a ``progress`` event, which the parent's ``RunConsole`` draws. It
    keeps apart from other bars (its own registry, no monitor thread), so that in one process
    it neither shifts the console's bar nor takes tqdm's lock while the console holds its own."""

    _instances: WeakSet = WeakSet()
    monitor_interval = 0

    def __init__(self, *args: Any, **options: Any) -> None:
        options.setdefault("mininterval", 1.0)
        options["file"] = io.StringIO()
        super().__init__(*args, **options)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        source = f"{os.getpid()}-{id(self)}"  # parallel sample shards each send their own
        emit("progress", source=source, desc=self.desc, n=self.n, total=self.total, unit=self.unit, postfix=self.postfix or "")
        return True


class _ConsoleBar(tqdm):
    """The bar ``RunConsole`` draws: apart from the stages' bars, without a monitor thread."""

    _instances: WeakSet = WeakSet()
    monitor_interval = 0


def describe(figures: dict[str, Any]) -> str:
    """The key figures of a stage, as ``FIGURES`` shows them."""
    shown = []
    for names, text in FIGURES:
        if all(name in figures for name in names):
            try:
                shown.append(text.format(**{name: figures[name] for name in names}))
            except (TypeError, ValueError):  # a figure of another kind under a known name
                continue
    return ", ".join(shown)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class RunConsole(io.TextIOBase):
    """A text stream standing in for stdout and stderr during a run (``capture``): each line goes
    to ``log``; event lines are shown as stage lines on ``console`` and one progress bar on
    ``bars``; other lines on ``console`` too when ``verbose``. Lines may come from several
    threads (kfp.local runs sample shards in parallel)."""

    def __init__(self, log: TextIO, console: TextIO, bars: TextIO, verbose: bool = False):
        self.log, self.console, self.bars, self.verbose = log, console, bars, verbose
        self.lines_shown = 0
        self._partial = ""
        self._lock = threading.RLock()
        self._bar: tqdm | None = None
        self._sources: dict[str, tuple[float, float]] = {}  # the live bars' (n, total), by source

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.closed:  # a handler kept past the run (a library's, made during it): straight to the console
            return self.bars.write(text)
        with self._lock:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        if self.closed:  # past the run, as in ``write``: transformers binds its handler's flush to the stderr of its first import
            self.bars.flush()
            return
        with self._lock:
            self.log.flush()
            self.console.flush()

    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        event = _event(line)
        if event is not None:
            self._event(event)
        elif self.verbose:
            self._show(line)

    def _show(self, text: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        self.console.write(text + "\n")
        self.console.flush()
        self.lines_shown += 1
        if self._bar is not None:
            self._bar.refresh()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "progress":
            self._progress(event)
        elif kind in ("stage_started", "stage_ended"):
            self._close_bar()
            where = f"iter {event['iteration']}  {event['stage']:<17}"
            if kind == "stage_started":
                self._show(f"{where} started")
            else:
                state = "FAILED after" if event["failed"] else "done in"
                figures = describe(event["figures"])
                self._show(f"{where} {state} {duration(event['seconds'])}" + (f": {figures}" if figures else ""))

    def _progress(self, event: dict[str, Any]) -> None:
        """One bar for the stage running now: the sum over its sources (parallel sample shards)."""
        if self._bar is not None and self._bar.desc != event["desc"]:
            self._close_bar()
        self._sources[event["source"]] = (event["n"], event["total"] or 0)
        n, total = (sum(values) for values in zip(*self._sources.values()))
        if self._bar is None:
            self._bar = _ConsoleBar(total=total, desc=event["desc"], unit=event["unit"], file=self.bars, leave=False, dynamic_ncols=True, position=0)
        self._bar.total = total
        self._bar.n = n
        if event["postfix"]:
            self._bar.set_postfix_str(event["postfix"], refresh=False)
        self._bar.refresh()

    def _close_bar(self) -> None:
        self._sources.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._line(self._partial)
                self._partial = ""
            self._close_bar()
        super().close()


def _stream_handlers(streams: tuple[TextIO, ...]) -> dict[logging.StreamHandler, TextIO]:
    """The logging handlers (of any logger) that write to one of ``streams``, with the stream of
    each: in-process stages log through them, so their lines go to the log file as well."""
    loggers = [logging.getLogger(), *(logger for logger in list(logging.Logger.manager.loggerDict.values()) if isinstance(logger, logging.Logger))]
    return {
        handler: handler.stream
        for logger in loggers
        for handler in list(logger.handlers)
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and handler.stream in streams
    }


def _event(line: str) -> dict[str, Any] | None:
    """The event a line carries (kfp.local indents a task's lines), or None."""
    text = line.strip()
    if not text.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(text.removeprefix(EVENT_PREFIX))
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and event.get("kind") in EVENT_FIELDS and EVENT_FIELDS[event["kind"]] <= event.keys() else None


EVENT_FIELDS = {
    "progress": {"source", "desc", "n", "total", "unit", "postfix"},
    "stage_started": {"stage", "iteration"},
    "stage_ended": {"stage", "iteration", "seconds", "figures", "failed"},
}
"""What each kind of event carries; a line that claims to be an event without them is a plain line."""


@contextmanager
def capture(log_path: str | Path, verbose: bool = False) -> Iterator[RunConsole]:
    """Within the block, all output of this process and of the stage processes it starts goes to
    ``log_path``, and the console shows what ``RunConsole`` shows."""
    stdout, stderr, events = sys.stdout, sys.stderr, os.environ.get(EVENTS_ENV)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        console = RunConsole(log, stdout, stderr, verbose)
        handlers = _stream_handlers((stdout, stderr))
        started = time.perf_counter()
        try:
            sys.stdout = sys.stderr = console
            for handler in handlers:
                handler.setStream(console)
            os.environ[EVENTS_ENV] = "1"
            yield console
        finally:
            try:
                console.close()
            finally:
                sys.stdout, sys.stderr = stdout, stderr
                # Handlers made during the run (a library's first import) write to stderr again.
                handlers.update({handler: stderr for handler in _stream_handlers((console,)) if handler not in handlers})
                for handler, stream in handlers.items():
                    handler.setStream(stream)
                if events is None:
                    os.environ.pop(EVENTS_ENV, None)
                else:
                    os.environ[EVENTS_ENV] = events
                log.write(f"[topr] output captured for {time.perf_counter() - started:.0f} s\n")
