"""GSM8K: grade-school word problems from local JSONL files in the GSM8K format.

Each record has ``question`` and ``answer``, the worked solution ending in ``#### <number>``;
the reference is that number. Files are read as ``topr.tasks.jsonl.FileTask`` describes
(``train_path`` for "train", ``eval_path`` for "test", seeded shuffle, first ``size``). Loading
from the Hugging Face hub is not supported: convert the dataset to JSONL first.

A completion's answer is read in one of two ways (``TaskConfig.extraction``), as evaluation
harnesses report a strict and a flexible match:

- flexible (the default): the answer however models write it. Of the answers the completion
  marks, the last: the number after "Answer:" (what the prompt asks for) or "####" (the format
  of GSM8K solutions, which fine-tuned models copy), the number right after "the (final) answer
  is", or a ``\\boxed{...}`` holding one number. A completion that marks none gives its last
  number.
- strict: only the number of the last "Answer: <number>", as the prompt asks.

Either way, thousands commas, a "$", and units or a "%" after the number are no part of it
("$1,234.00", "1,234 dollars" and "1234%" all read 1234; GSM8K references are bare numbers,
percentages too), nor is a sentence's closing period. Numbers are compared after normalisation,
so "1000.00" matches "1,000".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from topr.tasks import (
    ANSWER_INSTRUCTION,
    ANSWER_MARKER,
    NUMBER,
    MarkedAnswer,
    answer_line_number,
    first_number,
    last_marked_answer,
    last_number,
    normalize_number,
    numbers_equal,
)
from topr.tasks.jsonl import FileTask, record_error, record_id
from topr.tasks.math_task import boxed_answer

_HASHES = re.compile("####")
# "the (final) answer is" with a number right after, past a colon and markdown ("the answer is:
# **18**"): "the answer is clear: 3 and 4 make 7" marks no answer.
_ANSWER_IS = re.compile(rf"\banswer\s+is[\s:*_]*(?={NUMBER.pattern})", re.IGNORECASE)
# The markers a number follows, in no particular order: the last one in the completion counts.
_MARKERS = (ANSWER_MARKER, _HASHES, _ANSWER_IS)


class Gsm8kTask(FileTask):
    name = "gsm8k"
    required_fields = ("question", "answer")
    instruction = ANSWER_INSTRUCTION

    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, str]:
        _, hashes, reference = str(record["answer"]).rpartition("####")
        reference = reference.strip()
        if not hashes or normalize_number(reference) is None:
            raise record_error(path, index, "answer does not end in '#### <number>'")
        return {
            "prompt_id": record_id(record, path, index),
            "prompt": self.prompt_for(record["question"]),
            "reference": reference,
        }

    def extract(self, completion: str) -> str | None:
        marked = [_number_after_last(marker, completion) for marker in _MARKERS]
        marked.append(_boxed_number(completion))
        return last_marked_answer(marked) or last_number(completion)

    def extract_strict(self, completion: str) -> str | None:
        return answer_line_number(completion)

    def is_correct(self, extracted: str, reference: str) -> bool:
        return numbers_equal(extracted, reference)


def _number_after_last(marker: re.Pattern[str], completion: str) -> MarkedAnswer:
    """Where the last ``marker`` starts (-1 without one) and the first number after it."""
    matches = list(marker.finditer(completion))
    if not matches:
        return -1, None
    return matches[-1].start(), first_number(completion[matches[-1].end() :])


def _boxed_number(completion: str) -> MarkedAnswer:
    """Where the last ``\\boxed`` starts and its number, when it holds exactly one
    (``\\boxed{\\$1{,}234}``, ``\\boxed{18 \\text{ dollars}}``; ``\\boxed{\\frac{1}{2}}`` holds two)."""
    position, content = boxed_answer(completion)
    numbers = NUMBER.findall((content or "").replace("{,}", ","))
    return position, normalize_number(numbers[0]) if len(numbers) == 1 else None
