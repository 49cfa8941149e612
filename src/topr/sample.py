"""The sampling stage: n completions per prompt, with the behaviour log-probs of every token.

Two engines sit behind one interface (``generate(prompts, params) -> completions per prompt``):

- ``TransformersEngine``: ``model.generate`` on CPU or GPU, batched and left-padded. The
  behaviour log-probs come from the processed scores that ``generate`` sampled from
  (temperature, top-k and top-p applied, truncated tokens at -inf), so they are log μ of the
  distribution actually sampled from, at no second forward pass.
- ``VLLMEngine``: vLLM on GPU (extra ``[gpu]``, imported lazily) with
  ``logprobs_mode="processed_logprobs"`` for the same reason: by default vLLM returns log-probs
  of the raw logits, before temperature and truncation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from topr.config import Config, SampleConfig
from topr.console import progress_bar
from topr.models import context_length, load_policy, load_tokenizer, model_identity, prompt_token_ids, set_threads
from topr.records import PROMPT_FIELDS, SAMPLE_FIELDS, Record, RecordError, read_records, write_records

log = logging.getLogger(__name__)

SHARD_SEED_STRIDE = 1000  # shard s samples with seed + iteration + 1000·s


@dataclass(frozen=True)
class SamplingParams:
    """What to sample; ``temperature == 0`` means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 96
    seed: int = 0

    @classmethod
    def from_config(cls, config: SampleConfig, seed_offset: int = 0) -> SamplingParams:
        return cls(
            n=config.samples_per_prompt,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed + seed_offset,
        )


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each tokenized prompt, in prompt order."""


class TransformersEngine:
    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.stop_ids = _stop_token_ids(model, tokenizer)
        # generate() fills unset options from the model's own generation defaults (a shipped
        # repetition penalty, say); start from neutral ones so that what is sampled is exactly
        # what the parameters say, and the recorded log-probs match π at the same temperature.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=sorted(self.stop_ids), pad_token_id=tokenizer.pad_token_id
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        prompts_per_batch = max(1, self.batch_size // params.n)
        # Similar lengths together waste less padding; results go back to prompt order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        bar = progress_bar(total=len(prompts) * params.n, desc="sampling", unit="seq", disable=not self.progress)
        generated_tokens, started = 0, time.perf_counter()
        for batch_index, start in enumerate(range(0, len(order), prompts_per_batch)):
            indices = order[start : start + prompts_per_batch]
            completions = self._generate_batch([prompts[i] for i in indices], params, batch_index)
            for offset, index in enumerate(indices):
                results[index] = completions[offset * params.n : (offset + 1) * params.n]
            generated_tokens += sum(len(c.token_ids) for c in completions)
            bar.update(len(completions))
            bar.set_postfix(tokens_per_s=f"{generated_tokens / (time.perf_counter() - started):.0f}")
        bar.close()
        return results

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, batch_index: int) -> list[Completion]:
        from transformers import GenerationConfig

        device = self.model.device
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
        greedy = params.temperature == 0
        generation_config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_k=None if greedy else params.top_k,
            top_p=None if greedy else params.top_p,
            num_return_sequences=params.n,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
            output_scores=not greedy,
            return_dict_in_generate=True,
        )
        # Seeded per batch, so a batch's samples do not depend on what ran before it.
        torch.manual_seed(params.seed * 1_000_003 + batch_index)
        output = self.model.generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            generation_config=generation_config,
        )
        new_tokens = output.sequences[:, padded["input_ids"].shape[1] :]
        if greedy:
            token_logprobs = torch.zeros(new_tokens.shape)
        else:
            token_logprobs = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
        return [
            _cut_at_stop(row.tolist(), logprobs.float().tolist(), self.stop_ids)
            for row, logprobs in zip(new_tokens.cpu(), token_logprobs.cpu())
        ]


def _stop_token_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {token for token in configured + [tokenizer.eos_token_id] if token is not None}


def _cut_at_stop(token_ids: list[int], logprobs: list[float], stop_ids: set[int]) -> Completion:
    """Keep tokens up to and including the first stop token; what follows is padding."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return Completion(token_ids[: position + 1], logprobs[: position + 1], "stop")
    return Completion(token_ids, logprobs, "length")


