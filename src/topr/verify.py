"""The verify stage: score each completion against its reference with the task's checker.

Every record gains ``extracted`` (the parsed answer, None when there is none), ``correct`` and
``reward`` (+1.0 when correct, -1.0 otherwise). The answer is parsed as ``task.extraction`` says:
however it is written (flexible) or only in the format the prompt asks for (strict). A completion
without a parsable answer is wrong, and is also counted as unparsable in the summary. Other fields
pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from topr.config import TaskConfig
from topr.records import RECORD_KEY, VERIFY_INPUT_FIELDS, Record, read_records, write_records
from topr.tasks import Extraction, Task, get_task


def verify_record(record: Record, task: Task, extraction: Extraction = "flexible") -> Record:
    extracted = task.extract_as(extraction, record["completion"])
    correct = extracted is not None and task.is_correct(extracted, str(record["reference"]))
    reward = 1.0 if correct else -1.0
    return {**record, "extracted": extracted, "correct": correct, "reward": reward}


def summarize(records: list[Record]) -> dict[str, Any]:
    """Counts and rates over verified records, and how many prompts have a correct completion."""
    count = len(records)
    correct = sum(record["correct"] for record in records)
    unparsable = sum(record["extracted"] is None for record in records)
    prompts = {record["prompt_id"] for record in records}
    solved = {record["prompt_id"] for record in records if record["correct"]}
    return {
        "count": count,
        "correct": correct,
        "accuracy": correct / count if count else 0.0,
        "unparsable": unparsable,
        "unparsable_rate": unparsable / count if count else 0.0,
        "prompts": len(prompts),
        "prompts_with_a_correct": len(solved),
    }


def verify_records(
    records: Iterable[Record], task: Task, extraction: Extraction = "flexible"
) -> tuple[list[Record], dict[str, Any]]:
    """New records with ``extracted``, ``correct`` and ``reward`` added, and their summary."""
    verified = [verify_record(record, task, extraction) for record in records]
    return verified, summarize(verified)


def run_verify(
    task_config: TaskConfig, input_path: str | os.PathLike, output_path: str | os.PathLike
) -> dict[str, Any]:
    """Verify a file of completions into ``output_path`` (atomically); return the summary. A
    (prompt_id, sample_index) that appears twice is refused, naming both lines."""
    records = read_records(input_path, required=VERIFY_INPUT_FIELDS, unique=RECORD_KEY)
    verified, summary = verify_records(records, get_task(task_config), task_config.extraction)
    write_records(output_path, verified)
    return summary
