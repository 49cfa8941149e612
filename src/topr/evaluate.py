"""The evaluation stage: held-out pass@1 (greedy), and pass@k and maj@k over k samples.

Greedy pass@1 is reported under the configured answer extraction (``pass_at_1``, which the gate
compares) and under each extraction side by side, as evaluation harnesses do:
``pass_at_1_strict`` (only the format the prompt asks for) and ``pass_at_1_flexible`` (the answer
however it is written).

Besides accuracy, it reports the signs of a degenerating policy on the greedy completions:
``parse_failure_rate`` (no answer could be extracted), ``empty_rate`` (nothing but whitespace),
``truncated_rate`` (cut off at ``evaluate.max_new_tokens`` before the end-of-sequence token) and
``mean_completion_tokens``.

With ``evaluate.cut_at_tokens`` set, every greedy completion is also scored cut at that many
tokens (``cut_records``): greedy decoding is deterministic, so the first tokens of a long decoding
are the short decoding's, and one pass at 4× the training length gives both verdicts
(``pass_at_1_cut``, ``truncated_rate_cut``). An answer right at 4× but not at 1× was cut, not wrong.

The model is loaded once; the greedy completions and the k samples come from the same engine
as training data does, and are scored by the task's own checker. Every evaluation of a run uses
the same held-out prompts and the same sampling seed, so iterations compare.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from topr.config import Config
from topr.metrics import PromptResult, summarize_evaluation
from topr.models import model_identity
from topr.records import PROMPT_FIELDS, Record, read_records, write_json, write_records
from topr.sample import SamplingParams, check_prompt_lengths, opened_engine, sample_records
from topr.tasks import EXTRACTIONS, Task, get_task
from topr.verify import verify_records

log = logging.getLogger(__name__)


def prompt_results(greedy: list[Record], sampled: list[Record]) -> list[PromptResult]:
    """Group verified greedy and sampled records into one ``PromptResult`` per prompt."""
    samples_by_prompt: dict[str, list[Record]] = defaultdict(list)
    for record in sampled:
        samples_by_prompt[record["prompt_id"]].append(record)
    results = []
    for record in greedy:
        samples = sorted(samples_by_prompt[record["prompt_id"]], key=lambda r: r["sample_index"])
        results.append(
            PromptResult(
                greedy_correct=record["correct"],
                greedy_unparsable=record["extracted"] is None,
                sample_answers=tuple(s["extracted"] for s in samples),
                sample_correct=tuple(s["correct"] for s in samples),
            )
        )
    return results


def pass_at_1_by_extraction(greedy: list[Record], task: Task) -> dict[str, float]:
    """The greedy completions' pass@1 under each extraction: ``pass_at_1_strict`` and
    ``pass_at_1_flexible``."""
    return {f"pass_at_1_{extraction}": verify_records(greedy, task, extraction)[1]["accuracy"] for extraction in EXTRACTIONS}


def cut_records(greedy: list[Record], tokens: int, tokenizer) -> list[Record]:
    """The greedy records as decoding would have left them at ``tokens`` tokens: longer completions
    cut there (finish_reason "length", text decoded from the kept tokens), the others as they are.
    Verify them again for their verdicts."""
    cut = []
    for record in greedy:
        ids = record["completion_token_ids"]
        if len(ids) <= tokens:
            cut.append(dict(record))
            continue
        kept = ids[:tokens]
        cut.append(
            {
                **record,
                "completion": tokenizer.decode(kept, skip_special_tokens=True),
                "completion_token_ids": kept,
                "behavior_logprobs": record["behavior_logprobs"][:tokens],
                "finish_reason": "length",
            }
        )
    return cut


def run_evaluate(config: Config, model_dir: str, prompts_path: str | Path, report_path: str | Path, completions_path: str | Path) -> dict:
    """Evaluate the model on the first ``task.eval_size`` held-out prompts; write report and completions."""
    evaluation = config.evaluate
    problems = read_records(prompts_path, required=PROMPT_FIELDS)[: config.task.eval_size]
    if not problems:
        raise ValueError(f"{prompts_path}: no held-out prompts to evaluate")
    task = get_task(config.task)
    extraction = config.task.extraction
    check_prompt_lengths(model_dir, problems, evaluation.max_new_tokens, config.model, prompts_path)
    identity = model_identity(model_dir)
    greedy_params = SamplingParams(n=1, temperature=0.0, max_new_tokens=evaluation.max_new_tokens)
    sample_params = SamplingParams(
        n=evaluation.samples_per_prompt, temperature=evaluation.temperature, max_new_tokens=evaluation.max_new_tokens, seed=evaluation.seed
    )
    sampled: list[Record] = []
    greedy_cut: list[Record] = []
    cut_summary: dict = {}
    with opened_engine(config, model_dir, evaluation.batch_size) as (engine, tokenizer):
        greedy, _ = verify_records(sample_records(engine, tokenizer, problems, greedy_params, config.model.system_prompt, identity), task, extraction)
        if evaluation.cut_at_tokens:
            greedy_cut, cut_summary = verify_records(cut_records(greedy, evaluation.cut_at_tokens, tokenizer), task, extraction)
        if evaluation.samples_per_prompt:
            drawn = sample_records(engine, tokenizer, problems, sample_params, config.model.system_prompt, identity)
            sampled, _ = verify_records(drawn, task, extraction)

    metrics = summarize_evaluation(prompt_results(greedy, sampled), seed=evaluation.seed)
    metrics |= pass_at_1_by_extraction(greedy, task)
    metrics["mean_completion_tokens"] = sum(len(r["completion_token_ids"]) for r in greedy) / len(greedy)
    metrics["empty_rate"] = sum(not r["completion"].strip() for r in greedy) / len(greedy)
    metrics["truncated_rate"] = truncated_rate(greedy)
    report = {"model": identity, "prompts": str(prompts_path), "metrics": metrics, "greedy_correct": verdicts(greedy)}
    if greedy_cut:
        metrics["pass_at_1_cut"] = cut_summary["accuracy"]
        metrics["truncated_rate_cut"] = truncated_rate(greedy_cut)
        report["greedy_correct_cut"] = verdicts(greedy_cut)
    decodings = (("greedy", greedy), ("greedy_cut", greedy_cut), ("sampled", sampled))
    write_records(completions_path, [{**r, "decoding": decoding} for decoding, records in decodings for r in records])
    write_json(report_path, report)
    log.info("held-out pass@1 %.3f [%.3f, %.3f] on %d prompts", metrics["pass_at_1"], metrics["pass_at_1_ci_low"], metrics["pass_at_1_ci_high"], len(problems))
    return metrics


def truncated_rate(greedy: list[Record]) -> float:
    return sum(r["finish_reason"] == "length" for r in greedy) / len(greedy)


def verdicts(greedy: list[Record]) -> dict[str, bool]:
    return {record["prompt_id"]: bool(record["correct"]) for record in greedy}


def format_report(metrics: dict) -> str:
    """A small table of an evaluation's metrics."""
    rows = [("pass@1 (greedy)", metrics["pass_at_1"], metrics["pass_at_1_ci_low"], metrics["pass_at_1_ci_high"])]
    if "k" in metrics:
        k = int(metrics["k"])
        rows.append((f"pass@{k}", metrics["pass_at_k"], metrics["pass_at_k_ci_low"], metrics["pass_at_k_ci_high"]))
        rows.append((f"maj@{k}", metrics["maj_at_k"], metrics["maj_at_k_ci_low"], metrics["maj_at_k_ci_high"]))
    lines = [f"{'metric':<16} {'value':>7}  95% CI", "-" * 38]
    lines += [f"{name:<16} {value:>7.1%}  [{low:.1%}, {high:.1%}]" for name, value, low, high in rows]
    lines += [f"{'pass@1 ' + extraction:<16} {metrics[f'pass_at_1_{extraction}']:>7.1%}" for extraction in EXTRACTIONS]
    if "pass_at_1_cut" in metrics:
        lines.append(f"{'pass@1 cut':<16} {metrics['pass_at_1_cut']:>7.1%}")
    lines.append(f"{'parse failures':<16} {metrics['parse_failure_rate']:>7.1%}")
    lines.append(f"{'prompts':<16} {int(metrics['n_prompts']):>7d}")
    return "\n".join(lines)
