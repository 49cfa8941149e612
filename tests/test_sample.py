"""Tests for topr.sample with the tiny random Llama of conftest (real SmolLM2 tokenizer).

The behaviour log-probs are checked against an independent forward pass
(``completion_logprobs`` and, for top-k, the full logits), so a completion attached to the wrong
prompt, a wrong temperature or an unnormalised truncated distribution all show up as mismatches.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.testing import assert_close

from topr.config import load_config
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import load_policy, model_identity, prompt_token_ids
from topr.records import SAMPLE_FIELDS, RecordError, read_records, write_records
from topr.sample import (
    Completion,
    SamplingParams,
    TransformersEngine,
    VLLMEngine,
    make_engine,
    run_sample,
    sample_records,
    select_iteration_prompts,
)

from helpers import flatten_choices

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread beats synchronising several

QUESTIONS = ["Hi", "What is 12 plus 7? Show your steps please.", "Add 3 and 4."]


@pytest.fixture(scope="module")
def prompts(peaked_policy):
    _, tokenizer = peaked_policy
    ids = [prompt_token_ids(tokenizer, question) for question in QUESTIONS]
    assert len({len(p) for p in ids}) == len(ids)  # different lengths
    return ids


def fresh_logprobs(model, prompts, completions, temperature):
    batch = batch_prompt_completions(prompts, completions, pad_token_id=2)
    with torch.no_grad():
        return completion_logprobs(model, **batch, temperature=temperature)


def check_finish(choice: Completion, stop_ids, max_new_tokens):
    assert len(choice.token_ids) == len(choice.logprobs) >= 1
    stops = [i for i, token in enumerate(choice.token_ids) if token in stop_ids]
    if choice.finish_reason == "stop":
        assert stops == [len(choice.token_ids) - 1]
        assert len(choice.token_ids) <= max_new_tokens
    else:
        assert choice.finish_reason == "length"
        assert stops == []
        assert len(choice.token_ids) == max_new_tokens


# ----------------------------------------------------------------------------- TransformersEngine


def test_generate_n_per_prompt_in_prompt_order_with_behaviour_logprobs(peaked_policy, prompts):
    model, tokenizer = peaked_policy
    # batch_size 4 with n = 2: two prompts per batch, so two batches, one of them left-padded.
    engine = TransformersEngine(model, tokenizer, batch_size=4, progress=False)
    params = SamplingParams(n=2, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6, seed=3)
    results = engine.generate(prompts, params)

    assert len(results) == len(prompts)
    assert all(len(choices) == 2 for choices in results)
    for choices in results:
        for choice in choices:
            check_finish(choice, engine.stop_ids, 6)
    # Each completion's behaviour log-probs equal a fresh forward pass on *its own* prompt, at the
    # sampling temperature: completions swapped between prompts would not match.
    flat_prompts, flat = flatten_choices(prompts, results)
    expected = fresh_logprobs(model, flat_prompts, [c.token_ids for c in flat], temperature=0.7)
    for row, choice in enumerate(flat):
        assert_close(torch.tensor(choice.logprobs), expected[row, : len(choice.token_ids)], rtol=0, atol=2e-4)
    # At a different temperature they would not match.
    other = fresh_logprobs(model, flat_prompts, [c.token_ids for c in flat], temperature=1.0)
    assert not torch.allclose(torch.tensor(flat[0].logprobs), other[0, : len(flat[0].token_ids)], atol=1e-2)


def test_greedy_is_deterministic_order_independent_and_has_zero_logprobs(peaked_policy, prompts):
    model, tokenizer = peaked_policy
    engine = TransformersEngine(model, tokenizer, batch_size=2, progress=False)
    params = SamplingParams(n=1, temperature=0, max_new_tokens=5, seed=0)
    first = engine.generate(prompts, params)
    second = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=5, seed=99))
    assert [[c.token_ids for c in choices] for choices in first] == [
        [c.token_ids for c in choices] for choices in second
    ]
    for prompt, choices in zip(prompts, first):
        (choice,) = choices
        assert choice.logprobs == [0.0] * len(choice.token_ids)
        check_finish(choice, engine.stop_ids, 5)
        # Greedy tokens are the argmax of a full forward pass on this prompt alone.
        sequence = prompt + choice.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0]
        argmax = logits[len(prompt) - 1 : len(sequence) - 1].argmax(-1).tolist()
        assert choice.token_ids == argmax
    # The prompts alone, one at a time, give the same completions as the batch.
    alone = engine.generate([prompts[1]], params)
    assert alone[0][0].token_ids == first[1][0].token_ids


def test_top_k_logprobs_are_of_the_truncated_renormalised_distribution(peaked_policy, prompts):
    model, tokenizer = peaked_policy
    engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)
    temperature, k = 1.5, 5
    results = engine.generate(prompts[:2], SamplingParams(n=2, temperature=temperature, top_k=k, max_new_tokens=6, seed=1))
    flat_prompts, flat = flatten_choices(prompts[:2], results)
    untruncated = fresh_logprobs(model, flat_prompts, [c.token_ids for c in flat], temperature)
    strictly_higher = 0
    for row, (prompt, choice) in enumerate(zip(flat_prompts, flat)):
        behaviour = torch.tensor(choice.logprobs)
        full = untruncated[row, : len(choice.token_ids)]
        assert (behaviour >= full - 1e-5).all()
        strictly_higher += int((behaviour > full + 1e-3).sum())
        sequence = prompt + choice.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0].float() / temperature
        for t, token in enumerate(choice.token_ids):
            step = logits[len(prompt) - 1 + t]
            top = step.topk(k)
            assert token in top.indices.tolist()
            expected = step[token] - torch.logsumexp(top.values, dim=-1)
            assert behaviour[t].item() == pytest.approx(expected.item(), abs=2e-4)
    assert strictly_higher > 0


def test_stop_token_cuts_the_completion(peaked_policy, prompts):
    model, tokenizer = peaked_policy
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)
    free = engine.generate(prompts[:1], params)[0]
    # Random weights rarely produce <|im_end|>: make the sampled third token a stop token too.
    stop_token = free[0].token_ids[2]
    cut = free[0].token_ids.index(stop_token)
    engine.stop_ids = engine.stop_ids | {stop_token}
    stopped = engine.generate(prompts[:1], params)[0]

    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids == free[0].token_ids[: cut + 1]
    assert stopped[0].logprobs == pytest.approx(free[0].logprobs[: cut + 1], abs=1e-5)
    for choice in free:
        check_finish(choice, {2}, 8)
    for choice in stopped:
        check_finish(choice, engine.stop_ids, 8)


def test_seed_controls_the_samples(peaked_policy, prompts):
    model, tokenizer = peaked_policy
    engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)

    def tokens(seed):
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=seed)
        return [[c.token_ids for c in choices] for choices in engine.generate(prompts[:2], params)]

    first = tokens(11)
    torch.manual_seed(12345)  # global RNG state in between must not matter
    assert tokens(11) == first
    assert tokens(12) != first


def test_rows_that_join_a_running_batch_sample_what_they_would_alone(peaked_policy, prompts):
    """Continuous batching: rows finish at different steps and waiting rows take their places in
    the running batch (its cache left-padded to line up). Each sample draws from its own stream,
    so every completion, tokens and log-probs, equals the one sampled with no other row beside it."""
    model, tokenizer = peaked_policy
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    alone = TransformersEngine(model, tokenizer, batch_size=1, progress=False)
    free = alone.generate(prompts, params)
    # Stop tokens that end some rows after 2 or 4 tokens and leave others running to 8.
    alone.stop_ids = alone.stop_ids | {free[0][0].token_ids[1], free[1][1].token_ids[3]}
    shared = TransformersEngine(model, tokenizer, batch_size=4, progress=False)
    shared.stop_ids = alone.stop_ids

    expected, got = alone.generate(prompts, params), shared.generate(prompts, params)

    _, flat = flatten_choices(prompts, got)
    assert len({len(choice.token_ids) for choice in flat}) > 1  # rows left at different steps
    for expected_choices, choices in zip(expected, got):
        for reference, choice in zip(expected_choices, choices):
            assert choice.token_ids == reference.token_ids
            assert choice.finish_reason == reference.finish_reason
            assert choice.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
            check_finish(choice, shared.stop_ids, 8)
    flat_prompts, _ = flatten_choices(prompts, got)
    fresh = fresh_logprobs(model, flat_prompts, [c.token_ids for c in flat], temperature=1.0)
    for row, choice in enumerate(flat):
        assert_close(torch.tensor(choice.logprobs), fresh[row, : len(choice.token_ids)], rtol=0, atol=2e-4)


def test_a_model_with_sliding_window_layers_samples_in_batches_that_only_shrink(tiny_model_dir, prompts):
    """A sliding-window cache cannot be left-padded and joined: new rows wait for an empty batch."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=2)
    engine = TransformersEngine(model, tokenizer, batch_size=4, progress=False)
    results = engine.generate(prompts, params)
    alone = TransformersEngine(model, tokenizer, batch_size=1, progress=False).generate(prompts, params)
    assert [[c.token_ids for c in choices] for choices in results] == [[c.token_ids for c in choices] for choices in alone]
    flat_prompts, flat = flatten_choices(prompts, results)
    fresh = fresh_logprobs(model, flat_prompts, [c.token_ids for c in flat], temperature=1.0)
    for row, choice in enumerate(flat):
        check_finish(choice, engine.stop_ids, 6)
        assert_close(torch.tensor(choice.logprobs), fresh[row, : len(choice.token_ids)], rtol=0, atol=2e-4)


