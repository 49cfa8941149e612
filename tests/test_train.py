"""Tests for topr.train.run_train on hand-built curated sets and the tiny random Llama of conftest.

The completions are fixed token ids; their behaviour log-probs are computed by the tiny model
itself at the sampling temperature (1.0 here), so the data is on-policy unless a test shifts them.
The learning rate is 3e-3: Adam's first steps move every weight by about the learning rate, and
at 1e-2 (half the initialisation scale of this model) a few steps overshoot in every direction.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from topr import distributed
from topr import train as train_module
from topr.checkpoint import TrainCheckpoint
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import PROVENANCE_FILE, load_policy, model_identity, prompt_token_ids
from topr.objectives import NEGATIVE_RATIO_STATS
from topr.records import RecordError, write_records
from topr.sample import SamplingParams, TransformersEngine, sample_records
from topr.train import NonFiniteStepError, check_train_record, global_batches, launch_train, run_train, shared_token_positions

from helpers import train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread beats synchronising several

TEMPERATURE = 1.0


def sequence_logprobs(model, records) -> torch.Tensor:
    """Sum of log π over each record's completion tokens, at TEMPERATURE."""
    batch = batch_prompt_completions(
        [r["prompt_token_ids"] for r in records], [r["completion_token_ids"] for r in records], pad_token_id=2
    )
    with torch.no_grad():
        return completion_logprobs(model, **batch, temperature=TEMPERATURE).sum(dim=1)


def token_logprobs(model, prompt, completion) -> list[float]:
    batch = batch_prompt_completions([prompt], [completion], pad_token_id=2)
    with torch.no_grad():
        return completion_logprobs(model, **batch, temperature=TEMPERATURE)[0].tolist()


def make_records(policy, specs, behavior_shift=0.0):
    """One record per (question, completion token ids, reward); μ = π + behavior_shift per token."""
    model, tokenizer = policy
    records = []
    for index, (question, completion, reward) in enumerate(specs):
        prompt = prompt_token_ids(tokenizer, question)
        records.append(
            {
                "prompt_id": f"q{index}",
                "prompt": question,
                "reference": "0",
                "prompt_token_ids": prompt,
                "completion_token_ids": completion,
                "behavior_logprobs": [v + behavior_shift for v in token_logprobs(model, prompt, completion)],
                "reward": reward,
            }
        )
    return records


def config(*overrides):
    return train_config(f"sample.temperature={TEMPERATURE}", "train.batch_size=4", "train.batch_order=shuffle", "train.epochs=1", *overrides)


def train(tmp_path, model_dir, records, cfg, name="trained"):
    data = tmp_path / f"{name}.jsonl"
    write_records(data, records)
    steps = []
    summary = run_train(cfg, model_dir, data, tmp_path / name, on_step=lambda step, stats: steps.append((step, stats)))
    return summary, steps, tmp_path / name


POSITIVES = [("What is 2 + 2?", [1000, 1001, 1002], 1.0), ("Add 5 and 6.", [2000, 2001, 2002, 2003], 1.0)]
NEGATIVES = [("What is 3 + 9?", [3000, 3001, 3002], -1.0), ("Add 8 and 1.", [4000, 4001], -1.0)]


# ----------------------------------------------------------------------------- learning


def test_training_raises_positives_lowers_negatives_and_saves(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES)
    before = sequence_logprobs(policy[0], records)
    summary, steps, output = train(tmp_path, tiny_model_dir, records, config("train.epochs=4"))

    # 4 records in one micro-batch, 4 epochs, no accumulation: 4 optimizer steps.
    assert summary["steps"] == 4
    assert summary["examples"] == 4
    assert [step for step, _ in steps] == [0, 1, 2, 3]
    for _, stats in steps:
        assert {"loss", "grad_norm"} <= set(stats)
        assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert summary["final_loss"] == steps[-1][1]["loss"]

    trained, tokenizer = load_policy(str(output), device=torch.device("cpu"))
    after = sequence_logprobs(trained, records)
    assert (after[:2] > before[:2] + 0.1).all(), (before, after)  # positives rise
    assert (after[2:] < before[2:] - 0.1).all(), (before, after)  # negatives fall

    names = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", PROVENANCE_FILE} <= names
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["parent"] == model_identity(tiny_model_dir)
    parent_digest = json.loads((Path(tiny_model_dir) / PROVENANCE_FILE).read_text())["weights_sha256"]
    assert provenance["parent"] == f"sha256:{parent_digest}"
    assert provenance["weights_sha256"] == summary["weights_sha256"] != parent_digest
    assert provenance["training_data"] == str(tmp_path / "trained.jsonl")
    assert tokenizer.pad_token_id == policy[1].pad_token_id
    # Nothing else was written beside the output and the data file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained", "trained.jsonl"]


def train_and_measure(policy, tmp_path, model_dir, records, objective):
    """One training step; returns its stats and the change of each record's log π."""
    before = sequence_logprobs(policy[0], records)
    summary, steps, output = train(
        tmp_path, model_dir, records, config(f"train.objective={objective}"), name=objective
    )
    assert summary["steps"] == 1
    trained, _ = load_policy(str(output), device=torch.device("cpu"))
    return steps[0][1], sequence_logprobs(trained, records) - before


# μ = π · e^10 per token: the sequence ratio π/μ is e^-20 or less (the clamp), so TOPR's weight on
# these negatives is ~2e-9. (With e^5 per token the ratio of a 2-token completion is e^-10, whose
# gradient, though 1e-4 of REINFORCE's, is still far above Adam's eps of 1e-8; Adam rescales it
# to a full-size step, which would hide the taper in the parameters.)
FAR_BELOW_BEHAVIOUR = 10.0


def test_topr_gives_far_off_negatives_no_gradient_while_reinforce_pushes_them(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, NEGATIVES, behavior_shift=FAR_BELOW_BEHAVIOUR)
    topr_stats, topr_change = train_and_measure(policy, tmp_path, tiny_model_dir, records, "topr")
    reinforce_stats, reinforce_change = train_and_measure(policy, tmp_path, tiny_model_dir, records, "reinforce")

    assert reinforce_stats["mean_weight_negative"] == pytest.approx(1.0)
    assert topr_stats["mean_weight_negative"] < 1e-8
    assert reinforce_stats["grad_norm"] > 0.1
    assert topr_stats["grad_norm"] < 1e-6 * reinforce_stats["grad_norm"]
    # REINFORCE pushes the negatives down; TOPR (nearly) leaves them alone.
    assert (reinforce_change < -0.2).all(), reinforce_change
    assert topr_change.abs().max() < 0.1 * reinforce_change.abs().min(), (topr_change, reinforce_change)


