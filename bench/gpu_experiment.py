"""A scaled-down P1 on one GPU in a time box: rft, TOPR at c = 0 and at c = −0.8 (tis and REINFORCE on
request), one iteration, replicated, every arm's objective, baseline and optimizer steps pinned.

What ``topr experiment objectives`` does on the CPU machine, sized for an H100/H200 and for its
image (no MLflow, kfp, math-verify or gguf there, nothing to download; the loop's stages need
none of them, and pydantic, the one library they need that the image lacks, travels as wheels:
see docs/performance.md). No pretrained weights travel (the default model's 93 MB GGUF does not
fit the 64 MiB that can be carried), so

1. a Llama is built from a config (``--hidden`` × ``--layers``, the default model's tokenizer,
   exported beforehand with ``--export-tokenizer``) and warm-started by supervised training on
   the task's training problems until its greedy accuracy on a probe reaches ``--start-accuracy``
   (or ``--warm-start-seconds`` pass): a policy that is right sometimes, so that sampling finds
   positives and negatives;
2. its held-out accuracy is measured once on ``--eval-size`` (≥ 500) problems of the
   ``add_sub_2digit`` arithmetic level;
3. replicate by replicate, it samples the replicate's own training prompts once (its seeds: the
   replicate's index), and every arm trains one iteration on those samples with the library's
   own stages (``one_iteration``: bf16 autocast with the float32 head) and is evaluated on the
   same held-out problems.

Each unit writes ``<out>/units/<arm>-rep<r>.json`` (accuracy, per-problem correctness, training
summary, seconds) as soon as it ends; before a unit starts, the script stops if the time box
would not hold it (its estimate: the slowest unit so far). ``--analyse <out>`` then prints the
accuracy table and each arm's paired difference from rft (``topr.stats``; needs scipy and
statsmodels, so run it on the CPU machine).

    python bench/gpu_experiment.py --export-tokenizer gpu_tokenizer          # here, once
    python bench/gpu_experiment.py --tokenizer gpu_tokenizer --out $OUT      # on the GPU
    python bench/gpu_experiment.py --analyse <files_at>/gpu_p1                # here again
    python bench/gpu_experiment.py --quick --device cpu --tokenizer gpu_tokenizer --out /tmp/p1  # code path on CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the library, without installing it

ARMS = {
    "rft": {"objective": "rft", "baseline": 0.0},
    "topr": {"objective": "topr", "baseline": 0.0},  # the paper's TOPR (c = 0)
    "topr-c-0.8": {"objective": "topr", "baseline": -0.8},  # topr's default
    "tis": {"objective": "tis", "baseline": 0.0},
    "reinforce": {"objective": "reinforce", "baseline": 0.0},
}
"""Each arm's objective and baseline c, pinned: an arm never takes a default that may change."""
DEFAULT_ARMS = "rft,topr,topr-c-0.8"
REFERENCE = "rft"
LEVEL = "add_sub_2digit"  # 3,744 held-out problems ("easy" has only 108)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Folder for the units' JSON files, the models and summary.json.")
    parser.add_argument("--tokenizer", type=Path, help="A tokenizer folder written by --export-tokenizer.")
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR", help="Save the default model's tokenizer (3.5 MB) to DIR and exit.")
    parser.add_argument("--analyse", type=Path, metavar="OUT", help="Print the table and paired comparisons of a finished run and exit.")
    parser.add_argument("--time-box", type=float, default=450, help="Seconds for everything; no unit starts that would not end inside it.")
    parser.add_argument("--replicates", type=int, default=6, help="Replicates at most (the time box may stop earlier).")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"Arms to compare, of {', '.join(ARMS)} (rft is the reference; each pins its objective and baseline).")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps of every arm's iteration (train.steps_per_epoch), pinned.")
    parser.add_argument("--hidden", type=int, default=512, help="Hidden size of the Llama built from a config.")
    parser.add_argument("--layers", type=int, default=8, help="Its layers.")
    parser.add_argument("--warm-start-seconds", type=float, default=150, help="Longest supervised warm start.")
    parser.add_argument("--start-accuracy", type=float, default=0.3, help="Stop the warm start at this greedy accuracy on the probe.")
    parser.add_argument("--warm-start-batch", type=int, default=128, help="Sequences per warm-start step; the probe runs every 50 steps.")
    parser.add_argument("--eval-size", type=int, default=512, help="Held-out problems (the same for every unit).")
    parser.add_argument("--train-size", type=int, default=256, help="Training prompts per replicate.")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="The RL iteration's peak learning rate.")
    parser.add_argument("--batch-size", type=int, default=64, help="Sequences per optimizer step in the RL iteration.")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only to try the code path (--quick).")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: a few seconds of each part, for tests on CPU.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)} (choices: {', '.join(ARMS)})")
    if args.quick:
        args.hidden, args.layers, args.warm_start_seconds, args.eval_size, args.train_size = 32, 2, 5, 16, 8
        args.samples_per_prompt, args.batch_size, args.replicates, args.warm_start_batch = 2, 8, min(args.replicates, 2), 4
    return args


