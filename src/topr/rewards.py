"""Rewards: the number in [-1, 1] the verify stage writes as a completion's ``reward``.

By default it is the task's checker's verdict, +1 correct and -1 wrong. The ``task`` section
mixes in two more terms, each in [-1, 1]:

- a format term (``format_weight``): +1 when the strict extraction
  (``Task.extract_as("strict", ...)``) finds an answer in the format the prompt asks for, else -1;
- a Python function of the user's (``reward_function``, ``"module:function"`` or
  ``"path/to/file.py:function"``, weighted by ``function_weight``), called as
  ``function(record, completion)`` with a copy of the sample record as the checker left it
  (``prompt_id``, ``prompt``, ``reference``, ``sample_index``, ..., ``extracted``, ``correct``)
  and the completion text.

    reward = clip(correctness_weight * (+-1) + format_weight * (+-1) + function_weight * f, -1, 1)

The clip keeps every reward on the scale ``train.baseline`` (c) is set for: a completion trains
as a positive when R - c >= 0. ``correct`` stays the checker's verdict, for accuracy. A function
value that is not a finite number in [-1, 1], or an exception it raises, stops verification
(``RewardError``) naming the function and the record, rather than train on a reward nobody meant.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from topr.records import Record

if TYPE_CHECKING:
    from topr.config import TaskConfig
    from topr.tasks import Task

RewardFunction = Callable[[Record, str], float]


class RewardError(ValueError):
    """A reward that cannot be trained on; the message names the function and the record."""


def load_reward_function(spec: str) -> RewardFunction:
    """The function ``spec`` names, ``"module:function"`` or ``"path/to/file.py:function"``;
    a ``ValueError`` saying why when it cannot be imported, is missing or is not callable."""
    location, _, name = spec.rpartition(":")
    if not location or not name.isidentifier():
        raise ValueError(f"{spec!r} is not of the form 'module:function' or 'path/to/file.py:function'")
    module = _module_from_file(str(Path(location).resolve())) if location.endswith(".py") else _imported_module(location)
    if not hasattr(module, name):
        raise ValueError(f"{location} has no function {name!r}")
    function = getattr(module, name)
    if not callable(function):
        raise ValueError(f"{spec} is not callable: it is a {type(function).__name__}")
    return function


def _imported_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - a user's module may raise anything as it loads
        raise ValueError(f"cannot import module {name!r}: {type(error).__name__}: {error}") from error


@functools.cache
def _module_from_file(path: str) -> ModuleType:
    """The module a Python file defines, run once per process."""
    if not Path(path).is_file():
        raise ValueError(f"no such file: {path}")
    name = f"topr_reward_{Path(path).stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # where dataclasses and pickle look a class's module up
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - a user's file may raise anything as it runs
        del sys.modules[name]
        raise ValueError(f"{path} failed to load: {type(error).__name__}: {error}") from error
    return module


@dataclass(frozen=True)
class Reward:
    """How a checked completion's terms make its reward (see the module's docstring)."""

    correctness_weight: float = 1.0
    format_weight: float = 0.0
    function_weight: float = 1.0
    function: RewardFunction | None = None
    function_name: str | None = None
    """The function as the config names it, for error messages."""

    @classmethod
    def from_config(cls, config: TaskConfig) -> Reward:
        function = load_reward_function(config.reward_function) if config.reward_function else None
        return cls(config.correctness_weight, config.format_weight, config.function_weight, function, config.reward_function)

    def __call__(self, record: Record, task: Task) -> float:
        """The reward of ``record``, which holds the checker's ``correct``."""
        terms = [self.correctness_weight * (1.0 if record["correct"] else -1.0)]
        if self.format_weight:
            formatted = task.extract_as("strict", record["completion"]) is not None
            terms.append(self.format_weight * (1.0 if formatted else -1.0))
        if self.function is not None:
            terms.append(self.function_weight * self._function_value(record))
        return min(1.0, max(-1.0, sum(terms)))

    def _function_value(self, record: Record) -> float:
        try:
            value = self.function(dict(record), record["completion"])
        except Exception as error:  # noqa: BLE001 - whatever the user's code raises stops verify, named
            raise RewardError(self._describe(record, f"raised {type(error).__name__}: {error}")) from error
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1.0 <= float(value) <= 1.0:
            raise RewardError(self._describe(record, f"returned {value!r}: a reward is a finite number in [-1, 1]"))
        return float(value)

    def _describe(self, record: Record, problem: str) -> str:
        return (
            f"task.reward_function {self.function_name} {problem} "
            f"(prompt_id {record['prompt_id']!r}, sample_index {record.get('sample_index')})"
        )


CHECKER = Reward()
"""The default: the checker's verdict, +1 correct and -1 wrong."""
