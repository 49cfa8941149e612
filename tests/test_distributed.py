"""Distributed training: torchrun workers on CPU (gloo) against one process, with the tiny Llama of conftest.

Two processes with gradient_accumulation=1 see the same global batches as one process with
gradient_accumulation=2 (same batch_size), and the gradient of a step is the mean over all its
sequences either way, so both must end with the same weights. Workers are real torchrun
processes (``--standalone``: a free port each time), each with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from topr import distributed, steps, storage
from topr.config import config_to_dict
from topr.distributed import Ranks, WorkerError
from topr.records import write_records
from topr.checkpoint import TrainCheckpoint
from topr.train import global_batches, launch_train, run_train

from helpers import train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread beats synchronising several

WORKERS = 2


@pytest.fixture(autouse=True)
def single_threaded_workers(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def fixed_records(count: int) -> list[dict]:
    """Fixed prompts and completions of 2-4 tokens, rewards ±1, behaviour log-probs near the tiny
    model's own (about -10.8 per token), so that TOPR's clip bounds act on some of them."""
    records = []
    for index in range(count):
        completion = [1000 + 17 * index + offset for offset in range(2 + index % 3)]
        records.append(
            {
                "prompt_id": f"q{index}",
                "prompt_token_ids": [1, 40 + index, 300 + 3 * index, 2],
                "completion_token_ids": completion,
                "behavior_logprobs": [-10.6 - 0.15 * (index % 4)] * len(completion),
                "reward": 1.0 if index % 3 else -1.0,
            }
        )
    return records


def config(*overrides):
    """``helpers.train_config`` (c = 0, a step per global batch) with micro-batches of 2 and the
    default (stratified) batch order."""
    return train_config("train.batch_size=2", *overrides)


def one_process(tmp_path, model_dir, records, cfg):
    """The reference: ``run_train`` in this process; returns (output dir, summary, history)."""
    data = tmp_path / "one.jsonl"
    write_records(data, records)
    history = []
    summary = run_train(cfg, model_dir, data, tmp_path / "one", on_step=lambda step, stats: history.append((step, stats)))
    assert [step for step, _ in history] == list(range(summary["steps"]))
    return tmp_path / "one", summary, [stats for _, stats in history]


def assert_same_weights(left: Path, right: Path) -> None:
    a, b = load_file(left / "model.safetensors"), load_file(right / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_history(history: list[dict], reference: list[dict]) -> None:
    assert len(history) == len(reference)
    for stats, expected in zip(history, reference):
        assert set(stats) == set(expected)  # a step without negatives has no figures on them, either way
        names = ("loss", "grad_norm", "positive_fraction", "mean_weight_negative", "completion_tokens_mean",
                 "ratio_negative_p50", "log_ratio_per_token", "positive_weight_share")  # fmt: skip
        for name in set(names) & set(expected):
            assert stats[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
        assert stats["tokens_per_second"] > 0


# ----------------------------------------------------------------------------- global batches and shards


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_every_sequence_of_a_global_batch_goes_to_exactly_one_rank(world_size, batch_size):
    for length in range(1, 3 * world_size * batch_size + 2):
        batch = [f"r{i}" for i in range(length)]
        parts = [distributed.shard(batch, Ranks(rank, world_size)) for rank in range(world_size)]
        assert [item for part in parts for item in part] == batch  # each once, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        micro = [distributed.micro_batches(batch, batch_size, Ranks(rank, world_size)) for rank in range(world_size)]
        assert len({len(m) for m in micro}) == 1  # the same number of passes on every rank
        for part, batches in zip(parts, micro):
            assert all(len(b) <= batch_size for b in batches)
            assert [item for b in batches for item in b] == part
        if length < world_size:  # a short last batch leaves some ranks nothing but padding
            assert micro[-1] == [[]]


def test_global_batches_reshuffle_each_epoch_and_only_the_last_is_short():
    """Global batches depend only on their size B·A·N, so N processes with accumulation A take
    the batches of one process with accumulation N·A."""
    records = [{"prompt_id": f"q{i}"} for i in range(7)]
    batches = global_batches(records, 2 * 2, epochs=2, seed=3)
    assert [len(b) for b in batches] == [4, 4, 4, 2]  # 14 sequences; only the last batch is short
    order = [r["prompt_id"] for b in batches for r in b]
    assert sorted(order[:7]) == sorted(order[7:]) == sorted(r["prompt_id"] for r in records)  # each epoch once
    assert order[:7] != order[7:]  # reshuffled
    assert global_batches(records, 4, 2, seed=3) == batches  # deterministic


def test_process_count_and_when_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.process_count(3) == 3
    assert distributed.process_count(None) == max(torch.cuda.device_count(), 1)
    assert distributed.should_launch(2) and not distributed.should_launch(1)
    assert distributed.current_ranks() == Ranks(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.current_ranks() == Ranks(1, 2, 1) and not distributed.current_ranks().main
    assert not distributed.should_launch(2)  # already a worker: never launch again


# ----------------------------------------------------------------------------- torchrun workers


@pytest.fixture(scope="module")
def two_epochs(tiny_model_dir, tmp_path_factory):
    """7 records, 2 epochs, global batches of 4: 4, 4, 4 and a short last one of 2."""
    records = fixed_records(7)
    reference = one_process(tmp_path_factory.mktemp("reference"), tiny_model_dir, records, config("train.epochs=2", "train.gradient_accumulation=2"))
    assert reference[1]["steps"] == 4
    return records, reference


def test_torchrun_two_processes_end_with_the_weights_of_one(tiny_model_dir, tmp_path, two_epochs, s3):
    """What a researcher types: torchrun --nproc-per-node 2 -m topr.cli train ... (DDP), here with
    s3:// paths: every rank downloads its own copies, rank 0 alone publishes the model."""
    records, (reference_dir, reference, reference_history) = two_epochs
    write_records(tmp_path / "data.jsonl", records)
    data = storage.upload_file(tmp_path / "data.jsonl", f"{s3}/iter1/train_set.jsonl")
    storage.publish_directory(tiny_model_dir, f"{s3}/iter0/model")
    output, summary_path = f"{s3}/iter1/model", tmp_path / "summary.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORKERS}", "-m", "topr.cli",
        "train", "--model", f"{s3}/iter0/model", "--data", data, "--output", output, "--summary", str(summary_path),
        "sample.temperature=1.0", "train.learning_rate=3e-3", "train.batch_size=2", "train.epochs=2",
        "train.gradient_accumulation=1", "train.baseline=0", "train.steps_per_epoch=null",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    assert_same_weights(storage.fetch_directory(output, tmp_path / "trained"), reference_dir)  # checked against its manifest
    summary = json.loads(summary_path.read_text())
    assert summary["processes"] == WORKERS and summary["steps"] == reference["steps"]
    assert summary["tokens"] == reference["tokens"]  # every rank's tokens counted once
    assert_same_history(summary["history"], reference_history)
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)
    assert json.loads(result.stdout)["weights_sha256"] == summary["weights_sha256"]  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "summary.json", "trained"]


