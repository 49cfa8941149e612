"""The generative verifier branch: a copy of the starting model learns to judge solutions, then weights a vote.

After the last iteration (``verifier.enabled``):

1. ``run_verifier_data``: the final policy samples ``solutions_per_question`` solutions for the
   first ``train_questions`` training prompts and for every held-out prompt; the task's checker
   labels them, and each (question, solution) pair becomes a verifier prompt ("Is this solution
   correct? Yes or No", without the policy's answer-format instruction, which the task takes
   off: ``Task.question_text``) whose reference is the
   label. The training pairs are balanced so that the verifier cannot do well by always giving
   the more common answer.
2. ``run_train_verifier``: the starting model is trained on the training pairs with the policy's
   machinery (verify, curate, train) and the ``verifier`` section's objective. Instead of being
   sampled, both judgments of every pair, "Yes" and "No", are scored under the starting model
   (``both_judgments``): the one that matches the label earns +1, the other -1 (the ``verifier``
   task, ``topr.tasks.verifier``), so the right label is a positive for every pair whatever the
   model would have said. Sampled judgments from a model that always says "No" never give a
   "Yes" positive, and nothing then teaches it to say "Yes".
3. ``run_evaluate_verifier``: the starting and the trained verifier judge the held-out pairs
   (greedy accuracy, malformed-judgment rate; ``judgment_metrics``: AUROC and balanced accuracy of
   their P(correct)), and their P(correct) of each held-out solution weights a vote over each
   question's solutions: an answer scores the sum of the P(correct) of the solutions that reach
   it. The weighted vote is compared with maj@k, question by question, and with the mean sample
   accuracy over the same solutions.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import torch

from topr.config import Config, build_config, config_to_dict
from topr.curate import run_curate
from topr.evaluate import run_evaluate
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.metrics import auroc, auroc_interval, balanced_accuracy, majority_vote, vote_correct, weighted_vote, wilson_interval
from topr.models import load_policy, model_identity, prompt_token_ids, set_threads
from topr.records import PROMPT_FIELDS, Record, read_records, write_json, write_records
from topr.sample import SamplingParams, opened_engine, sample_records
from topr.stats import problem_gain
from topr.tasks import Task, get_task
from topr.train import StepCallback, launch_train
from topr.verify import run_verify, verify_records
from topr.workflow import IterationFiles

log = logging.getLogger(__name__)

SOLUTIONS_TRAIN = "solutions_train.jsonl"
SOLUTIONS_EVAL = "solutions_eval.jsonl"
VERIFIER_TRAIN = "verifier_train.jsonl"
VERIFIER_EVAL = "verifier_eval.jsonl"
YES, NO = "Yes", "No"
JUDGMENTS = (YES, NO)  # a pair's training judgments, as sample_index 0 and 1
SOLUTION_FIELDS = ("prompt_id", "prompt", "completion", "sample_index", "extracted", "correct")

def verifier_prompt(question: str, solution: str, task: Task) -> str:
    """The verifier's prompt for one (question, solution) pair; ``question`` is a prompt of the
    policy's ``task``, shown without its answer-format instruction (``Task.question_text``)."""
    return (
        "Here is a question and a proposed solution.\n\n"
        f"Question:\n{task.question_text(question)}\n\n"
        f"Proposed solution:\n{solution}\n\n"
        "Is the proposed solution correct? Reply with Yes or No only."
    )


def solution_id(question_id: str, solution_index: int) -> str:
    """The verifier prompt id of a question's ``solution_index``-th solution."""
    return f"{question_id}/s{solution_index}"


def build_verifier_prompts(verified: Sequence[Record], task: Task) -> list[Record]:
    """One verifier prompt per non-empty verified solution to a prompt of ``task``, its reference
    the checker's verdict."""
    return [
        {
            "prompt_id": solution_id(record["prompt_id"], record["sample_index"]),
            "prompt": verifier_prompt(record["prompt"], record["completion"], task),
            "reference": YES if record["correct"] else NO,
            "question_id": record["prompt_id"],
            "solution_index": record["sample_index"],
            "solution_answer": record["extracted"],
            "solution_correct": record["correct"],
        }
        for record in verified
        if record["completion"].strip()
    ]


