"""Tests for the generative verifier: its task, its data, its P(correct), the votes it weights, the branch end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from topr.config import TaskConfig, load_config
from topr.curate import curate
from topr.metrics import auroc, auroc_interval, balanced_accuracy
from topr.models import load_policy, prompt_token_ids
from topr.prompts import run_prompts
from topr.records import read_records, write_records
from topr.tasks import ANSWER_INSTRUCTION, get_task, registered_tasks
from topr.tasks.arithmetic import ArithmeticTask
from topr.tasks.jsonl import EXACT_INSTRUCTION
from topr.tasks.math_task import BOXED_INSTRUCTION
from topr.tasks.verifier import VerifierTask
from topr.verifier import (
    SOLUTIONS_EVAL,
    SOLUTIONS_TRAIN,
    VERIFIER_EVAL,
    VERIFIER_TRAIN,
    QuestionVotes,
    balance_labels,
    both_judgments,
    build_verifier_prompts,
    judgment_metrics,
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
POLICY = ArithmeticTask()  # the policy's task where a test builds verifier prompts itself
FIXTURES = Path(__file__).parent / "fixtures"


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
    records = build_verifier_prompts([solution("q1", 0, "Answer: 4", "4", True)], POLICY)
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
    prompts = build_verifier_prompts(solutions, POLICY)
    assert [p["prompt_id"] for p in prompts] == ["q1/s0", "q1/s2"]
    assert [p["reference"] for p in prompts] == ["Yes", "No"]
    assert [(p["question_id"], p["solution_index"], p["solution_answer"], p["solution_correct"]) for p in prompts] == [
        ("q1", 0, "4", True),
        ("q1", 2, "5", False),
    ]
    assert prompts[1]["prompt"] == verifier_prompt("What is 2 + 2?", "2 + 2 = 5. Answer: 5", POLICY)
    assert "What is 2 + 2?" in prompts[1]["prompt"] and "Yes or No" in prompts[1]["prompt"]


def fixture_task(name: str, file: str, **options) -> TaskConfig:
    return TaskConfig(name=name, train_path=str(FIXTURES / file), eval_path=str(FIXTURES / file), **options)


# Every built-in policy task: its config, the question of its first training prompt (seed 0) and
# the answer-format instruction that prompt ends with.
BUILT_IN = {
    "arithmetic": (TaskConfig(), "There are 18 shells in a box. Sara removes 6 from the box. How many shells are in the box now?", ANSWER_INSTRUCTION),
    "gsm8k": (fixture_task("gsm8k", "gsm8k.jsonl"), "A school orders 40 boxes of 30 pencils. How many pencils does it order?", ANSWER_INSTRUCTION),
    "math": (fixture_task("math", "math.jsonl"), "What is $\\sin 60^\\circ$?", BOXED_INSTRUCTION),
    "jsonl-numeric": (fixture_task("jsonl", "generic.jsonl", prompt_field="text", answer_field="target"), "What is 7 divided by 2?", ANSWER_INSTRUCTION),
    "jsonl-exact": (fixture_task("jsonl", "generic.jsonl", prompt_field="text", answer_field="target", match="exact"), "What is 7 divided by 2?", EXACT_INSTRUCTION),
    "dataset": (fixture_task("dataset", "generic.jsonl", prompt_field="text", answer_field="target"), "What is 7 divided by 2?", ANSWER_INSTRUCTION),
}  # fmt: skip


def test_every_built_in_task_is_checked_below():
    built_in = {name for name, kind in registered_tasks().items() if kind.__module__.startswith("topr.tasks.")}
    assert built_in == {config.name for config, _, _ in BUILT_IN.values()} | {"verifier"}


@pytest.mark.parametrize(("config", "question", "instruction"), BUILT_IN.values(), ids=BUILT_IN.keys())
def test_the_verifier_is_shown_a_built_in_tasks_question_without_its_instruction(config, question, instruction):
    task = get_task(config)
    (problem,) = task.problems("train", 1, 0)
    assert problem["prompt"] == f"{question}\n{instruction}"
    # Byte for byte the verifier prompt of before tasks stripped their own instruction.
    assert verifier_prompt(problem["prompt"], "3 + 4 = 7. Answer: 7", task) == (
        "Here is a question and a proposed solution.\n\n"
        f"Question:\n{question}\n\n"
        "Proposed solution:\n3 + 4 = 7. Answer: 7\n\n"
        "Is the proposed solution correct? Reply with Yes or No only."
    )
    for problem in task.problems("test", 50, 0):
        asked = task.question_text(problem["prompt"])
        assert instruction not in asked and "End your reply" not in asked and "\\boxed{}" not in asked
        assert task.prompt_for(asked) == problem["prompt"]


def test_a_verifier_prompt_is_shown_as_it_is(tmp_path):
    pairs = build_verifier_prompts([solution("q1", 0, "Answer: 4", "4", True)], POLICY)
    write_records(tmp_path / "pairs.jsonl", pairs)
    (problem,) = VerifierTask(str(tmp_path / "pairs.jsonl"), None).problems("train", 1, 0)
    assert TASK.question_text(problem["prompt"]) == problem["prompt"] == pairs[0]["prompt"]


def test_a_task_with_a_prompt_format_of_its_own_overrides_question_text():
    class Quoted(ArithmeticTask):
        """Asks "Q: <question>" and the instruction first."""

        def prompt_for(self, question):
            return f"{self.instruction}\nQ: {question}"

        def question_text(self, prompt):
            return prompt.removeprefix(f"{self.instruction}\nQ: ")

    prompt = verifier_prompt(Quoted().prompt_for("What is 2 + 2?"), "4", Quoted())
    assert prompt == verifier_prompt("What is 2 + 2?", "4", POLICY) and ANSWER_INSTRUCTION not in prompt


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
        ["verifier.max_new_tokens=5", "verifier.objective=reinforce", "verifier.learning_rate=1e-4", "verifier.epochs=2",
         "verifier.train_questions=4", "verifier.solutions_per_question=2", "task.eval_size=10", "evaluate.samples_per_prompt=8",
         "train.batch_size=3", "train.policy_temperature=0.7", "curate.strategy=uniform", "curate.target_positive_fraction=0.3"],
    )  # fmt: skip
    verifier = verifier_config(config, "train.jsonl", "eval.jsonl")
    assert (verifier.task.name, verifier.task.train_path, verifier.task.eval_path) == ("verifier", "train.jsonl", "eval.jsonl")
    assert (verifier.task.train_size, verifier.task.eval_size) == (8, 20)
    assert (verifier.sample.samples_per_prompt, verifier.sample.max_new_tokens, verifier.evaluate.max_new_tokens) == (2, 5, 5)
    assert verifier.evaluate.samples_per_prompt == 0
    assert (verifier.train.objective, verifier.train.learning_rate, verifier.train.epochs) == ("reinforce", 1e-4, 2)
    assert verifier.train.batch_size == 3
    # π at temperature 1, as the judgments were scored; both judgments of every pair kept.
    assert (verifier.sample.temperature, verifier.train.policy_temperature) == (1.0, None)
    assert (verifier.curate.strategy, verifier.curate.target_positive_fraction) == ("all", None)


def test_the_policys_diagnostics_and_held_out_split_do_not_carry_over_to_the_verifier():
    config = load_config(
        None,
        ["evaluate.max_new_tokens=256", "evaluate.cut_at_tokens=64", "train.negatives_skip_shared_tokens=true", "task.eval_split=validation", "verifier.enabled=true"],
    )  # fmt: skip
    verifier = verifier_config(config, "train.jsonl", "eval.jsonl")
    assert (verifier.evaluate.cut_at_tokens, verifier.train.negatives_skip_shared_tokens, verifier.task.eval_split) == (None, False, "test")


def test_the_verifier_is_rewarded_by_its_checker_alone_whatever_the_policys_reward():
    config = load_config(None, ["task.reward_function=json:dumps", "task.correctness_weight=0.5", "task.format_weight=0.5"])
    task = verifier_config(config, "train.jsonl", "eval.jsonl").task
    assert (task.reward_function, task.correctness_weight, task.format_weight) == (None, 1.0, 0.0)


def test_the_default_verifier_judges_in_two_tokens_and_trains_on_about_200_questions():
    verifier = load_config(None, []).verifier
    assert verifier.max_new_tokens == 2 and verifier.train_questions == 200


def test_the_prompt_file_holds_the_verifiers_training_questions(tmp_path):
    overrides = ["task.train_size=3", "run.iterations=2", "task.eval_size=2", "verifier.train_questions=10"]
    run_prompts(load_config(None, overrides), tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert len(read_records(tmp_path / "train.jsonl")) == 6
    run_prompts(load_config(None, [*overrides, "verifier.enabled=true"]), tmp_path / "with.jsonl", tmp_path / "eval.jsonl")
    with_verifier = read_records(tmp_path / "with.jsonl")
    assert len(with_verifier) == 10
    assert with_verifier[:6] == read_records(tmp_path / "train.jsonl")  # the policy's prompts are unchanged


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
    # The weighted vote against the majority vote, question by question: one gained, none lost.
    assert metrics["vote_gain_trained"] == pytest.approx(1 / 4)
    assert (metrics["vote_gain_trained_questions_gained"], metrics["vote_gain_trained_questions_lost"]) == (1, 0)
    assert metrics["vote_gain_trained_ci_low"] <= metrics["vote_gain_trained"] <= metrics["vote_gain_trained_ci_high"]
    assert metrics["vote_gain_trained_p_value"] == pytest.approx(1.0)  # exact McNemar, 1 of 1 changed


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


# --- how well P(correct) separates correct from wrong solutions ---------------------------------

LABELS = [True, True, True, False, False, False, False]
SCORES = [0.9, 0.6, 0.4, 0.6, 0.3, 0.2, 0.2]  # one tie across the labels (0.6), one within (0.2)


def test_auroc_is_the_mann_whitney_statistic_with_ties_counting_half():
    # Of the 3 × 4 (correct, wrong) pairs, 10 are ranked right, 1 tied, 1 wrong: (10 + 0.5) / 12.
    assert auroc(LABELS, SCORES) == pytest.approx(10.5 / 12)
    positives = [s for s, label in zip(SCORES, LABELS) if label]
    negatives = [s for s, label in zip(SCORES, LABELS) if not label]
    u = stats.mannwhitneyu(positives, negatives).statistic
    assert auroc(LABELS, SCORES) == pytest.approx(u / (len(positives) * len(negatives)))
    assert auroc(LABELS, [1 - s for s in SCORES]) == pytest.approx(1 - 10.5 / 12)
    assert auroc(LABELS, [0.5] * len(LABELS)) == pytest.approx(0.5)  # a constant judgment ranks nothing


def test_auroc_interval_holds_the_estimate_and_narrows_with_more_pairs():
    low, high = auroc_interval(LABELS, SCORES, seed=0)
    assert 0 <= low <= auroc(LABELS, SCORES) <= high <= 1
    assert auroc_interval(LABELS, SCORES, seed=0) == (low, high)
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = rng.random(400) + 0.5 * labels
    many_low, many_high = auroc_interval(labels, scores, seed=0)
    assert many_low <= auroc(labels, scores) <= many_high and many_high - many_low < high - low


def test_balanced_accuracy_weighs_both_labels_alike_at_a_threshold_of_one_half():
    # Correct: 2 of 3 called correct (0.9, 0.6); wrong: 3 of 4 called wrong (0.6 is called correct).
    assert balanced_accuracy(LABELS, SCORES) == pytest.approx((2 / 3 + 3 / 4) / 2)
    always_no = [0.1] * len(LABELS)
    assert balanced_accuracy(LABELS, always_no) == pytest.approx(0.5)  # plain accuracy would be 4/7
    assert balanced_accuracy(LABELS, [0.5] * len(LABELS)) == pytest.approx(0.5)  # 0.5 counts as "Yes"


@pytest.mark.parametrize("function", [auroc, auroc_interval, balanced_accuracy])
def test_ranking_metrics_need_both_labels(function):
    with pytest.raises(ValueError, match="both"):
        function([False, False], [0.2, 0.7])


def test_judgment_metrics_name_the_verifier_and_are_left_out_when_labels_are_alike(caplog):
    metrics = judgment_metrics("trained", LABELS, SCORES)
    assert metrics["verifier_auroc_trained"] == pytest.approx(10.5 / 12)
    assert metrics["verifier_auroc_trained_ci_low"] <= metrics["verifier_auroc_trained"] <= metrics["verifier_auroc_trained_ci_high"]
    assert metrics["verifier_balanced_accuracy_trained"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert metrics["verifier_p_correct_on_correct_trained"] == pytest.approx(np.mean([0.9, 0.6, 0.4]))
    assert metrics["verifier_p_correct_on_wrong_trained"] == pytest.approx(np.mean([0.6, 0.3, 0.2, 0.2]))
    assert judgment_metrics("base", [False, False], [0.2, 0.7]) == {}
    assert "labelled alike" in caplog.text


# --- P(correct) --------------------------------------------------------------------------------


def test_p_correct_matches_an_unpadded_forward_pass(peaked_policy):
    model, tokenizer = peaked_policy
    prompts = [verifier_prompt("What is 2 + 2?", solution, POLICY) for solution in ("4", "It is 5, since 2 + 2 + 1 = 5.", "Four. Answer: 4")]
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


# --- training judgments: both replies of every pair ---------------------------------------------


def test_both_judgments_of_every_pair_reach_training_and_the_right_one_is_the_positive(peaked_policy):
    model, tokenizer = peaked_policy
    pairs = build_verifier_prompts([
        solution("q1", 0, "2 + 2 = 4. Answer: 4", "4", True),
        solution("q1", 1, "2 + 2 = 5. Answer: 5", "5", False),
        solution("q2", 0, "3 + 3 = 7. Answer: 7", "7", False, prompt="What is 3 + 3?"),
    ], POLICY)  # fmt: skip
    judgments = both_judgments(model, tokenizer, pairs, system_prompt=None, batch_size=4, behavior_model="sha256:judge")
    assert [(j["prompt_id"], j["completion"], j["sample_index"]) for j in judgments] == [
        ("q1/s0", "Yes", 0), ("q1/s0", "No", 1), ("q1/s1", "Yes", 0), ("q1/s1", "No", 1), ("q2/s0", "Yes", 0), ("q2/s0", "No", 1),
    ]  # fmt: skip
    for judgment in judgments:  # the word, then the end of the reply
        ids = judgment["completion_token_ids"]
        assert 2 <= len(ids) <= load_config(None, []).verifier.max_new_tokens and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == judgment["completion"]
        assert (judgment["behavior_model"], judgment["finish_reason"]) == ("sha256:judge", "stop")

    verified, _ = verify_records(judgments, TASK)
    curate_config = verifier_config(load_config(None, []), "train.jsonl", "eval.jsonl").curate
    train_set, _ = curate(verified, curate_config, baseline=0.0)
    rewards = {(r["prompt_id"], r["completion"]): r["reward"] for r in train_set}
    assert rewards == {
        ("q1/s0", "Yes"): 1.0, ("q1/s0", "No"): -1.0,  # a correct solution: "Yes" is the positive
        ("q1/s1", "Yes"): -1.0, ("q1/s1", "No"): 1.0,  # a wrong one: "No" is
        ("q2/s0", "Yes"): -1.0, ("q2/s0", "No"): 1.0,
    }  # fmt: skip


def test_the_behaviour_log_probs_of_a_judgment_are_its_tokens_log_probs_under_the_model(peaked_policy):
    model, tokenizer = peaked_policy
    pairs = build_verifier_prompts([solution("q1", 0, "Answer: 4", "4", True), solution("q1", 1, "It is 5, as 2 + 2 + 1 = 5.", "5", False)], POLICY)
    for judgment in both_judgments(model, tokenizer, pairs, system_prompt=None, batch_size=3, behavior_model="m"):
        prompt, reply = judgment["prompt_token_ids"], judgment["completion_token_ids"]
        assert prompt == prompt_token_ids(tokenizer, judgment["prompt"])
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt + reply])).logits[0].float().log_softmax(-1)
        expected = [logprobs[len(prompt) - 1 + offset, token].item() for offset, token in enumerate(reply)]
        assert judgment["behavior_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_training_raises_p_yes_on_correct_pairs_and_lowers_it_on_wrong_ones(tiny_model_dir, tmp_path):
    solutions = [
        solution(f"q{a}", index, f"{a} + {a} = {2 * a + index}. Answer: {2 * a + index}", str(2 * a + index), index == 0, prompt=f"What is {a} + {a}?")
        for a in (2, 3, 4)
        for index in (0, 1)
    ]  # fmt: skip
    pairs = build_verifier_prompts(solutions, POLICY)
    write_records(tmp_path / "data" / VERIFIER_TRAIN, pairs)
    write_records(tmp_path / "data" / VERIFIER_EVAL, pairs)
    config = load_config(
        None,
        ["verifier.learning_rate=1e-3", "verifier.epochs=20", "train.batch_size=12", "train.gradient_accumulation=1", "sample.batch_size=12"],
    )  # fmt: skip
    prompts = [pair["prompt"] for pair in pairs]
    before = p_correct(*load_policy(tiny_model_dir, device=torch.device("cpu")), prompts, None, batch_size=6)

    summary = run_train_verifier(config, tiny_model_dir, tmp_path / "data", tmp_path / "verifier", tmp_path / "work")

    assert summary["judgments"] == summary["curated_count"] == 2 * len(pairs)
    assert summary["curated_positives"] == summary["curated_negatives"] == len(pairs)
    assert summary["first_step_log_ratio_per_token"] == pytest.approx(0.0, abs=1e-5)  # π/μ = 1 at the first step
    after = p_correct(*load_policy(str(tmp_path / "verifier"), device=torch.device("cpu")), prompts, None, batch_size=6)
    for pair, old, new in zip(pairs, before, after):
        assert (new > old) == pair["solution_correct"], (pair["prompt_id"], old, new)


# --- end to end --------------------------------------------------------------------------------


def test_branch_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    config = load_config(
        None,
        ["verifier.train_questions=2", "verifier.solutions_per_question=2", "verifier.learning_rate=1e-3", "task.eval_size=2",
         "sample.max_new_tokens=4", "sample.temperature=1.0", "train.batch_size=4", "evaluate.batch_size=8"],
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
    judgments = read_records(tmp_path / "work" / "samples.jsonl")  # topr.workflow.IterationFiles
    assert trained["judgments"] == len(judgments) == 2 * summary["verifier_train_prompts"]
    assert trained["curated_count"] == len(judgments) and trained["curated_positives"] == trained["curated_negatives"]
    assert trained["steps"] >= 1
    before, after = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(tmp_path / "verifier" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)

    report = tmp_path / "report" / "verifier.json"
    metrics = run_evaluate_verifier(config, tiny_model_dir, str(tmp_path / "verifier"), data, report)
    assert json.loads(report.read_text())["metrics"] == metrics
    assert (metrics["vote_k"], metrics["vote_questions"], metrics["verifier_eval_pairs"]) == (2, 2, len(pairs_eval))
    for name in ("verifier_accuracy_base", "verifier_accuracy_trained", "vote_pass_at_1", "vote_majority", "vote_weighted_base", "vote_weighted_trained"):
        assert 0 <= metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"] <= 1, name
    for name in ("base", "trained"):
        assert 0 <= metrics[f"verifier_invalid_rate_{name}"] <= 1
        assert metrics[f"vote_gain_{name}_ci_low"] <= metrics[f"vote_gain_{name}"] <= metrics[f"vote_gain_{name}_ci_high"]
        # The random model's solutions may all be wrong: no AUROC then.
        both_labels = len({p["reference"] for p in pairs_eval}) == 2
        assert (f"verifier_auroc_{name}" in metrics) == (f"verifier_balanced_accuracy_{name}" in metrics) == both_labels
    assert metrics["vote_pass_at_1"] == pytest.approx(sum(r["correct"] for r in solutions_eval) / 4)
