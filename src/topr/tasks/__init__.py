"""Tasks: where prompts and reference answers come from, and how completions are checked.

A task turns ``(split, size, seed)`` into prompt records (``prompt_id``, ``prompt``,
``reference``), parses the final answer out of a completion and judges it against the reference
(``is_correct``). It parses in one of two ways, as evaluation harnesses report a strict and a
flexible match side by side, and ``TaskConfig.extraction`` picks the one the verify stage rewards:
``extract`` (flexible, the default) takes the answer however models write it, ``extract_strict``
only in the format its ``instruction`` asks for. The prompt is the bare user message (the chat
template is applied when sampling; a record may also carry the chat it ends, ``messages``, as the
``dataset`` task's do) and always tells the model the answer format its checker expects: a task
sets that instruction once (``Task.instruction``) and builds each prompt with
``Task.prompt_for(question)``, the question then the instruction on a line of its own;
``Task.question_text`` gives a prompt back without it (what the generative verifier is shown,
``topr.verifier``).

Every concrete ``Task`` subclass with a ``name`` registers itself under it, and ``get_task``
picks one by ``TaskConfig.name``; the modules of this package are imported when a name is first
looked up, so a new task is one new module here (or one in another package, named by an entry
point of the group ``topr.tasks``). Built in:

- ``arithmetic``: generated integer problems at the levels of ``topr.tasks.arithmetic.LEVELS``.
- ``gsm8k``: GSM8K-format JSONL files (``question``, ``answer`` ending in ``#### N``).
- ``math``: MATH-format JSONL files (``problem``, ``solution`` with ``\\boxed{...}``), answers
  compared for mathematical equivalence with math-verify.
- ``jsonl``: any JSONL file with a prompt field and an answer field, matched as numbers or strings.
- ``dataset``: Hugging Face datasets kept as files (JSON/JSONL, CSV, Parquet, ``save_to_disk``
  folders), prompts as text or chat messages, answers matched as ``jsonl`` matches them.
- ``verifier``: Yes/No judgments of proposed solutions, from the files ``topr.verifier`` writes.

This module also holds the number parsing shared by the tasks that expect ``Answer: <number>``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import pkgutil
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

if TYPE_CHECKING:
    from topr.config import TaskConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
"""Training prompts; held-out problems for choosing settings (learning rates, c, lengths); held-out
problems for verdicts only. File tasks have no validation split of their own (their held-out file is
whatever ``task.eval_path`` names); ``arithmetic`` splits its generated problems three ways."""
ANSWER_INSTRUCTION = "End your reply with 'Answer: <number>'."

# "Answer:", case-insensitive, also written "**Answer**:" or "Answer :".
ANSWER_MARKER = re.compile(r"answer[\s*_]*:", re.IGNORECASE)
# A sign only when it cannot be a binary minus ("5-3" holds 5 and 3), then "$", then the digits
# with optional thousands commas and decimals; a trailing sentence period is not taken.
NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# "Answer: <number>" as the instruction asks: the number right after the marker, past whitespace
# and markdown ("**Answer:** 19", "Answer: **19**"); "Answer: about 19" is not it.
_ANSWER_LINE = re.compile(rf"{ANSWER_MARKER.pattern}[\s*_]*({NUMBER.pattern})", re.IGNORECASE)

Extraction = Literal["flexible", "strict"]
"""How a completion's answer is read: however it is written, or only as the instruction asks."""
EXTRACTIONS: tuple[Extraction, ...] = get_args(Extraction)


_REGISTRY: dict[str, type[Task]] = {}


MODEL_NAME_SLUG_LIMIT = 96
"""The longest held-out location kept whole in a default registered model's name."""


