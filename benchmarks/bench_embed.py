"""Sentence-embedding throughput beside sentence-transformers, and matmul GFLOP/s beside BLAS.

Run from the repository root with the peer extra installed:

    python benchmarks/bench_embed.py [--texts N] [--repeats R] [--json FILE]

All numbers come from one command, one backend after another on the same
inputs, so they can be compared as ratios. Absolute numbers drift on a shared
machine.
Inputs: the first N tweets of the WNUT-16 training data (fetched through the
registry), and a fixed batch of 32 texts of 128 word pieces.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from isolated import run_isolated


def best_time(function, repeats):
    """Minimum wall time of ``repeats`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def blas_info():
    try:
        from threadpoolctl import threadpool_info
        return [f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} threads={p.get('num_threads')}"
                for p in threadpool_info()]
    except ImportError:
        return ["threadpoolctl not installed"]


def texts_for_benchmark(count):
    from refimpl.ner.conll import load_wnut16_train

    return [" ".join(sentence.words) for sentence in load_wnut16_train()[:count]]


def fixed_length_texts(tokenizer, batch=32, length=128):
    """Texts that tokenize to exactly ``length`` word pieces with [CLS] and [SEP]."""
    words = ("the model reads weights through memory mapped chunk views " * 40).split()
    texts = []
    for i in range(batch):
        ids = tokenizer.encode(" ".join(words[i:])).ids[1: length - 1]
        texts.append(tokenizer.decode(ids))
    return texts


def time_refimpl(model_dir, texts, mode, repeats):
    from refimpl.embed import SentenceEncoder

    encoder = SentenceEncoder(model_dir, mode=mode)
    return best_time(lambda: encoder.encode(texts, batch_size=32), repeats)


def time_sentence_transformers(model_dir, texts, repeats):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    with torch.inference_mode():
        return best_time(lambda: model.encode(texts, batch_size=32, convert_to_numpy=True), repeats)


def bench_embeddings(model_dir, texts, repeats):
    """Time each backend on ``texts``, each in its own process (see isolated.py)."""
    from refimpl.embed import load_tokenizer, read_max_seq_length
    from refimpl.models.bert import BertConfig

    config = BertConfig.from_file(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir, read_max_seq_length(model_dir, config))
    tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts))
    rows = {
        "refimpl reference": run_isolated(time_refimpl, model_dir, texts, "reference", repeats),
        "refimpl fast": run_isolated(time_refimpl, model_dir, texts, "fast", repeats),
        "sentence-transformers (torch)": run_isolated(time_sentence_transformers, model_dir, texts, repeats),
    }
    peer_seconds = rows["sentence-transformers (torch)"]
    return {name: {"seconds": s, "tokens_per_s": tokens / s, "vs_torch": peer_seconds / s}
            for name, s in rows.items()}, tokens


def bench_matmul(repeats):
    from refimpl_kernels.matmul import linear_reference

    rng = np.random.default_rng(0)
    results = []
    # MiniLM's projections at batch 32 x 128 tokens: (rows of x, in_features, out_features)
    for M, K, N in [(4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384), (1, 384, 1536)]:
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        out = np.empty((M, N), dtype=np.float32)
        reference = best_time(lambda: linear_reference(x, w, out), repeats)
        blas = best_time(lambda: np.matmul(x, w.T, out=out), repeats)
        flops = 2 * M * K * N
        results.append({"shape": [M, K, N], "reference_gflops": flops / reference / 1e9,
                        "blas_gflops": flops / blas / 1e9, "reference_over_blas": blas / reference})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512, help="number of WNUT-16 tweets (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is kept (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    from importlib.metadata import version

    from tokenizers import Tokenizer

    from refimpl.registry import resolve_model

    model_dir = resolve_model("minilm")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__, "torch": version("torch"),
                    "blas": blas_info()},
    }
    report["tweets"], report["tweet_tokens"] = bench_embeddings(model_dir, texts_for_benchmark(args.texts), args.repeats)
    report["batch_32x128"], _ = bench_embeddings(model_dir, fixed_length_texts(tokenizer), args.repeats)
    report["matmul"] = run_isolated(bench_matmul, args.repeats)

    print(f"command: {report['command']}")
    print(f"machine: {report['machine']}")
    for workload in ("tweets", "batch_32x128"):
        print(f"\n{workload}:")
        for name, row in report[workload].items():
            print(f"  {name:32s} {row['tokens_per_s']:10.0f} tokens/s   {row['vs_torch']:.2f}x torch")
    print("\nmatmul x[M,K] @ W[N,K].T:")
    for row in report["matmul"]:
        M, K, N = row["shape"]
        print(f"  M={M:5d} K={K:5d} N={N:5d}  reference {row['reference_gflops']:6.1f} GFLOP/s  "
              f"BLAS {row['blas_gflops']:6.1f} GFLOP/s  reference/BLAS {row['reference_over_blas']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
