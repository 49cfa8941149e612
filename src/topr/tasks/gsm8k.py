"""GSM8K: grade-school word problems from local JSONL files in the GSM8K format.

Each record has ``question`` and ``answer``, the worked solution ending in ``#### <number>``;
the reference is that number. Files are read as ``topr.tasks.jsonl.FileTask`` describes
(``train_path`` for "train", ``eval_path`` for "test", seeded shuffle, first ``size``). Loading
from the Hugging Face hub is not supported: convert the dataset to JSONL first.

A completion's answer is the number after its last "Answer:" (what the prompt asks for), else
the number after its last "####" (the format of GSM8K solutions, which fine-tuned models copy);
numbers are compared after normalisation, so "$1,000.00" matches "1000".
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from topr.tasks import (
    ANSWER_INSTRUCTION,
    ANSWER_MARKER,
    normalize_number,
    number_after,
    numbers_equal,
)
from topr.tasks.jsonl import FileTask, record_error, record_id

_HASHES = re.compile("####")


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
        return number_after(ANSWER_MARKER, completion) or number_after(_HASHES, completion)

    def is_correct(self, extracted: str, reference: str) -> bool:
        return numbers_equal(extracted, reference)
