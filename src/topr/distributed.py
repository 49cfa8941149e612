"""torch.distributed for the training stage: ranks, process group, shards, model wrapping, launch.

Training runs in one process, or in several started by torchrun (which sets RANK, WORLD_SIZE
and LOCAL_RANK), one per GPU: DDP keeps a whole model in every process and averages gradients;
FSDP (FSDP2 ``fully_shard``) shards weights, gradients and optimizer state across processes,
for models that do not fit on one GPU. In a single process every helper here is the identity
or does nothing, so ``topr.train`` reads the same either way. ``launch`` starts the workers:
``python -m torch.distributed.run --standalone --nproc-per-node N -m topr.cli train ...``, the
command a researcher would type.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from datetime import timedelta
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from topr.console import EVENTS_ENV
from topr.hf_internals import transformer_block_classes

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerError(RuntimeError):
    """A training worker started by ``launch`` failed; the message names its rank and exit code."""


# ----------------------------------------------------------------------------- ranks and process group


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, how many processes there are, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 reports, saves the model and returns the summary."""
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether torchrun (or another torch.distributed launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current_ranks() -> Ranks:
    """This process's ranks from torchrun's environment; a process on its own is rank 0 of 1."""
    if not under_torchrun():
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def process_count(configured: int | None) -> int:
    """Training processes on this node: as configured, else one per visible CUDA GPU, else 1."""
    if configured is not None:
        return configured
    return max(torch.cuda.device_count(), 1)


def should_launch(configured: int | None) -> bool:
    """True when training wants several processes and this process is not already one of them."""
    return not under_torchrun() and process_count(configured) > 1


@contextmanager
def process_group() -> Iterator[tuple[Ranks, torch.device]]:
    """Join the process group (nccl on CUDA, gloo on CPU) when there are several processes.

    Yields this process's ranks and its device (cuda:LOCAL_RANK, or the CPU); leaves the group
    at the end, also when training fails.
    """
    ranks = current_ranks()
    if torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {ranks.local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU (train.processes, torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    joined = ranks.world_size > 1 and not dist.is_initialized()
    if joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The other ranks wait in the next collective while rank 0 writes a checkpoint: allow an hour.
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timedelta(hours=1))
        log.info("rank %d of %d joined the %s process group on %s", ranks.rank, ranks.world_size, backend, device)
    try:
        yield ranks, device
    finally:
        if joined:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- shards


def shard(batch: list[T], ranks: Ranks) -> list[T]:
    """This rank's contiguous part of a global batch: parts differ in length by at most one and
    together are the batch, in order."""
    base, extra = divmod(len(batch), ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return batch[start : start + base + (ranks.rank < extra)]


def micro_batches(batch: list[T], batch_size: int, ranks: Ranks) -> list[list[T]]:
    """This rank's part of a global batch, cut into micro-batches of at most ``batch_size``.

    Every rank gets the same number of micro-batches, so that every rank takes part in every
    forward and backward collective; a rank whose part runs out first gets empty micro-batches
    (the training loop runs those at weight 0).
    """
    part = shard(batch, ranks)
    count = math.ceil(math.ceil(len(batch) / ranks.world_size) / batch_size)
    return [part[index * batch_size : (index + 1) * batch_size] for index in range(count)]


# ----------------------------------------------------------------------------- the model


def wrap(module: torch.nn.Module, parallelism: str, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Place ``module`` on ``device`` and, with several processes, wrap it for ``parallelism``.

    ``ddp``: DistributedDataParallel. ``fsdp``: FSDP2 ``fully_shard`` on every transformer block
    (the classes a Hugging Face model lists in ``_no_split_modules``), then on ``module`` itself;
    with a ``compute_dtype`` (bfloat16 on GPU) weights are gathered in it and gradients reduced
    in float32. Both act on ``module``'s forward, so every use of a parameter must happen inside
    it. ``module`` arrives whole on the CPU (every process loads all weights into host memory);
    FSDP moves only each process's shard to the GPU.
    """
    if not dist.is_initialized():
        return module.to(device)
    log.info("wrapping the model for %d processes: %s", dist.get_world_size(), "DDP" if parallelism == "ddp" else "FSDP2 fully_shard")
    if parallelism == "ddp":
        return DistributedDataParallel(module.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    blocks = transformer_block_classes(module)
    for sub in module.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh, mp_policy=precision)
    return fully_shard(module, mesh=mesh, mp_policy=precision)  # moves each shard to the mesh's device


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: average gradients across processes in this
    backward (``enabled``, the step's last micro-batch) or only accumulate them locally."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients' global L2 norm (across every shard under FSDP); return the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over all processes (every rank passes the same keys)."""
    if not dist.is_initialized():
        return dict(values)
    names = sorted(values)
    totals = torch.tensor([values[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return dict(zip(names, totals.tolist()))


def gather_over_ranks(values: list[float]) -> list[float]:
    """Every process's values, concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return list(values)
    gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return [value for rank_values in gathered for value in rank_values]


def gathered_policy(policy: torch.nn.Module, parallelism: str) -> torch.nn.Module | None:
    """The policy with all its weights, to save: on rank 0; None on the other ranks.

    Under FSDP every rank must call this: the full state dict is gathered to rank 0's CPU
    (``get_model_state_dict`` with ``full_state_dict``, ``cpu_offload``) and loaded into a copy
    of the model built on the meta device, so no GPU ever holds the whole model.
    """
    if not dist.is_initialized():
        return policy
    if parallelism == "ddp":
        return policy if dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        whole = type(policy)(policy.config)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()  # assign=True replaced the tied tensors one by one
    whole.generation_config = policy.generation_config
    return whole


# ----------------------------------------------------------------------------- launching


def launch(processes: int, arguments: list[str]) -> None:
    """Run ``topr <arguments>`` in ``processes`` workers under torchrun on this node; wait for them.

    ``--standalone`` rendezvous on a free local port, no restarts. Workers inherit the
    environment (OMP_NUM_THREADS=1 unless it is set); their output passes through to ours.
    Raises ``WorkerError`` naming the failed worker's rank, its exit code and its error line.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={processes}", "--max-restarts=0", "-m", "topr.cli", *arguments,
    ]  # fmt: skip
    log.info("launching %d training processes: %s", processes, shlex.join(command))
    # The workers draw their own bars (relayed below), not console events: their stdout is not ours.
    environment = {key: value for key, value in os.environ.items() if key != EVENTS_ENV}
    process = subprocess.Popen(command, env={"OMP_NUM_THREADS": "1", **environment}, stderr=subprocess.PIPE)
    try:
        output = _relay(process.stderr)
        code = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()
    if code != 0:
        raise WorkerError(_failure_message(processes, code, output))


def _relay(stream, keep: int = 400) -> str:
    """Copy a child's stderr to ours as it arrives (progress bars included); return its last lines."""
    lines: deque[str] = deque(maxlen=keep)
    for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=""):
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line)
    return "".join(lines)


def _failure_message(processes: int, code: int, output: str) -> str:
    """What went wrong, from torchrun's root-cause report and the workers' own error lines."""
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", output, re.S)
    who = f"worker rank {root[1]} failed with exit code {root[2]}" if root else "a worker failed"
    errors = [line.strip() for line in output.splitlines() if re.match(r"(topr \w+: error: |\w*(Error|Exception): )", line)]
    cause = f": {errors[-1]}" if errors else "; see the workers' output above"
    return f"distributed training ({processes} processes) failed: {who} (torchrun exit code {code}){cause}"