def export_tokenizer(folder: Path) -> None:
    from topr.config import EMBEDDED_MODEL
    from topr.models import load_tokenizer

    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)
    print(f"tokenizer saved to {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.1f} MiB)")


def unit_config(args: argparse.Namespace, arm: str, replicate: int, samples: Path | None):
    """The library's config of one unit (``replicate``'s seeds; its shared iteration-1 samples)."""
    from topr.config import build_config

    bf16 = args.device == "cuda"
    return build_config(
        {
            "model": {"path": str(args.out / "start_model")},
            "task": {"name": "arithmetic", "level": LEVEL, "train_size": args.train_size, "eval_size": args.eval_size, "train_seed": replicate},
            "sample": {"samples_per_prompt": args.samples_per_prompt, "temperature": 1.0, "max_new_tokens": 24, "batch_size": 512, "seed": replicate,
                       "first_iteration_samples": str(samples) if samples else None},
            "train": {**ARMS[arm], "learning_rate": args.learning_rate, "batch_size": args.batch_size, "gradient_accumulation": 1, "batch_order": "stratified",
                      "steps_per_epoch": args.steps, "epochs": 1, "seed": replicate, "dtype": "bfloat16" if bf16 else "float32", "float32_head": True},
            "evaluate": {"max_new_tokens": 24, "batch_size": 512},
            "curate": {"seed": replicate},
            "run": {"iterations": 1},
        },
        source=f"gpu experiment unit {arm}/rep{replicate}",
    )


