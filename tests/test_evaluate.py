"""The evaluation stage on a tiny model: its report holds each problem's greedy verdict and the
share of answers cut at the length limit."""

import json

import pytest

from topr.config import load_config
from topr.evaluate import run_evaluate
from topr.prompts import run_prompts
from topr.records import read_records

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