class VLLMEngine:
    """vLLM on GPU. Needs the ``[gpu]`` extra; the import happens only when this engine is made."""

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError(
                "sample.engine=vllm needs vLLM on a GPU machine: pip install 'topr[gpu]'"
            ) from error
        self.llm = LLM(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            logprobs_mode="processed_logprobs",
            load_format="safetensors",  # as load_policy: never unpickle weights
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=0,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling)
        return [[_vllm_completion(choice) for choice in output.outputs] for output in outputs]


def _vllm_completion(choice) -> Completion:
    token_ids = list(choice.token_ids)
    logprobs = [step[token].logprob for step, token in zip(choice.logprobs, token_ids)]
    return Completion(token_ids, logprobs, "length" if choice.finish_reason == "length" else "stop")


def make_engine(config: Config, model_dir: str, batch_size: int):
    """Build the configured engine; returns ``(engine, tokenizer)``."""
    set_threads(config.model.threads)
    if config.sample.engine == "vllm":
        engine = VLLMEngine(model_dir, config.sample.tensor_parallel_size, config.sample.seed)
        return engine, load_tokenizer(model_dir)
    model, tokenizer = load_policy(model_dir)
    return TransformersEngine(model, tokenizer, batch_size), tokenizer


def check_prompt_lengths(model_dir: str, problems: list[Record], max_new_tokens: int, system_prompt: str | None, source: str | Path) -> None:
    """Refuse, before the model loads, a prompt that leaves no room in the model's context for a
    completion of ``max_new_tokens`` (only the tokenizer and the model's config are read)."""
    limit = context_length(model_dir)
    if limit is None:
        return
    tokenizer = load_tokenizer(model_dir)
    for problem in problems:
        length = len(prompt_token_ids(tokenizer, problem["prompt"], system_prompt))
        if length + max_new_tokens > limit:
            raise RecordError(
                f"{source}: prompt {problem['prompt_id']} is {length} tokens; with max_new_tokens={max_new_tokens} "
                f"it does not fit the model's context of {limit} tokens (shorten it, or lower max_new_tokens)"
            )


def sample_records(
    engine: Engine,
    tokenizer,
    problems: list[Record],
    params: SamplingParams,
    system_prompt: str | None,
    behavior_model: str,
) -> list[Record]:
    """Sample ``params.n`` completions for each problem; one record per completion."""
    prompts = [prompt_token_ids(tokenizer, problem["prompt"], system_prompt) for problem in problems]
    completions = engine.generate(prompts, params)
    records = []
    for problem, prompt_ids, choices in zip(problems, prompts, completions):
        for sample_index, choice in enumerate(choices):
            records.append(
                {
                    **problem,
                    "prompt_token_ids": prompt_ids,
                    "completion": tokenizer.decode(choice.token_ids, skip_special_tokens=True),
                    "completion_token_ids": choice.token_ids,
                    "behavior_logprobs": choice.logprobs,
                    "sample_index": sample_index,
                    "behavior_model": behavior_model,
                    "finish_reason": choice.finish_reason,
                }
            )
    return records


def collect_shards(shard_paths: list[str | Path], output_path: str | Path) -> dict:
    """Concatenate shard sample files, in the order given, into one sample file."""
    records = []
    for path in shard_paths:
        records += read_records(path, required=SAMPLE_FIELDS)
    write_records(output_path, records)
    summary = {"shards": len(shard_paths), "samples": len(records), "prompts": len({r["prompt_id"] for r in records})}
    log.info("collected %(samples)d samples for %(prompts)d prompts from %(shards)d shard(s)", summary)
    return summary


def select_iteration_prompts(problems: list[Record], iteration: int, size: int) -> list[Record]:
    """The ``size`` prompts of iteration ``iteration`` (1-based), cycling through the file."""
    if not problems:
        return []
    start = (iteration - 1) * size
    return [problems[(start + offset) % len(problems)] for offset in range(min(size, len(problems)))]