def test_topr_with_a_positive_trains_like_rejection_fine_tuning(policy, tiny_model_dir, tmp_path):
    """Beside a positive, a far-off negative changes nothing under TOPR (as if dropped, like RFT)."""
    records = make_records(policy, POSITIVES[:1]) + make_records(
        policy, NEGATIVES, behavior_shift=FAR_BELOW_BEHAVIOUR
    )
    changes = {
        objective: train_and_measure(policy, tmp_path, tiny_model_dir, records, objective)[1]
        for objective in ("topr", "rft", "reinforce")
    }
    assert (changes["topr"][:1] > 0.2).all()  # the positive rises
    torch.testing.assert_close(changes["topr"], changes["rft"], rtol=0, atol=1e-3)
    assert (changes["reinforce"][1:] < changes["topr"][1:] - 0.2).all(), changes


def test_topr_on_policy_negatives_get_the_full_gradient(policy, tiny_model_dir, tmp_path):
    """Control for the test above: with μ = π the ratio is 1 and TOPR equals REINFORCE."""
    records = make_records(policy, NEGATIVES)
    norms = {}
    for objective in ("topr", "reinforce"):
        _, steps, _ = train(tmp_path, tiny_model_dir, records, config(f"train.objective={objective}"), name=objective)
        norms[objective] = steps[0][1]
    assert norms["topr"]["mean_weight_negative"] == pytest.approx(1.0, abs=1e-4)
    assert norms["topr"]["grad_norm"] == pytest.approx(norms["reinforce"]["grad_norm"], rel=1e-3)
    assert norms["topr"]["loss"] == pytest.approx(norms["reinforce"]["loss"], rel=1e-4)


def test_policy_is_evaluated_at_the_sampling_temperature(policy, tiny_model_dir, tmp_path):
    """Data sampled at temperature 0.5 by the policy itself has ratio π/μ = 1 at step 0."""
    model, tokenizer = policy
    records = []
    for index, (question, completion, reward) in enumerate(POSITIVES + NEGATIVES):
        prompt = prompt_token_ids(tokenizer, question)
        batch = batch_prompt_completions([prompt], [completion], pad_token_id=2)
        with torch.no_grad():
            mu = completion_logprobs(model, **batch, temperature=0.5)[0].tolist()
        records.append(
            {"prompt_id": f"q{index}", "prompt_token_ids": prompt, "completion_token_ids": completion,
             "behavior_logprobs": mu, "reward": reward}
        )
    stats = {}
    for name, overrides in {
        "sampling": ["sample.temperature=0.5"],
        "explicit": ["sample.temperature=1.0", "train.policy_temperature=0.5"],
        "other": ["sample.temperature=0.5", "train.policy_temperature=1.0"],
    }.items():
        _, steps, _ = train(tmp_path, tiny_model_dir, records, config(*overrides), name=name)
        stats[name] = steps[0][1]
    for name in ("sampling", "explicit"):
        assert abs(stats[name]["log_ratio_mean"]) < 1e-3, stats[name]
        assert stats[name]["ratio_p50"] == pytest.approx(1.0, abs=1e-3)
    assert abs(stats["other"]["log_ratio_mean"]) > 0.03  # near-uniform random model: small but clear


def test_first_step_on_data_the_model_just_sampled_has_ratio_one(tiny_model_dir, tmp_path, caplog):
    """Sampled at temperature 0.5 by the float32 model itself, π evaluated at the sampling temperature:
    log π − log μ is 0 on every token up to float rounding, and nothing is reported as wrong."""
    # A copy of its own: the engine sets the model's generation config.
    model, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    engine = TransformersEngine(model, tokenizer, batch_size=8, progress=False)
    questions = [question for question, _, _ in POSITIVES + NEGATIVES]
    problems = [{"prompt_id": f"p{i}", "prompt": question, "reference": "0"} for i, question in enumerate(questions)]
    params = SamplingParams(n=2, temperature=0.5, top_k=0, top_p=1.0, max_new_tokens=6, seed=0)
    records = sample_records(engine, tokenizer, problems, params, None, model_identity(tiny_model_dir))
    for index, record in enumerate(records):
        record.update(reward=1.0 if index % 2 else -1.0, correct=bool(index % 2))
    with caplog.at_level(logging.WARNING, logger="topr.train"):
        summary, steps, _ = train(tmp_path, tiny_model_dir, records, config("sample.temperature=0.5", "train.batch_size=8"))
    assert abs(summary["first_step_log_ratio_per_token"]) < 1e-3
    first = steps[0][1]
    assert first["log_ratio_per_token"] == pytest.approx(0.0, abs=1e-3)
    assert first["ratio_negative_p50"] == pytest.approx(1.0, abs=1e-3)
    assert "sampled itself" not in caplog.text


def test_a_warning_when_the_models_own_data_starts_off_policy(policy, tiny_model_dir, tmp_path, caplog):
    """μ = π · e^0.05 per token: fine for data from another model, suspect for the model's own."""
    records = make_records(policy, POSITIVES + NEGATIVES, behavior_shift=0.05)
    itself, another = model_identity(tiny_model_dir), "sha256:another-model"
    warnings = {}
    for sampler in (itself, another):
        caplog.clear()
        for record in records:
            record["behavior_model"] = sampler
        with caplog.at_level(logging.WARNING, logger="topr.train"):
            summary, _, _ = train(tmp_path, tiny_model_dir, records, config(), name=sampler[-5:])
        assert summary["first_step_log_ratio_per_token"] == pytest.approx(-0.05, abs=1e-4)
        warnings[sampler] = caplog.text
    assert "sampled itself" in warnings[itself] and "-0.0500" in warnings[itself]
    assert "sampled itself" not in warnings[another]


# ----------------------------------------------------------------------------- options