def build_start_model(args: argparse.Namespace, deadline: float) -> dict:
    """A Llama from a config, warm-started on the task's training problems; saved as the start model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from topr.models import save_policy

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(args.device)
    started = time.perf_counter()
    steps, accuracy = warm_start(model, tokenizer, args, min(deadline, started + args.warm_start_seconds))
    save_policy(model.cpu(), tokenizer, args.out / "start_model", provenance={"source": "bench/gpu_experiment.py warm start"})
    return {"parameters": sum(p.numel() for p in model.parameters()), "warm_start_steps": steps,
            "warm_start_probe_accuracy": accuracy, "warm_start_seconds": time.perf_counter() - started}


def warm_start(model, tokenizer, args: argparse.Namespace, until: float) -> tuple[int, float]:
    """Supervised steps on "prompt → Answer: N" until ``until`` or the probe's greedy accuracy
    reaches ``--start-accuracy``; returns the steps taken and the last probe accuracy."""
    import torch

    from topr.logprobs import batch_prompt_completions, completion_logprobs
    from topr.models import prompt_token_ids
    from topr.tasks import get_task
    from topr.config import TaskConfig

    problems = get_task(TaskConfig(level=LEVEL)).problems("train", 100_000, seed=12345)
    probe, problems = problems[:128], problems[128:]
    examples = [(prompt_token_ids(tokenizer, p["prompt"]), tokenizer.encode(f"Answer: {p['reference']}", add_special_tokens=False) + [tokenizer.eos_token_id]) for p in problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator, steps, accuracy = torch.Generator().manual_seed(0), 0, 0.0
    while time.perf_counter() < until and accuracy < args.start_accuracy:
        for _ in range(50):
            batch = [examples[i] for i in torch.randint(len(examples), (args.warm_start_batch,), generator=generator).tolist()]
            tensors = {k: v.to(args.device) for k, v in batch_prompt_completions([p for p, _ in batch], [c for _, c in batch], tokenizer.pad_token_id).items()}
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                logprobs = completion_logprobs(model, **tensors)
            loss = -(logprobs * tensors["completion_mask"]).sum() / tensors["completion_mask"].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        accuracy = probe_accuracy(model, tokenizer, probe, args.device)
        logging.info("warm start: %d steps, loss %.3f, probe greedy accuracy %.3f", steps, loss.item(), accuracy)
    return steps, accuracy


def probe_accuracy(model, tokenizer, probe: list[dict], device: str) -> float:
    from topr.sample import SamplingParams, TransformersEngine, sample_records
    from topr.tasks import get_task
    from topr.config import TaskConfig
    from topr.verify import verify_records

    model.eval()
    engine = TransformersEngine(model, tokenizer, batch_size=128, progress=False)
    records = sample_records(engine, tokenizer, probe, SamplingParams(n=1, temperature=0.0, max_new_tokens=24), None, "warm-start")
    model.train()
    _, summary = verify_records(records, get_task(TaskConfig(level=LEVEL)))
    return summary["accuracy"]


def greedy_correct(completions: Path) -> list[bool]:
    from topr.records import read_records

    greedy = sorted((r for r in read_records(completions) if r["decoding"] == "greedy"), key=lambda r: r["prompt_id"])
    return [bool(r["correct"]) for r in greedy]


def write_json(path: Path, payload: dict) -> None:
    from topr.records import write_json as write

    write(path, payload)


def run(args: argparse.Namespace) -> dict:
    """Everything up to the time box; returns what ``summary.json`` holds."""
    import torch
    import transformers

    from topr.evaluate import run_evaluate
    from topr.prompts import run_prompts
    from topr.sample import run_sample
    from topr.workflow import IterationFiles

    started = time.perf_counter()
    deadline = started + args.time_box
    summary = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "arguments": {k: str(v) for k, v in vars(args).items()}}
    summary["start_model"] = build_start_model(args, deadline)
    start_model = str(args.out / "start_model")
    eval_prompts = args.out / "eval_prompts.jsonl"
    start = IterationFiles(args.out / "start")
    run_prompts(unit_config(args, REFERENCE, 0, None), args.out / "rep0_prompts.jsonl", eval_prompts)
    summary["start_pass_at_1"] = run_evaluate(unit_config(args, REFERENCE, 0, None), start_model, eval_prompts, start.evaluation, start.completions)["pass_at_1"]
    write_json(args.out / "units" / "start.json", {"pass_at_1": summary["start_pass_at_1"], "correct": greedy_correct(start.completions)})
    slowest, units = 0.0, []
    for replicate in range(args.replicates):
        shared = IterationFiles(args.out / f"rep{replicate}")
        config = unit_config(args, REFERENCE, replicate, None)
        prompts = shared.folder / "train_prompts.jsonl"
        run_prompts(config, prompts, eval_prompts)
        run_sample(config, start_model, prompts, shared.samples)
        for arm in args.arms.split(","):
            if time.perf_counter() + slowest > deadline:
                summary["stopped"] = f"time box: {len(units)} units done, the next ({arm}/rep{replicate}) would not end inside it"
                return summary | {"units": units, "seconds": time.perf_counter() - started}
            unit_started = time.perf_counter()
            config = unit_config(args, arm, replicate, shared.samples)
            files = IterationFiles(args.out / "arms" / arm / f"rep{replicate}")
            stages = one_iteration(config, start_model, prompts, files, eval_prompts)
            seconds = time.perf_counter() - unit_started
            slowest = max(slowest, seconds)
            unit = {"arm": arm, "replicate": f"rep{replicate}", "pass_at_1": stages["evaluate"]["pass_at_1"], "seconds": seconds,
                    "correct": greedy_correct(files.completions), "train": stages["train"], "curate": stages["curate"]}
            write_json(args.out / "units" / f"{arm}-rep{replicate}.json", unit)
            units.append(f"{arm}/rep{replicate}")
            logging.info("%s/rep%d: pass@1 %.3f in %.0f s", arm, replicate, unit["pass_at_1"], seconds)
    return summary | {"units": units, "seconds": time.perf_counter() - started}


def one_iteration(config, model_dir: str, prompts: Path, files, eval_prompts: Path) -> dict[str, dict]:
    """Sample (or take the shared samples), verify, curate, train and evaluate, on local files
    under ``files.folder``, without tracking; each stage's summary by its name."""
    from topr.curate import run_curate
    from topr.evaluate import run_evaluate
    from topr.sample import run_sample
    from topr.train import launch_train
    from topr.verify import run_verify

    files.folder.mkdir(parents=True, exist_ok=True)
    stages = {"sample": run_sample(config, model_dir, prompts, files.samples)}
    stages["verify"] = run_verify(config.task, files.samples, files.verified)
    stages["curate"] = run_curate(config, files.verified, files.train_set, files.composition)
    stages["train"] = launch_train(config, model_dir, files.train_set, files.model)
    stages["evaluate"] = run_evaluate(config, str(files.model), eval_prompts, files.evaluation, files.completions)
    return stages


def analyse(out: Path) -> str:
    """The accuracy table and the paired comparisons with rft, from the units' JSON files."""
    from topr.stats import compare_arms, format_comparisons

    units = [json.loads(path.read_text()) for path in sorted((out / "units").glob("*-rep*.json"))]
    start = json.loads((out / "units" / "start.json").read_text())
    correct: dict[str, dict[str, list[bool]]] = {}
    for unit in units:
        correct.setdefault(unit["arm"], {})[unit["replicate"]] = unit["correct"]
    lines = [f"start model: pass@1 {start['pass_at_1']:.1%} on {len(start['correct'])} held-out problems", "",
             "| arm | replicates | mean pass@1 | each replicate |", "|---|---|---|---|"]
    for arm, replicates in correct.items():
        values = [sum(v) / len(v) for v in replicates.values()]
        lines.append(f"| {arm} | {len(values)} | {sum(values) / len(values):.1%} | {', '.join(f'{v:.1%}' for v in values)} |")
    if REFERENCE in correct and len(correct) > 1:
        lines += ["", format_comparisons(compare_arms(correct, REFERENCE))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return 0
    if args.analyse:
        print(analyse(args.analyse))
        return 0
    if args.out is None or args.tokenizer is None:
        sys.stderr.write("gpu_experiment: --out and --tokenizer are needed (see --help)\n")
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_experiment: no CUDA device here; use --device cpu --quick to try the code path\n")
        return 2
    summary = run(args)
    write_json(args.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "arguments"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