def shard_prompts(problems: list[Record], shard: int, shards: int) -> list[Record]:
    """Shard ``shard`` of ``shards`` contiguous, balanced parts, so collecting in shard order keeps prompt order."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    size, extra = divmod(len(problems), shards)
    start = shard * size + min(shard, extra)
    return problems[start : start + size + (shard < extra)]


def recorded_samples(location: str, problems: list[Record], samples_per_prompt: int) -> list[Record]:
    """The samples of ``problems`` from a file recorded earlier, in prompt and sample order.

    Used instead of sampling for iteration 1 (``sample.first_iteration_samples``): the data then
    comes from whichever model recorded it, as its ``behavior_model`` field says, and every
    prompt must have exactly ``samples_per_prompt`` samples, so the sample budget is the same as
    sampling would have spent.
    """
    from topr.storage import local_file

    wanted = {problem["prompt_id"] for problem in problems}
    by_prompt: dict[str, list[Record]] = {prompt_id: [] for prompt_id in wanted}
    with local_file(location) as path:
        for record in read_records(path, required=SAMPLE_FIELDS):
            if record["prompt_id"] in wanted:
                by_prompt[record["prompt_id"]].append(record)
    wrong = {prompt_id: len(found) for prompt_id, found in by_prompt.items() if len(found) != samples_per_prompt}
    if wrong:
        shown = ", ".join(f"{prompt_id}: {count}" for prompt_id, count in sorted(wrong.items())[:5])
        raise ValueError(
            f"{location}: sample.first_iteration_samples needs {samples_per_prompt} samples for each of "
            f"iteration 1's {len(wanted)} prompts; {len(wrong)} prompt(s) have another count ({shown})"
        )
    log.info("iteration 1 trains on %d recorded samples from %s", len(wanted) * samples_per_prompt, location)
    return [
        record
        for problem in problems
        for record in sorted(by_prompt[problem["prompt_id"]], key=lambda record: record["sample_index"])
    ]


def _counts(problems: list[Record], records: list[Record]) -> dict:
    return {
        "prompts": len(problems),
        "samples": len(records),
        "completion_tokens": sum(len(record["completion_token_ids"]) for record in records),
        "truncated": sum(record.get("finish_reason") == "length" for record in records),
    }


def run_sample(
    config: Config,
    model_dir: str,
    prompts_path: str | Path,
    output_path: str | Path,
    iteration: int = 1,
    shard: int = 0,
    shards: int = 1,
) -> dict:
    """Sample completions for shard ``shard`` of this iteration's training prompts; write the records.

    Each shard has its own seed (shard 0 keeps the unsharded one), so shards draw independent samples.
    Iteration 1 reads ``sample.first_iteration_samples`` instead, when it is set.
    """
    problems = read_records(prompts_path, required=PROMPT_FIELDS)
    problems = shard_prompts(select_iteration_prompts(problems, iteration, config.task.train_size), shard, shards)
    if iteration == 1 and config.sample.first_iteration_samples:
        records = recorded_samples(config.sample.first_iteration_samples, problems, config.sample.samples_per_prompt)
        write_records(output_path, records)
        return {**_counts(problems, records), "recorded": 1}
    check_prompt_lengths(model_dir, problems, config.sample.max_new_tokens, config.model.system_prompt, prompts_path)
    engine, tokenizer = make_engine(config, model_dir, config.sample.batch_size)
    params = SamplingParams.from_config(config.sample, seed_offset=iteration + SHARD_SEED_STRIDE * shard)
    started = time.perf_counter()
    records = sample_records(engine, tokenizer, problems, params, config.model.system_prompt, model_identity(model_dir))
    seconds = time.perf_counter() - started
    write_records(output_path, records)
    summary = {**_counts(problems, records), "recorded": 0, "seconds": seconds}
    summary["tokens_per_second"] = summary["completion_tokens"] / seconds if seconds else 0.0
    log.info("sampled %(samples)d completions for %(prompts)d prompts (%(tokens_per_second).0f tokens/s)", summary)
    return summary
