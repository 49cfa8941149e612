"""The prompts stage: a task's training prompts for every iteration and its held-out prompts."""

from __future__ import annotations

from pathlib import Path

from topr.config import Config
from topr.records import write_records
from topr.tasks import get_task


def run_prompts(config: Config, train_path: str | Path, eval_path: str | Path) -> dict:
    """Write ``train_size × iterations`` training prompts and ``eval_size`` held-out prompts.

    Each iteration samples its own slice of the training prompts (see
    ``topr.sample.select_iteration_prompts``); a file with fewer prompts is cycled through.
    With the verifier branch on, the file holds at least ``verifier.train_questions`` prompts,
    the verifier's training questions: the extra ones come after the iterations' slices, which
    stay as they are (a task's first N problems do not depend on how many are asked for).
    """
    task = get_task(config.task)
    train_seed = config.task.seed if config.task.train_seed is None else config.task.train_seed
    count = config.task.train_size * config.run.iterations
    if config.verifier.enabled:
        count = max(count, config.verifier.train_questions)
    train = task.problems("train", count, train_seed)
    held_out = task.problems("test", config.task.eval_size, config.task.seed)
    if not train or not held_out:
        raise ValueError(f"task {config.task.name} produced {len(train)} training and {len(held_out)} held-out prompts")
    write_records(train_path, train)
    write_records(eval_path, held_out)
    return {"train_prompts": len(train), "eval_prompts": len(held_out)}
