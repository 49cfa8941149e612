"""vLLM's CPU build against topr's own ``TransformersEngine``, on the default run's sampling and
evaluation stages (run it in ``.venv-vllm``: ``make vllm-cpu``).

- ``transformers``: ``topr.sample.TransformersEngine`` as ``topr sample`` and ``topr evaluate``
  use it (float32, continuous batching at the stage's configured batch size).
- ``vllm``: ``topr.sample.VLLMEngine`` as ``sample.engine=vllm`` makes it on CPU: in-process,
  float32, eager, a KV cache of ``sample.cpu_kv_cache_gib`` (``--kv-cache-gib``).

Each engine's start-up (loading the model; for vLLM also its KV cache) is timed once, apart from
the stages. In each stage, each engine's first call is timed apart (it is what a pipeline stage,
which calls its engine once, gets: vLLM's first call on CPU runs slower than the next ones), then
the engines are timed interleaved (vllm, transformers, vllm, …), medians of ``--repeats``.
vLLM's prefix cache is emptied before each of its calls: a repeated call would otherwise skip the
prefill of prompts it has already seen, which no stage does.

The workloads are the default run's (``Config()``): ``sample`` is iteration 1's sampling stage
(``task.train_size`` prompts × ``sample.samples_per_prompt`` at ``sample.temperature``, up to
``sample.max_new_tokens``), ``evaluate`` the held-out greedy pass (``task.eval_size`` prompts,
``evaluate.max_new_tokens``).
Tokens/s counts the completion tokens each engine produced, stop token included. Reported
besides: vLLM's largest |log μ − log π| against a fresh teacher-forced forward pass (training's
first-step log π/μ), and the greedy completions and answers that differ between the engines.

Both engines run in this one process, one after the other within a round; on a machine where
something else runs, the figures are noise: time it on an idle machine.

    .venv-vllm/bin/python bench/vllm_cpu.py                   # the real default model
    .venv-vllm/bin/python bench/vllm_cpu.py --stages sample --repeats 1 --json vllm.json
    .venv-vllm/bin/python bench/vllm_cpu.py --quick            # code paths only, small sizes
"""

from __future__ import annotations

import sys
import time

import common


def model_dir(path: str) -> str:
    """A Hugging Face directory of ``path`` (vLLM does not read GGUF): the embedded model converted as ``topr run`` converts it."""
    from pathlib import Path

    from topr.models import converted_gguf, resolve_model_source

    source = resolve_model_source(path)
    return str(converted_gguf(Path(source.location, source.gguf_file))) if source.gguf_file else source.location


def workloads(tokenizer, quick: bool) -> dict:
    """Each stage's prompts (token ids), sampling parameters and transformers batch size, as the default run sets them."""
    from topr.config import Config
    from topr.models import prompt_token_ids
    from topr.sample import SamplingParams
    from topr.tasks import get_task

    config = Config()
    task = get_task(config.task)
    train_size, eval_size = (4, 6) if quick else (config.task.train_size, config.task.eval_size)

    def token_ids(split: str, size: int) -> list[list[int]]:
        return [prompt_token_ids(tokenizer, p["prompt"], config.model.system_prompt) for p in task.problems(split, size, config.task.seed)]

    sample = SamplingParams.from_config(config.sample, seed_offset=1)
    evaluate = SamplingParams(n=1, temperature=0.0, max_new_tokens=config.evaluate.max_new_tokens)
    if quick:
        sample = SamplingParams(n=2, temperature=sample.temperature, max_new_tokens=8, seed=sample.seed)
        evaluate = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    return {
        "sample": (token_ids("train", train_size), sample, config.sample.batch_size),
        "evaluate": (token_ids("test", eval_size), evaluate, config.evaluate.batch_size),
    }


def start_engines(path: str, kv_cache_gib: float) -> tuple[dict, dict]:
    """Both engines, and the seconds each took to start."""
    from topr.models import load_policy
    from topr.sample import TransformersEngine, VLLMEngine

    seconds, engines = {}, {}
    started = time.perf_counter()
    engines["vllm"] = VLLMEngine(path, cpu_kv_cache_gib=kv_cache_gib)
    seconds["vllm"] = time.perf_counter() - started
    started = time.perf_counter()
    model, tokenizer = load_policy(path)
    engines["transformers"] = TransformersEngine(model, tokenizer, progress=False)
    seconds["transformers"] = time.perf_counter() - started
    return engines, seconds


def logprob_error(model, prompts: list[list[int]], results: list[list], temperature: float, rows: int = 32) -> float:
    """Largest |log μ recorded by vLLM − fresh forward's log π| over the first ``rows`` completions."""
    import torch

    from topr.logprobs import batch_prompt_completions, completion_logprobs

    pairs = [(prompt, choice) for prompt, choices in zip(prompts, results) for choice in choices][:rows]
    batch = batch_prompt_completions([p for p, _ in pairs], [c.token_ids for _, c in pairs], pad_token_id=0)
    with torch.no_grad():
        fresh = completion_logprobs(model, **batch, temperature=temperature)
    return max(float((torch.tensor(c.logprobs) - fresh[row, : len(c.token_ids)]).abs().max()) for row, (_, c) in enumerate(pairs))