def test_learning_rate_follows_the_schedule_and_is_the_one_used(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES + POSITIVES[:1])
    _, steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=1", "train.warmup_steps=2", "train.lr_schedule=linear")
    )
    # get_scheduler("linear") over 5 steps, 2 of warm-up: 0, 1/2, then from 1 down by thirds.
    assert [stats["learning_rate"] for _, stats in steps] == pytest.approx([0.0, 1.5e-3, 3e-3, 2e-3, 1e-3])

    # A single step inside the warm-up runs at learning rate 0: the weights stay as they were.
    summary, steps, output = train(tmp_path, tiny_model_dir, records[:4], config("train.warmup_steps=1"), name="warm")
    assert summary["steps"] == 1 and steps[0][1]["learning_rate"] == 0.0 and steps[0][1]["grad_norm"] > 0
    trained, initial = load_file(output / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    assert all(torch.equal(trained[name], initial[name]) for name in initial)


def test_constant_length_normalization_divides_by_max_new_tokens(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES)
    rewards = torch.tensor([r["reward"] for r in records])
    lengths = torch.tensor([len(r["completion_token_ids"]) for r in records])
    logprob_sums = sequence_logprobs(policy[0], records)
    losses = {}
    for normalization in ("sequence", "constant"):
        cfg = config(f"train.length_normalization={normalization}", "sample.max_new_tokens=8")
        losses[normalization] = train(tmp_path, tiny_model_dir, records, cfg, name=normalization)[1][0][1]["loss"]
    # On-policy, every weight is 1: loss = -mean(A · Σ log π / L).
    assert losses["constant"] == pytest.approx(-(rewards * logprob_sums).mean().item() / 8, rel=1e-4)
    assert losses["sequence"] == pytest.approx(-(rewards * logprob_sums / lengths).mean().item(), rel=1e-4)


def reward_records(rewards):
    return [{"prompt_id": f"q{index}", "reward": reward} for index, reward in enumerate(rewards)]


@pytest.mark.parametrize(
    "count, positives, size, epochs", [(89, 10, 8, 3), (30, 7, 4, 2), (12, 6, 5, 3), (9, 0, 4, 2), (9, 9, 4, 1)]
)
def test_stratified_batches_spread_the_positives_evenly(count, positives, size, epochs):
    records = reward_records([1.0] * positives + [-1.0] * (count - positives))
    batches = global_batches(records, size, epochs, seed=5, order="stratified")

    order = [r["prompt_id"] for batch in batches for r in batch]
    for epoch in range(epochs):  # every record once per epoch, epochs back to back
        assert sorted(order[epoch * count : (epoch + 1) * count]) == sorted(r["prompt_id"] for r in records)
    assert all(len(batch) == size for batch in batches[:-1]) and len(order) == count * epochs
    share = positives * size / count
    for batch in batches:
        if len(batch) == size:
            assert sum(r["reward"] > 0 for r in batch) in {math.floor(share), math.ceil(share)}, batches
    assert global_batches(records, size, epochs, seed=5, order="stratified") == batches  # deterministic
    if 0 < positives < count:
        assert global_batches(records, size, epochs, seed=6, order="stratified") != batches


def test_stratified_batches_count_positives_against_the_baseline_and_shuffle_inside_a_batch():
    records = reward_records([0.5] * 3 + [0.0] * 9)  # baseline 0.5: A = 0 counts as positive
    batches = global_batches(records, 4, epochs=4, seed=1, order="stratified", baseline=0.5)
    assert all(sum(r["reward"] == 0.5 for r in batch) == 1 for batch in batches)
    places = {next(i for i, r in enumerate(batch) if r["reward"] == 0.5) for batch in batches}
    assert len(places) > 1  # the positive is not always in the same place of its batch


def test_shuffled_batches_are_as_before():
    """The default order is unchanged, so a seed gives the batches that earlier runs had."""
    records = reward_records([1.0, -1.0] * 5 + [1.0])
    expected = []
    for epoch in range(3):
        epoch_order = list(range(len(records)))
        random.Random(4 * 7919 + epoch).shuffle(epoch_order)
        expected += epoch_order
    batches = global_batches(records, 4, 3, seed=4)
    assert [r["prompt_id"] for batch in batches for r in batch] == [f"q{i}" for i in expected]


@pytest.mark.parametrize("count, positives, steps, epochs", [(89, 10, 3, 2), (244, 27, 3, 1), (9, 2, 4, 3), (20, 10, 3, 1), (2, 1, 3, 2)])
@pytest.mark.parametrize("order", ["shuffle", "stratified"])
def test_a_fixed_number_of_steps_per_epoch_whatever_the_sets_size(count, positives, steps, epochs, order):
    records = reward_records([1.0] * positives + [-1.0] * (count - positives))
    batches = global_batches(records, 32, epochs, seed=2, order=order, steps_per_epoch=steps)

    per_epoch = min(steps, count)
    assert len(batches) == per_epoch * epochs
    assert {len(batch) for batch in batches} <= {count // per_epoch, math.ceil(count / per_epoch)}
    order_ids = [r["prompt_id"] for batch in batches for r in batch]
    for epoch in range(epochs):  # every record once per epoch; no batch spans two epochs
        epoch_batches = batches[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(r["prompt_id"] for batch in epoch_batches for r in batch) == sorted(r["prompt_id"] for r in records)
    assert len(order_ids) == count * epochs
    if order == "stratified":
        for batch in batches:
            share = positives * len(batch) / count
            assert sum(r["reward"] > 0 for r in batch) in {math.floor(share), math.ceil(share)}


def test_training_takes_the_steps_per_epoch_asked_for(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES + POSITIVES[:1])  # 5 records
    summary, steps, _ = train(tmp_path, tiny_model_dir, records, config("train.batch_size=1", "train.steps_per_epoch=2", "train.epochs=2"))
    assert summary["steps"] == 4  # batch_size × gradient_accumulation (1) would give 10
    assert [stats["sequences"] for _, stats in steps] == [2, 3, 2, 3]


def test_training_takes_the_batch_order_asked_for(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES * 3)
    positives = {
        order: [sum(r["reward"] >= 0 for r in batch) for batch in global_batches(records, 2, 2, seed=0, order=order)]
        for order in ("shuffle", "stratified")
    }
    assert positives["stratified"] != positives["shuffle"]  # so the steps show which order was taken
    cfg = config("train.batch_order=stratified", "train.batch_size=2", "train.epochs=2")
    _, steps, _ = train(tmp_path, tiny_model_dir, records, cfg)
    assert [stats["positive_count"] for _, stats in steps] == positives["stratified"]


# ----------------------------------------------------------------------------- negatives_skip_shared_tokens


def text_ids(tokenizer, text, eos=True):
    """The token ids of ``text``, then the end-of-sequence token if ``eos``."""
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])


@pytest.mark.parametrize(
    "text, finish_reason, shared",
    [
        ("So 5 + 7 = 12.\nAnswer: 12", "stop", ["Answer", ":", "<eos>"]),
        ("Answer: 3, no.\n**Answer**: 12", "stop", ["Answer", "**:", "<eos>"]),  # the last marker; a token overlapping it
        ("The answer: 7", "stop", [" answer", ":", "<eos>"]),
        ("So it is 12.", "stop", ["<eos>"]),
        ("So 5 + 7 = 12.\nAnswer: 1", "length", ["Answer", ":"]),
        ("So it is 12 and", "length", []),
    ],
)
def test_shared_tokens_are_the_last_answer_markers_and_the_end_of_sequence(policy, text, finish_reason, shared):
    tokenizer = policy[1]
    ids = text_ids(tokenizer, text, eos=finish_reason == "stop")
    positions = shared_token_positions({"completion_token_ids": ids, "finish_reason": finish_reason}, tokenizer)
    assert positions == sorted(positions)
    decoded = [tokenizer.decode([ids[position]]) for position in positions]
    assert decoded == [tokenizer.eos_token if token == "<eos>" else token for token in shared]


def test_negatives_skip_shared_tokens_leaves_them_out_of_the_negatives_loss_only(policy, tiny_model_dir, tmp_path):
    model, tokenizer = policy
    texts = [
        ("What is 5 + 7?", "5 + 7 = 12.\nAnswer: 12", 1.0),
        ("What is 3 + 9?", "3 + 9 = 11.\nAnswer: 11", -1.0),
        ("Add 8 and 1.", "It is 9", -1.0),
    ]
    records = make_records(policy, [(question, text_ids(tokenizer, text), reward) for question, text, reward in texts])
    for record in records:
        record["finish_reason"] = "stop"
    steps = {
        skip: train(tmp_path, tiny_model_dir, records, config(f"train.negatives_skip_shared_tokens={skip}"), name=str(skip))[1][0][1]
        for skip in (False, True)
    }
    # On-policy every weight is 1: loss = -mean(A · Σ log π over the tokens kept / |y|), |y| counting every token.
    expected = {}
    for skip in (False, True):
        terms = []
        for record in records:
            logprobs = token_logprobs(model, record["prompt_token_ids"], record["completion_token_ids"])
            left_out = shared_token_positions(record, tokenizer) if skip and record["reward"] < 0 else []
            kept = sum(value for position, value in enumerate(logprobs) if position not in left_out)
            terms.append(record["reward"] * kept / len(logprobs))
        expected[skip] = -sum(terms) / len(terms)
    assert expected[True] != pytest.approx(expected[False], rel=1e-2)
    assert steps[True]["loss"] == pytest.approx(expected[True], rel=1e-4)
    assert steps[False]["loss"] == pytest.approx(expected[False], rel=1e-4)
    # The marker's two tokens and the end of sequence in one negative, the end of sequence in the other.
    assert (steps[True]["excluded_negative_tokens"], steps[True]["excluded_tokens_per_negative"]) == (4.0, 2.0)
    assert not {"excluded_negative_tokens", "excluded_tokens_per_negative"} & set(steps[False])
    assert steps[True]["ratio_negative_p50"] == steps[False]["ratio_negative_p50"]


# ----------------------------------------------------------------------------- steps and accumulation


def test_a_steps_ratio_quantiles_are_over_all_its_negatives_and_its_counts_are_sums(policy, tiny_model_dir, tmp_path):
    """Two micro-batches of 4 in one step (sorted by length): the median ratio on negatives is the
    median over the step's 6 negatives, not the mean of the micro-batches' medians."""
    lengths = [1, 2, 3, 4, 5, 6]
    negatives = [(f"Question {n}?", list(range(3000, 3000 + n)), -1.0) for n in lengths]
    shift = 0.5  # log μ = log π + 0.5 per token, so at step 0 a negative's ratio is exp(-0.5 |y|)
    records = make_records(policy, POSITIVES + negatives, behavior_shift=shift)
    cfg = config("train.batch_size=4", "train.gradient_accumulation=2", "train.learning_rate=1e-9")
    _, steps, _ = train(tmp_path, tiny_model_dir, records, cfg)

    (_, first), = steps
    expected = torch.quantile(torch.tensor([math.exp(-shift * n) for n in lengths], dtype=torch.float64), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert [first[f"ratio_negative_p{q}"] for q in (10, 50, 90)] == pytest.approx(expected.tolist(), rel=1e-4)
    assert (first["positive_count"], first["negative_count"], first["sequences"]) == (2, 6, 8)


def test_gradient_accumulation_matches_a_larger_batch(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES)
    accumulated, accumulated_steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=2", "train.gradient_accumulation=2"), name="acc"
    )
    large, large_steps, _ = train(tmp_path, tiny_model_dir, records, config("train.batch_size=4"), name="large")
    assert accumulated["steps"] == large["steps"] == 1
    assert [s for s, _ in accumulated_steps] == [s for s, _ in large_steps] == [0]
    # Same records in the step, the loss averaged over micro-batches: same loss and gradient.
    assert accumulated_steps[0][1]["loss"] == pytest.approx(large_steps[0][1]["loss"], rel=1e-4, abs=1e-6)
    assert accumulated_steps[0][1]["grad_norm"] == pytest.approx(large_steps[0][1]["grad_norm"], rel=1e-3)


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_weights(policy, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from topr.models import load_policy
    from topr.train import training_scorer

    model, _ = load_policy(tiny_model_dir, device=torch.device("cpu"))
    scorer = training_scorer(model, config("train.gradient_checkpointing=true"), 1, torch.device("cpu"), None)
    assert model.is_gradient_checkpointing and not scorer.share_prefix

    records = make_records(policy, POSITIVES + NEGATIVES)
    kept, kept_steps, kept_dir = train(tmp_path, tiny_model_dir, records, config("train.epochs=2", "train.batch_size=2"), name="kept")
    recomputed, recomputed_steps, recomputed_dir = train(
        tmp_path, tiny_model_dir, records, config("train.epochs=2", "train.batch_size=2", "train.gradient_checkpointing=true"), name="recomputed"
    )
    assert kept["steps"] == recomputed["steps"] >= 2
    for (_, plain), (_, checkpointed) in zip(kept_steps, recomputed_steps, strict=True):
        assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
        assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    # The weights moved the same way: their changes differ by float rounding only (< 0.1% of the change).
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    plain, checkpointed = load_file(kept_dir / "model.safetensors"), load_file(recomputed_dir / "model.safetensors")
    moved = torch.cat([(plain[name] - start[name]).flatten() for name in start])
    apart = torch.cat([(checkpointed[name] - plain[name]).flatten() for name in start])
    assert moved.norm() > 0 and apart.norm() < 1e-3 * moved.norm()


def test_a_short_micro_batch_counts_its_sequences_not_as_a_whole_micro_batch(policy, tiny_model_dir, tmp_path):
    """3 records as micro-batches of 2 and 1: the step's loss and gradient are the mean over the
    3 sequences, as in one micro-batch of 3 (not the mean of the two micro-batch means)."""
    records = make_records(policy, POSITIVES + NEGATIVES[:1])
    split, split_steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=2", "train.gradient_accumulation=2"), name="split"
    )
    whole, whole_steps, _ = train(tmp_path, tiny_model_dir, records, config("train.batch_size=3"), name="whole")
    assert split["steps"] == whole["steps"] == 1
    assert split_steps[0][1]["loss"] == pytest.approx(whole_steps[0][1]["loss"], rel=1e-4, abs=1e-6)
    assert split_steps[0][1]["grad_norm"] == pytest.approx(whole_steps[0][1]["grad_norm"], rel=1e-3)
    assert split_steps[0][1]["positive_fraction"] == pytest.approx(2 / 3)


def test_a_groups_figures_weigh_each_micro_batch_by_the_groups_size(policy, tiny_model_dir, tmp_path):
    """3 positives and a negative in micro-batches of 2: one micro-batch holds no negative, and the
    figures on negatives are the negative's own, not halved by the micro-batch without one."""
    records = make_records(policy, POSITIVES + POSITIVES[:1] + NEGATIVES[:1])
    summary, steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=2", "train.gradient_accumulation=2")
    )
    stats = steps[0][1]
    assert stats["mean_weight_negative"] == pytest.approx(1.0, abs=1e-4)  # on-policy: ratio 1
    assert stats["logprob_negative_mean"] == pytest.approx(sum(records[3]["behavior_logprobs"]) / 3, abs=1e-4)
    assert stats["ratio_negative_p50"] == pytest.approx(1.0, abs=1e-3)
    assert stats["mean_weight_positive"] == pytest.approx(1.0)
    # |α·A| = 1 for each of the 4 sequences: the positives carry 3/4 of the gradient weight.
    assert stats["positive_weight_share"] == pytest.approx(0.75, abs=1e-4)
    assert (stats["sequences"], stats["learning_rate"]) == (4, 3e-3)
    assert summary["positive_weight_share"] == pytest.approx(0.75, abs=1e-4)
    assert summary["final_ratio_negative_p50"] == pytest.approx(1.0, abs=1e-3)
    assert abs(summary["first_step_log_ratio_per_token"]) < 1e-4

    positives_only, steps, _ = train(tmp_path, tiny_model_dir, make_records(policy, POSITIVES * 2), config(), name="positives")
    stats = steps[0][1]
    assert not {"mean_weight_negative", "logprob_negative_mean", *NEGATIVE_RATIO_STATS} & set(stats)
    assert stats["positive_weight_share"] == 1.0 and stats["gradient_weight_negative"] == 0.0
    assert not {"mean_weight_negative", "final_logprob_negative", "final_ratio_negative_p50"} & set(positives_only)


