"""SmolLM2-135M-Instruct prefill and decode speed beside transformers, with a roofline.

Run from the repository root with the peer extra installed:

    python benchmarks/bench_decode.py [--prompt-tokens N] [--new-tokens N] [--json FILE]

Rows, all in one process on the same prompt: transformers (PyTorch, float32),
refimpl fast and reference modes with resident weights, and refimpl reference
under a 16 MiB weight budget. Decode is greedy with a KV cache. The roofline
compares decode tokens/s x weight bytes per token with the memory read
bandwidth of this machine, measured in the same run by summing a 512 MiB array.
Each row runs in its own process (see isolated.py).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from isolated import run_isolated

MIB = 1 << 20


def read_bandwidth(repeats=5):
    """Bytes per second that numpy's sum reads from a 512 MiB float32 array (best of ``repeats``)."""
    data = np.ones(128 * MIB, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def bench_transformers(model_dir, prompt_ids, new_tokens):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model(ids)  # warm-up
        started = time.perf_counter()
        output = model(ids, use_cache=True)
        prefill = time.perf_counter() - started
        past = output.past_key_values
        token = output.logits[:, -1:].argmax(-1)
        tokens = []
        started = time.perf_counter()
        for _ in range(new_tokens):
            output = model(token, past_key_values=past, use_cache=True)
            past = output.past_key_values
            token = output.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        decode = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prefill_tokens_per_s": len(prompt_ids) / prefill, "decode_tokens_per_s": new_tokens / decode,
            "weight_bytes_per_token": weight_bytes, "tokens": tokens}


def bench_refimpl(model_dir, prompt_ids, new_tokens, mode, budget_mib=None):
    from refimpl.generate import Decoder, generate

    budget = None if budget_mib is None else int(budget_mib * MIB)
    decoder = Decoder(model_dir, mode=mode, budget_bytes=budget)
    generate(decoder, prompt_ids[:4], max_new_tokens=2)  # compile the kernels
    # A stop-free run of exactly new_tokens + 1 tokens: the first comes from prefill.
    decoder.eos_token_ids = lambda: set()
    result = generate(decoder, prompt_ids, max_new_tokens=new_tokens + 1)
    weights = sum(info.nbytes for _, info in decoder.store.index.values())
    return {"prefill_tokens_per_s": len(prompt_ids) / result.prefill_seconds,
            "decode_tokens_per_s": result.decode_steps / result.decode_seconds,
            "weight_bytes_per_token": weights, "bytes_read_per_token": result.decode_bytes_read / result.decode_steps,
            "peak_resident_weight_bytes": decoder.store.stats.peak_resident_bytes,
            "tokens": result.ids[1:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per row (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    from importlib.metadata import version

    from refimpl.generate import Decoder
    from refimpl.registry import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = Decoder(model_dir).tokenizer
    text = "The history of the printing press begins in the fifteenth century, when " * 20
    prompt_ids = tokenizer.encode(text).ids[: args.prompt_tokens]

    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "torch": version("torch")},
              "read_bandwidth_bytes_per_s": read_bandwidth()}
    rows = {
        "transformers (torch, float32)": run_isolated(bench_transformers, model_dir, prompt_ids, args.new_tokens),
        "refimpl fast": run_isolated(bench_refimpl, model_dir, prompt_ids, args.new_tokens, "fast"),
        "refimpl reference": run_isolated(bench_refimpl, model_dir, prompt_ids, args.new_tokens, "reference"),
        "refimpl reference, 16 MiB budget": run_isolated(bench_refimpl, model_dir, prompt_ids, args.new_tokens,
                                                         "reference", 16),
    }
    report["rows"] = rows

    bandwidth = report["read_bandwidth_bytes_per_s"]
    torch_row = rows["transformers (torch, float32)"]
    print(f"command: {report['command']}")
    print(f"machine: {report['machine']}")
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s; prompt {len(prompt_ids)} tokens, "
          f"{args.new_tokens} decoded tokens")
    print(f"{'':34s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'vs torch':>8s} {'roofline':>8s}  same tokens")
    for name, row in rows.items():
        # Decoding reads every weight once per token, so bandwidth / weight bytes bounds tokens/s.
        roofline = row["decode_tokens_per_s"] * row["weight_bytes_per_token"] / bandwidth
        same = row["tokens"] == torch_row["tokens"]
        print(f"{name:34s} {row['prefill_tokens_per_s']:13.1f} {row['decode_tokens_per_s']:12.2f} "
              f"{row['decode_tokens_per_s'] / torch_row['decode_tokens_per_s']:8.2f} {roofline:8.0%}  {same}")
        row["roofline_fraction"] = roofline
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
