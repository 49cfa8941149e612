"""Padding: the share of padded positions in training micro-batches, before and after sorting
each global batch by length (``topr.train.by_length``).

A micro-batch is right-padded to its longest sequence; the padded share is 1 − real tokens /
(rows × width) over all micro-batches of one epoch, exactly as ``topr.train`` forms them
(``global_batches``, then ``by_length``, then ``distributed.micro_batches`` for each rank).
Sorting happens only inside a global batch (its sequences are fixed by the shuffle, and the
step's gradient is their mean), so it can only help when a global batch is split into several
micro-batches: ``gradient_accumulation`` > 1 or several processes. ``completion`` is the same
share over the [B, T] completion tensors that the log-probs and the loss work on.

    .venv/bin/python bench/padding.py                       # the curated sets of runs/default
    .venv/bin/python bench/padding.py --data /tmp/def3/default/pipeline_root/*/curate*/train_set
"""

from __future__ import annotations

import glob
import sys

import common

CONFIGS = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (16, 1, 1), (4, 4, 1)]


def padded_share(records: list[dict], batch_size: int, accumulation: int, processes: int, sort: bool) -> tuple[float, float]:
    from topr import distributed
    from topr.train import by_length, global_batches

    real = total = real_completion = total_completion = 0
    for batch in global_batches(records, batch_size * accumulation * processes, epochs=1, seed=0):
        ordered = by_length(batch, batch_size, processes) if sort else batch
        for rank in range(processes):
            for part in distributed.micro_batches(ordered, batch_size, distributed.Ranks(rank, processes)):
                if not part:
                    continue
                lengths = [len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in part]
                completions = [len(r["completion_token_ids"]) for r in part]
                real, total = real + sum(lengths), total + max(lengths) * len(part)
                real_completion, total_completion = real_completion + sum(completions), total_completion + max(completions) * len(part)
    return 1 - real / total, 1 - real_completion / total_completion


def synthetic_records(count: int = 64) -> list[dict]:
    import random

    rng = random.Random(0)
    return [{"prompt_token_ids": [1] * rng.randint(60, 72), "completion_token_ids": [2] * rng.randint(3, 64)} for _ in range(count)]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--data", nargs="+", default=["runs/default/pipeline_root/*/curate*/train_set"], help="curated sets (JSONL; globs allowed)")
    args = p.parse_args(argv)
    info = common.setup(args)
    from topr.records import read_records

    if args.quick:
        sets = {"synthetic": synthetic_records()}
    else:
        paths = sorted({path for pattern in args.data for path in glob.glob(pattern)})
        if not paths:
            raise SystemExit(f"no curated set matches {args.data}; run `make run` first or pass --data")
        sets = {path: read_records(path) for path in paths}
    rows = []
    for path, records in sets.items():
        for batch_size, accumulation, processes in CONFIGS:
            before = padded_share(records, batch_size, accumulation, processes, sort=False)
            after = padded_share(records, batch_size, accumulation, processes, sort=True)
            rows.append(
                {
                    "data": path.split("pipeline_root/")[-1],
                    "sequences": len(records),
                    "config": f"{batch_size} × {accumulation} × {processes}",
                    "before": before[0],
                    "after": after[0],
                    "completion_before": before[1],
                    "completion_after": after[1],
                }
            )
    text = "padded share of micro-batch positions, one epoch (config = batch_size × gradient_accumulation × processes; the default is 8 × 1 × 1)\n\n"
    text += common.table(
        rows,
        [
            ("data", "curated set", ""),
            ("sequences", "sequences", "d"),
            ("config", "B × A × N", ""),
            ("before", "padded, as shuffled", ".1%"),
            ("after", "padded, sorted in batch", ".1%"),
            ("completion_before", "completion padded, shuffled", ".1%"),
            ("completion_after", "completion padded, sorted", ".1%"),
        ],
    )
    common.finish(args, "padding", info, {"rows": rows}, text)
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