def balance_labels(records: Sequence[Record], seed: int) -> list[Record]:
    """Keep a seeded random subset of the majority label as large as the minority; order is kept.

    When one label is missing altogether, balancing would leave nothing to train on: every
    record is kept and a warning logged.
    """
    by_label: dict[str, list[int]] = {YES: [], NO: []}
    for index, record in enumerate(records):
        by_label[record["reference"]].append(index)
    smaller = min(len(indices) for indices in by_label.values())
    if smaller == 0:
        log.warning("the verifier's training pairs are all labelled alike; kept all %d, unbalanced", len(records))
        return list(records)
    rng = random.Random(seed)
    kept = {index for indices in by_label.values() for index in rng.sample(indices, smaller)}
    return [record for index, record in enumerate(records) if index in kept]


def verifier_config(config: Config, train_path: str | Path, eval_path: str | Path) -> Config:
    """The configuration the verifier is trained and evaluated with: the ``verifier`` task on the
    given prompt files, rewarded by its checker alone (+1 for a judgment that matches the label,
    -1 otherwise: the policy's reward settings are for the policy's completions), the
    ``verifier`` section's settings, the rest as in ``config``.

    ``train_size`` and ``eval_size`` are upper bounds on the number of verifier prompts (one per
    solution), so every prompt of the files is used. Training takes both judgments of every pair
    (``both_judgments``), one positive and one negative, and computes π at temperature 1, the
    temperature their behaviour log-probs were scored at, so the first step's ratio π/μ is 1.
    Its set is balanced by construction, so it trains with baseline 0 (both judgments weigh 1)
    and takes a step per global batch of train.batch_size × gradient_accumulation judgments,
    whatever the policy's baseline and steps per epoch.
    """
    verifier = config.verifier
    data = config_to_dict(config)
    data["task"].update(
        name="verifier",
        train_path=str(train_path),
        eval_path=str(eval_path),
        train_size=verifier.train_questions * verifier.solutions_per_question,
        eval_size=config.task.eval_size * verifier.solutions_per_question,
        eval_split="test",  # its held-out file: the policy's held-out questions, whichever split they are
        reward_function=None,
        correctness_weight=1.0,
        format_weight=0.0,
    )
    data["sample"].update(
        samples_per_prompt=len(JUDGMENTS), temperature=1.0, max_new_tokens=verifier.max_new_tokens, first_iteration_samples=None
    )
    data["evaluate"].update(samples_per_prompt=0, max_new_tokens=verifier.max_new_tokens, cut_at_tokens=None)
    data["curate"].update(strategy="all", target_positive_fraction=None)
    data["train"].update(
        objective=verifier.objective,
        learning_rate=verifier.learning_rate,
        epochs=verifier.epochs,
        policy_temperature=None,
        baseline=0.0,
        steps_per_epoch=None,
        negatives_skip_shared_tokens=False,
    )
    return build_config(data, source="verifier configuration")


def data_files(data_dir: str | Path) -> tuple[Path, Path]:
    """The verifier's training and held-out prompt files in a ``run_verifier_data`` folder."""
    return Path(data_dir, VERIFIER_TRAIN), Path(data_dir, VERIFIER_EVAL)


def reply_token_ids(tokenizer, word: str) -> list[int]:
    """The tokens of a reply that is ``word`` and nothing more: the word as a reply starts with it
    (no leading space), then end-of-sequence, the token sampling stops at."""
    return tokenizer.encode(word, add_special_tokens=False) + [tokenizer.eos_token_id]


def judgment_token_ids(tokenizer) -> tuple[int, int]:
    """The first token of the reply "Yes" and of the reply "No"."""
    return tuple(reply_token_ids(tokenizer, word)[0] for word in JUDGMENTS)


