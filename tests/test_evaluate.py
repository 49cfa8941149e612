"""The evaluation stage on a tiny model: its report holds each problem's greedy verdict and the
share of answers cut at the length limit."""

import json

import pytest

from topr.config import load_config
from topr.evaluate import format_report, pass_at_1_by_extraction, run_evaluate
from topr.prompts import run_prompts
from topr.records import read_records
from topr.tasks.gsm8k import Gsm8kTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_report_holds_each_problems_verdict_and_the_truncated_share(tiny_model_dir, tmp_path):
    config = load_config(None, ["task.eval_size=6", "task.train_size=2", "evaluate.max_new_tokens=3", "evaluate.samples_per_prompt=0"])
    eval_prompts = tmp_path / "eval.jsonl"
    run_prompts(config, tmp_path / "train.jsonl", eval_prompts)
    metrics = run_evaluate(config, tiny_model_dir, eval_prompts, tmp_path / "report.json", tmp_path / "completions.jsonl")

    greedy = [r for r in read_records(tmp_path / "completions.jsonl") if r["decoding"] == "greedy"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["greedy_correct"] == {r["prompt_id"]: r["correct"] for r in greedy}
    assert list(report["greedy_correct"]) == [p["prompt_id"] for p in read_records(eval_prompts)]
    truncated = [r["finish_reason"] == "length" for r in greedy]
    assert metrics["truncated_rate"] == pytest.approx(sum(truncated) / 6)
    assert all(len(r["completion_token_ids"]) == 3 for r, cut in zip(greedy, truncated) if cut)
    assert metrics["pass_at_1"] == metrics["pass_at_1_flexible"]  # the configured extraction's
    assert 0.0 <= metrics["pass_at_1_strict"] <= 1.0
    assert report["metrics"]["pass_at_1_strict"] == metrics["pass_at_1_strict"]
    assert "pass@1 strict" in format_report(metrics) and "pass@1 flexible" in format_report(metrics)


def test_pass_at_1_is_reported_under_both_extractions():
    greedy = [
        {"prompt_id": "a", "reference": "18", "completion": "The final answer is $18.00"},
        {"prompt_id": "b", "reference": "-3", "completion": "Answer: -3"},
        {"prompt_id": "c", "reference": "7", "completion": "Answer: 6"},
        {"prompt_id": "d", "reference": "5", "completion": "so the answer is 5."},
    ]
    assert pass_at_1_by_extraction(greedy, Gsm8kTask(None, None)) == {"pass_at_1_strict": 0.25, "pass_at_1_flexible": 0.75}
