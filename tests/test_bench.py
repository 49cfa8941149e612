"""The benchmarks in bench/ run: each script at its smallest sizes (``--quick``) in its own process.

These check code paths, not speed: no figure is asserted beyond being present and finite. All
scripts start at once (one torch thread each) and each test waits for its own, so the file takes
about as long as the slowest script.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

SCRIPTS = {
    "train_step": ["--quick"],
    "train_memory": ["--quick"],
    "interval_coverage": ["--quick"],
    "logprobs_memory": ["--quick"],
    "sampling": ["--quick"],
    "growth": ["--quick"],
    "padding": ["--quick"],
    "gpu_train_smoke": ["--cpu-smoke-test"],
}


def fake_run_store(path: Path) -> str:
    """An MLflow store holding one finished `topr run`: a parent run and timed stage runs."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{path}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("topr")
    t0 = 1_700_000_000_000
    parent = client.create_run(experiment, run_name="default", start_time=t0)
    stages = [("iter0/prepare_model", "prepare_model", 1_000, 20_000), ("iter1/sample", "sample", 22_000, 122_000),
              ("iter1/train", "train", 125_000, 225_000), ("iter1/evaluate", "evaluate", 228_000, 268_000)]  # fmt: skip
    for name, stage, start, end in stages:
        run = client.create_run(experiment, run_name=name, start_time=t0 + start, tags={"mlflow.parentRunId": parent.info.run_id, "topr.stage": stage})
        if stage == "sample":
            client.log_metric(run.info.run_id, "seconds", 97.0)
        if stage == "train":
            for step, rate in enumerate((90.0, 100.0)):
                client.log_metric(run.info.run_id, "tokens_per_second", rate, step=step)
            client.log_metric(run.info.run_id, "tokens", 9_600.0)
            client.log_metric(run.info.run_id, "seconds", 97.0)
        client.set_terminated(run.info.run_id, "FINISHED", end_time=t0 + end)
    client.set_terminated(parent.info.run_id, "FINISHED", end_time=t0 + 270_000)
    return uri


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every script at once; yields ``{name: (process, json path)}``."""
    scratch = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = {}

    def start(name, script, arguments):
        output = scratch / f"{name}.json"
        command = [sys.executable, str(BENCH / f"{script}.py"), *arguments, "--threads", "1", "--json", str(output)]
        started[name] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=scratch), output)

    for name, arguments in SCRIPTS.items():
        start(name, name.removesuffix("_smoke"), arguments)
    start("run_overhead", "run_overhead", ["--tracking-uri", fake_run_store(scratch / "mlflow.db")])
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()


def finished(runs, name: str) -> tuple[str, dict]:
    process, output = runs[name]
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "| " in stdout and "machine:" in stdout
    return stdout, json.loads(output.read_text())


def test_train_step(runs):
    stdout, results = finished(runs, "train_step")
    assert [row["step"] for row in results["rows"]] == ["supervised", "topr"]
    assert all(math.isfinite(row["median_s"]) and row["median_s"] > 0 for row in results["rows"])
    assert set(results["memory"]) == {"supervised", "topr"}
    assert "time / supervised" in stdout


def test_train_memory(runs):
    stdout, results = finished(runs, "train_memory")
    variants = results["variants"]
    assert list(variants) == ["full", "gradient checkpointing", "LoRA rank 8", "LoRA rank 8 + checkpointing"]
    assert all(variant["median"] > 0 and variant["peak_mib"] > 0 for variant in variants.values())
    assert variants["gradient checkpointing"]["trainable_parameters"] == variants["full"]["trainable_parameters"]
    assert 0 < variants["LoRA rank 8"]["trainable_parameters"] < variants["full"]["trainable_parameters"] / 10
    assert "step peak MiB" in stdout


def test_interval_coverage(runs):
    stdout, results = finished(runs, "interval_coverage")
    assert {row["interval"] for row in results["rows"]} == {"t-interval", "joint bootstrap"}
    assert all(0 <= row["low"] <= row["coverage"] <= row["high"] <= 1 for row in results["rows"])
    assert "Wilson low" in stdout


def test_logprobs_memory(runs):
    _, results = finished(runs, "logprobs_memory")
    assert {row["scope"] for row in results["rows"]} == {"head", "model"}
    for row in results["rows"]:
        assert row["max_abs_diff_logprobs"] < 1e-4 and row["max_abs_diff_grad_hidden"] < 1e-4  # same values


def test_sampling(runs):
    _, results = finished(runs, "sampling")
    assert [row["stage"] for row in results["rows"]] == ["sample", "evaluate"]
    for row in results["rows"]:
        assert row["tokens_engine"] > 0 and row["tokens_generate"] > 0
        assert math.isfinite(row["speedup"]) and row["speedup"] > 0
    (sample, evaluate) = results["rows"]
    assert sample["logprob_error"] < 1e-4  # the behaviour log-probs are the model's, at the sampling temperature
    assert evaluate["tokens_engine"] == evaluate["tokens_generate"]  # greedy: the same completions either way
    assert evaluate["greedy_differences"] == 0


def test_growth(runs):
    _, results = finished(runs, "growth")
    assert {row["task"] for row in results["rows"]} == {"sampling", "training"}
    assert all(row["seconds"] > 0 for row in results["rows"])


def test_padding(runs):
    _, results = finished(runs, "padding")
    for row in results["rows"]:
        assert 0 <= row["after"] <= row["before"] + 1e-12  # sorting inside a global batch never adds padding


def test_run_overhead(runs):
    stdout, results = finished(runs, "run_overhead")
    assert results["wall_seconds"] == pytest.approx(270.0)
    # compute: sample 97 + train loop 9600/100 = 96 + evaluate's whole run 40
    assert results["compute_seconds"] == pytest.approx(97 + 96 + 40)
    assert results["overhead_share_lower_bound"] == pytest.approx(1 - 233 / 270)
    assert "whole run" in stdout


def test_gpu_benchmark_code_paths_on_cpu(runs):
    _, results = finished(runs, "gpu_train_smoke")
    assert results["throughput"]["tokens_per_second"] > 0
    assert [row["variant"] for row in results["logprob_memory"]] == ["naive", "chunked"]


def test_gpu_benchmark_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, str(BENCH / "gpu_train.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


def test_gpu_experiment_code_path_on_cpu_writes_a_unit_per_arm_and_replicate(tmp_path):
    """bench/gpu_experiment.py at toy sizes on CPU: tokenizer export, warm start, one JSON per unit, analysis."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = [sys.executable, str(BENCH / "gpu_experiment.py")]

    def run(*arguments: str) -> str:
        result = subprocess.run([*script, *arguments], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run("--export-tokenizer", str(tmp_path / "tokenizer"))
    run("--quick", "--device", "cpu", "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "out"), "--arms", "topr,rft")
    units = {path.name for path in (tmp_path / "out" / "units").iterdir()}
    assert units == {"start.json", "topr-rep0.json", "rft-rep0.json", "topr-rep1.json", "rft-rep1.json"}
    unit = json.loads((tmp_path / "out" / "units" / "topr-rep1.json").read_text())
    assert len(unit["correct"]) == 16 and unit["train"]["steps"] >= 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["units"] == ["topr/rep0", "rft/rep0", "topr/rep1", "rft/rep1"]
    assert "| topr | rft | 2 |" in run("--analyse", str(tmp_path / "out"))


def test_gpu_experiment_stops_at_its_time_box(tmp_path):
    """With no time left after the warm start, no unit starts, and the summary says why."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = [sys.executable, str(BENCH / "gpu_experiment.py")]
    subprocess.run([*script, "--export-tokenizer", str(tmp_path / "tokenizer")], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([*script, "--quick", "--device", "cpu", "--time-box", "1", "--tokenizer", str(tmp_path / "tokenizer"), "--out", str(tmp_path / "out")],
                   check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["units"] == [] and summary["stopped"].startswith("time box: 0 units done")


@pytest.mark.slow
def test_task_starts_times_every_runner(topr_image, tmp_path):
    output = tmp_path / "task_starts.json"
    command = [sys.executable, str(BENCH / "task_starts.py"), "--quick", "--image", topr_image, "--json", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    timings = json.loads(output.read_text())["seconds_per_task"]
    assert set(timings) == {"warm", "cold", "docker"}
    assert all(len(values) == 1 and values[0] > 0 for values in timings.values())
    assert "vs warm" in done.stdout
