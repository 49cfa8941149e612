"""The prompts stage: a task's training prompts for every iteration and its held-out prompts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from topr.config import Config
from topr.records import write_records
from topr.tasks import get_task


def prompts_digest(records: list[dict]) -> str:
    """The SHA-256 of prompt records, each as canonical JSON (sorted keys) on a line: what a
    model was trained on, compared by a scheduled run before it trains again
    (``run.skip_unchanged_prompts``)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def training_prompts(config: Config) -> list[dict]:
    """The training prompts ``run_prompts`` writes, in order."""
    task = get_task(config.task)
    train_seed = config.task.seed if config.task.train_seed is None else config.task.train_seed
    count = config.task.train_size * config.run.iterations
    if config.verifier.enabled:
        count = max(count, config.verifier.train_questions)
    return task.problems("train", count, train_seed)


def run_prompts(config: Config, train_path: str | Path, eval_path: str | Path) -> dict:
    """Write ``train_size × iterations`` training prompts and ``eval_size`` held-out prompts (of
    ``task.eval_split``);
    return their counts and the training prompts' digest (``prompts_digest``).

    Each iteration samples its own slice of the training prompts (see
    ``topr.sample.select_iteration_prompts``); a file with fewer prompts is cycled through.
    With the verifier branch on, the file holds at least ``verifier.train_questions`` prompts,
    the verifier's training questions: the extra ones come after the iterations' slices, which
    stay as they are (a task's first N problems do not depend on how many are asked for).
    """
    train = training_prompts(config)
    held_out = get_task(config.task).problems(config.task.eval_split, config.task.eval_size, config.task.seed)
    if not train or not held_out:
        raise ValueError(f"task {config.task.name} produced {len(train)} training and {len(held_out)} held-out prompts")
    write_records(train_path, train)
    write_records(eval_path, held_out)
    return {"train_prompts": len(train), "eval_prompts": len(held_out), "train_prompts_sha256": prompts_digest(train)}
