"""Training options against full fine-tuning: step time and peak memory of topr's own training step.

Each variant is a set of ``train.*`` overrides (``VARIANTS``); each runs in a fresh process
(``bench/common.py``), on the default model's architecture (SmolLM2-135M: Llama, 30 layers,
vocabulary 49152) with random weights, through what ``topr.train.run_train`` runs for one
optimizer step: ``training_scorer`` (the option applied to the model), ``make_optimizer``,
``forward_backward`` over one global batch of synthetic records, gradient clipping and the
optimizer step (with LoRA, ``topr.lora.with_adapter`` first, as ``run_train`` does). One step warms up (it makes the optimizer's state); then ``--repeats`` steps are
timed (median) and one more is measured at its peak: the extra memory above the resident set
before it (model, optimizer state, batch), which is the activations and gradients.

    .venv/bin/python bench/train_memory.py --threads 2                  # 32 × (~110 + ~64) tokens
    .venv/bin/python bench/train_memory.py --threads 2 --json train_memory.json
"""

from __future__ import annotations

import sys
import time

import common

VARIANTS = {
    "full": [],
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
    "LoRA rank 8": ["train.lora_rank=8"],
    "LoRA rank 8 + checkpointing": ["train.lora_rank=8", "train.gradient_checkpointing=true"],
}


def records(batch: int, prompt: int, completion: int, vocab: int) -> list[dict]:
    """A global batch of training records: random tokens, a quarter of them positive."""
    pairs = common.synthetic_sequences(batch, prompt, completion, vocab, seed=0, spread=0.1)
    return [
        {
            "prompt_id": f"p{row}",
            "sample_index": 0,
            "prompt_token_ids": prompt_ids,
            "completion_token_ids": completion_ids,
            "behavior_logprobs": [-10.8] * len(completion_ids),  # near a random model's own
            "reward": 1.0 if row % 4 == 0 else -1.0,
        }
        for row, (prompt_ids, completion_ids) in enumerate(pairs)
    ]


def variant_child(overrides: list[str], batch: int, prompt: int, completion: int, layers: int, vocab: int, repeats: int) -> dict:
    """In a fresh process: one warm-up step, ``repeats`` timed steps, one step measured at its peak."""
    import torch

    from topr import distributed, lora
    from topr.config import load_config
    from topr.train import forward_backward, make_optimizer, training_scorer

    config = load_config(None, [f"train.batch_size={batch}", *overrides])
    model = common.build_model(num_hidden_layers=layers, vocab_size=vocab)
    device, ranks = torch.device("cpu"), distributed.Ranks()
    if config.train.lora_rank:
        lora.with_adapter(model, config.train)
    scorer = training_scorer(model, config, 1, device, None)
    optimizer = make_optimizer(scorer, config)
    batch_records = records(batch, prompt, completion, vocab)

    def step():
        forward_backward(scorer, batch_records, config, 2, ranks, device, None)
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    measured = common.measure_peak(step, "cpu")
    measured.pop("result")
    trainable = sum(parameter.numel() for parameter in scorer.parameters() if parameter.requires_grad)
    return {**measured, **common.summarize(times), "trainable_parameters": trainable}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=32, help="sequences per optimizer step (default 32, the default run's micro-batch × accumulation)")
    p.add_argument("--prompt", type=int, default=110, help="mean prompt tokens (±10%%; default 110)")
    p.add_argument("--completion", type=int, default=64, help="mean completion tokens (±10%%; default 64)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (default 30, as SmolLM2-135M)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.completion, args.layers, args.vocab, args.repeats = 2, 12, 6, 2, 2048, 1
    info = common.setup(args)
    sizes = dict(batch=args.batch, prompt=args.prompt, completion=args.completion, layers=args.layers, vocab=args.vocab, repeats=args.repeats)
    results = {name: common.measure_in_child("train_memory:variant_child", {"overrides": overrides, **sizes}, args.threads) for name, overrides in VARIANTS.items()}
    full = results["full"]
    rows = [
        {
            "variant": name,
            "overrides": " ".join(VARIANTS[name]) or "(defaults)",
            "trainable": result["trainable_parameters"],
            "median_s": result["median"],
            "time_ratio": result["median"] / full["median"],
            "peak_mib": result["peak_mib"],
            "peak_ratio": result["peak_mib"] / full["peak_mib"],
        }
        for name, result in results.items()
    ]
    header = (
        f"one optimizer step on CPU: {args.batch} sequences of ~{args.prompt} + ~{args.completion} tokens, "
        f"{args.layers} layers, vocabulary {args.vocab}; median of {args.repeats} steps, peak of one more, each variant in its own process\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("variant", "variant", ""),
            ("overrides", "overrides", ""),
            ("trainable", "trainable parameters", ","),
            ("median_s", "median s", ".2f"),
            ("time_ratio", "× full", ".2f"),
            ("peak_mib", "step peak MiB", ".0f"),
            ("peak_ratio", "× full", ".2f"),
        ],
    )
    common.finish(args, "train_memory", info, {"variants": results, "sizes": sizes}, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
