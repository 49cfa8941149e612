"""Training checkpoints (``topr.checkpoint``): what a full disk while staging one looks like."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

from topr import checkpoint as checkpoint_module
from topr.checkpoint import TrainCheckpoint
from topr.records import DiskFullError


def nearly_full(path):
    return shutil._ntuple_diskusage(5 * 2**30, 5 * 2**30 - 2**20, 2**20)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("basic_ios::clear: iostream error"), OSError(errno.ENOSPC, "No space left on device")],
)
def test_a_full_disk_while_staging_a_checkpoint_names_the_disk_and_tmpdir(tmp_path, monkeypatch, error):
    folder = tmp_path / "topr-checkpoints" / "run"
    checkpoint = TrainCheckpoint(folder / "iter1-train.checkpoint.pt")
    checkpoint.save({"next_step": 1})  # room: saved
    before = checkpoint.path.read_bytes()

    def failing_save(state, path):
        open(path, "wb").write(b"partial")
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(DiskFullError) as caught:
        checkpoint.save({"next_step": 2})
    message = str(caught.value)
    assert f"the disk holding {folder} is full (1.0 MiB free of 5.0 GiB)" in message
    assert "TMPDIR" in message
    assert checkpoint.path.read_bytes() == before  # the last good checkpoint stays
    assert [p.name for p in folder.iterdir()] == [checkpoint.path.name]


def test_a_checkpoint_saves_and_loads_as_before(tmp_path):
    checkpoint = TrainCheckpoint(tmp_path / "c.pt")
    checkpoint.save({"fingerprint": "f", "next_step": 3, "weights": torch.ones(2)})
    assert checkpoint.load("f")["next_step"] == 3
