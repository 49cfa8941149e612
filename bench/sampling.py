"""Sampling: the default run's sampling and evaluation stages, ``TransformersEngine`` against
``model.generate``.

Two ways to produce the same records, timed side by side (interleaved after one untimed warm-up round, medians):

- ``generate``: what ``TransformersEngine`` did until its own decoding loop: one
  ``model.generate`` call per batch of ``--generate-batch`` sequences (32, the default batch
  size then; KV cache on), every step's
  processed scores kept (``output_scores=True``) and the chosen tokens' log-probs taken from
  them afterwards (``compute_transition_scores``). A batch runs until its longest sequence ends,
  and a prompt's n samples are prefilled n times.
- ``engine``: ``topr.sample.TransformersEngine`` as ``topr sample`` and ``topr evaluate`` use it:
  finished rows leave the batch and waiting ones join it (continuous batching), a prompt's n
  samples share one prefill, and only the chosen token's log-prob is kept at each step; at the
  stage's configured batch size (``sample.batch_size``, ``evaluate.batch_size``).

The workloads are the default run's (``Config()``): ``sample`` is iteration 1's sampling stage
(``task.train_size`` training prompts × ``sample.samples_per_prompt`` at
``sample.temperature``), ``evaluate`` the held-out greedy pass (``task.eval_size`` prompts).
Tokens/s counts the completion tokens each variant produced (up to and including the stop
token). The engine's behaviour log-probs are checked against a fresh forward pass of the same
model (``completion_logprobs`` at the sampling temperature): training's first-step log π/μ.

    .venv/bin/python bench/sampling.py                  # the real default model, about 14 minutes
    .venv/bin/python bench/sampling.py --stages sample --repeats 1
"""

from __future__ import annotations

import sys
import time

import common


def load(model_path: str, quick: bool):
    from topr.config import EMBEDDED_MODEL
    from topr.models import load_policy, load_tokenizer

    from transformers import GenerationConfig

    if quick:
        model, tokenizer = common.build_model(num_hidden_layers=2), load_tokenizer(EMBEDDED_MODEL)
        model.eval()
    else:
        model, tokenizer = load_policy(model_path)
    # As the engine did before its own loop: generate() fills unset options from the model's own
    # generation defaults, so start from neutral ones.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def workloads(tokenizer, quick: bool) -> dict:
    """Each stage's prompts (token ids) and sampling parameters, as the default run sets them."""
    from topr.config import Config
    from topr.models import prompt_token_ids
    from topr.sample import SamplingParams
    from topr.tasks import get_task

    config = Config()
    task = get_task(config.task)
    train_size, eval_size, max_new_tokens = (3, 4, 4) if quick else (config.task.train_size, config.task.eval_size, None)

    def token_ids(split: str, size: int) -> list[list[int]]:
        return [prompt_token_ids(tokenizer, p["prompt"], config.model.system_prompt) for p in task.problems(split, size, config.task.seed)]

    sample = SamplingParams.from_config(config.sample, seed_offset=1)
    evaluate = SamplingParams(n=1, temperature=0.0, max_new_tokens=config.evaluate.max_new_tokens)
    if max_new_tokens:
        sample = SamplingParams(n=2, temperature=sample.temperature, max_new_tokens=max_new_tokens, seed=sample.seed)
        evaluate = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    return {
        "sample": (token_ids("train", train_size), sample, config.sample.batch_size),
        "evaluate": (token_ids("test", eval_size), evaluate, config.evaluate.batch_size),
    }


def generate_batches(engine, prompts: list[list[int]], params) -> list[list]:
    """The engine up to its own decoding loop: ``model.generate`` per batch, log-probs from the kept scores."""
    import torch
    from transformers import GenerationConfig

    from topr.sample import Completion

    greedy = params.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_k=None if greedy else params.top_k,
        top_p=None if greedy else params.top_p,
        num_return_sequences=params.n,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=engine.tokenizer.pad_token_id,
        eos_token_id=sorted(engine.stop_ids),
        output_scores=not greedy,
        return_dict_in_generate=True,
    )
    per_batch = max(1, engine.batch_size // params.n)
    completions = []
    for start in range(0, len(prompts), per_batch):
        padded = engine.tokenizer.pad({"input_ids": prompts[start : start + per_batch]}, padding=True, return_tensors="pt", padding_side="left")
        torch.manual_seed(params.seed * 1_000_003 + start)
        with torch.inference_mode():
            output = engine.model.generate(**padded.to(engine.model.device), generation_config=config)
            new = output.sequences[:, padded["input_ids"].shape[1] :]
            logprobs = torch.zeros(new.shape) if greedy else engine.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
        for row, row_logprobs in zip(new.tolist(), logprobs.tolist()):
            stop = next((i + 1 for i, token in enumerate(row) if token in engine.stop_ids), None)
            completions.append(Completion(row[:stop], row_logprobs[:stop], "length" if stop is None else "stop"))
    return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]


