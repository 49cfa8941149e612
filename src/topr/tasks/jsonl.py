"""Tasks read from local JSONL files, and the generic ``jsonl`` task.

Split "train" reads ``train_path``, "test" reads ``eval_path``. ``problems(split, size, seed)``
reads and checks every record of the file, shuffles them with ``random.Random(seed)`` and keeps
the first ``size`` (all of them when the file has fewer). A record's ``prompt_id`` is its ``id``
field when it has one, else ``<file stem>-<index>`` with the 0-based position of the record in
the file (blank lines not counted).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from topr.records import RecordError, iter_records
from topr.storage import local_file
from topr.tasks import (
    ANSWER_INSTRUCTION,
    ANSWER_MARKER,
    Task,
    answer_line_number,
    check_split,
    last_number,
    normalize_number,
    number_after,
    numbers_equal,
)

EXACT_INSTRUCTION = "End your reply with 'Answer: <answer>'."


class FileTask(Task):
    """A task whose prompts and references come from one JSONL file per split."""

    required_fields: tuple[str, ...]
    needs_task_files = True

    def __init__(self, train_path: str | None, eval_path: str | None):
        self.paths = {"train": train_path, "test": eval_path}

    @classmethod
    def from_config(cls, config) -> FileTask:
        return cls(config.train_path, config.eval_path)

    def problems(self, split: str, size: int, seed: int) -> list[dict[str, str]]:
        with self.local_copy(split) as path:
            problems = [self.problem(record, path, index) for index, record in enumerate(self.rows(path))]
        _check_unique_ids(problems, path)
        random.Random(seed).shuffle(problems)
        return problems[:size]

    def local_copy(self, split: str) -> AbstractContextManager[Path]:
        """The split's file as a local path (a downloaded copy of an ``s3://`` object) for a block."""
        return local_file(self._location(split))

    def rows(self, path: Path) -> Iterable[dict[str, Any]]:
        """The records of the split's local copy, in order, with the fields it requires."""
        return iter_records(path, required=self.required_fields)

    def _location(self, split: str) -> str:
        """The split's file: a local path or an ``s3://`` URI."""
        check_split(split)
        if split not in self.paths:
            raise ValueError(
                f"task {self.name} has no {split!r} split: its held-out problems are the file task.eval_path names "
                "(point it at your validation file, with task.eval_split=test)"
            )
        location = self.paths[split]
        if location is None:
            raise ValueError(f"task {self.name} needs task.{path_option(split)} for the {split!r} split")
        return location

    @abstractmethod
    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, str]:
        """The prompt record made from the ``index``-th record of ``path``."""


def path_option(split: str) -> str:
    """The ``task`` field naming the split's file."""
    return "train_path" if split == "train" else "eval_path"


def record_id(record: dict[str, Any], path: Path, index: int, field: str = "id") -> str:
    return str(record[field]) if field in record else f"{path.stem}-{index}"


def record_error(path: Path, index: int, message: str) -> RecordError:
    return RecordError(f"{path}: record {index + 1}: {message}")


def _check_unique_ids(problems: list[dict[str, str]], path: Path) -> None:
    """Ids must be unique: later stages group completions by prompt id."""
    seen = set()
    for index, problem in enumerate(problems):
        if problem["prompt_id"] in seen:
            raise record_error(path, index, f"id {problem['prompt_id']!r} is used twice")
        seen.add(problem["prompt_id"])


class JsonlTask(FileTask):
    """Any JSONL file with a prompt field and an answer field.

    ``match="numeric"``: the answer must be a number; a completion's answer is the number after
    the last "Answer:", else its last number, compared after normalisation ("1,000.00" ==
    "1000"). ``match="exact"``: a completion's answer is the rest of the line after the last
    "Answer:" (markdown ``*`` stripped), else the whole completion, compared as stripped strings.
    The strict extraction takes the "Answer:" line only, without falling back.
    """

    name = "jsonl"
    one_model_per_dataset = True

    @classmethod
    def from_config(cls, config) -> JsonlTask:
        return cls(config.train_path, config.eval_path, config.prompt_field, config.answer_field, config.match)

    def __init__(
        self,
        train_path: str | None,
        eval_path: str | None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        match: Literal["numeric", "exact"] = "numeric",
    ):
        super().__init__(train_path, eval_path)
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.match = match
        self.required_fields = (prompt_field, answer_field)
        self.instruction = ANSWER_INSTRUCTION if match == "numeric" else EXACT_INSTRUCTION

    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, str]:
        return {
            "prompt_id": record_id(record, path, index),
            "prompt": self.prompt_for(record[self.prompt_field]),
            "reference": self.reference(record, path, index),
        }

    def reference(self, record: dict[str, Any], path: Path, index: int) -> str:
        """The record's answer as text; with numeric matching it must be a number."""
        reference = str(record[self.answer_field]).strip()
        if self.match == "numeric" and normalize_number(reference) is None:
            raise record_error(path, index, f"{self.answer_field} {reference!r} is not a number")
        return reference

    def extract(self, completion: str) -> str | None:
        if self.match == "numeric":
            return number_after(ANSWER_MARKER, completion) or last_number(completion)
        line = _answer_line(completion)
        return _unmarked(completion if line is None else line)

    def extract_strict(self, completion: str) -> str | None:
        if self.match == "numeric":
            return answer_line_number(completion)
        line = _answer_line(completion)
        return None if line is None else _unmarked(line)

    def is_correct(self, extracted: str, reference: str) -> bool:
        if self.match == "numeric":
            return numbers_equal(extracted, reference)
        return extracted.strip() == reference.strip()


def _answer_line(completion: str) -> str | None:
    """The rest of the line after the last "Answer:"; None without one."""
    markers = list(ANSWER_MARKER.finditer(completion))
    return completion[markers[-1].end() :].strip().split("\n")[0] if markers else None


def _unmarked(text: str) -> str | None:
    """``text`` without surrounding whitespace and markdown ``*``; None when nothing is left."""
    return text.strip().strip("*").strip() or None