def greedy_differences(tokenizer, ours: list[list], theirs: list[list]) -> tuple[int, int]:
    """How many greedy completions, and how many of their extracted answers, differ."""
    from topr.config import Config
    from topr.tasks import get_task

    task = get_task(Config().task)

    def answer(choice):
        return task.extract(tokenizer.decode(choice.token_ids, skip_special_tokens=True))

    pairs = [(a[0], b[0]) for a, b in zip(ours, theirs)]
    return sum(a.token_ids != b.token_ids for a, b in pairs), sum(answer(a) != answer(b) for a, b in pairs)


def measure_stage(stage: str, engines: dict, workload: tuple, repeats: int) -> dict:
    """One stage: a first, cold call of each engine (what a pipeline stage, which calls once,
    sees), then ``repeats`` interleaved rounds."""
    prompts, params, batch_size = workload
    engines["transformers"].batch_size = batch_size
    produced: dict[str, list] = {}

    def run(name: str) -> None:
        if name == "vllm":  # a stage's prompts are new to its engine: no prefill left over from the round before
            engines[name].llm.reset_prefix_cache()
        produced[name] = engines[name].generate(prompts, params)

    variants = {name: (lambda name=name: run(name)) for name in ("vllm", "transformers")}
    first = common.interleaved_medians(variants, repeats=1, warmup=0)
    timings = common.interleaved_medians(variants, repeats=repeats, warmup=0)
    row = {"stage": stage, "sequences": len(prompts) * params.n, "max_new_tokens": params.max_new_tokens, "batch_transformers": batch_size, "timings": timings}
    row |= {f"first_seconds_{name}": first[name]["median"] for name in variants}
    for name in variants:
        row[f"tokens_{name}"] = sum(len(c.token_ids) for choices in produced[name] for c in choices)
        row[f"seconds_{name}"] = timings[name]["median"]
        row[f"tokens_per_s_{name}"] = row[f"tokens_{name}"] / timings[name]["median"]
    row["ratio"] = row["tokens_per_s_vllm"] / row["tokens_per_s_transformers"]
    tokenizer = engines["transformers"].tokenizer
    if params.temperature > 0:
        row["logprob_error"] = logprob_error(engines["transformers"].model, prompts, produced["vllm"], params.temperature)
    else:
        row["greedy_differences"], row["answer_differences"] = greedy_differences(tokenizer, produced["vllm"], produced["transformers"])
    return row


def quick_model(scratch: str) -> str:
    """A 2-layer random model of the default architecture with heads of 64 (vLLM's CPU attention needs 32 or more)."""
    from topr.config import EMBEDDED_MODEL
    from topr.models import load_tokenizer, save_policy

    model = common.build_model(num_hidden_layers=2)
    save_policy(model, load_tokenizer(EMBEDDED_MODEL), scratch, provenance={"source": "bench/vllm_cpu.py --quick"})
    return scratch


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    p = common.parser(__doc__)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="a Hugging Face directory or the embedded model (default)")
    p.add_argument("--stages", nargs="+", choices=["sample", "evaluate"], default=["sample", "evaluate"])
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of each engine per stage (default 2)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM's KV cache (default: sample.cpu_kv_cache_gib)")
    args = p.parse_args(argv)
    from topr.config import Config

    kv_cache_gib = args.kv_cache_gib or Config().sample.cpu_kv_cache_gib
    if args.quick:
        args.repeats = 1
    info = common.setup(args)
    import vllm

    info["vllm"] = vllm.__version__
    with tempfile.TemporaryDirectory() as scratch:
        path = quick_model(f"{scratch}/model") if args.quick else model_dir(args.model)
        engines, start_seconds = start_engines(path, kv_cache_gib)
        stages = workloads(engines["transformers"].tokenizer, args.quick)
        rows = [measure_stage(stage, engines, stages[stage], args.repeats) for stage in args.stages]
        engines["vllm"].close()
    header = (
        f"model {'random (2 layers)' if args.quick else args.model}; start-up: vLLM {start_seconds['vllm']:.1f} s "
        f"(KV cache {kv_cache_gib:g} GiB), transformers {start_seconds['transformers']:.1f} s; the default run's stages, "
        f"float32; medians of {args.repeats} interleaved repeats after a first call of each (timed apart)\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("stage", "stage", "s"),
            ("sequences", "sequences", "d"),
            ("max_new_tokens", "max new tokens", "d"),
            ("tokens_vllm", "tokens (vLLM)", "d"),
            ("first_seconds_vllm", "first call s (vLLM)", ".1f"),
            ("seconds_vllm", "s (vLLM)", ".1f"),
            ("tokens_per_s_vllm", "tokens/s (vLLM)", ".1f"),
            ("batch_transformers", "batch (transformers)", "d"),
            ("tokens_transformers", "tokens (transformers)", "d"),
            ("first_seconds_transformers", "first call s (transformers)", ".1f"),
            ("seconds_transformers", "s (transformers)", ".1f"),
            ("tokens_per_s_transformers", "tokens/s (transformers)", ".1f"),
            ("ratio", "tokens/s vLLM / transformers", ".2f"),
            ("logprob_error", "max abs(log μ − fresh log π)", ".1e"),
            ("greedy_differences", "greedy completions that differ", "d"),
            ("answer_differences", "greedy answers that differ", "d"),
        ],
    )
    results = {"model": args.model, "kv_cache_gib": kv_cache_gib, "start_seconds": start_seconds, "rows": rows}
    common.finish(args, "vllm_cpu", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