def both_judgments(
    model, tokenizer, pairs: Sequence[Record], system_prompt: str | None, batch_size: int, behavior_model: str
) -> list[Record]:
    """Both training judgments of every verifier prompt, as sample records: "Yes" (``sample_index``
    0) then "No" (1), each ending the reply.

    They are scored, not sampled: the checker's label makes one of them the positive whatever
    the model would have said. ``behavior_logprobs`` are log π of each reply token under
    ``model`` at temperature 1, computed in float32 by the code training uses
    (``topr.logprobs``), so the first training step's ratio π/μ is 1.
    """
    replies = [reply_token_ids(tokenizer, word) for word in JUDGMENTS]
    records = [
        {
            **pair,
            "prompt_token_ids": prompt_token_ids(tokenizer, pair["prompt"], system_prompt),
            "completion": word,
            "completion_token_ids": reply,
            "sample_index": index,
            "behavior_model": behavior_model,
            "finish_reason": "stop",
        }
        for pair in pairs
        for index, (word, reply) in enumerate(zip(JUDGMENTS, replies))
    ]
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        for record, logprobs in zip(batch, _reply_logprobs(model, batch, tokenizer.pad_token_id)):
            record["behavior_logprobs"] = logprobs
    return records


@torch.no_grad()
def _reply_logprobs(model, batch: Sequence[Record], pad_token_id: int) -> list[list[float]]:
    """log π of each record's completion tokens, in float32 (no autocast)."""
    tensors = batch_prompt_completions([r["prompt_token_ids"] for r in batch], [r["completion_token_ids"] for r in batch], pad_token_id)
    logprobs = completion_logprobs(model, **{name: value.to(model.device) for name, value in tensors.items()}).cpu()
    return [row[: len(record["completion_token_ids"])].tolist() for row, record in zip(logprobs, batch)]


def run_judgments(config: Config, model_dir: str, pairs_path: str | Path, output_path: str | Path) -> dict:
    """Write both judgments of every verifier prompt in ``pairs_path``, scored under ``model_dir``."""
    pairs = read_records(pairs_path, required=PROMPT_FIELDS)
    set_threads(config.model.threads)
    model, tokenizer = load_policy(model_dir, chat_template=config.model.chat_template)
    records = both_judgments(model, tokenizer, pairs, config.model.system_prompt, config.sample.batch_size, model_identity(model_dir))
    write_records(output_path, records)
    return {"prompts": len(pairs), "samples": len(records)}


@torch.no_grad()
def p_correct(model, tokenizer, prompts: Sequence[str], system_prompt: str | None, batch_size: int) -> list[float]:
    """For each verifier prompt, P(Yes) / (P(Yes) + P(No)) of the reply's first token, at temperature 1.

    Normalized over the two judgments: the mass on other first tokens ("The", "**") says how
    well the model follows the format, which the greedy invalid rate reports, not which of the
    two answers it prefers; unnormalized, a verifier that rarely starts with either word would
    give every solution a weight near 0 in the vote.

    Prompts are left-padded with explicit position ids, so each prompt's last position sees
    exactly what an unpadded forward pass would, and only that position's logits are computed.
    """
    yes, no = judgment_token_ids(tokenizer)
    probabilities: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_token_ids(tokenizer, prompt, system_prompt) for prompt in prompts[start : start + batch_size]]
        padded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt", padding_side="left").to(model.device)
        positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**padded, position_ids=positions, logits_to_keep=1).logits[:, -1].float()
        probabilities += torch.sigmoid(logits[:, yes] - logits[:, no]).tolist()
    return probabilities


