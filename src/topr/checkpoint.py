"""Training checkpoints: what a retried ``train`` stage resumes from.

A checkpoint holds everything the rest of a training run depends on: the weights, the
optimizer's and the scheduler's state, the torch random state, the next step and every finished
step's figures (so the retried stage's run logs the whole curve). The order of the global
batches is not saved: it follows from the seed, so resuming at step k replays exactly the steps
an uninterrupted run would have taken from k on, and ends with the same weights.

The file is written atomically on local disk (a full disk raises ``DiskFullError``, naming it)
and, when the checkpoint has a ``remote`` s3:// URI, uploaded there (an S3 PUT replaces the
object whole), so that a pod retried on another node finds it. A fingerprint of the training job (data, starting model, training settings, processes) ties
a checkpoint to its job: one left by different data or settings is ignored, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from topr import storage
from topr.config import Config, config_to_dict
from topr.models import model_identity
from topr.records import DiskFullError, atomic_path

log = logging.getLogger(__name__)

UNFINGERPRINTED_TRAIN_FIELDS = ("checkpoint_minutes",)
"""Training settings that do not change the result, so a retry may change them and still resume."""


def job_fingerprint(config: Config, model_dir: str, data_path: str | Path, world_size: int) -> str:
    """A digest of what decides the training run: its data, starting model, settings and processes."""
    settings = {k: v for k, v in config_to_dict(config)["train"].items() if k not in UNFINGERPRINTED_TRAIN_FIELDS}
    job = {
        "data_sha256": storage.file_sha256(data_path),
        "model": model_identity(model_dir),
        "train": settings,
        "sample_temperature": config.sample.temperature,
        "sample_max_new_tokens": config.sample.max_new_tokens,  # the normaliser of length_normalization=constant
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


class TrainCheckpoint:
    """One training run's checkpoint: ``path`` on local disk, mirrored to ``remote`` if given.

    ``every_minutes`` is the time between saves (0: after every step); ``due`` says when the next
    one is.
    """

    def __init__(self, path: str | Path, remote: str | None = None, every_minutes: float = 30.0):
        self.path, self.remote, self.every_minutes = Path(path), remote, every_minutes
        self.last_save = time.monotonic()

    def fetch(self) -> None:
        """Download the remote checkpoint unless a local one is already here (call once, before
        the training processes start)."""
        if self.remote and not self.path.exists() and storage.exists(self.remote):
            log.info("fetching the training checkpoint %s", self.remote)
            storage.download_file(self.remote, self.path)

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The saved state of this job, or None when there is none (or only another job's)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file: start over rather than fail every retry
            log.warning("ignoring the checkpoint %s, which cannot be read: %s", self.path, error)
            return None
        if state.get("fingerprint") != fingerprint:
            log.warning("ignoring the checkpoint %s: it was saved by training on other data or settings", self.path)
            return None
        log.info("resuming training at step %d of the checkpoint %s", state["next_step"], self.remote or self.path)
        return state

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= self.every_minutes * 60

    def save(self, state: dict[str, Any]) -> None:
        """Write the state atomically (the last good checkpoint stays if it fails), then upload it.
        On a full disk, ``DiskFullError`` names the folder instead of torch's ``basic_ios::clear:
        iostream error``."""
        try:
            with atomic_path(self.path) as partial:
                torch.save(state, partial)
        except DiskFullError as error:
            raise DiskFullError(
                errno.ENOSPC,
                f"{error.strerror} (the training checkpoint; the train stage stages it under TMPDIR, now "
                f"{tempfile.gettempdir()}: point TMPDIR at a disk with room for the weights and optimizer state)",
            ) from error
        if self.remote:
            storage.upload_file(self.path, self.remote)
        self.last_save = time.monotonic()

    def remove(self) -> None:
        """Delete the checkpoint, here and remotely: the job it belongs to has finished."""
        self.path.unlink(missing_ok=True)
        if self.remote:
            storage.delete(self.remote)