def test_log_ratio_per_token_weighs_each_micro_batch_by_its_tokens(policy, tiny_model_dir, tmp_path):
    # log π − log μ: −0.3 on each of 3 tokens, +0.2 on each of 2 tokens; one micro-batch each.
    records = make_records(policy, POSITIVES[:1], behavior_shift=0.3)
    records += make_records(policy, NEGATIVES[1:], behavior_shift=-0.2)
    summary, steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=1", "train.gradient_accumulation=2")
    )
    stats = steps[0][1]
    assert stats["log_ratio_per_token"] == pytest.approx((3 * -0.3 + 2 * 0.2) / 5, abs=1e-4)
    assert summary["first_step_log_ratio_per_token"] == stats["log_ratio_per_token"]
    assert stats["ratio_negative_p50"] == pytest.approx(math.exp(0.4), rel=1e-3)  # the negative's own ratio
    assert stats["mean_weight_negative"] == pytest.approx(1.0)  # TOPR: clip(e^0.4, 0, 1)


def test_one_process_trains_here_and_reports_each_step_as_it_goes(policy, tiny_model_dir, tmp_path):
    """``launch_train`` with train.processes=1 is ``run_train`` in this process: no torchrun, ``on_step`` live."""
    records = make_records(policy, POSITIVES + NEGATIVES)
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    seen = []
    summary = launch_train(
        config("train.processes=1", "train.batch_size=2"), tiny_model_dir, data, tmp_path / "out",
        on_step=lambda step, stats: seen.append((step, stats["loss"])),
    )
    assert summary["processes"] == 1 and summary["steps"] == 2
    assert seen == [(0, seen[0][1]), (1, summary["final_loss"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]  # no launcher files


def test_steps_count_with_a_partial_last_group(policy, tiny_model_dir, tmp_path):
    records = make_records(policy, POSITIVES + NEGATIVES + POSITIVES[:1])
    summary, steps, _ = train(
        tmp_path, tiny_model_dir, records, config("train.batch_size=2", "train.gradient_accumulation=2")
    )
    # 5 records -> micro-batches of 2, 2, 1 -> optimizer steps of 2 and 1 micro-batches.
    assert summary["steps"] == 2
    assert [s for s, _ in steps] == [0, 1]
    assert summary["examples"] == 5


def test_sorting_by_length_inside_a_global_batch_keeps_the_step(policy, tiny_model_dir, tmp_path, monkeypatch):
    """Micro-batches of similar lengths pad less; the step (mean over the global batch) is the same."""
    specs = [(f"Question number {i}?", [1000 + i] * (1 + 5 * (i % 4)), 1.0 if i % 3 else -1.0) for i in range(8)]
    records = make_records(policy, specs)
    # One step of 4 micro-batches. Adam moves every weight by about the learning rate, and by
    # less only where the gradient is near its eps; there float rounding shows, scaled by the rate.
    cfg = config("train.batch_size=2", "train.gradient_accumulation=4", "train.learning_rate=3e-5")
    padded = {}
    original = train_module.by_length
    for name, order in {"sorted": original, "unsorted": lambda batch, *args: batch}.items():
        widths = []

        def recording(batch, *args, order=order, widths=widths):
            ordered = order(batch, *args)
            widths.append(sum(2 * max(map(train_module.sequence_length, ordered[i : i + 2])) for i in range(0, len(ordered), 2)))
            return ordered

        monkeypatch.setattr(train_module, "by_length", recording)
        padded[name] = (widths, train(tmp_path, tiny_model_dir, records, cfg, name=name))
    monkeypatch.setattr(train_module, "by_length", original)
    (sorted_widths, (_, sorted_steps, sorted_dir)), (unsorted_widths, (_, unsorted_steps, unsorted_dir)) = padded["sorted"], padded["unsorted"]
    assert sorted_widths[0] < unsorted_widths[0]  # fewer padded positions
    assert sorted_steps[0][1]["loss"] == pytest.approx(unsorted_steps[0][1]["loss"], rel=1e-5, abs=1e-7)
    assert sorted_steps[0][1]["grad_norm"] == pytest.approx(unsorted_steps[0][1]["grad_norm"], rel=1e-5)
    a, b = load_file(sorted_dir / "model.safetensors"), load_file(unsorted_dir / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max(float((a[name] - initial[name]).abs().max()) for name in a) > 2e-5  # the step moved the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_by_length_gives_every_rank_neighbouring_lengths_and_keeps_every_sequence():
    from topr import distributed
    from topr.distributed import Ranks

    batch = [{"prompt_token_ids": [0] * length, "completion_token_ids": [1]} for length in (9, 3, 7, 1, 5, 8, 2, 6, 4, 10, 12, 11)]
    assert [train_module.sequence_length(r) for r in train_module.by_length(batch, 3)] == list(range(2, 14))
    for world_size, batch_size in ((2, 3), (3, 2), (2, 2)):
        ordered = train_module.by_length(batch, batch_size, world_size)
        micro = [distributed.micro_batches(ordered, batch_size, Ranks(rank, world_size)) for rank in range(world_size)]
        seen = sorted(train_module.sequence_length(r) for parts in micro for part in parts for r in part)
        assert seen == list(range(2, 14))
        for k in range(len(micro[0])):  # micro-batch k of every rank: one contiguous run of lengths
            lengths = sorted(train_module.sequence_length(r) for parts in micro for r in parts[k])
            assert lengths == list(range(lengths[0], lengths[0] + len(lengths)))


# ----------------------------------------------------------------------------- checkpoints


class NodeLost(RuntimeError):
    pass


def fail_at(step_index):
    """An ``on_step`` that records the steps and kills the run as step ``step_index`` reports."""
    seen = []

    def on_step(step, stats):
        if step == step_index:
            raise NodeLost(f"the node went away at step {step}")
        seen.append(step)

    return on_step, seen


CHECKPOINTED = ("train.batch_size=2", "train.epochs=2", "train.lr_schedule=cosine", "train.warmup_steps=1", "train.checkpoint_minutes=0")


def test_a_run_killed_at_step_k_resumes_from_its_checkpoint_to_the_uninterrupted_weights(policy, tiny_model_dir, tmp_path):
    """Weights, Adam's moments, the schedule and the figures all continue: the resumed run ends
    with the weights of one that never stopped, and reports every step once, in order."""
    records = make_records(policy, POSITIVES + NEGATIVES)  # 4 records, 2 per step, 2 epochs: 4 steps
    cfg = config(*CHECKPOINTED)
    uninterrupted, uninterrupted_steps, _ = train(tmp_path, tiny_model_dir, records, cfg, name="uninterrupted")
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    checkpoint = TrainCheckpoint(tmp_path / "ckpt" / "train.pt", every_minutes=0)

    killer, reported = fail_at(2)
    with pytest.raises(NodeLost):
        run_train(cfg, tiny_model_dir, data, tmp_path / "killed", killer, checkpoint)
    assert reported == [0, 1] and not (tmp_path / "killed").exists()
    assert torch.load(checkpoint.path, weights_only=True)["next_step"] == 2

    resumed_steps = []
    resumed = run_train(cfg, tiny_model_dir, data, tmp_path / "resumed", lambda step, stats: resumed_steps.append((step, stats)), checkpoint)
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["steps"] == uninterrupted["steps"] == 4 and resumed["tokens"] == uninterrupted["tokens"]
    assert [step for step, _ in resumed_steps] == [0, 1, 2, 3]
    for (_, got), (_, expected) in zip(resumed_steps, uninterrupted_steps):
        assert got["loss"] == expected["loss"] and got["learning_rate"] == expected["learning_rate"]


def test_without_its_optimizer_state_the_resumed_run_would_differ(policy, tiny_model_dir, tmp_path, monkeypatch):
    """The check above can fail: resuming with fresh Adam moments ends elsewhere."""
    records = make_records(policy, POSITIVES + NEGATIVES)
    cfg = config(*CHECKPOINTED)
    uninterrupted, _, _ = train(tmp_path, tiny_model_dir, records, cfg, name="uninterrupted")
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    checkpoint = TrainCheckpoint(tmp_path / "train.pt", every_minutes=0)
    with pytest.raises(NodeLost):
        run_train(cfg, tiny_model_dir, data, tmp_path / "killed", fail_at(2)[0], checkpoint)
    monkeypatch.setattr(train_module, "resume", lambda state, optimizer, scheduler: scheduler.load_state_dict(state["scheduler"]))
    forgetful = run_train(cfg, tiny_model_dir, data, tmp_path / "resumed", None, checkpoint)
    assert forgetful["weights_sha256"] != uninterrupted["weights_sha256"]


def test_a_checkpoint_of_other_data_is_ignored_and_training_starts_over(policy, tiny_model_dir, tmp_path, caplog):
    records = make_records(policy, POSITIVES + NEGATIVES)
    cfg = config(*CHECKPOINTED)
    checkpoint = TrainCheckpoint(tmp_path / "train.pt", every_minutes=0)
    other = tmp_path / "other.jsonl"
    write_records(other, records[:2] + records[:2])
    with pytest.raises(NodeLost):
        run_train(cfg, tiny_model_dir, other, tmp_path / "killed", fail_at(2)[0], checkpoint)
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    seen = []
    with caplog.at_level(logging.WARNING, logger="topr.checkpoint"):
        run_train(cfg, tiny_model_dir, data, tmp_path / "out", lambda step, stats: seen.append(step), checkpoint)
    assert seen == [0, 1, 2, 3]
    assert "saved by training on other data or settings" in caplog.text


def test_a_checkpoint_that_cannot_be_read_is_ignored(policy, tiny_model_dir, tmp_path, caplog):
    records = make_records(policy, POSITIVES + NEGATIVES)
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    checkpoint = TrainCheckpoint(tmp_path / "train.pt", every_minutes=60)
    checkpoint.path.write_bytes(b"half a checkpoint")
    seen = []
    with caplog.at_level(logging.WARNING, logger="topr.checkpoint"):
        run_train(config(*CHECKPOINTED), tiny_model_dir, data, tmp_path / "out", lambda step, stats: seen.append(step), checkpoint)
    assert seen == [0, 1, 2, 3] and "which cannot be read" in caplog.text


def test_checkpoints_are_saved_when_due_and_not_after_the_last_step(policy, tiny_model_dir, tmp_path, monkeypatch):
    records = make_records(policy, POSITIVES + NEGATIVES)
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    saved = []
    monkeypatch.setattr(TrainCheckpoint, "save", lambda self, state: saved.append(state["next_step"]))
    run_train(config(*CHECKPOINTED), tiny_model_dir, data, tmp_path / "every", None, TrainCheckpoint(tmp_path / "a.pt", every_minutes=0))
    assert saved == [1, 2, 3]
    saved.clear()
    run_train(config(*CHECKPOINTED), tiny_model_dir, data, tmp_path / "hourly", None, TrainCheckpoint(tmp_path / "b.pt", every_minutes=60))
    assert saved == []


# ----------------------------------------------------------------------------- failures


def fake_record(completion, logprobs, **extra):
    return {
        "prompt_id": "x",
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": completion,
        "behavior_logprobs": logprobs,
        "reward": 1.0,
        **extra,
    }


def existing_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("previous model")
    return output


def assert_untouched(tmp_path, output, data):
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", data.name])


def test_mismatched_lengths_name_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0]), fake_record([5, 6, 7], [-1.0, -1.0]), fake_record([5], [-1.0])])
    output = existing_output(tmp_path)
    with pytest.raises(RecordError) as error:
        run_train(config(), tiny_model_dir, data, output)
    message = str(error.value)
    assert f"{data}:2:" in message
    assert "3 tokens" in message and "2 values" in message
    assert_untouched(tmp_path, output, data)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"behavior_logprobs": [-1.0, 0.25]}, "behavior_logprobs[1] is 0.25: a log-probability is at most 0"),
        ({"behavior_logprobs": [-1.0, math.nan]}, "behavior_logprobs[1] is NaN"),
        ({"behavior_logprobs": [-math.inf, -1.0]}, "behavior_logprobs[0] is -Infinity"),
        ({"reward": 1.5}, "reward is 1.5, outside [-1, 1]"),
        ({"reward": -2}, "reward is -2, outside [-1, 1]"),
    ],
)
def test_impossible_numbers_in_a_training_record_name_file_line_and_field(tiny_model_dir, tmp_path, changes, problem):
    data = tmp_path / "bad.jsonl"
    good = fake_record([5, 6], [-1.0, -1.0], reward=-1.0, correct=False)
    write_records(data, [good, fake_record([5, 6], [-1.0, -1.0], **changes)])
    output = existing_output(tmp_path)
    with pytest.raises(RecordError) as error:
        run_train(config(), tiny_model_dir, data, output)
    assert str(error.value).startswith(f"{data}:2: {problem}")
    assert_untouched(tmp_path, output, data)