def judgment_metrics(name: str, correct: Sequence[bool], p: Sequence[float]) -> dict[str, float]:
    """How well verifier ``name``'s P(correct) tells correct solutions (``correct``) from wrong ones.

    ``verifier_auroc_<name>`` with its 95% interval (``_ci_low``, ``_ci_high``; stratified
    bootstrap over pairs, which treats a question's solutions as independent, so it is
    optimistic): the chance that a correct solution gets a higher P(correct) than a wrong one;
    ``verifier_balanced_accuracy_<name>``: the mean of the accuracies on correct and on wrong
    solutions, P(correct) >= 0.5 counting as "Yes". Both stay at 0.5 for a verifier that gives
    every pair the same answer, where plain accuracy shows the share of the more common label.
    ``verifier_p_correct_on_correct_<name>`` and ``..._on_wrong_<name>``: the mean P(correct) of
    each group. None is defined when every pair has the same label: then none is returned.
    """
    correct = [bool(label) for label in correct]
    if len(set(correct)) < 2:
        log.warning("the held-out pairs are all labelled alike: no AUROC or balanced accuracy for verifier %s", name)
        return {}
    low, high = auroc_interval(correct, p)
    key = f"verifier_auroc_{name}"
    return {
        key: auroc(correct, p),
        f"{key}_ci_low": low,
        f"{key}_ci_high": high,
        f"verifier_balanced_accuracy_{name}": balanced_accuracy(correct, p),
        f"verifier_p_correct_on_correct_{name}": fmean(q for q, label in zip(p, correct) if label),
        f"verifier_p_correct_on_wrong_{name}": fmean(q for q, label in zip(p, correct) if not label),
    }


@dataclass(frozen=True)
class QuestionVotes:
    """One held-out question's k solutions: extracted answers (None where none), the checker's
    verdicts, and per verifier (e.g. "base", "trained") its P(correct) of each solution."""

    answers: tuple[str | None, ...]
    correct: tuple[bool, ...]
    weights: Mapping[str, tuple[float, ...]]


def _rate(name: str, successes: int, n: int) -> dict[str, float]:
    low, high = wilson_interval(successes, n)
    return {name: successes / n, f"{name}_ci_low": low, f"{name}_ci_high": high}


def vote_metrics(questions: Sequence[QuestionVotes]) -> dict[str, float]:
    """Accuracies over held-out questions, each with its 95% Wilson interval, and each weighted
    vote against the majority vote on the same questions.

    ``vote_pass_at_1``: the fraction of correct solutions (its interval treats the k·n solutions
    as independent, so it is optimistic); ``vote_majority``: maj@k; ``vote_weighted_<verifier>``:
    the answer with the largest sum of P(correct) is correct. Ties go to the answer seen first.
    ``vote_gain_<verifier>``: weighted minus majority accuracy, question by question
    (``topr.stats.problem_gain``), with its paired bootstrap interval (``_ci_low``, ``_ci_high``),
    exact McNemar p-value (``_p_value``) and the questions it gained and lost
    (``_questions_gained``, ``_questions_lost``). ``vote_k`` and ``vote_questions`` say what was
    voted on.
    """
    if not questions:
        raise ValueError("no held-out questions to vote on")
    k = len(questions[0].answers)
    solutions = sum(len(question.correct) for question in questions)
    metrics = {"vote_k": k, "vote_questions": len(questions)}
    metrics |= _rate("vote_pass_at_1", sum(sum(question.correct) for question in questions), solutions)
    majority = [vote_correct(q.answers, q.correct, majority_vote(q.answers)) for q in questions]
    metrics |= _rate("vote_majority", sum(majority), len(questions))
    for name in questions[0].weights:
        weighted = [vote_correct(q.answers, q.correct, weighted_vote(q.answers, q.weights[name])) for q in questions]
        metrics |= _rate(f"vote_weighted_{name}", sum(weighted), len(questions))
        metrics |= _gain(f"vote_gain_{name}", weighted, majority)
    return metrics


def _gain(name: str, after: Sequence[bool], before: Sequence[bool]) -> dict[str, float]:
    gain = problem_gain(after, before)
    return {
        name: gain.difference,
        f"{name}_ci_low": gain.interval[0],
        f"{name}_ci_high": gain.interval[1],
        f"{name}_p_value": gain.p_value,
        f"{name}_questions_gained": gain.gained,
        f"{name}_questions_lost": gain.lost,
    }


