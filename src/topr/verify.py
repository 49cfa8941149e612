"""The verify stage: score each completion against its reference with the task's checker.

Every record gains ``extracted`` (the parsed answer, None when there is none), ``correct`` and
``reward``: +1.0 when correct, -1.0 otherwise, unless the ``task`` section mixes in a format term or
a function of the user's (``topr.rewards``). The answer is parsed as ``task.extraction`` says:
however it is written (flexible) or only in the format the prompt asks for (strict). A completion
without a parsable answer is wrong, and is also counted as unparsable in the summary. Other fields
pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from statistics import fmean
from typing import Any

from topr.config import TaskConfig
from topr.records import RECORD_KEY, VERIFY_INPUT_FIELDS, Record, read_records, write_records
from topr.rewards import CHECKER, Reward, RewardError
from topr.tasks import Extraction, Task, get_task


def verify_record(record: Record, task: Task, extraction: Extraction = "flexible", reward: Reward = CHECKER) -> Record:
    extracted = task.extract_as(extraction, record["completion"])
    correct = extracted is not None and task.is_correct(extracted, str(record["reference"]))
    checked = {**record, "extracted": extracted, "correct": correct}
    return {**checked, "reward": reward(checked, task)}


def summarize(records: list[Record]) -> dict[str, Any]:
    """Counts and rates over verified records, how many prompts have a correct completion, and
    the mean reward."""
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
        "mean_reward": fmean(record["reward"] for record in records) if count else 0.0,
    }


def verify_records(
    records: Iterable[Record], task: Task, extraction: Extraction = "flexible", reward: Reward = CHECKER
) -> tuple[list[Record], dict[str, Any]]:
    """New records with ``extracted``, ``correct`` and ``reward`` added, and their summary."""
    verified = [verify_record(record, task, extraction, reward) for record in records]
    return verified, summarize(verified)


def run_verify(
    task_config: TaskConfig, input_path: str | os.PathLike, output_path: str | os.PathLike
) -> dict[str, Any]:
    """Verify a file of completions into ``output_path`` (atomically); return the summary. A
    (prompt_id, sample_index) that appears twice is refused, naming both lines; a reward the
    ``task`` section's function gets wrong (``RewardError``) names the file too, and nothing is written."""
    reward = Reward.from_config(task_config)
    records = read_records(input_path, required=VERIFY_INPUT_FIELDS, unique=RECORD_KEY)
    try:
        verified, summary = verify_records(records, get_task(task_config), task_config.extraction, reward)
    except RewardError as error:
        raise RewardError(f"{input_path}: {error}") from error
    write_records(output_path, verified)
    return summary
