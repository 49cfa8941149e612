"""On a GPU: TOPR training throughput and MFU of a ~1B-parameter Llama in bf16, and the chunked
log-prob's peak memory at sequence length 2048. Needs CUDA; on any other machine it stops with a
message saying so (exit status 2).

The model is built from its config with random weights (no download): Llama-3.2-1B's shape,
hidden 2048, 16 layers, 32 attention heads, 8 KV heads, intermediate 8192, vocabulary 128256,
tied embeddings (1.24 B parameters). Training is what ``topr.train`` does on a GPU: float32
weights under ``torch.autocast(bfloat16)``, ``completion_logprobs`` in checkpointed chunks of
``--chunk-size`` completion tokens, ``policy_loss`` (TOPR), backward, gradient clipping, AdamW.

- tokens/s: real (unpadded) tokens of a step over the median step time (after warm-up);
- MFU: 6 · N · tokens/s / peak FLOP/s (N = all parameters; the usual 6N estimate, attention
  FLOPs not counted, the output head counted on every token as in supervised training although
  TOPR applies it to the completion tokens only); ``--peak-flops`` defaults to 989e12, the
  H100 SXM's dense bf16 peak (use 756e12 for H100 PCIe, 312e12 for A100). Target: ≥ 40%.
- log-prob memory: forward + backward of the completion log-probs from given hidden states at
  sequence length 2048, chunked (``completion_logprobs``) against the naive float32
  ``log_softmax`` over the whole vocabulary (``torch.cuda.max_memory_allocated`` above the
  allocation before), as ``bench/logprobs_memory.py`` does on CPU.

    .venv/bin/python bench/gpu_train.py --json gpu_train.json
    .venv/bin/python bench/gpu_train.py --batch 8 --seq-len 2048 --peak-flops 756e12
"""

from __future__ import annotations

import argparse
import sys

import common

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=common.LLAMA3_VOCAB,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write(
            "bench/gpu_train.py needs a CUDA GPU and torch built with CUDA; this machine has none "
            f"(torch {torch.__version__}). Run it on a GPU machine: .venv/bin/python bench/gpu_train.py\n"
        )
        raise SystemExit(2)


def training_throughput(args) -> dict:
    import torch
    from train_step import make_batch, make_steps

    shape = dict(LLAMA_1B, num_hidden_layers=args.layers, vocab_size=args.vocab or LLAMA_1B["vocab_size"])
    model = common.build_model(device=args.device, **shape)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    parameters = sum(p.numel() for p in model.parameters())
    prompt = args.seq_len - args.completion
    data = make_batch(args.batch, prompt, args.completion, shape["vocab_size"])
    step = make_steps(model, data, args.chunk_size, device=args.device)["topr"]
    timings = common.interleaved_medians({"topr": step}, repeats=args.repeats, warmup=2)["topr"]
    tokens = int(data["tensors"]["attention_mask"].sum())
    tokens_per_second = tokens / timings["median"]
    mfu = 6 * parameters * tokens_per_second / args.peak_flops
    peak = torch.cuda.max_memory_allocated() / 1024**3 if args.device == "cuda" else None
    del model, step
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": parameters, "tokens_per_step": tokens, "step_seconds": timings, "tokens_per_second": tokens_per_second, "mfu": mfu, "peak_gib": peak}


def logprob_memory(args) -> list[dict]:
    import torch
    from logprobs_memory import head_case, run_head

    rows = []
    vocab = args.vocab or LLAMA_1B["vocab_size"]
    for variant in ("naive", "chunked"):
        tensors, hidden, head = head_case(args.memory_batch, args.seq_len - args.completion, args.completion, vocab, LLAMA_1B["hidden_size"], device=args.device)

        def run():
            with torch.autocast(args.device, dtype=torch.bfloat16):
                run_head(variant, tensors, hidden, head, args.chunk_size, 1.0)

        run()
        measured = common.measure_peak(run, args.device)
        rows.append({"variant": variant, "peak_mib": measured["peak_mib"], "seconds": measured["seconds"]})
        del tensors, hidden, head
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence, prompt + completion (default 2048)")
    p.add_argument("--completion", type=int, default=1024, help="completion tokens per sequence (default 1024)")
    p.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    p.add_argument("--chunk-size", type=int, default=1024, help="train.logprob_chunk_size (default 1024)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-flops", type=float, default=989e12, help="the GPU's dense bf16 peak FLOP/s (default 989e12, H100 SXM)")
    p.add_argument("--memory-batch", type=int, default=4, help="sequences of the log-prob memory case (default 4)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the decoder layers in backward")
    p.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)  # tests/test_bench.py: the code paths on CPU
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu_smoke_test else "cuda"
    if not args.cpu_smoke_test:
        require_cuda()
    if args.quick:
        args.batch, args.seq_len, args.completion, args.layers, args.repeats, args.memory_batch = 1, 256, 128, 2, 2, 1
    if args.cpu_smoke_test:
        args.batch, args.seq_len, args.completion, args.layers, args.repeats, args.memory_batch, args.vocab = 1, 16, 8, 1, 1, 1, 512
        LLAMA_1B.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    info = common.setup(args)
    throughput = training_throughput(args)
    memory = logprob_memory(args)
    naive, chunked = max(memory[0]["peak_mib"], 1e-9), memory[1]["peak_mib"]
    text = (
        f"TOPR training, Llama {throughput['parameters'] / 1e9:.2f} B parameters, bf16 autocast, {args.batch} × {args.seq_len} tokens "
        f"({args.completion} completion), medians of {args.repeats}\n\n"
        + common.table(
            [{"tokens": throughput["tokens_per_step"], "step_s": throughput["step_seconds"]["median"], "tps": throughput["tokens_per_second"],
              "mfu": throughput["mfu"], "target": "met" if throughput["mfu"] >= 0.4 else "MISSED", "peak": throughput["peak_gib"]}],
            [("tokens", "tokens/step", "d"), ("step_s", "median step s", ".3f"), ("tps", "tokens/s", ".0f"), ("mfu", "MFU (6N)", ".1%"),
             ("target", "≥ 40%", ""), ("peak", "peak GiB", ".1f")],
        )
        + f"\n\ncompletion log-probs at sequence length {args.seq_len}, {args.memory_batch} sequences, vocabulary {args.vocab or LLAMA_1B['vocab_size']}, forward + backward\n\n"
        + common.table(memory, [("variant", "variant", ""), ("peak_mib", "peak MiB", ".0f"), ("seconds", "s", ".3f")])
        + f"\n\nchunked / naive peak: {chunked / naive:.2f} (target ≤ 0.5: {'met' if chunked <= 0.5 * naive else 'MISSED'})"
    )
    results = {"throughput": throughput, "logprob_memory": memory, "peak_flops": args.peak_flops}
    common.finish(args, "gpu_train", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
