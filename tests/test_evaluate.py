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


def test_a_cut_long_decoding_scores_as_the_short_decoding_does(tiny_model_dir, tmp_path):
    """Greedy decoding is deterministic: 8 tokens cut at 3 are the 3-token decoding, verdicts too."""
    common = ["task.eval_size=6", "task.train_size=2", "evaluate.samples_per_prompt=0"]
    long_config = load_config(None, [*common, "evaluate.max_new_tokens=8", "evaluate.cut_at_tokens=3"])
    short_config = load_config(None, [*common, "evaluate.max_new_tokens=3"])
    eval_prompts = tmp_path / "eval.jsonl"
    run_prompts(long_config, tmp_path / "train.jsonl", eval_prompts)
    long_metrics = run_evaluate(long_config, tiny_model_dir, eval_prompts, tmp_path / "long.json", tmp_path / "long.jsonl")
    short_metrics = run_evaluate(short_config, tiny_model_dir, eval_prompts, tmp_path / "short.json", tmp_path / "short.jsonl")

    def by_decoding(path, decoding):
        return [r for r in read_records(path) if r["decoding"] == decoding]

    cut, short = by_decoding(tmp_path / "long.jsonl", "greedy_cut"), by_decoding(tmp_path / "short.jsonl", "greedy")
    fields = ("prompt_id", "completion", "completion_token_ids", "finish_reason", "extracted", "correct")
    assert [{f: r[f] for f in fields} for r in cut] == [{f: r[f] for f in fields} for r in short]
    assert long_metrics["pass_at_1_cut"] == short_metrics["pass_at_1"]
    assert long_metrics["truncated_rate_cut"] == short_metrics["truncated_rate"]
    assert any(len(r["completion_token_ids"]) > 3 for r in by_decoding(tmp_path / "long.jsonl", "greedy"))
    report = json.loads((tmp_path / "long.json").read_text())
    assert report["greedy_correct_cut"] == json.loads((tmp_path / "short.json").read_text())["greedy_correct"]
    assert "pass@1 cut" in format_report(long_metrics)


def test_a_cut_at_or_beyond_the_limit_is_refused():
    from topr.config import ConfigError

    with pytest.raises(ConfigError, match=r"cut_at_tokens \(64\) must be below max_new_tokens \(64\)"):
        load_config(None, ["evaluate.cut_at_tokens=64"])


def test_the_validation_split_gives_other_held_out_problems_than_test(tmp_path):
    test_config = load_config(None, ["task.eval_size=40"])
    validation_config = load_config(None, ["task.eval_size=40", "task.eval_split=validation"])
    run_prompts(test_config, tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    run_prompts(validation_config, tmp_path / "train2.jsonl", tmp_path / "validation.jsonl")
    test_ids = {r["prompt_id"] for r in read_records(tmp_path / "test.jsonl")}
    validation_ids = {r["prompt_id"] for r in read_records(tmp_path / "validation.jsonl")}
    assert all("-validation-" in i for i in validation_ids) and all("-test-" in i for i in test_ids)
    assert read_records(tmp_path / "train.jsonl") == read_records(tmp_path / "train2.jsonl")
