"""Training step: one TOPR step against one plain supervised step, same model, same batch.

- supervised: ``model(input_ids, attention_mask, labels=...)`` (transformers' cross-entropy over
  the completion tokens; prompt and padding labelled -100), backward, gradient clipping, AdamW.
- TOPR: what ``topr.train`` does: ``completion_logprobs`` (hidden states gathered at the
  completion positions, the output head applied in checkpointed chunks), ``policy_loss`` with
  objective ``topr``, backward, gradient clipping, AdamW.

The model has the default model's architecture (SmolLM2-135M: Llama, hidden 576, 30 layers,
vocabulary 49152) with random weights, built from its config (no download). The two steps are
timed in turn (A B A B …) after a warm-up round; the table gives the medians and the ratio.
Peak memory: each variant in its own fresh process (see ``bench/common.py``): the extra memory
of one step at its peak above the resident set before it (model, optimizer state, batch).

    .venv/bin/python bench/train_step.py                 # 8 × (~120 prompt + ~64 completion)
    .venv/bin/python bench/train_step.py --repeats 15 --json train_step.json
"""

from __future__ import annotations

import sys

import common


def make_batch(batch: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> dict:
    """Tensors of ``batch_prompt_completions``, the supervised labels, behaviour log-probs and rewards."""
    import torch

    from topr.logprobs import batch_prompt_completions

    pairs = common.synthetic_sequences(batch, prompt, completion, vocab, seed=seed, spread=0.1)
    tensors = batch_prompt_completions([p for p, _ in pairs], [c for _, c in pairs], pad_token_id=2)
    labels = torch.full_like(tensors["input_ids"], -100)
    for row, (p, c) in enumerate(pairs):
        labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
    generator = torch.Generator().manual_seed(seed)
    mask = tensors["completion_mask"]
    # μ near a random model's own log-probs (-ln 49152 ≈ -10.8), so the ratio and the clip act.
    behavior = (-10.8 + 0.3 * torch.randn(mask.shape, generator=generator)) * mask
    rewards = torch.tensor([1.0 if row % 4 == 0 else -1.0 for row in range(batch)])
    return {"tensors": tensors, "labels": labels, "behavior": behavior, "rewards": rewards}


def make_steps(model, data: dict, chunk_size: int = 1024, temperature: float = 0.5, device: str = "cpu"):
    """``{"supervised": step, "topr": step}``: callables running one optimizer step each."""
    import torch

    from topr.logprobs import completion_logprobs
    from topr.objectives import policy_loss

    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tensors = {name: value.to(device) for name, value in data["tensors"].items()}
    labels, behavior, rewards = data["labels"].to(device), data["behavior"].to(device), data["rewards"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def supervised():
        with autocast:
            loss = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], labels=labels).loss
        finish(loss)

    def topr():
        with autocast:
            logprobs = completion_logprobs(model, **tensors, chunk_size=chunk_size, temperature=temperature)
            loss, _ = policy_loss(logprobs, behavior, rewards, tensors["completion_mask"], objective="topr")
        finish(loss)

    return {"supervised": supervised, "topr": topr}


def peak_child(variant: str, batch: int, prompt: int, completion: int, layers: int, vocab: int, chunk_size: int, device: str) -> dict:
    """In a fresh process: build, warm up one step (optimizer state), then measure one step's peak."""
    model = common.build_model(num_hidden_layers=layers, vocab_size=vocab, device=device)
    step = make_steps(model, make_batch(batch, prompt, completion, vocab), chunk_size, device=device)[variant]
    step()
    measured = common.measure_peak(step, device)
    measured.pop("result")
    return measured


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--prompt", type=int, default=120, help="mean prompt tokens (±10%%; default 120)")
    p.add_argument("--completion", type=int, default=64, help="mean completion tokens (±10%%; default 64)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (default 30, as SmolLM2-135M)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152)")
    p.add_argument("--chunk-size", type=int, default=1024, help="train.logprob_chunk_size (default 1024)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.completion, args.layers, args.vocab, args.repeats = 2, 12, 6, 2, 2048, 2
    info = common.setup(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(batch=args.batch, prompt=args.prompt, completion=args.completion, layers=args.layers, vocab=args.vocab)
    model = common.build_model(num_hidden_layers=args.layers, vocab_size=args.vocab, device=device)
    data = make_batch(args.batch, args.prompt, args.completion, args.vocab)
    steps = make_steps(model, data, args.chunk_size, device=device)
    timings = common.interleaved_medians(steps, repeats=args.repeats, warmup=1)
    del model, steps

    memory = {}
    if not args.no_memory:
        for variant in ("supervised", "topr"):
            memory[variant] = common.measure_in_child(
                "train_step:peak_child", {"variant": variant, **sizes, "chunk_size": args.chunk_size, "device": device}, args.threads
            )

    tensors = data["tensors"]
    tokens = int(tensors["attention_mask"].sum())
    padded = tensors["attention_mask"].numel()
    rows = []
    for variant in ("supervised", "topr"):
        t = timings[variant]
        rows.append(
            {
                "step": variant,
                "median_s": t["median"],
                "min_s": t["min"],
                "max_s": t["max"],
                "ratio": t["median"] / timings["supervised"]["median"],
                "tokens_per_s": tokens / t["median"],
                "peak_mib": memory.get(variant, {}).get("peak_mib"),
                "peak_ratio": memory[variant]["peak_mib"] / memory["supervised"]["peak_mib"] if memory else None,
            }
        )
    header = (
        f"train step on {device}: {args.batch} sequences, {tokens} tokens ({padded} with padding; "
        f"completions {int(tensors['completion_mask'].sum())}), {args.layers} layers, vocabulary {args.vocab}, "
        f"medians of {args.repeats} interleaved repeats\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("step", "step", ""),
            ("median_s", "median s", ".3f"),
            ("min_s", "min s", ".3f"),
            ("max_s", "max s", ".3f"),
            ("ratio", "time / supervised", ".3f"),
            ("tokens_per_s", "tokens/s", ".0f"),
            ("peak_mib", "peak MiB above baseline", ".0f"),
            ("peak_ratio", "peak / supervised", ".2f"),
        ],
    )
    ratio = rows[1]["ratio"]
    text += f"\n\ntarget: TOPR step ≤ 1.05 × supervised: {'met' if ratio <= 1.05 else 'MISSED'} ({ratio:.3f}×)"
    results = {"sizes": sizes, "device": device, "tokens": tokens, "timings": timings, "memory": memory, "rows": rows}
    common.finish(args, "train_step", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