class Task(ABC):
    """Prompts, reference answers and a checker.

    A subclass that sets ``name`` is registered under it (``task.name`` selects it);
    ``from_config`` builds it from the ``task`` section.
    """

    name: ClassVar[str]
    needs_task_files: ClassVar[bool] = False
    """Whether its prompts come from task.train_path and task.eval_path (checked with the config)."""
    instruction: str = ""
    """The answer-format instruction its prompts end with, on a line of their own (``prompt_for``
    adds it, ``question_text`` takes it off); "" when its prompts carry none. A class attribute,
    or set in ``__init__`` when it depends on the task's options."""

    one_model_per_dataset: ClassVar[bool] = False
    """Whether each held-out file is a task of its own, registered and gated apart (a task reading
    anyone's files, as jsonl does), rather than one benchmark however its files are named."""

    @classmethod
    def registered_model(cls, config: TaskConfig) -> str:
        """What ``run.registered_model`` defaults to: ``topr-<name>``, one model (and champion) per
        task; for a task of one model per dataset, its held-out file's location too (a local path
        made absolute), so runs on other files do not gate against each other's champion:
        ``topr-jsonl-srv-data-capitals-test`` for ``/srv/data/capitals/test.jsonl``, and a
        scheduled run reading the same URI each time keeps its model."""
        if not (cls.one_model_per_dataset and config.eval_path):
            return f"topr-{cls.name}"
        scheme = re.match(r"^[a-z0-9]+://", config.eval_path, re.IGNORECASE)
        location = config.eval_path[scheme.end():] if scheme else str(Path(config.eval_path).absolute())
        location = re.sub(r"\.(jsonl|json|csv|parquet)$", "", location, flags=re.IGNORECASE)
        slug = re.sub(r"[^A-Za-z0-9._]+", "-", location).strip("-.") or "data"
        if len(slug) > MODEL_NAME_SLUG_LIMIT:  # the folder's tail, and a digest of all of it
            slug = f"{hashlib.sha256(location.encode()).hexdigest()[:8]}-{slug[-MODEL_NAME_SLUG_LIMIT:].lstrip('-.')}"
        return f"topr-{cls.name}-{slug}"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            known = _REGISTRY.get(cls.name, cls)
            if known.__module__ != cls.__module__:
                raise ValueError(f"task {cls.name!r} is defined twice: in {known.__module__} and in {cls.__module__}")
            _REGISTRY[cls.name] = cls

    @classmethod
    def from_config(cls, config: TaskConfig) -> Task:
        """The task as the ``task`` section sets it up (by default it takes no option)."""
        return cls()

    def prompt_for(self, question: str) -> str:
        """The prompt asking ``question``: the question, then ``instruction`` on a line of its own."""
        return f"{question}\n{self.instruction}" if self.instruction else str(question)

    def question_text(self, prompt: str) -> str:
        """One of its prompts without the answer-format instruction (and whitespace after it); a
        prompt that does not end with the instruction is returned as it is.

        The generative verifier is shown this: the instruction tells the policy how to end a
        solution and would only ask the verifier for something other than Yes or No. A task whose
        prompts do not end with ``instruction`` as ``prompt_for`` writes it overrides this.
        """
        if self.instruction:
            text = prompt.rstrip()
            suffix = f"\n{self.instruction}"
            if text.endswith(suffix):
                return text[: -len(suffix)]
        return prompt

    @abstractmethod
    def problems(self, split: str, size: int, seed: int) -> list[dict[str, str]]:
        """At most ``size`` records with ``prompt_id``, ``prompt`` and ``reference`` (strings).

        ``split`` is one of ``SPLITS``; the same arguments always give the same records.
        """

    @abstractmethod
    def extract(self, completion: str) -> str | None:
        """The final answer parsed from a completion however it is written (the flexible
        extraction), None when it gives none."""

    def extract_strict(self, completion: str) -> str | None:
        """The final answer only where the completion gives it as ``instruction`` asks, else None.

        By default the same as ``extract``: a task whose answers have a single form (the
        verifier's Yes or No) has nothing to be strict about.
        """
        return self.extract(completion)

    def extract_as(self, extraction: Extraction, completion: str) -> str | None:
        """``extract`` for "flexible", ``extract_strict`` for "strict"."""
        if extraction not in EXTRACTIONS:
            raise ValueError(f"unknown extraction {extraction!r} (choices: {', '.join(EXTRACTIONS)})")
        return self.extract_strict(completion) if extraction == "strict" else self.extract(completion)

    @abstractmethod
    def is_correct(self, extracted: str, reference: str) -> bool:
        """Whether an extracted answer matches the reference."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choices: {', '.join(SPLITS)})")


def task_class(name: str) -> type[Task]:
    """The registered task called ``name``."""
    tasks = registered_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} (choices: {', '.join(tasks)})")
    return tasks[name]


def registered_tasks() -> dict[str, type[Task]]:
    """Every task by name (see ``_import_task_modules``)."""
    _import_task_modules()
    return dict(sorted(_REGISTRY.items()))


@functools.cache
def _import_task_modules() -> None:
    """Import this package's modules and the ``topr.tasks`` entry points once, so that their
    tasks register (their heavy dependencies, such as sympy, load only when a task checks)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry_point in entry_points(group="topr.tasks"):
        try:
            entry_point.load()
        except Exception as error:  # noqa: BLE001 - another package's broken task must not break every command
            log.warning("the task entry point %s (%s) could not be loaded: %s", entry_point.name, entry_point.value, error)


def get_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``, set up from the other ``TaskConfig`` fields."""
    return task_class(config.name).from_config(config)


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
    match = NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def last_number(text: str) -> str | None:
    """The last number in ``text``, normalised; None if it has none."""
    matches = NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def answer_line_number(text: str) -> str | None:
    """The number of the last "Answer: <number>" in ``text``, normalised: the strict extraction
    of the tasks that ask for that line. None without one."""
    numbers = _ANSWER_LINE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


MarkedAnswer = tuple[int, str | None]
"""Where a completion marks an answer (the marker's start, -1 when it has no such marker) and the
answer there, None when it has none."""


def last_marked_answer(marked: Iterable[MarkedAnswer]) -> str | None:
    """The answer marked last in the completion, among the marks holding one; None if none does.

    A model that corrects itself ("Answer: 4. Wait, the answer is 5.") means its last word.
    """
    answered = [(position, answer) for position, answer in marked if answer is not None]
    return max(answered, key=lambda mark: mark[0])[1] if answered else None


def number_after(marker: re.Pattern[str], text: str) -> str | None:
    """The first number after the last ``marker`` in ``text``; None without marker or number."""
    matches = list(marker.finditer(text))
    return first_number(text[matches[-1].end() :]) if matches else None
