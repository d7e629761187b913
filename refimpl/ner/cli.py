"""The ``refimpl ner`` commands: train, eval and predict."""

import json
import time

from refimpl.errors import RefimplError
from refimpl.store import DEFAULT_CHUNK_ROWS

MIB = 1 << 20


def cmd_train(args):
    from refimpl.ner.train import TrainOptions, train

    if args.offload_dir is None and args.budget_mib is not None:
        raise RefimplError("--budget-mib needs --offload-dir DIR, the folder for the offloaded training state")
    budget = None
    if args.budget_mib is not None:
        if args.budget_mib <= 0:
            raise RefimplError(f"--budget-mib {args.budget_mib} is invalid; use a positive number of MiB")
        budget = int(args.budget_mib * MIB)
    options = TrainOptions(
        out=args.out, model=args.model, train_file=args.train, dev_file=args.dev, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        max_length=args.max_length, seed=args.seed, dropout=args.dropout, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, mode=args.mode, budget_bytes=budget, offload_dir=args.offload_dir,
        chunk_rows=args.chunk_rows, resume=args.resume, stop_after_epoch=args.stop_after_epoch,
        progress=not args.quiet)
    started = time.perf_counter()
    history = train(options)
    best = max(history["epochs"], key=lambda e: e["dev_f1"]) if history["epochs"] else None
    if best is not None:
        print(f"best dev entity F1 {100 * best['dev_f1']:.2f} at epoch {best['epoch']}; "
              f"model in {args.out}/best ({time.perf_counter() - started:.0f} s in this run)")


def make_tagger(args):
    from refimpl.cli import budget_bytes
    from refimpl.ner.model import NerTagger

    if args.model is None:
        raise RefimplError("--model DIR is required: a folder written by `refimpl ner train` (OUT/best)")
    return NerTagger(args.model, mode=args.mode, max_length=args.max_length, chunk_rows=args.chunk_rows,
                     budget_bytes=budget_bytes(args), schedule=args.schedule, prefetch=args.prefetch)


def cmd_eval(args):
    from refimpl.cli import print_stats
    from refimpl.ner.conll import read_conll
    from refimpl.ner.scoring import entity_report, format_entity_report, format_token_report, token_report

    tagger = make_tagger(args)
    sentences = read_conll(args.data)
    started = time.perf_counter()
    predicted = tagger.predict([s.words for s in sentences], batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    gold = [s.tags for s in sentences]
    entities = entity_report(gold, predicted)
    tokens = token_report(gold, predicted)
    if args.json:
        print(json.dumps({"entity": entities, "token": tokens}, indent=2))
    else:
        print(format_entity_report(entities))
        print(format_token_report(tokens))
    if args.stats:
        print_stats(tagger.store, sum(len(s.words) for s in sentences), seconds)


def cmd_predict(args):
    tagger = make_tagger(args)
    sentences = [text.split() for text in args.text]
    for words, tags in zip(sentences, tagger.predict(sentences, batch_size=args.batch_size)):
        for word, tag in zip(words, tags):
            print(f"{word}\t{tag}")
        print()


def add_inference_options(parser):
    from refimpl.cli import add_weight_options

    add_weight_options(parser)
    parser.set_defaults(model=None)
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, metavar="N",
                        help="word pieces per window, [CLS] and [SEP] included; longer sentences are split "
                             "into several windows (default: %(default)s)")


def add_ner_parser(subparsers):
    """Add ``ner`` with the subcommands train, eval and predict to an argparse subparsers object."""
    ner = subparsers.add_parser(
        "ner", help="train, evaluate and run a named-entity tagger",
        description="Fine-tune BERT for named-entity recognition (BertForTokenClassification) on CoNLL data, "
                    "score it with conlleval rules, and tag text.")
    commands = ner.add_subparsers(dest="ner_command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="fine-tune a tagger",
        description="Fine-tune a BERT encoder on CoNLL data with AdamW. Prints dev entity scores after each "
                    "epoch and keeps the best model in OUT/best. Default data: the WNUT-16 train set, "
                    "split by --seed into train and dev.")
    train.add_argument("--model", default="minilm",
                       help="registry name or folder of the encoder to start from (default: %(default)s)")
    train.add_argument("--train", metavar="FILE", help="CoNLL training data (default: WNUT-16 train)")
    train.add_argument("--dev", metavar="FILE",
                       help="CoNLL dev data (default: a seeded 10%% split of the training data)")
    train.add_argument("--out", required=True, metavar="DIR", help="output folder")
    train.add_argument("--epochs", type=int, default=4, metavar="N", help="passes over the data (default: %(default)s)")
    train.add_argument("--lr", type=float, default=2e-4, metavar="X",
                       help="peak AdamW learning rate (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=16, metavar="N",
                       help="windows per optimizer step (default: %(default)s)")
    train.add_argument("--micro-batch-size", type=int, metavar="N",
                       help="windows per forward/backward pass; gradients are accumulated over the step "
                            "(default: the whole batch)")
    train.add_argument("--max-length", type=int, default=128, metavar="N",
                       help="word pieces per window, [CLS] and [SEP] included (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed of the split, shuffling, dropout and classifier init (default: %(default)s)")
    train.add_argument("--dropout", type=float, default=0.1, metavar="P",
                       help="dropout probability on the classifier input (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=0.01, metavar="X",
                       help="AdamW decoupled weight decay, not on biases and LayerNorm (default: %(default)s)")
    train.add_argument("--warmup-ratio", type=float, default=0.1, metavar="X",
                       help="fraction of the steps with linear warmup (default: %(default)s)")
    train.add_argument("--mode", choices=("reference", "fast"), default="fast",
                       help="reference: Numba kernels, bitwise identical under every chunking, budget and "
                            "micro-batch split; fast: numpy BLAS (default: %(default)s)")
    train.add_argument("--budget-mib", type=float, metavar="N",
                       help="bound the resident pages of the offloaded parameters, gradients and AdamW "
                            "moments to N MiB (needs --offload-dir)")
    train.add_argument("--offload-dir", metavar="DIR",
                       help="keep parameters, gradients and moments in memory-mapped files under DIR")
    train.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, metavar="N",
                       help="rows per weight chunk; shrunk to fit the budget (default: %(default)s)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint, written at the end of each epoch")
    train.add_argument("--stop-after-epoch", type=int, metavar="N",
                       help="stop after epoch N with a checkpoint; continue later with --resume")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="score a tagger on CoNLL data",
        description="Tag CoNLL data and print the entity report (conlleval) and the token report.")
    add_inference_options(evaluate)
    evaluate.add_argument("--data", required=True, metavar="FILE", help="CoNLL file with gold tags")
    evaluate.add_argument("--json", action="store_true", help="print both reports as JSON")
    evaluate.set_defaults(run=cmd_eval)

    predict = commands.add_parser(
        "predict", help="tag text",
        description="Tag each TEXT, split into words at whitespace; prints one word and its tag per line.")
    add_inference_options(predict)
    predict.add_argument("text", nargs="+", metavar="TEXT", help="texts to tag")
    predict.set_defaults(run=cmd_predict)
    return ner