def logprob_error(model, prompts: list[list[int]], results: list[list], temperature: float, rows: int = 32) -> float:
    """Largest |behaviour log-prob − fresh forward's log-prob| over the first ``rows`` completions."""
    import torch

    from topr.logprobs import batch_prompt_completions, completion_logprobs

    pairs = [(prompt, choice) for prompt, choices in zip(prompts, results) for choice in choices][:rows]
    batch = batch_prompt_completions([p for p, _ in pairs], [c.token_ids for _, c in pairs], pad_token_id=0)
    with torch.no_grad():
        fresh = completion_logprobs(model, **batch, temperature=temperature)
    return max(
        float((torch.tensor(choice.logprobs) - fresh[row, : len(choice.token_ids)]).abs().max()) for row, (_, choice) in enumerate(pairs)
    )


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="any model path topr.models.load_policy takes")
    p.add_argument("--stages", nargs="+", choices=["sample", "evaluate"], default=["sample", "evaluate"])
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of each variant per stage (default 2)")
    p.add_argument("--generate-batch", type=int, default=32, help="batch size of the generate variant (default 32, the default until 2026-11-29)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.model = 1, "random (2 layers)"
    info = common.setup(args)
    from topr.sample import TransformersEngine

    started = time.perf_counter()
    model, tokenizer = load(args.model, args.quick)
    load_seconds = time.perf_counter() - started
    stages = workloads(tokenizer, args.quick)
    rows = []
    for stage in args.stages:
        prompts, params, batch_size = stages[stage]
        engine = TransformersEngine(model, tokenizer, batch_size=batch_size, progress=False)
        before = TransformersEngine(model, tokenizer, batch_size=args.generate_batch, progress=False)
        produced: dict[str, list] = {}
        variants = {
            "generate": lambda: produced.__setitem__("generate", generate_batches(before, prompts, params)),
            "engine": lambda: produced.__setitem__("engine", engine.generate(prompts, params)),
        }
        timings = common.interleaved_medians(variants, repeats=args.repeats, warmup=0 if args.quick else 1)
        row = {"stage": stage, "sequences": len(prompts) * params.n, "batch_generate": args.generate_batch, "batch_engine": batch_size, "timings": timings}
        for name in variants:
            row[f"tokens_{name}"] = sum(len(c.token_ids) for choices in produced[name] for c in choices)
            row[f"seconds_{name}"] = timings[name]["median"]
            row[f"tokens_per_s_{name}"] = row[f"tokens_{name}"] / timings[name]["median"]
        row["speedup"] = row["tokens_per_s_engine"] / row["tokens_per_s_generate"]
        if params.temperature > 0:  # greedy records log-prob 0: there is no distribution to train against
            row["logprob_error"] = logprob_error(model, prompts, produced["engine"], params.temperature)
        else:
            row["greedy_differences"] = sum(
                a.token_ids != b.token_ids for x, y in zip(produced["engine"], produced["generate"]) for a, b in zip(x, y)
            )
        rows.append(row)
    header = (
        f"model {args.model} (loaded in {load_seconds:.1f} s); the default run's stages; "
        f"medians of {args.repeats} interleaved repeats after a warm-up round\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("stage", "stage", "s"),
            ("sequences", "sequences", "d"),
            ("batch_generate", "batch (generate)", "d"),
            ("tokens_generate", "tokens (generate)", "d"),
            ("seconds_generate", "s (generate)", ".1f"),
            ("tokens_per_s_generate", "tokens/s (generate)", ".1f"),
            ("batch_engine", "batch (engine)", "d"),
            ("tokens_engine", "tokens (engine)", "d"),
            ("seconds_engine", "s (engine)", ".1f"),
            ("tokens_per_s_engine", "tokens/s (engine)", ".1f"),
            ("speedup", "tokens/s engine / generate", ".2f"),
            ("logprob_error", "max abs(log μ − fresh log π)", ".1e"),
            ("greedy_differences", "greedy completions that differ", "d"),
        ],
    )
    results = {"model": args.model, "load_seconds": load_seconds, "rows": rows}
    common.finish(args, "sampling", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
