"""The ``refimpl`` command line."""

import argparse
import math
import resource
import sys
import time
from pathlib import Path

from refimpl.errors import RefimplError
from refimpl.store import DEFAULT_CHUNK_ROWS

MIB = 1 << 20


def peak_rss_bytes():
    """Peak resident set size of this process in bytes (VmHWM of /proc/self/status).

    Not getrusage's ru_maxrss: Linux carries that value across fork and exec,
    so a process started by a larger one reports its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def read_texts(args):
    """Texts from the command line, or one per line from --input FILE (- for stdin)."""
    texts = list(args.text)
    if args.input is not None:
        if args.input == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(args.input)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise RefimplError(f"{path}: not found") from None
            except UnicodeDecodeError as error:
                raise RefimplError(f"{path}: not valid UTF-8 at byte {error.start}") from None
            except OSError as error:
                raise RefimplError(f"{path}: cannot read: {error.strerror}") from None
        texts.extend(lines)
    if not texts:
        raise RefimplError("no texts given; pass TEXT arguments or --input FILE (- for stdin)")
    return texts


def budget_bytes(args):
    """Return --budget-mib in bytes, or None without a budget; reject what no budget can mean."""
    if args.budget_mib is None:
        if getattr(args, "schedule", None) == "budget":
            raise RefimplError("--schedule budget needs --budget-mib N")
        return None
    if not math.isfinite(args.budget_mib) or args.budget_mib <= 0:
        raise RefimplError(f"--budget-mib {args.budget_mib} is invalid; use a positive number of MiB")
    if getattr(args, "schedule", None) in ("resident", "layer"):
        raise RefimplError(f"--budget-mib is ignored by --schedule {args.schedule}; drop one of them "
                           "(a budget implies --schedule budget)")
    return int(args.budget_mib * MIB)


def write_npy(path, array):
    """Write an .npy file atomically: a temporary file in the same folder, then rename."""
    import os
    import tempfile

    import numpy as np

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise RefimplError(f"{path}: folder {folder} does not exist")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, array)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def print_stats(store, tokens, seconds):
    stats = store.stats
    print(f"tokens: {tokens} in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s)", file=sys.stderr)
    print(f"schedule: {store.schedule}, chunk rows: {store.chunk_rows}"
          + (f" (requested {store.requested_chunk_rows})" if store.chunk_rows != store.requested_chunk_rows else "")
          + (f", budget: {store.budget_bytes / MIB:.1f} MiB" if store.budget_bytes else ""), file=sys.stderr)
    print(f"weight bytes read: {stats.bytes_read / MIB:.1f} MiB "
          f"(hits {stats.hits}, misses {stats.misses}, prefetches {stats.prefetches}, evictions {stats.evictions})",
          file=sys.stderr)
    print(f"peak resident weight bytes: {stats.peak_resident_bytes / MIB:.1f} MiB", file=sys.stderr)
    print(f"peak RSS of the process: {peak_rss_bytes() / MIB:.1f} MiB", file=sys.stderr)


def cmd_embed(args):
    import numpy as np
    from tqdm import tqdm

    from refimpl.embed import SentenceEncoder
    from refimpl.registry import resolve_model

    texts = read_texts(args)
    model_dir = resolve_model(args.model)
    encoder = SentenceEncoder(model_dir, mode=args.mode, chunk_rows=args.chunk_rows,
                              budget_bytes=budget_bytes(args), schedule=args.schedule,
                              prefetch=args.prefetch)
    show_progress = len(texts) > args.batch_size and not args.quiet
    started = time.perf_counter()
    with tqdm(total=len(texts), unit="text", disable=not show_progress, file=sys.stderr) as bar:
        embeddings = encoder.encode(texts, batch_size=args.batch_size, progress=bar.update)
    seconds = time.perf_counter() - started

    if args.output:
        write_npy(args.output, embeddings)
    if args.similarity:
        similarity = embeddings @ embeddings.T
        width = max(len(str(len(texts))), 3)
        print(" " * (width + 1) + " ".join(f"{j:>7d}" for j in range(len(texts))))
        for i, row in enumerate(similarity):
            print(f"{i:>{width}d} " + " ".join(f"{value:7.4f}" for value in row))
    elif not args.output:
        np.set_printoptions(linewidth=1 << 20, threshold=1 << 30)
        for vector in embeddings:
            print(" ".join(f"{value:.7g}" for value in vector))
    if args.stats:
        tokens = sum(len(ids) for ids in encoder.tokenize(texts))
        print_stats(encoder.store, tokens, seconds)


def cmd_inspect(args):
    from refimpl.safetensors import format_inspect

    print(format_inspect(args.file))


def add_weight_options(parser):
    parser.add_argument("--model", default="minilm",
                        help="registry name or local folder in the Hugging Face layout (default: %(default)s)")
    parser.add_argument("--mode", choices=("reference", "fast"), default="reference",
                        help="reference: Numba kernels, bitwise identical under every schedule; "
                             "fast: numpy BLAS, checked against reference by tolerance (default: %(default)s)")
    parser.add_argument("--budget-mib", type=float, metavar="N",
                        help="bound resident weight pages to N MiB (1 MiB = 2^20 bytes); "
                             "default: no bound, weights stay resident")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, metavar="N",
                        help="rows per weight chunk; shrunk to fit the budget if needed (default: %(default)s)")
    parser.add_argument("--schedule", choices=("resident", "layer", "budget"),
                        help="resident: keep every page; layer: release each layer after use; "
                             "budget: LRU under --budget-mib (default: budget if --budget-mib is set, else resident)")
    parser.add_argument("--prefetch", type=int, default=1, metavar="N",
                        help="chunks read ahead in execution order (default: %(default)s)")
    parser.add_argument("--stats", action="store_true",
                        help="print tokens/s, weight bytes read, peak resident weight bytes and peak RSS to stderr")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="refimpl",
        description="A small, exact, readable transformer engine on NumPy and Numba.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed", help="compute sentence embeddings",
        description="Compute L2-normalised sentence embeddings (mean pooling, as sentence-transformers "
                    "does for all-MiniLM-L6-v2). Prints one embedding per line, or the cosine matrix.",
    )
    embed.add_argument("text", nargs="*", metavar="TEXT", help="texts to embed")
    embed.add_argument("--input", metavar="FILE", help="read more texts from FILE, one per line (- for stdin)")
    add_weight_options(embed)
    embed.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="texts per forward pass (default: %(default)s)")
    embed.add_argument("--output", metavar="FILE.npy", help="write float32 [n, hidden_size] embeddings to FILE.npy")
    embed.add_argument("--similarity", action="store_true", help="print the cosine similarity matrix instead")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=cmd_embed)

    inspect = commands.add_parser(
        "inspect", help="list the tensors of a safetensors file",
        description="List name, dtype, shape and byte range of every tensor in a safetensors file.",
    )
    inspect.add_argument("file", metavar="FILE", help="path of a .safetensors file")
    inspect.set_defaults(run=cmd_inspect)

    from refimpl.generate import add_generate_parser, add_logits_parser
    from refimpl.gguf_import import add_convert_parser
    from refimpl.ner.cli import add_ner_parser

    add_generate_parser(commands)
    add_logits_parser(commands)
    add_ner_parser(commands)
    add_convert_parser(commands)
    return parser


def check_counts(args):
    """Reject a negative or zero count among the options every command shares."""
    for option, minimum in (("batch_size", 1), ("chunk_rows", 1), ("prefetch", 0)):
        value = getattr(args, option, None)
        if value is not None and value < minimum:
            flag = "--" + option.replace("_", "-")
            raise RefimplError(f"{flag} {value} is invalid; use {minimum} or more")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_counts(args)
        args.run(args)
    except RefimplError as error:
        print(f"refimpl: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("refimpl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