def test_a_graded_reward_trains_whatever_the_checker_said():
    """A reward function or a format term (``topr.rewards``) grades completions: a correct one may
    earn less than 1, a wrong one more than -1."""
    for reward, correct in ((0.5, False), (-0.25, True), (1.0, False), (-1.0, True), (0, True)):
        check_train_record(fake_record([5, 6], [-1.0, -1.0], reward=reward, correct=correct))


def test_a_non_finite_loss_stops_training_naming_the_step_and_saves_nothing(nan_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0]), fake_record([7], [-2.0], reward=-1.0)])
    output = existing_output(tmp_path)
    logged = []
    with pytest.raises(NonFiniteStepError, match=r"training stopped at step 0 .*: the loss is nan") as error:
        run_train(config(), nan_model_dir, data, output, on_step=lambda step, stats: logged.append(step))
    assert "nothing was saved" in str(error.value)
    assert logged == []
    assert_untouched(tmp_path, output, data)


def test_a_non_finite_gradient_norm_stops_training_before_the_weights_change(tiny_model_dir, tmp_path, monkeypatch):
    """The second step's gradient overflows (injected): the first step was logged, nothing is saved."""
    real_clip = distributed.clip_grad_norm
    norms = []

    def overflowing_clip(model, max_norm):
        norms.append(real_clip(model, max_norm))
        return norms[-1] if len(norms) == 1 else math.inf

    monkeypatch.setattr(distributed, "clip_grad_norm", overflowing_clip)
    data = tmp_path / "data.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0]), fake_record([7], [-2.0], reward=-1.0)])
    logged = []
    with pytest.raises(NonFiniteStepError, match=r"training stopped at step 1 .*: the loss is \S+, the gradient norm is inf"):
        run_train(config("train.batch_size=1"), tiny_model_dir, data, tmp_path / "trained", on_step=lambda step, stats: logged.append(step))
    assert logged == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_missing_field_is_an_error(tiny_model_dir, tmp_path):
    data = tmp_path / "missing.jsonl"
    record = fake_record([5], [-1.0])
    del record["reward"]
    write_records(data, [fake_record([5], [-1.0]), record])
    with pytest.raises(RecordError, match=r"missing\.jsonl:2: .*reward"):
        run_train(config(), tiny_model_dir, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_training_set_is_an_error(tiny_model_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(RecordError, match="empty"):
        run_train(config(), tiny_model_dir, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_during_training_leaves_the_existing_output(tiny_model_dir, tmp_path, monkeypatch):
    # A step that fails (injected: a token id beyond the vocabulary used to do it, and is now refused up front).
    def failing_step(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_module, "forward_backward", failing_step)
    data = tmp_path / "data.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0])])
    output = existing_output(tmp_path)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_train(config(), tiny_model_dir, data, output)
    assert_untouched(tmp_path, output, data)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"completion_token_ids": [5, 10**7]}, "completion_token_ids[1] is 10000000"),
        ({"completion_token_ids": [5, -3]}, "completion_token_ids[1] is -3"),
        ({"prompt_token_ids": [1, 2, 10**6]}, "prompt_token_ids[2] is 1000000"),
    ],
)
def test_a_token_id_outside_the_models_vocabulary_names_file_and_line_before_any_step(policy, tiny_model_dir, tmp_path, changes, problem):
    vocabulary = policy[0].get_input_embeddings().num_embeddings
    data = tmp_path / "oov.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0]), fake_record([5, vocabulary - 1], [-1.0, -1.0], **changes)])
    output = existing_output(tmp_path)
    steps = []
    with pytest.raises(RecordError) as error:
        run_train(config(), tiny_model_dir, data, output, on_step=lambda step, stats: steps.append(step))
    message = str(error.value)
    assert message.startswith(f"{data}:2: {problem}")
    assert f"the model's vocabulary of {vocabulary} tokens (ids 0 to {vocabulary - 1})" in message
    assert steps == []
    assert_untouched(tmp_path, output, data)


