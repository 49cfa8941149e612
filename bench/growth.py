"""Growth: how time and peak memory grow with samples per prompt (n), completion length and
vocabulary size, for sampling and for a TOPR training step.

One factor varies at a time around a base point; every point runs in its own fresh process
(see ``bench/common.py``): build, one warm-up run, ``--repeats`` timed runs (median), then one
run whose peak memory above the state before it is measured.

- sampling: ``TransformersEngine.generate`` (behaviour log-probs included) for ``--prompts``
  prompts of 64 tokens, n completions each, ``max_new_tokens`` = the completion length; a random
  model rarely stops early, so every completion has that length.
- training: one TOPR step (``completion_logprobs`` in chunks, ``policy_loss``, backward, AdamW)
  on ``--prompts`` × n sequences of 64 prompt tokens and the completion length.

The model has the default model's width (SmolLM2-135M: hidden 576, 9 heads, 3 KV heads) with
``--layers`` decoder layers (default 4, so that the table takes minutes on a CPU; the backbone's
share of time grows with the layers, the output head's does not) and random weights.

    .venv/bin/python bench/growth.py
    .venv/bin/python bench/growth.py --layers 30 --repeats 3 --json growth.json
"""

from __future__ import annotations

import sys

import common

BASE = {"n": 4, "completion": 64, "vocab": 49152}
AXES = {"n": [1, 2, 4, 8], "completion": [16, 32, 64, 128], "vocab": [16384, 49152, 128256]}
PROMPT_TOKENS = 64


class PlainTokenizer:
    """Just what ``TransformersEngine`` asks of a tokenizer, for token ids that need no text."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def pad(self, encoded, padding=True, return_tensors="pt", padding_side="left"):
        import torch

        rows = encoded["input_ids"]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


def point_child(task: str, n: int, completion: int, vocab: int, prompts: int, layers: int, repeats: int) -> dict:
    """One point in a fresh process: median seconds of ``repeats`` runs, then one run's peak memory."""
    model = common.build_model(num_hidden_layers=layers, vocab_size=vocab)
    if task == "sampling":
        from topr.sample import SamplingParams, TransformersEngine

        model.eval()
        engine = TransformersEngine(model, PlainTokenizer(), batch_size=prompts * n, progress=False)
        prompt_ids = [p for p, _ in common.synthetic_sequences(prompts, PROMPT_TOKENS, 1, vocab, seed=1)]
        params = SamplingParams(n=n, temperature=0.5, max_new_tokens=completion)
        counted = {}

        def run():
            completions = engine.generate(prompt_ids, params)
            counted["tokens"] = sum(len(c.token_ids) for choices in completions for c in choices)
    else:
        from train_step import make_batch, make_steps

        data = make_batch(prompts * n, PROMPT_TOKENS, completion, vocab)
        step = make_steps(model, data)["topr"]
        counted = {"tokens": int(data["tensors"]["attention_mask"].sum())}

        def run():
            step()

    run()
    timings = common.interleaved_medians({"run": run}, repeats=repeats, warmup=0)["run"]
    measured = common.measure_peak(run)
    return {"seconds": timings["median"], "peak_mib": measured["peak_mib"], "tokens": counted["tokens"]}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4; SmolLM2-135M has 30)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per batch (default 2; sequences = prompts × n)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (default 3)")
    p.add_argument("--tasks", nargs="+", default=["sampling", "training"], choices=["sampling", "training"])
    args = p.parse_args(argv)
    base, axes = dict(BASE), {name: list(values) for name, values in AXES.items()}
    if args.quick:
        args.layers, args.prompts, args.repeats = 1, 1, 1
        base = {"n": 1, "completion": 4, "vocab": 1024}
        axes = {"n": [1]}
    info = common.setup(args)
    rows = []
    for task in args.tasks:
        for axis, values in axes.items():
            reference = None
            for value in values:
                point = {**base, axis: value}
                measured = common.measure_in_child(
                    "growth:point_child", {"task": task, **point, "prompts": args.prompts, "layers": args.layers, "repeats": args.repeats}, args.threads
                )
                if value == base[axis]:
                    reference = measured
                rows.append({"task": task, "axis": axis, **point, "sequences": args.prompts * point["n"], **measured})
            for row in rows:
                if row["task"] == task and row["axis"] == axis and reference:
                    row["time_vs_base"] = row["seconds"] / reference["seconds"]
                    row["memory_vs_base"] = row["peak_mib"] / reference["peak_mib"] if reference["peak_mib"] > 0 else None
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    text = (
        f"growth around n={base['n']}, completion {base['completion']} tokens, vocabulary {base['vocab']}; {args.prompts} prompts of "
        f"{PROMPT_TOKENS} tokens, {args.layers} decoder layers of SmolLM2-135M's width, medians of {args.repeats}; "
        "peak = extra memory of one run above the state before it\n\n"
    )
    text += common.table(
        rows,
        [
            ("task", "task", ""),
            ("axis", "varied", ""),
            ("n", "n", "d"),
            ("completion", "completion", "d"),
            ("vocab", "vocabulary", "d"),
            ("sequences", "sequences", "d"),
            ("seconds", "median s", ".3f"),
            ("time_vs_base", "time / base", ".2f"),
            ("tokens_per_s", "tokens/s", ".0f"),
            ("peak_mib", "peak MiB", ".0f"),
            ("memory_vs_base", "memory / base", ".2f"),
        ],
    )
    common.finish(args, "growth", info, {"base": base, "layers": args.layers, "prompts": args.prompts, "rows": rows}, text)
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