def test_fsdp_two_processes_end_with_the_weights_of_one(tiny_model_dir, tmp_path, two_epochs, capsys):
    """FSDP2 (fully_shard) on gloo: the full state dict is gathered to rank 0 and saved."""
    records, (reference_dir, reference, reference_history) = two_epochs
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    cfg = config("train.epochs=2", f"train.processes={WORKERS}", "train.parallelism=fsdp")
    history = []
    summary = launch_train(cfg, tiny_model_dir, data, tmp_path / "model", on_step=lambda step, stats: history.append((step, stats)))
    assert "wrapping the model for 2 processes: FSDP2 fully_shard" in capsys.readouterr().err  # relayed from rank 0
    assert summary["processes"] == WORKERS and "history" not in summary
    assert [step for step, _ in history] == list(range(reference["steps"]))
    assert_same_history([stats for _, stats in history], reference_history)
    assert_same_weights(tmp_path / "model", reference_dir)
    assert json.loads((tmp_path / "model" / "topr_model.json").read_text())["weights_sha256"] == summary["weights_sha256"]


def test_ddp_workers_checkpoint_and_a_second_launch_resumes_from_the_last_step(tiny_model_dir, tmp_path, two_epochs):
    """The workers get the checkpoint's path; rank 0 saves after every step but the last, so a
    second launch on the same job resumes at the last step: it replays the steps before it,
    takes that one, and ends with the weights of one process."""
    records, (reference_dir, reference, reference_history) = two_epochs
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    cfg = config("train.epochs=2", f"train.processes={WORKERS}", "train.checkpoint_minutes=0")
    checkpoint = TrainCheckpoint(tmp_path / "checkpoint" / "train.pt", every_minutes=0)
    launch_train(cfg, tiny_model_dir, data, tmp_path / "first", checkpoint=checkpoint)
    saved = torch.load(checkpoint.path, weights_only=True)
    assert saved["next_step"] == reference["steps"] - 1 and len(saved["history"]) == reference["steps"] - 1

    history = []
    launch_train(cfg, tiny_model_dir, data, tmp_path / "resumed", lambda step, stats: history.append((step, stats)), checkpoint)
    assert [step for step, _ in history] == list(range(reference["steps"]))
    assert_same_history([stats for _, stats in history], reference_history)
    assert_same_weights(tmp_path / "resumed", reference_dir)