def question_votes(solutions: Sequence[Record], weights: Mapping[str, Mapping[str, float]]) -> list[QuestionVotes]:
    """Group verified solutions by question, in first-seen order and sample order.

    ``weights[verifier][verifier prompt id]`` is that verifier's P(correct); a solution without a
    verifier prompt (an empty completion) weighs 0.
    """
    by_question: dict[str, list[Record]] = defaultdict(list)
    for record in solutions:
        by_question[record["prompt_id"]].append(record)
    votes = []
    for group in by_question.values():
        group.sort(key=lambda record: record["sample_index"])
        ids = [solution_id(record["prompt_id"], record["sample_index"]) for record in group]
        votes.append(
            QuestionVotes(
                answers=tuple(record["extracted"] for record in group),
                correct=tuple(bool(record["correct"]) for record in group),
                weights={name: tuple(table.get(id_, 0.0) for id_ in ids) for name, table in weights.items()},
            )
        )
    return votes


def _yes_share(records: Sequence[Record]) -> float:
    return sum(record["reference"] == YES for record in records) / len(records) if records else 0.0


def _sample_solutions(config: Config, engine, tokenizer, problems: list[Record], policy_dir: str) -> list[Record]:
    """``solutions_per_question`` solutions per problem at the policy's sampling settings, verified."""
    params = replace(
        SamplingParams.from_config(config.sample), n=config.verifier.solutions_per_question, seed=config.verifier.seed
    )
    records = sample_records(engine, tokenizer, problems, params, config.model.system_prompt, model_identity(policy_dir))
    verified, _ = verify_records(records, get_task(config.task), config.task.extraction)
    return verified


def run_verifier_data(
    config: Config, policy_dir: str, train_prompts_path: str | Path, eval_prompts_path: str | Path, output_dir: str | Path
) -> dict:
    """Sample and label the final policy's solutions; write them and the verifier's prompt files."""
    verifier = config.verifier
    train_problems = read_records(train_prompts_path, required=PROMPT_FIELDS)[: verifier.train_questions]
    eval_problems = read_records(eval_prompts_path, required=PROMPT_FIELDS)[: config.task.eval_size]
    with opened_engine(config, policy_dir, config.sample.batch_size) as (engine, tokenizer):
        train_solutions = _sample_solutions(config, engine, tokenizer, train_problems, policy_dir)
        eval_solutions = _sample_solutions(config, engine, tokenizer, eval_problems, policy_dir)
    task = get_task(config.task)
    train_prompts = build_verifier_prompts(train_solutions, task)
    if verifier.balance:
        train_prompts = balance_labels(train_prompts, verifier.seed)
    eval_prompts = build_verifier_prompts(eval_solutions, task)
    output_dir = Path(output_dir)
    for name, prompts in ((VERIFIER_TRAIN, train_prompts), (VERIFIER_EVAL, eval_prompts)):
        if not prompts:
            raise ValueError(f"{output_dir / name}: no verifier prompts (every sampled solution was empty)")
    write_records(output_dir / SOLUTIONS_TRAIN, train_solutions)
    write_records(output_dir / SOLUTIONS_EVAL, eval_solutions)
    write_records(output_dir / VERIFIER_TRAIN, train_prompts)
    write_records(output_dir / VERIFIER_EVAL, eval_prompts)
    summary = {
        "train_questions": len(train_problems),
        "eval_questions": len(eval_problems),
        "train_solutions": len(train_solutions),
        "eval_solutions": len(eval_solutions),
        "train_solution_accuracy": sum(r["correct"] for r in train_solutions) / len(train_solutions),
        "eval_solution_accuracy": sum(r["correct"] for r in eval_solutions) / len(eval_solutions),
        "verifier_train_prompts": len(train_prompts),
        "verifier_eval_prompts": len(eval_prompts),
        "verifier_train_yes_share": _yes_share(train_prompts),
        "verifier_eval_yes_share": _yes_share(eval_prompts),
    }
    log.info("verifier data: %(verifier_train_prompts)d training and %(verifier_eval_prompts)d held-out pairs", summary)
    return summary


