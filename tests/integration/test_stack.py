"""``topr up`` / ``topr down`` start and stop real servers; stage commands read and write s3:// URIs."""

from __future__ import annotations

import json
import os

from topr import storage
from topr.cli import main
from topr.records import read_records, write_records
from topr.stack import STATE_FILE, free_port
from topr.tracking import http_ok


def test_up_starts_both_services_and_down_stops_exactly_them(tmp_path, capsys):
    state_dir = tmp_path / "stack"
    s3_port, mlflow_port = free_port(), free_port()
    assert main(["up", "--state-dir", str(state_dir), "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port)]) == 0
    printed = capsys.readouterr().out
    assert f"http://127.0.0.1:{s3_port}" in printed and f"--tracking-uri http://127.0.0.1:{mlflow_port}" in printed
    services = json.loads((state_dir / STATE_FILE).read_text())["services"]
    try:
        assert http_ok(f"http://127.0.0.1:{mlflow_port}/health")
        assert main(["up", "--state-dir", str(state_dir)]) == 2
        assert "already recorded" in capsys.readouterr().err
    finally:
        assert main(["down", "--state-dir", str(state_dir)]) == 0
    stopped = capsys.readouterr().out
    assert all(f"pid {service['pid']}" in stopped for service in services)
    assert not any(os.path.exists(f"/proc/{service['pid']}") for service in services)
    assert not http_ok(f"http://127.0.0.1:{mlflow_port}/health")
    assert main(["down", "--state-dir", str(state_dir)]) == 2
    assert "no stack recorded" in capsys.readouterr().err


def test_stage_commands_read_and_write_s3(stack, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    write_records(samples, [
        {"prompt_id": "p1", "reference": "19", "completion": "Answer: 19"},
        {"prompt_id": "p1", "reference": "19", "completion": "Answer: 18"},
    ])  # fmt: skip
    prefix = f"s3://{stack.bucket}/cli-test"
    storage.upload_file(samples, f"{prefix}/samples.jsonl")
    assert main(["verify", "--task", "arithmetic", "--input", f"{prefix}/samples.jsonl", "--output", f"{prefix}/verified.jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 1
    copy = storage.download_file(f"{prefix}/verified.jsonl", tmp_path / "verified.jsonl")
    assert [record["reward"] for record in read_records(copy)] == [1.0, -1.0]
    assert main(["verify", "--input", f"{prefix}/absent.jsonl", "--output", f"{prefix}/never.jsonl"]) == 2
    assert "absent.jsonl: no such object" in capsys.readouterr().err
    assert not storage.exists(f"{prefix}/never.jsonl")