def test_a_model_with_non_finite_scores_stops_sampling_with_a_clear_error(nan_model_dir, prompts):
    model, tokenizer = load_policy(nan_model_dir, device=torch.device("cpu"))
    engine = TransformersEngine(model, tokenizer, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="not finite"):
        engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0))


# ----------------------------------------------------------------------------- records and stage


def test_sample_records_fields_and_pass_through(peaked_policy):
    model, tokenizer = peaked_policy
    engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)
    problems = [
        {"prompt_id": "a", "prompt": QUESTIONS[0], "reference": "1", "extra": {"x": 1}},
        {"prompt_id": "b", "prompt": QUESTIONS[2], "reference": "7", "extra": "kept"},
    ]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=4, seed=0)
    records = sample_records(engine, tokenizer, problems, params, "Be brief.", "sha256:abc")

    assert len(records) == 6
    assert [r["prompt_id"] for r in records] == ["a"] * 3 + ["b"] * 3
    assert [r["sample_index"] for r in records] == [0, 1, 2, 0, 1, 2]
    for record in records:
        problem = problems[0] if record["prompt_id"] == "a" else problems[1]
        assert set(SAMPLE_FIELDS) <= set(record)
        for field in problem:
            assert record[field] == problem[field]
        assert record["prompt_token_ids"] == prompt_token_ids(tokenizer, problem["prompt"], "Be brief.")
        assert len(record["completion_token_ids"]) == len(record["behavior_logprobs"]) >= 1
        assert record["completion"] == tokenizer.decode(record["completion_token_ids"], skip_special_tokens=True)
        assert record["behavior_model"] == "sha256:abc"
        assert record["finish_reason"] in ("stop", "length")
        assert all(isinstance(value, float) for value in record["behavior_logprobs"])