def run_train_verifier(
    config: Config,
    base_model_dir: str,
    data_dir: str | Path,
    output_dir: str | Path,
    work_dir: str | Path,
    on_step: StepCallback | None = None,
) -> dict:
    """Train the starting model as a verifier on ``data_dir``'s training pairs; save it to ``output_dir``.

    The policy's own stages with ``verifier_config``, sampling aside: both judgments of every
    pair are scored under the starting model (``run_judgments``), verified against the labels,
    curated (all kept) and trained on. ``work_dir`` receives the intermediate files under the
    names an iteration gives them (``topr.workflow.IterationFiles``: the judgments in
    ``samples.jsonl``, then ``verified.jsonl``, ``train_set.jsonl`` and ``composition.json``).
    """
    verifier, files = verifier_config(config, *data_files(data_dir)), IterationFiles(Path(work_dir))
    files.folder.mkdir(parents=True, exist_ok=True)
    judgments = run_judgments(verifier, base_model_dir, verifier.task.train_path, files.samples)
    run_verify(verifier.task, files.samples, files.verified)
    composition = run_curate(verifier, files.verified, files.train_set, files.composition)
    trained = launch_train(verifier, base_model_dir, files.train_set, output_dir, on_step)
    return {
        "judgments": judgments["samples"],
        "curated_count": composition["count"],
        "curated_positives": composition["positives"],
        "curated_negatives": composition["negatives"],
        **trained,
    }


def _judge(config: Config, model_dir: str, name: str) -> tuple[dict[str, float], dict[str, float]]:
    """A verifier's greedy accuracy and invalid rate on the held-out pairs, how its P(correct)
    separates them (``judgment_metrics``), and its P(correct) of each pair by prompt id."""
    prompts = read_records(config.task.eval_path, required=PROMPT_FIELDS)
    with tempfile.TemporaryDirectory(prefix="topr-verifier-") as scratch:
        greedy = run_evaluate(config, model_dir, config.task.eval_path, Path(scratch, "report.json"), Path(scratch, "judgments.jsonl"))
    metrics = {
        f"verifier_accuracy_{name}": greedy["pass_at_1"],
        f"verifier_accuracy_{name}_ci_low": greedy["pass_at_1_ci_low"],
        f"verifier_accuracy_{name}_ci_high": greedy["pass_at_1_ci_high"],
        f"verifier_invalid_rate_{name}": greedy["parse_failure_rate"],
    }
    model, tokenizer = load_policy(model_dir, chat_template=config.model.chat_template)
    weights = p_correct(model, tokenizer, [p["prompt"] for p in prompts], config.model.system_prompt, config.evaluate.batch_size)
    metrics |= judgment_metrics(name, [p["reference"] == YES for p in prompts], weights)
    return metrics, {p["prompt_id"]: weight for p, weight in zip(prompts, weights)}


def run_evaluate_verifier(
    config: Config, base_model_dir: str, verifier_dir: str, data_dir: str | Path, report_path: str | Path
) -> dict:
    """Judge the held-out pairs with the starting and the trained verifier; vote with their P(correct).

    Writes the report (both models' identities and the metrics) to ``report_path``; returns the metrics.
    """
    verifier = verifier_config(config, *data_files(data_dir))
    metrics: dict[str, float] = {"verifier_eval_pairs": len(read_records(verifier.task.eval_path))}
    weights = {}
    for name, model_dir in (("base", base_model_dir), ("trained", verifier_dir)):
        judged, weights[name] = _judge(verifier, model_dir, name)
        metrics |= judged
    solutions = read_records(Path(data_dir, SOLUTIONS_EVAL), required=SOLUTION_FIELDS)
    metrics |= vote_metrics(question_votes(solutions, weights))
    models = {"base": model_identity(base_model_dir), "trained": model_identity(verifier_dir)}
    write_json(report_path, {"models": models, "data": str(data_dir), "metrics": metrics})
    log.info(
        "verifier accuracy %.3f (base %.3f), AUROC %.3f (base %.3f); weighted vote %.3f, majority %.3f",
        metrics["verifier_accuracy_trained"], metrics["verifier_accuracy_base"],
        metrics.get("verifier_auroc_trained", math.nan), metrics.get("verifier_auroc_base", math.nan),
        metrics["vote_weighted_trained"], metrics["vote_majority"],
    )  # fmt: skip
    return metrics