class RecordingRun:
    """Stands in for ``topr.tracking.StageRun``: records what ``steps.train`` logs."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.logged: dict = {}

    def log_metrics(self, metrics, step=0, on_parent=False):
        self.metrics.append((step, dict(metrics)))

    def log_steps(self, steps):
        self.metrics += [(step, dict(figures)) for step, _, figures in steps]

    def log_params(self, params):
        pass

    def log_dataset(self, path, name, context, source=None):
        pass

    def log_artifacts(self, directory, name):
        pass

    def log_text(self, text, name):
        pass

    def parent_tags(self):
        return {}

    def register_model(self, name, artifact, tags):
        return "1"


def test_the_train_step_launches_workers_and_logs_every_step(tiny_model_dir, tmp_path, monkeypatch):
    """steps.train with train.processes=2: torchrun workers, then each step's figures at its step.

    9 records, one epoch, global batches of 4: the last holds one sequence, so rank 1 runs a
    zero-weight micro-batch there.
    """
    records = fixed_records(9)
    reference_dir, reference, reference_history = one_process(tmp_path, tiny_model_dir, records, config("train.gradient_accumulation=2"))
    assert reference["steps"] == 3
    run = RecordingRun()

    @contextmanager
    def recording_stage_run(tracking_uri, parent_run_id, stage, iteration, part=""):
        yield run

    monkeypatch.setattr(steps, "stage_run", recording_stage_run)
    data, samples = tmp_path / "train_set.jsonl", tmp_path / "samples.jsonl"
    write_records(data, records)
    write_records(samples, records)
    config_json = json.dumps(config_to_dict(config(f"train.processes={WORKERS}")))
    summary = steps.train(steps.StageContext.from_pipeline(config_json, "unused", "parent", 1), tiny_model_dir, str(data), str(samples), str(tmp_path / "model"))

    assert summary["processes"] == WORKERS and summary["registered_version"] == 1
    assert_same_weights(tmp_path / "model", reference_dir)
    step_metrics = [(step, metrics) for step, metrics in run.metrics if "grad_norm" in metrics]
    assert [step for step, _ in step_metrics] == [0, 1, 2]
    assert_same_history([metrics for _, metrics in step_metrics], reference_history)


def test_a_failing_worker_is_a_clear_error(tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, fixed_records(3))
    cfg = config(f"train.processes={WORKERS}")
    with pytest.raises(WorkerError, match=r"worker rank \d failed with exit code 2 .*topr train: error: model path .*nowhere"):
        launch_train(cfg, str(tmp_path / "nowhere"), data, tmp_path / "model")
    assert not (tmp_path / "model").exists()