def test_select_iteration_prompts_slices_and_cycles():
    problems = [{"prompt_id": str(i)} for i in range(5)]

    def ids(iteration, size):
        return [p["prompt_id"] for p in select_iteration_prompts(problems, iteration, size)]

    assert ids(1, 2) == ["0", "1"]
    assert ids(2, 2) == ["2", "3"]
    assert ids(3, 2) == ["4", "0"]
    assert ids(4, 2) == ["1", "2"]
    assert ids(1, 5) == ["0", "1", "2", "3", "4"]
    assert ids(2, 3) == ["3", "4", "0"]
    assert ids(1, 9) == ["0", "1", "2", "3", "4"]  # never a prompt twice in one iteration
    assert select_iteration_prompts([], 1, 3) == []


def test_run_sample_writes_readable_records(tiny_model_dir, tmp_path):
    prompts_path = tmp_path / "prompts.jsonl"
    problems = [{"prompt_id": f"p{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)} for i in range(4)]
    write_records(prompts_path, problems)
    config = load_config(
        None, ["task.train_size=3", "sample.samples_per_prompt=2", "sample.max_new_tokens=8", "sample.temperature=1.0"]
    )
    output = tmp_path / "out" / "samples.jsonl"
    summary = run_sample(config, tiny_model_dir, prompts_path, output, iteration=2)

    records = read_records(output, required=SAMPLE_FIELDS)
    assert len(records) == 6
    # Iteration 2 of size 3 over 4 prompts: p3, then wraps to p0, p1.
    assert [r["prompt_id"] for r in records] == ["p3", "p3", "p0", "p0", "p1", "p1"]
    assert [r["sample_index"] for r in records] == [0, 1] * 3
    assert all(r["behavior_model"] == model_identity(tiny_model_dir) for r in records)
    assert all(r["behavior_model"].startswith("sha256:") for r in records)
    assert all(1 <= len(r["completion_token_ids"]) <= 8 for r in records)
    assert summary["prompts"] == 3
    assert summary["samples"] == 6
    assert summary["completion_tokens"] == sum(len(r["completion_token_ids"]) for r in records)
    assert summary["truncated"] == sum(r["finish_reason"] == "length" for r in records)
    assert [p.name for p in output.parent.iterdir()] == ["samples.jsonl"]


def test_a_prompt_too_long_for_the_context_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model has 512 positions: a prompt of ~600 tokens leaves no room for a completion."""
    prompts_path = tmp_path / "prompts.jsonl"
    write_records(prompts_path, [{"prompt_id": "short", "prompt": "What is 1 + 1?", "reference": "2"},
                                 {"prompt_id": "essay", "prompt": "seven " * 600, "reference": "7"}])  # fmt: skip
    config = load_config(None, ["task.train_size=2", "sample.max_new_tokens=8"])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("topr.sample.load_policy", no_model)
    with pytest.raises(RecordError, match=rf"{prompts_path}: prompt essay is 6\d\d tokens; with max_new_tokens=8 it does not fit the model's context of 512 tokens"):
        run_sample(config, tiny_model_dir, prompts_path, tmp_path / "samples.jsonl")
    assert not (tmp_path / "samples.jsonl").exists()


def test_vllm_engine_without_vllm_names_the_extra(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(RuntimeError, match=r"topr\[gpu\]"):
        VLLMEngine(tiny_model_dir)
    config = load_config(None, ["sample.engine=vllm"])
    with pytest.raises(RuntimeError, match=r"topr\[gpu\]"):
        make_engine(config, tiny_model_dir, batch_size=4)


class FakeVLLM:
    """A stand-in for the ``vllm`` package (which the main venv does not have) with vLLM's shapes.

    ``LLM.generate`` samples for real with the transformers engine on the same model, then
    returns vLLM-shaped outputs: one ``RequestOutput`` per prompt, ``n`` ``CompletionOutput``s each,
    and per generated token a ``{token_id: Logprob}`` dict, as vLLM returns for ``logprobs=0``.
    ``on_cpu`` is what ``vllm.platforms.current_platform.is_cpu()`` says; a request without a
    seed draws from this process's torch generator, as vLLM's in-process CPU engine does.
    """

    def __init__(self, on_cpu: bool = False):
        from types import SimpleNamespace

        self.made: dict = {}
        self.sampling: dict = {}
        self.environment: dict = {}
        self.closed: list[str] = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.made = kwargs
                fake.environment = dict(os.environ)
                model, tokenizer = load_policy(kwargs["model"])
                self.engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)
                self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: fake.closed.append("engine")))
                torch.set_num_threads = lambda threads: None  # as vLLM's CPU worker does

            def generate(self, prompts, sampling, use_tqdm=True):
                params = SamplingParams(
                    n=sampling["n"], temperature=sampling["temperature"], top_k=max(sampling["top_k"], 0),
                    top_p=sampling["top_p"], max_new_tokens=sampling["max_tokens"],
                    seed=sampling.get("seed", torch.initial_seed()),
                )  # fmt: skip
                results = self.engine.generate([p["prompt_token_ids"] for p in prompts], params)
                return [
                    SimpleNamespace(outputs=[
                        SimpleNamespace(
                            token_ids=tuple(c.token_ids),
                            logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(c.token_ids, c.logprobs)],
                            finish_reason="length" if c.finish_reason == "length" else "stop",
                        )
                        for c in choices
                    ])
                    for choices in results
                ]  # fmt: skip

        def sampling_params(**kwargs):
            fake.sampling = kwargs
            return kwargs

        self.module = SimpleNamespace(LLM=LLM, SamplingParams=sampling_params)
        self.inputs = SimpleNamespace(TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids})
        self.platforms = SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: on_cpu))
        self.parallel_state = SimpleNamespace(cleanup_dist_env_and_memory=lambda: fake.closed.append("distributed"))

    def install(self, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.inputs", self.inputs)
        monkeypatch.setitem(sys.modules, "vllm.platforms", self.platforms)
        monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", self.parallel_state)
        monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # whatever the fake does to it


def write_questions(path) -> None:
    write_records(path, [{"prompt_id": f"p{i}", "prompt": q, "reference": "7"} for i, q in enumerate(QUESTIONS)])


SAMPLING_OVERRIDES = ["task.train_size=3", "sample.samples_per_prompt=2", "sample.max_new_tokens=6", "sample.top_k=5"]


def test_vllm_engine_asks_for_processed_logprobs_and_makes_the_same_records(monkeypatch, tmp_path, tiny_model_dir):
    fake = FakeVLLM()
    fake.install(monkeypatch)
    write_questions(tmp_path / "prompts.jsonl")

    run_sample(load_config(None, [*SAMPLING_OVERRIDES, "sample.engine=vllm", "sample.tensor_parallel_size=2"]), tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "v.jsonl")
    run_sample(load_config(None, SAMPLING_OVERRIDES), tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "t.jsonl")

    # log mu must be that of the distribution sampled from (temperature, top-k, top-p applied):
    # vLLM returns raw log-probs unless asked for processed ones.
    assert fake.made == {"model": tiny_model_dir, "tensor_parallel_size": 2, "seed": 0, "logprobs_mode": "processed_logprobs", "load_format": "safetensors"}
    assert fake.sampling == {"n": 2, "temperature": 0.5, "top_k": 5, "top_p": 1.0, "max_tokens": 6, "seed": 1, "logprobs": 0, "detokenize": False}
    from_vllm, from_transformers = read_records(tmp_path / "v.jsonl"), read_records(tmp_path / "t.jsonl")
    assert from_vllm == from_transformers  # same samples, same fields, same order, same log-probs


def test_vllm_on_cpu_runs_in_process_in_float32_seeded_through_torch(monkeypatch, tmp_path, tiny_model_dir):
    """vLLM's CPU build: an in-process engine (no spawned workers), float32, eager, a bounded KV
    cache, and each call seeded through this process's torch generator (a per-request seed fails
    on CPU); the process's environment and ``torch.set_num_threads`` are left as they were."""
    fake = FakeVLLM(on_cpu=True)
    fake.install(monkeypatch)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    write_questions(tmp_path / "prompts.jsonl")
    environment, set_num_threads = dict(os.environ), torch.set_num_threads

    config = load_config(None, [*SAMPLING_OVERRIDES, "sample.engine=vllm", "sample.cpu_kv_cache_gib=1.5"])
    run_sample(config, tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "v.jsonl")
    run_sample(load_config(None, SAMPLING_OVERRIDES), tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "t.jsonl")

    assert fake.made == {
        "model": tiny_model_dir, "tensor_parallel_size": 1, "seed": 0, "logprobs_mode": "processed_logprobs",
        "load_format": "safetensors", "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 3 * 2**29,
    }  # fmt: skip
    assert fake.environment["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and fake.environment["OMP_NUM_THREADS"]
    assert "seed" not in fake.sampling
    assert dict(os.environ) == environment and torch.set_num_threads is set_num_threads
    assert fake.closed == ["engine", "distributed"]  # the stage closes its engine: a process that goes on gets its memory back
    assert read_records(tmp_path / "v.jsonl") == read_records(tmp_path / "t.jsonl")  # seeded with sample.seed + iteration


def test_vllm_greedy_records_zero_logprobs_like_the_transformers_engine(monkeypatch, tiny_model_dir, prompts):
    fake = FakeVLLM(on_cpu=True)
    fake.install(monkeypatch)
    engine = VLLMEngine(tiny_model_dir)
    (choice,) = engine.generate(prompts[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=4))[0]
    assert fake.sampling["logprobs"] is None and choice.logprobs == [0.0] * len(choice.token_ids)


def test_vllm_top_k_zero_means_no_truncation(monkeypatch, tiny_model_dir):
    fake = FakeVLLM()
    fake.install(monkeypatch)
    engine = VLLMEngine(tiny_model_dir)
    engine.generate([[1, 2, 3]], SamplingParams(n=1, temperature=1.0, top_k=0, max_new_tokens=2))
    assert fake.sampling["top_k"] == -1  # vLLM's "off"; 0 is rejected by older vLLM releases


def test_iteration_one_reads_recorded_samples_in_prompt_order_instead_of_sampling(tmp_path):
    prompts_path, recorded = tmp_path / "prompts.jsonl", tmp_path / "recorded.jsonl"
    write_records(prompts_path, [{"prompt_id": f"p{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1)} for i in range(3)])
    # Recorded for p2 and p0 (and p1 of a later iteration), out of order, by an older model.
    rows = [(prompt_id, index) for prompt_id in ("p2", "p0", "p1") for index in (1, 0)]
    write_records(recorded, [{**sample_record(prompt_id, index), "behavior_model": "sha256:older"} for prompt_id, index in rows])
    config = load_config(None, ["task.train_size=2", "sample.samples_per_prompt=2", f"sample.first_iteration_samples={recorded}"])

    # No model is needed: the path does not exist, and nothing is loaded.
    summary = run_sample(config, str(tmp_path / "no-model"), prompts_path, tmp_path / "samples.jsonl", iteration=1)

    records = read_records(tmp_path / "samples.jsonl", required=SAMPLE_FIELDS)
    assert [(r["prompt_id"], r["sample_index"]) for r in records] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    assert {r["behavior_model"] for r in records} == {"sha256:older"}
    assert summary["samples"] == 4 and summary["prompts"] == 2


def test_recorded_samples_with_another_budget_name_the_file_and_prompts(tmp_path):
    prompts_path, recorded = tmp_path / "prompts.jsonl", tmp_path / "recorded.jsonl"
    write_records(prompts_path, [{"prompt_id": f"p{i}", "prompt": "q", "reference": "1"} for i in range(2)])
    write_records(recorded, [sample_record("p0", 0), sample_record("p0", 1), sample_record("p1", 0)])
    config = load_config(None, ["task.train_size=2", "sample.samples_per_prompt=2", f"sample.first_iteration_samples={recorded}"])

    with pytest.raises(ValueError, match=r"recorded.jsonl.*needs 2 samples.*1 prompt\(s\).*p1: 1"):
        run_sample(config, "unused", prompts_path, tmp_path / "samples.jsonl", iteration=1)
    assert not (tmp_path / "samples.jsonl").exists()


def sample_record(prompt_id: str, sample_index: int) -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": "q",
        "reference": "1",
        "prompt_token_ids": [1, 2],
        "completion": "Answer: 1",
        "completion_token_ids": [3, 4],
        "behavior_logprobs": [-0.1, -0.2],
        "sample_index": sample_index,
    }
