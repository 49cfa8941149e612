"""topr's core installs on its own: in a fresh virtual environment, without the workflow extra
(kfp, MLflow, boto3), `topr train` trains and `policy_loss` gives a loss and its gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from topr.records import write_records

REPOSITORY = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the Makefile's: the CPU build, first
WORKFLOW_ONLY = ("kfp", "mlflow", "boto3")

POLICY_LOSS = """
import torch
from topr.objectives import policy_loss
logprobs = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
loss, _ = policy_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1), objective="topr")
loss.backward()
print(logprobs.grad[:, 0].tolist())
"""


def train_record(sample_index: int, completion: str, correct: bool) -> dict:
    return {
        "prompt_id": "p1",
        "prompt": "What is 7 + 12?",
        "reference": "19",
        "prompt_token_ids": [1, 2, 3],
        "completion": completion,
        "completion_token_ids": [4, 5],
        "behavior_logprobs": [-0.5, -0.25],
        "sample_index": sample_index,
        "finish_reason": "stop",
        "extracted": "19" if correct else "18",
        "correct": correct,
        "reward": 1.0 if correct else -1.0,
    }


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_SPEC], check=True)
    subprocess.run([*pip, str(REPOSITORY)], check=True)  # no extras: the core
    return venv


@pytest.mark.slow
def test_the_core_installs_without_the_workflow_extra(core_venv):
    for module in WORKFLOW_ONLY:
        found = subprocess.run([str(core_venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True, text=True)
        assert found.returncode == 1 and "ModuleNotFoundError" in found.stderr, f"{module} is installed in the core's venv"


@pytest.mark.slow
def test_every_component_folder_is_installed(core_venv):
    """setup.py finds the component folders: none is listed by hand, none is left out."""
    site_packages = next((core_venv / "lib").glob("python3*/site-packages"))
    folders = sorted(path.parent.name for path in (REPOSITORY / "components").glob("*/component.py"))
    installed = sorted(path.parent.name for path in (site_packages / "topr_components").glob("*/component.py"))
    assert folders and installed == folders
    assert (site_packages / "topr_pipelines" / "topr_pipeline.py").exists()


@pytest.mark.slow
def test_policy_loss_from_the_core(core_venv):
    result = subprocess.run([str(core_venv / "bin" / "python"), "-c", POLICY_LOSS], capture_output=True, text=True, check=True)
    positive, negative = json.loads(result.stdout)
    # Descending the loss raises the positive's log-prob and lowers the negative's.
    assert positive < 0 < negative


@pytest.mark.slow
def test_topr_train_from_the_core(core_venv, tiny_model_dir, tmp_path):
    data, output = tmp_path / "train.jsonl", tmp_path / "trained"
    write_records(data, [train_record(0, "Answer: 19", True), train_record(1, "Answer: 18", False)])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [str(core_venv / "bin" / "topr"), "train", "--model", tiny_model_dir, "--data", str(data), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["examples"] == 2 and summary["steps"] >= 1
    assert (output / "model.safetensors").exists()

    # The workflow's commands, and s3:// arguments, say what to install instead of failing on an import.
    for arguments, missing in ((["run"], "kfp"), (["train", "--model", tiny_model_dir, "--data", "s3://bucket/train.jsonl", "--output", "x"], "boto3")):
        result = subprocess.run([str(core_venv / "bin" / "topr"), *arguments], capture_output=True, text=True, env=environment, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"this needs {missing}, from topr's workflow extra: pip install 'topr[workflow]'" in result.stderr
