"""Shared helpers of the benchmarks in ``bench/``: the machine, the default model's architecture,
interleaved timing with medians, peak memory of one measurement in its own process, tables.

Peak memory on CPU: every measured variant runs in a fresh Python process (``measure_in_child``).
The child builds what it needs, runs the variant once to warm up, then resets the kernel's
high-water mark of its resident set (``/proc/self/clear_refs``, Linux), runs the variant again
and reports ``VmHWM`` minus the resident set just before: the extra memory the variant needed at
its peak. glibc is told to serve every block above 64 KiB with its own mapping
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the figure is
not hidden by memory that an earlier, freed tensor left in malloc's pools. On CUDA the same
helper reports ``torch.cuda.max_memory_allocated`` above the allocation before the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MIB = 1024 * 1024

# SmolLM2-135M-Instruct, the default model (config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    vocab_size=49152,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
LLAMA3_VOCAB = 128256


# ----------------------------------------------------------------------------- the machine


def machine() -> dict:
    """What the figures were measured on."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def describe_machine(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"{info['memory_gib']} GiB{gpu}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}"
    )


# ----------------------------------------------------------------------------- models and batches


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**SMOLLM2_135M, **overrides})


def build_model(seed: int = 0, dtype=None, device: str = "cpu", **overrides):
    """A LlamaForCausalLM with the default model's architecture (or ``overrides``), random weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(**overrides)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def synthetic_sequences(batch: int, prompt: int, completion: int, vocab: int, seed: int = 0, spread: float = 0.0):
    """``batch`` (prompt ids, completion ids) pairs of random tokens; lengths vary by up to ±spread."""
    import random

    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, round(mean * (1 + rng.uniform(-spread, spread))))

    pairs = []
    for _ in range(batch):
        p, c = length(prompt), length(completion)
        pairs.append(([rng.randrange(3, vocab) for _ in range(p)], [rng.randrange(3, vocab) for _ in range(c)]))
    return pairs


# ----------------------------------------------------------------------------- timing


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run the variants in turn (A B A B …), ``warmup`` rounds untimed, then ``repeats`` timed ones.

    Interleaving spreads slow drifts of the machine (other load, frequency) over all variants
    alike, so their ratio is fairer than that of back-to-back blocks.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, run in variants.items():
            synchronize()
            started = time.perf_counter()
            run()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: summarize(values) for name, values in times.items()}


def summarize(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "repeats": len(ordered),
        "all": values,
    }


# ----------------------------------------------------------------------------- peak memory in a child process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_peak(run: Callable[[], object], device: str = "cpu") -> dict:
    """Run ``run`` (already warmed up) once; its extra memory at the peak, in MiB, and its seconds."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / MIB, "seconds": seconds, "result": result, "method": "cuda.max_memory_allocated"}
    reset = _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    import resource

    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    if reset:
        peak = (_status_kib("VmHWM") - before_kib) / 1024
        method = "VmHWM after clear_refs"
    else:  # no clear_refs: the high-water mark only counts if the run set a new one
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_maxrss) / 1024
        method = "ru_maxrss delta (lower bound)"
    return {"peak_mib": peak, "seconds": seconds, "result": result, "method": method}


def measure_in_child(target: str, arguments: dict, threads: int | None = None, timeout: float = 900) -> dict:
    """Call ``target`` ("module:function", a module of bench/) in a fresh Python process.

    The function gets ``arguments`` as keyword arguments and returns a dict; it usually calls
    ``measure_peak``. The dict comes back through a JSON line on stdout.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, str(BENCH_DIR / "common.py"), "--child", target, json.dumps(arguments)]
    if threads:
        command += ["--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{target} failed in its process (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT ") :])
    raise RuntimeError(f"{target} printed no result:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("arguments")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    module_name, function_name = args.child.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(args.arguments))
    print("@@RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- command line and output


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has; the description is the script's docstring."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest sizes: checks that the code paths run (figures meaningless)")
    p.add_argument("--json", metavar="FILE", help="also write the results (and the machine) as JSON to FILE")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    return p


def setup(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"machine: {describe_machine(info)}\n", flush=True)
    return info


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format spec)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" if spec else "---" for _, _, spec in columns) + "|")
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, spec) if spec and not isinstance(value, str) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finish(args, name: str, info: dict, results: dict, text: str) -> None:
    print(text, flush=True)
    if args.json:
        payload = {"benchmark": name, "machine": info, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH_DIR))
    _child_main(sys.argv[1:])