def test_a_duplicate_training_record_is_refused_naming_both_lines(tiny_model_dir, tmp_path):
    """Trained twice, a duplicate would weigh double (and the model it made was promoted)."""
    data = tmp_path / "dup.jsonl"
    first = fake_record([5, 6], [-1.0, -1.0], sample_index=0)
    write_records(data, [first, fake_record([7], [-2.0], sample_index=1, reward=-1.0), first])
    output = existing_output(tmp_path)
    with pytest.raises(RecordError, match=r"dup\.jsonl:3: duplicate record: prompt_id 'x', sample_index 0 is also at line 1"):
        run_train(config(), tiny_model_dir, data, output)
    assert_untouched(tmp_path, output, data)


def test_a_full_disk_while_saving_the_trained_model_names_the_disk(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    from topr.records import DiskFullError

    def no_space(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**30, 2**30))
    data = tmp_path / "data.jsonl"
    write_records(data, [fake_record([5, 6], [-1.0, -1.0])])
    output = existing_output(tmp_path)
    with pytest.raises(DiskFullError) as error:
        run_train(config(), tiny_model_dir, data, output)
    assert f"the disk holding {tmp_path} is full (1.0 GiB free of 1.0 TiB)" in str(error.value)
    assert str(output) in str(error.value)
    assert_untouched(tmp_path, output, data)


