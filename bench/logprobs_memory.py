"""Completion log-probs: ``topr.logprobs.completion_logprobs`` (chunked) against the naive
``log_softmax(model(...).logits.float())``, forward and backward, at two vocabulary sizes.

Two scopes, each variant measured in its own fresh process (see ``bench/common.py``):

- ``head``: the log-prob computation alone. The backbone's hidden states [B, L, 576] are given
  (a leaf that requires grad) and the output head is a Linear(576, V); forward to the completion
  tokens' log-probs, then backward to the hidden states and the head. This is the memory the
  chunking is about: the naive path holds float32 logits [B, L, V], their log-softmax and the
  gradients of both; the chunked path holds the logits of at most ``chunk_size`` completion
  positions at a time and recomputes them in the backward pass.
- ``model``: the whole step's forward and backward through a Llama with the default model's
  architecture (SmolLM2-135M, 30 layers) at that vocabulary, random weights: the backbone's
  activations and the weight gradients come on top, alike for both.

Values: the largest absolute difference between the two paths' log-probs, and between their
gradients with respect to the hidden states (head scope), on the same inputs.

    .venv/bin/python bench/logprobs_memory.py                    # vocabularies 49152 and 128256
    .venv/bin/python bench/logprobs_memory.py --seq-len 2048 --batch 1 --completion 1024
"""

from __future__ import annotations

import sys

import common


