"""Tests for the generative verifier: its task, its data, its P(correct), the votes it weights, the branch end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from topr.config import TaskConfig, load_config
from topr.models import load_policy, prompt_token_ids
from topr.records import read_records, write_records
from topr.tasks import get_task
from topr.tasks.verifier import VerifierTask
from topr.verifier import (
    SOLUTIONS_EVAL,
    SOLUTIONS_TRAIN,
    VERIFIER_EVAL,
    VERIFIER_TRAIN,
    QuestionVotes,
    balance_labels,
    build_verifier_prompts,
    judgment_token_ids,
    p_correct,
    question_votes,
    run_evaluate_verifier,
    run_train_verifier,
    run_verifier_data,
    verifier_config,
    verifier_prompt,
    vote_metrics,
)
from topr.verify import verify_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = VerifierTask(None, None)


# --- the verifier task ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "judgment"),
    [
        ("Yes", "Yes"),
        ("yes.", "Yes"),
        ("  **No**", "No"),
        ("No, because 3 + 4 is 7.", "No"),
        ("YES!\nThe solution adds correctly.", "Yes"),
        ("Maybe", None),
        ("", None),
        ("The answer is yes", None),
        ("Yesterday it was right", None),
        ("Nope", None),
    ],
)
def test_extract_reads_the_first_word(reply, judgment):
    assert TASK.extract(reply) == judgment


def test_get_task_builds_the_verifier_task():
    task = get_task(TaskConfig(name="verifier", train_path="a.jsonl", eval_path="b.jsonl"))
    assert isinstance(task, VerifierTask) and task.name == "verifier"


def test_verifier_task_reads_prompt_files_as_they_are(tmp_path):
    records = build_verifier_prompts([solution("q1", 0, "Answer: 4", "4", True)])
    write_records(tmp_path / "pairs.jsonl", records)
    (problem,) = VerifierTask(str(tmp_path / "pairs.jsonl"), None).problems("train", 10, 0)
    assert {key: problem[key] for key in records[0]} == records[0]


def test_judgment_rewards_come_from_the_label():
    judgments = [("Yes.", "Yes"), ("No", "No"), ("No", "Yes"), ("yes", "No"), ("Maybe", "Yes"), ("", "No")]
    records = [{"prompt_id": f"q/s{i}", "reference": label, "completion": reply} for i, (reply, label) in enumerate(judgments)]
    verified, summary = verify_records(records, TASK)
    assert [r["reward"] for r in verified] == [1.0, 1.0, -1.0, -1.0, -1.0, -1.0]
    assert summary["unparsable"] == 2


# --- data --------------------------------------------------------------------------------------


def solution(question_id, index, completion, extracted, correct, prompt="What is 2 + 2?"):
    return {
        "prompt_id": question_id,
        "prompt": prompt,
        "reference": "4",
        "completion": completion,
        "sample_index": index,
        "extracted": extracted,
        "correct": correct,
    }


def test_build_verifier_prompts_labels_each_non_empty_solution():
    solutions = [
        solution("q1", 0, "2 + 2 = 4. Answer: 4", "4", True),
        solution("q1", 1, "  \n", None, False),
        solution("q1", 2, "2 + 2 = 5. Answer: 5", "5", False),
    ]
    prompts = build_verifier_prompts(solutions)
    assert [p["prompt_id"] for p in prompts] == ["q1/s0", "q1/s2"]
    assert [p["reference"] for p in prompts] == ["Yes", "No"]
    assert [(p["question_id"], p["solution_index"], p["solution_answer"], p["solution_correct"]) for p in prompts] == [
        ("q1", 0, "4", True),
        ("q1", 2, "5", False),
    ]
    assert prompts[1]["prompt"] == verifier_prompt("What is 2 + 2?", "2 + 2 = 5. Answer: 5")
    assert "What is 2 + 2?" in prompts[1]["prompt"] and "Yes or No" in prompts[1]["prompt"]


def labelled(labels: str) -> list[dict]:
    return [{"prompt_id": f"p{i}", "reference": "Yes" if label == "Y" else "No"} for i, label in enumerate(labels)]


def test_balance_labels_keeps_as_many_of_the_majority_as_of_the_minority_in_order():
    records = labelled("YNYYNYY")
    kept = balance_labels(records, seed=0)
    assert [r["reference"] for r in kept].count("Yes") == 2 and [r["reference"] for r in kept].count("No") == 2
    assert [r for r in records if r in kept] == kept  # original order
    assert {"p1", "p4"} <= {r["prompt_id"] for r in kept}  # every minority record stays
    assert balance_labels(records, seed=0) == kept
    assert len({tuple(r["prompt_id"] for r in balance_labels(records, seed)) for seed in range(20)}) > 1  # seeded, not fixed


def test_balance_labels_keeps_everything_when_a_label_is_missing():
    records = labelled("NNN")
    assert balance_labels(records, seed=0) == records


def test_verifier_config_takes_the_verifier_section():
    config = load_config(
        None,
        ["verifier.judgments_per_solution=3", "verifier.max_new_tokens=5", "verifier.objective=reinforce",
         "verifier.learning_rate=1e-4", "verifier.epochs=2", "verifier.train_questions=4", "verifier.solutions_per_question=2",
         "task.eval_size=10", "evaluate.samples_per_prompt=8", "train.batch_size=3"],
    )  # fmt: skip
    verifier = verifier_config(config, "train.jsonl", "eval.jsonl")
    assert (verifier.task.name, verifier.task.train_path, verifier.task.eval_path) == ("verifier", "train.jsonl", "eval.jsonl")
    assert (verifier.task.train_size, verifier.task.eval_size) == (8, 20)
    assert (verifier.sample.samples_per_prompt, verifier.sample.max_new_tokens, verifier.evaluate.max_new_tokens) == (3, 5, 5)
    assert verifier.evaluate.samples_per_prompt == 0
    assert (verifier.train.objective, verifier.train.learning_rate, verifier.train.epochs) == ("reinforce", 1e-4, 2)
    assert verifier.train.batch_size == 3 and verifier.sample.temperature == config.sample.temperature


# --- votes -------------------------------------------------------------------------------------


def test_weighted_vote_can_beat_the_majority_and_ties_go_to_the_first_answer():
    questions = [
        # The verifier trusts the lone 7, which is right; the majority says 5.
        QuestionVotes(("5", "5", "7"), (False, False, True), {"trained": (0.1, 0.1, 0.9)}),
        # A tie in both votes: the first answer seen, 5, wins.
        QuestionVotes(("5", "7", None), (False, True, False), {"trained": (0.5, 0.5, 0.9)}),
        # No answer at all: no vote is correct.
        QuestionVotes((None, None, None), (False, False, False), {"trained": (0.9, 0.9, 0.9)}),
        # Both votes right.
        QuestionVotes(("3", "3", "4"), (True, True, False), {"trained": (0.6, 0.6, 0.7)}),
    ]
    metrics = vote_metrics(questions)
    assert (metrics["vote_k"], metrics["vote_questions"]) == (3, 4)
    assert metrics["vote_pass_at_1"] == pytest.approx(4 / 12)
    assert metrics["vote_majority"] == pytest.approx(1 / 4)
    assert metrics["vote_weighted_trained"] == pytest.approx(2 / 4)
    for name in ("vote_pass_at_1", "vote_majority", "vote_weighted_trained"):
        assert 0 <= metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"] <= 1


def test_question_votes_group_solutions_and_weigh_those_without_a_verifier_prompt_zero():
    solutions = [
        solution("q2", 1, "Answer: 6", "6", True),
        solution("q1", 1, "", None, False),
        solution("q1", 0, "Answer: 4", "4", True),
        solution("q2", 0, "Answer: 5", "5", False),
    ]
    votes = question_votes(solutions, {"base": {"q1/s0": 0.8, "q2/s0": 0.3, "q2/s1": 0.6}})
    assert votes == [  # questions in first-seen order, solutions in sample order
        QuestionVotes(("5", "6"), (False, True), {"base": (0.3, 0.6)}),
        QuestionVotes(("4", None), (True, False), {"base": (0.8, 0.0)}),
    ]


# --- P(correct) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    """The tiny model with a separate, larger random head: its tied head is nearly uniform, so
    P(Yes) would be about 0.5 for every prompt and a padding error would go unnoticed."""
    model, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    model.lm_head.weight = torch.nn.Parameter(head)
    return model, tokenizer


def test_p_correct_matches_an_unpadded_forward_pass(judge):
    model, tokenizer = judge
    prompts = [verifier_prompt("What is 2 + 2?", solution) for solution in ("4", "It is 5, since 2 + 2 + 1 = 5.", "Four. Answer: 4")]
    batched = p_correct(model, tokenizer, prompts, system_prompt=None, batch_size=3)
    yes, no = judgment_token_ids(tokenizer)
    assert tokenizer.decode([yes]) == "Yes" and tokenizer.decode([no]) == "No"
    for prompt, value in zip(prompts, batched):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_token_ids(tokenizer, prompt)])).logits[0, -1]
        probabilities = logits.softmax(-1)
        assert value == pytest.approx((probabilities[yes] / (probabilities[yes] + probabilities[no])).item(), abs=1e-5)
        assert 0 < value < 1
    assert max(batched) - min(batched) > 1e-3  # the prompts are told apart
    assert p_correct(model, tokenizer, prompts, system_prompt=None, batch_size=1) == pytest.approx(batched, abs=1e-5)


# --- end to end --------------------------------------------------------------------------------


def test_branch_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    # curate.drop_empty=false: the random model's judgments may all be empty, and they are negatives too.
    config = load_config(
        None,
        ["verifier.train_questions=2", "verifier.solutions_per_question=2", "verifier.judgments_per_solution=2",
         "verifier.max_new_tokens=4", "verifier.learning_rate=1e-3", "task.eval_size=2", "sample.max_new_tokens=4",
         "sample.temperature=1.0", "train.batch_size=4", "evaluate.batch_size=8", "curate.drop_empty=false"],
    )  # fmt: skip
    task = get_task(config.task)
    write_records(tmp_path / "train_prompts.jsonl", task.problems("train", 3, 0))
    write_records(tmp_path / "eval_prompts.jsonl", task.problems("test", 3, 0))
    data = tmp_path / "verifier_data"

    summary = run_verifier_data(config, tiny_model_dir, tmp_path / "train_prompts.jsonl", tmp_path / "eval_prompts.jsonl", data)
    assert sorted(p.name for p in data.iterdir()) == sorted([SOLUTIONS_TRAIN, SOLUTIONS_EVAL, VERIFIER_TRAIN, VERIFIER_EVAL])
    assert (summary["train_questions"], summary["eval_questions"]) == (2, 2)
    assert (summary["train_solutions"], summary["eval_solutions"]) == (4, 4)
    solutions_eval = read_records(data / SOLUTIONS_EVAL)
    pairs_eval = read_records(data / VERIFIER_EVAL)
    assert summary["verifier_eval_prompts"] == len(pairs_eval) == sum(bool(r["completion"].strip()) for r in solutions_eval)
    assert {p["reference"] for p in pairs_eval} <= {"Yes", "No"}
    assert summary["verifier_train_prompts"] == len(read_records(data / VERIFIER_TRAIN))
    assert 0 <= summary["verifier_train_yes_share"] <= 1

    trained = run_train_verifier(config, tiny_model_dir, data, tmp_path / "verifier", tmp_path / "work")
    judgments = read_records(tmp_path / "work" / "samples.jsonl")  # topr.loop.IterationFiles
    assert trained["judgments"] == len(judgments) == 2 * summary["verifier_train_prompts"]
    assert 0 <= trained["judgment_accuracy_before"] <= 1 and 0 <= trained["judgment_invalid_rate_before"] <= 1
    assert trained["curated_count"] == trained["curated_positives"] + trained["curated_negatives"] > 0
    assert trained["steps"] >= 1
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(tmp_path / "verifier" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)

    report = tmp_path / "report" / "verifier.json"
    metrics = run_evaluate_verifier(config, tiny_model_dir, str(tmp_path / "verifier"), data, report)
    assert json.loads(report.read_text())["metrics"] == metrics
    assert (metrics["vote_k"], metrics["vote_questions"], metrics["verifier_eval_pairs"]) == (2, 2, len(pairs_eval))
    for name in ("verifier_accuracy_base", "verifier_accuracy_trained", "vote_pass_at_1", "vote_majority", "vote_weighted_base", "vote_weighted_trained"):
        assert 0 <= metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"] <= 1, name
    assert 0 <= metrics["verifier_invalid_rate_base"] <= 1 and 0 <= metrics["verifier_invalid_rate_trained"] <= 1
    assert metrics["vote_pass_at_1"] == pytest.approx(sum(r["correct"] for r in solutions_eval) / 4)
