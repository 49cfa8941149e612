"""Tasks: where prompts and reference answers come from, and how completions are checked.

A task turns ``(split, size, seed)`` into prompt records (``prompt_id``, ``prompt``,
``reference``), parses the final answer out of a completion (``extract``) and judges it against
the reference (``is_correct``). The prompt is the bare user message (the chat template is applied
when sampling) and always tells the model the answer format its checker expects.

Built in (``get_task`` picks one from ``TaskConfig.name``):

- ``arithmetic``: generated integer problems at the levels of ``topr.tasks.arithmetic.LEVELS``.
- ``gsm8k``: GSM8K-format JSONL files (``question``, ``answer`` ending in ``#### N``).
- ``math``: MATH-format JSONL files (``problem``, ``solution`` with ``\\boxed{...}``), answers
  compared for mathematical equivalence with math-verify.
- ``jsonl``: any JSONL file with a prompt field and an answer field, matched as numbers or strings.
- ``verifier``: Yes/No judgments of proposed solutions, from the files ``topr.verifier`` writes.

This module also holds the number parsing shared by the tasks that expect ``Answer: <number>``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from topr.config import TaskConfig

SPLITS = ("train", "test")
TASK_NAMES = ("arithmetic", "gsm8k", "math", "jsonl", "verifier")
ANSWER_INSTRUCTION = "End your reply with 'Answer: <number>'."

# "Answer:", case-insensitive, also written "**Answer**:" or "Answer :".
ANSWER_MARKER = re.compile(r"answer[\s*_]*:", re.IGNORECASE)
# A sign only when it cannot be a binary minus ("5-3" holds 5 and 3), then "$", then the digits
# with optional thousands commas and decimals; a trailing sentence period is not taken.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


class Task(ABC):
    """Prompts, reference answers and a checker."""

    name: str

    @abstractmethod
    def problems(self, split: str, size: int, seed: int) -> list[dict[str, str]]:
        """At most ``size`` records with ``prompt_id``, ``prompt`` and ``reference`` (strings).

        ``split`` is "train" or "test"; the same arguments always give the same records.
        """

    @abstractmethod
    def extract(self, completion: str) -> str | None:
        """The final answer parsed from a completion, None when it gives none."""

    @abstractmethod
    def is_correct(self, extracted: str, reference: str) -> bool:
        """Whether an extracted answer matches the reference."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choices: {', '.join(SPLITS)})")


def get_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``, set up from the other ``TaskConfig`` fields."""
    # Imported here so that loading one task does not import the others' dependencies (sympy).
    if config.name == "arithmetic":
        from topr.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(config.level)
    if config.name == "gsm8k":
        from topr.tasks.gsm8k import Gsm8kTask

        return Gsm8kTask(config.train_path, config.eval_path)
    if config.name == "math":
        from topr.tasks.math_task import MathTask

        return MathTask(config.train_path, config.eval_path)
    if config.name == "jsonl":
        from topr.tasks.jsonl import JsonlTask

        return JsonlTask(
            config.train_path,
            config.eval_path,
            config.prompt_field,
            config.answer_field,
            config.match,
        )
    if config.name == "verifier":
        from topr.tasks.verifier import VerifierTask

        return VerifierTask(config.train_path, config.eval_path)
    raise ValueError(f"unknown task {config.name!r} (choices: {', '.join(TASK_NAMES)})")


PLAIN_EXPONENT_LIMIT = 1000
"""Numbers beyond 10^±1000 are written as <digits>e<exponent> rather than in full."""


def normalize_number(text: str) -> str | None:
    """A number in canonical form, or None if ``text`` is not one.

    Commas, "$" and spaces are dropped and trailing decimal zeros removed, so "1,000.00", "$1000"
    and "1000" all become "1000", "3.50" becomes "3.5" and "-0" becomes "0". Every digit counts
    (no rounding), and a number beyond 10^±1000 is written as ``<digits>e<exponent>``.
    """
    cleaned = re.sub(r"[,$\s]", "", text).replace("\u2212", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    # Trailing zeros go by hand: Decimal.normalize() rounds to 28 digits and overflows past 1e999999.
    sign, digits, exponent = value.as_tuple()
    written = "".join(map(str, digits))
    significant = written.rstrip("0")
    exponent += len(written) - len(significant)
    significant = significant.lstrip("0")
    exact = Decimal((sign, tuple(map(int, significant)), exponent))
    if abs(exact.adjusted()) > PLAIN_EXPONENT_LIMIT:  # written out, 1e999999999 would take a gigabyte
        return f"{'-' if sign else ''}{significant}e{exponent}"
    return format(exact, "f")


def numbers_equal(first: str, second: str) -> bool:
    normalized = normalize_number(first)
    return normalized is not None and normalized == normalize_number(second)


def first_number(text: str) -> str | None:
    """The first number in ``text``, normalised; None if it has none."""
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised; None if it has none."""
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def number_after(marker: re.Pattern[str], text: str) -> str | None:
    """The first number after the last ``marker`` in ``text``; None without marker or number."""
    matches = list(marker.finditer(text))
    return first_number(text[matches[-1].end() :]) if matches else None