def test_negatives_summary_weighs_each_step_by_its_count_and_ends_on_the_last_quarter():
    step = lambda weight, negatives, logp_neg, positives, logp_pos: {  # noqa: E731
        "mean_weight_negative": weight,
        "negative_count": negatives,
        "logprob_negative_mean": logp_neg,
        "positive_count": positives,
        "logprob_positive_mean": logp_pos,
    }
    history = [step(1.0, 3, -1.0, 1, -0.5), step(0.5, 1, -2.0, 3, -0.4), step(0.0, 0, 0.0, 4, -0.3), step(0.2, 2, -4.0, 2, -0.2)]

    summary = train_module.negatives_summary(history)

    assert summary["mean_weight_negative"] == pytest.approx((3 * 1.0 + 1 * 0.5 + 2 * 0.2) / 6)
    assert summary["final_logprob_negative"] == pytest.approx(-4.0)  # the last quarter: the last step
    assert summary["final_logprob_positive"] == pytest.approx(-0.2)
    assert train_module.negatives_summary([step(0.0, 0, 0.0, 2, -0.1)]) == {"final_logprob_positive": pytest.approx(-0.1)}


def test_summaries_count_only_the_steps_that_report_a_figure():
    """A step without negatives reports no figure on them; the last quarter of 8 steps is the last 2."""
    without_negatives = {"positive_count": 4, "negative_count": 0, "logprob_positive_mean": -0.5}
    with_negatives = [
        {"positive_count": 1, "negative_count": 3, "ratio_negative_p50": 0.9, "logprob_negative_mean": -2.0},
        {"positive_count": 3, "negative_count": 1, "ratio_negative_p50": 0.3, "logprob_negative_mean": -3.0},
        {"positive_count": 1, "negative_count": 3, "ratio_negative_p50": 0.1, "logprob_negative_mean": -4.0},
    ]
    ending_without = train_module.negatives_summary(with_negatives + [without_negatives] * 5)
    assert ending_without == {"final_logprob_positive": pytest.approx(-0.5)}
    ending_with = train_module.negatives_summary([without_negatives] * 5 + with_negatives)
    assert ending_with["final_ratio_negative_p50"] == pytest.approx((1 * 0.3 + 3 * 0.1) / 4)
    assert ending_with["final_logprob_negative"] == pytest.approx((1 * -3.0 + 3 * -4.0) / 4)


def test_gradient_summary_weighs_each_step_by_its_sequences():
    history = [
        {"log_ratio_per_token": 0.004, "gradient_weight_positive": 0.25, "gradient_weight_negative": 0.75, "sequences": 4},
        {"log_ratio_per_token": -0.5, "gradient_weight_positive": 1.0, "gradient_weight_negative": 0.0, "sequences": 4},
        {"log_ratio_per_token": -0.9, "gradient_weight_positive": 0.4, "gradient_weight_negative": 0.1, "sequences": 2},
    ]
    summary = train_module.gradient_summary(history)
    assert summary["first_step_log_ratio_per_token"] == 0.004
    assert summary["positive_weight_share"] == pytest.approx((1.0 + 4.0 + 0.8) / (4.0 + 4.0 + 1.0))
    silent = [{"log_ratio_per_token": 0.0, "gradient_weight_positive": 0.0, "gradient_weight_negative": 0.0, "sequences": 4}]
    assert train_module.gradient_summary(silent) == {"first_step_log_ratio_per_token": 0.0}
