"""What a new user brings, end to end: a Parquet dataset whose prompts are chat messages, a reward
function of their own, and LoRA; the whole loop runs on it, in process, tracked in MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from test_experiment_run import TINY
from topr.config import load_config
from topr.inprocess import run_in_process
from topr.records import read_records
from topr.tracking import default_tracking_uri

REWARD = '''
def brevity(record, completion):
    """0 for an empty answer, down to -1 at 40 characters."""
    return -min(1.0, len(completion) / 40)
'''


def _messages(a: int, b: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "Answer: 2"},
        {"role": "user", "content": f"What is {a} + {b}?"},
    ]


@pytest.mark.slow
def test_a_run_on_a_chat_dataset_with_a_reward_function_and_lora(tmp_path, tiny_model_dir):
    from datasets import Dataset

    for split, offset in (("train", 0), ("test", 50)):
        rows = [{"id": f"{split}-{i}", "messages": _messages(i + offset, 3), "answer": str(i + offset + 3)} for i in range(4)]
        Dataset.from_list(rows).to_parquet(tmp_path / f"{split}.parquet")
    (tmp_path / "brevity.py").write_text(REWARD)
    overrides = [
        f"model.path={tiny_model_dir}", "task.name=dataset", f"task.train_path={tmp_path / 'train.parquet'}",
        f"task.eval_path={tmp_path / 'test.parquet'}", "task.prompt_field=messages", "run.iterations=1",
        f"task.reward_function={tmp_path / 'brevity.py'}:brevity", "task.function_weight=0.5", "train.lora_rank=4", *TINY,
    ]  # fmt: skip
    tracking_uri = default_tracking_uri(tmp_path / "runs")
    parent_run_id = run_in_process(load_config(None, overrides), tmp_path / "run", tracking_uri, "user-data")

    client = MlflowClient(tracking_uri)
    assert client.get_run(parent_run_id).info.status == "FINISHED"
    prompt = read_records(tmp_path / "run" / "iter0" / "train_prompts.jsonl")[0]
    number = int(prompt["prompt_id"].removeprefix("train-"))
    assert prompt["messages"][:3] == _messages(number, 3)[:3]  # the system and few-shot turns kept
    assert prompt["prompt"].startswith(f"What is {number} + 3?") and prompt["messages"][-1]["content"] == prompt["prompt"]
    verified = read_records(tmp_path / "run" / "iter1" / "verified.jsonl")
    # The checker's ±1 plus half the brevity term, clipped: graded rewards, the wrong ones below −1 clipped to −1.
    for record in verified:
        expected = max(-1.0, min(1.0, (1.0 if record["correct"] else -1.0) - 0.5 * min(1.0, len(record["completion"]) / 40)))
        assert record["reward"] == pytest.approx(expected)
    (version,) = client.search_model_versions(f"name = '{load_config(None, overrides).run.registered_model}'")
    assert version.tags["topr.adapter_path"] == "adapter" and json.loads(version.tags.get("topr.lora_rank", "0")) == 4