def inputs(batch: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> dict:
    from topr.logprobs import batch_prompt_completions

    pairs = common.synthetic_sequences(batch, prompt, completion, vocab, seed=seed, spread=0.1)
    return batch_prompt_completions([p for p, _ in pairs], [c for _, c in pairs], pad_token_id=2)


def naive_logprobs(logits, tensors: dict, temperature: float):
    """log_softmax over the whole [B, L, V] in float32, then the completion tokens picked out."""
    import torch

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    offsets = torch.arange(tensors["completion_ids"].shape[1], device=logits.device)
    positions = (tensors["completion_start"].unsqueeze(1) + offsets - 1).clamp(0, logits.shape[1] - 1)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    picked = logp[rows, positions].gather(-1, tensors["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return picked * tensors["completion_mask"]


class HiddenStates:
    """A stand-in model whose backbone returns given hidden states: ``completion_logprobs`` runs unchanged."""

    def __init__(self, hidden, head):
        import types

        self.head = head
        self.base_model = lambda **_: types.SimpleNamespace(last_hidden_state=hidden)

    def get_output_embeddings(self):
        return self.head


def head_case(batch, prompt, completion, vocab, hidden_size=576, seed=0, device="cpu"):
    import torch

    tensors = {k: v.to(device) for k, v in inputs(batch, prompt, completion, vocab, seed).items()}
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tensors["input_ids"].shape, hidden_size, generator=generator).to(device).requires_grad_()
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(0.1 * torch.randn(vocab, hidden_size, generator=generator))  # logits of std ~2.4
    head = head.to(device)
    return tensors, hidden, head


def run_head(variant: str, tensors, hidden, head, chunk_size: int, temperature: float):
    from topr.logprobs import completion_logprobs

    hidden.grad = None
    head.weight.grad = None
    if variant == "chunked":
        values = completion_logprobs(HiddenStates(hidden, head), **tensors, chunk_size=chunk_size, temperature=temperature)
    else:
        values = naive_logprobs(head(hidden), tensors, temperature)
    values.sum().backward()
    return values.detach()


def run_model(variant: str, model, tensors, chunk_size: int, temperature: float):
    from topr.logprobs import completion_logprobs

    model.zero_grad(set_to_none=True)
    if variant == "chunked":
        values = completion_logprobs(model, **tensors, chunk_size=chunk_size, temperature=temperature)
    else:
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        values = naive_logprobs(logits, tensors, temperature)
    values.sum().backward()
    model.zero_grad(set_to_none=True)  # the gradients are alike for both; free them inside the run
    return None


def peak_child(scope: str, variant: str, batch: int, prompt: int, completion: int, vocab: int, layers: int, chunk_size: int, device: str) -> dict:
    """In a fresh process: build the case, run it once to warm up, then measure one run's peak."""
    temperature = 0.5
    if scope == "head":
        tensors, hidden, head = head_case(batch, prompt, completion, vocab, device=device)

        def run():
            run_head(variant, tensors, hidden, head, chunk_size, temperature)

    else:
        model = common.build_model(num_hidden_layers=layers, vocab_size=vocab, device=device)
        model.config.use_cache = False
        tensors = {k: v.to(device) for k, v in inputs(batch, prompt, completion, vocab).items()}
        run = lambda: run_model(variant, model, tensors, chunk_size, temperature)  # noqa: E731
    run()
    measured = common.measure_peak(run, device)
    measured.pop("result")
    return measured


def differences(batch, prompt, completion, vocab, chunk_size, device="cpu") -> dict:
    """Largest absolute differences, chunked against naive: log-probs and gradients (head scope)."""
    tensors, hidden, head = head_case(batch, prompt, completion, vocab, device=device)
    chunked = run_head("chunked", tensors, hidden, head, chunk_size, 0.5)
    grads = (hidden.grad.clone(), head.weight.grad.clone())
    naive = run_head("naive", tensors, hidden, head, chunk_size, 0.5)
    return {
        "max_abs_diff_logprobs": float((chunked - naive).abs().max()),
        "max_abs_diff_grad_hidden": float((grads[0] - hidden.grad).abs().max()),
        "max_abs_diff_grad_head": float((grads[1] - head.weight.grad).abs().max()),
        "max_abs_logprob": float(naive.abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=120, help="mean prompt tokens (±10%%)")
    p.add_argument("--completion", type=int, default=64, help="mean completion tokens (±10%%)")
    p.add_argument("--vocab", type=int, nargs="+", default=[common.SMOLLM2_135M["vocab_size"], common.LLAMA3_VOCAB])
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the model scope (default 30)")
    p.add_argument("--chunk-size", type=int, default=1024, help="train.logprob_chunk_size (default 1024)")
    p.add_argument("--scopes", nargs="+", default=["head", "model"], choices=["head", "model"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.completion, args.vocab, args.layers = 2, 12, 6, [1024], 2
    info = common.setup(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for vocab in args.vocab:
        diffs = differences(args.batch, args.prompt, args.completion, vocab, args.chunk_size, device)
        for scope in args.scopes:
            peaks = {}
            for variant in ("naive", "chunked"):
                peaks[variant] = common.measure_in_child(
                    "logprobs_memory:peak_child",
                    dict(scope=scope, variant=variant, batch=args.batch, prompt=args.prompt, completion=args.completion,
                         vocab=vocab, layers=args.layers, chunk_size=args.chunk_size, device=device),
                    args.threads,
                )
            ratio = peaks["chunked"]["peak_mib"] / peaks["naive"]["peak_mib"]
            rows.append(
                {
                    "vocab": vocab,
                    "scope": scope,
                    "naive_mib": peaks["naive"]["peak_mib"],
                    "chunked_mib": peaks["chunked"]["peak_mib"],
                    "ratio": ratio,
                    "target": ("met" if ratio <= 0.5 else "MISSED") if scope == "head" else "",
                    "naive_s": peaks["naive"]["seconds"],
                    "chunked_s": peaks["chunked"]["seconds"],
                    **diffs,
                }
            )
    tensors = inputs(args.batch, args.prompt, args.completion, args.vocab[0])
    header = (
        f"completion log-probs, forward + backward on {device}: {args.batch} sequences, "
        f"{tensors['input_ids'].shape[1]} positions wide, {int(tensors['completion_mask'].sum())} completion tokens, "
        f"chunk size {args.chunk_size}; peak = extra memory above the process's state before the run\n"
    )
    text = header + "\n" + common.table(
        rows,
        [
            ("vocab", "vocabulary", "d"),
            ("scope", "scope", ""),
            ("naive_mib", "naive peak MiB", ".0f"),
            ("chunked_mib", "chunked peak MiB", ".0f"),
            ("ratio", "chunked / naive", ".2f"),
            ("target", "≤ 0.5 (head)", ""),
            ("naive_s", "naive s", ".2f"),
            ("chunked_s", "chunked s", ".2f"),
            ("max_abs_diff_logprobs", "max |Δ log-prob|", ".1e"),
            ("max_abs_diff_grad_hidden", "max |Δ grad|", ".1e"),
        ],
    )
    results = {"device": device, "rows": rows}
    common.finish(args, "logprobs_memory", info, results, text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
