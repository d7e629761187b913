"""Training throughput: refimpl fast and reference mode beside PyTorch, on the same model and batch.

One training step is forward, backward and an AdamW update of
BertForTokenClassification (all-MiniLM-L6-v2 with a random 21-label head, no
dropout) on a batch of random token ids with every position labelled.
Tokens/s counts the tokens of the batch, padding excluded (there is none).

    python benchmarks/bench_train.py [--batch-size 16] [--length 48] [--steps 3]

The machine is shared, so the load average is printed with the numbers;
compare the three rows of one run, not runs with each other.
"""

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

LABELS = 21  # O plus B- and I- of WNUT-16's ten entity types


def machine_line():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{cpu}; {os.cpu_count()} cores; load average {load}; Python {platform.python_version()}, numpy {np.__version__}"


def make_batch(batch_size, length, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1000, vocab_size, (batch_size, length))
    input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS], [SEP]
    labels = rng.integers(0, LABELS, (batch_size, length))
    return input_ids, np.ones_like(input_ids), labels


def time_steps(step, steps):
    step()  # the first step compiles kernels and faults pages in
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def bench_refimpl(model_dir, mode, batch, steps):
    from refimpl.ner.model import initial_weights, read_model_config
    from refimpl.train import build_training
    from refimpl.train.adamw import AdamW

    _, config = read_model_config(model_dir)
    weights = initial_weights(model_dir, config, [str(i) for i in range(LABELS)])
    state, model = build_training(config, weights, LABELS, mode=mode)
    optimizer = AdamW(state, lr=1e-5, total_steps=10 * steps)
    input_ids, mask, labels = batch
    micro = [{"input_ids": input_ids, "attention_mask": mask, "labels": labels,
              "example_ids": np.arange(len(input_ids))}]

    def step():
        state.grads.zero()
        model.accumulate_gradients(micro, state.grads, train=False)
        optimizer.step()

    seconds = time_steps(step, steps)
    state.close()
    return seconds


def bench_torch(model_dir, batch, steps):
    import torch
    import transformers

    model = transformers.BertForTokenClassification.from_pretrained(model_dir, num_labels=LABELS)
    model.train()
    for module in model.modules():  # no dropout, as in the refimpl rows
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids, mask, labels = (torch.from_numpy(a) for a in batch)

    def step():
        optimizer.zero_grad()
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    return time_steps(step, steps), torch.__version__, torch.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="registry name or model folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--length", type=int, default=48, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default: %(default)s)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("fast", "reference", "torch"),
                        help="rows to leave out")
    args = parser.parse_args()

    from refimpl.registry import resolve_model

    model_dir = resolve_model(args.model)
    from refimpl.ner.model import read_model_config

    _, config = read_model_config(model_dir)
    batch = make_batch(args.batch_size, args.length, config.vocab_size)
    tokens = args.batch_size * args.length
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"machine: {machine_line()}")
    print(f"model: {model_dir}; batch {args.batch_size} x {args.length} tokens; {args.steps} timed steps")
    print(f"{'backend':<22} {'s/step':>8} {'tokens/s':>9}")
    rows = []
    for mode in ("fast", "reference"):
        if mode not in args.skip:
            rows.append((f"refimpl {mode}", bench_refimpl(model_dir, mode, batch, args.steps)))
            print(f"{rows[-1][0]:<22} {rows[-1][1]:8.3f} {tokens / rows[-1][1]:9.0f}", flush=True)
    if "torch" not in args.skip:
        seconds, version, threads = bench_torch(model_dir, batch, args.steps)
        print(f"{f'PyTorch {version}':<22} {seconds:8.3f} {tokens / seconds:9.0f}   ({threads} threads)")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
