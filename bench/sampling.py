"""Sampling: tokens per second of ``topr.sample.TransformersEngine`` by batch size, and what
recording the behaviour log-probs costs.

The engine samples with ``model.generate`` (KV cache on) and takes the behaviour log-probs from
the processed scores that ``generate`` already computed to sample (``output_scores=True``, then
``compute_transition_scores``). The same batch is also generated with the same settings but
without scores; a forward hook counts the model's forward passes in both, showing that the
log-probs cost no second forward pass (one forward per generated token either way) and only the
time of keeping the scores and one log-softmax over them.

Prompts: the built-in arithmetic task's training prompts in the default model's chat template
(real SmolLM2 tokenizer, ~66 tokens). Model: the default model's architecture with random weights
(``--model random``, the default; a random model rarely stops early, so every sequence runs to
``--max-new-tokens``) or any model path ``topr.models.load_policy`` takes, such as
``embedded:smollm2-135m-instruct`` (the real default model; it stops early, so its tokens/s
counts only the tokens it generated).

    .venv/bin/python bench/sampling.py                          # batch sizes 1 4 16 32
    .venv/bin/python bench/sampling.py --model embedded:smollm2-135m-instruct --json sampling.json
"""

from __future__ import annotations

import sys
import time

import common


def load(model_path: str, layers: int | None = None):
    from topr.config import EMBEDDED_MODEL
    from topr.models import load_policy, load_tokenizer

    if model_path == "random":
        tokenizer = load_tokenizer(EMBEDDED_MODEL)
        overrides = {"num_hidden_layers": layers} if layers else {}
        model = common.build_model(**overrides)
        model.eval()
        return model, tokenizer
    return load_policy(model_path)


def arithmetic_prompts(tokenizer, count: int) -> list[list[int]]:
    from topr.config import TaskConfig
    from topr.models import prompt_token_ids
    from topr.tasks import get_task

    problems = get_task(TaskConfig()).problems("train", count, 0)
    return [prompt_token_ids(tokenizer, problem["prompt"]) for problem in problems]


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def generate_without_scores(engine, prompts: list[list[int]], params):
    """What the engine does for one batch, with the same settings, minus the scores and log-probs."""
    import torch
    from transformers import GenerationConfig

    padded = engine.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        num_return_sequences=params.n,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=engine.tokenizer.pad_token_id,
        eos_token_id=sorted(engine.stop_ids),
    )
    torch.manual_seed(params.seed * 1_000_003)
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=padded["input_ids"].to(engine.model.device),
            attention_mask=padded["attention_mask"].to(engine.model.device),
            generation_config=config,
        )
    new = output[:, padded["input_ids"].shape[1] :]
    return int(sum(len(engine_cut(row.tolist(), engine.stop_ids)) for row in new))


def engine_cut(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1]
    return tokens


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--model", default="random", help="'random' (SmolLM2-135M architecture, random weights) or a model path")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--max-new-tokens", type=int, default=64, help="sample.max_new_tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (default 3)")
    args = p.parse_args(argv)
    layers = None
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats, layers = [1, 2], 4, 1, 2
    info = common.setup(args)
    from topr.sample import SamplingParams, TransformersEngine

    started = time.perf_counter()
    model, tokenizer = load(args.model, layers)
    load_seconds = time.perf_counter() - started
    counter = ForwardCounter(model)
    prompts = arithmetic_prompts(tokenizer, max(args.batch_sizes))
    params = SamplingParams(n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    rows = []
    for batch_size in args.batch_sizes:
        engine = TransformersEngine(model, tokenizer, batch_size=batch_size, progress=False)
        batch = prompts[:batch_size]
        tokens, calls = {}, {}

        def with_logprobs():
            before = counter.calls
            completions = engine.generate(batch, params)
            calls["with"] = counter.calls - before
            tokens["with"] = sum(len(c.token_ids) for choices in completions for c in choices)

        def without():
            before = counter.calls
            tokens["without"] = generate_without_scores(engine, batch, params)
            calls["without"] = counter.calls - before

        timings = common.interleaved_medians({"with": with_logprobs, "without": without}, repeats=args.repeats, warmup=1 if batch_size == args.batch_sizes[0] else 0)
        rows.append(
            {
                "batch": batch_size,
                "tokens": tokens["with"],
                "seconds": timings["with"]["median"],
                "tokens_per_s": tokens["with"] / timings["with"]["median"],
                "seconds_without": timings["without"]["median"],
                "tokens_per_s_without": tokens["without"] / timings["without"]["median"],
                "logprob_cost": timings["with"]["median"] / timings["without"]["median"] - 1,
                "forwards": calls["with"],
                "forwards_without": calls["without"],
                "timings": timings,
            }
        )
    header = (
        f"TransformersEngine, model {args.model} (loaded in {load_seconds:.1f} s), n=1, temperature {args.temperature}, "
        f"max_new_tokens {args.max_new_tokens}, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"KV cache on; medians of {args.repeats} interleaved repeats\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("batch", "batch size", "d"),
            ("tokens", "tokens generated", "d"),
            ("seconds", "s (with log-probs)", ".2f"),
            ("tokens_per_s", "tokens/s (with log-probs)", ".1f"),
            ("seconds_without", "s (no scores)", ".2f"),
            ("tokens_per_s_without", "tokens/s (no scores)", ".1f"),
            ("logprob_cost", "log-prob overhead", "+.1%"),
            ("forwards", "forward passes (with)", "d"),
            ("forwards_without", "forward passes (no scores)", "d"),
        ],
    )
    results = {"model": args.model, "load_seconds": load_seconds, "rows": rows}
    common.finish(args, "sampling", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
