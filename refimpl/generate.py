"""Text generation with the decoders: prefill, then one token at a time over a KV cache.

The prompt goes through the model once (prefill), which fills the KV cache.
Each new token is then chosen from the logits of the last position and fed
back alone (decode). In reference mode a decode step gives the same bits as a full
forward pass over the whole sequence, so greedy output does not depend on the
prompt split, the chunk size or the weight budget.

Tokens are chosen greedily (temperature 0) or sampled with numpy's
``default_rng(seed)`` after temperature, top-k and top-p filtering. Text is
streamed as it is decoded, holding back incomplete UTF-8 characters and
anything that may be the start of a stop string.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError
from refimpl.models.gpt2 import GPT2Config, GPT2Model
from refimpl.models.llama import KVCache, LlamaConfig, LlamaModel
from refimpl.ops import Ops
from refimpl.store import DEFAULT_CHUNK_ROWS, WeightStore

DEFAULT_MODEL = "smollm2-135m-instruct"
ARCHITECTURES = {
    "LlamaForCausalLM": (LlamaConfig, LlamaModel),
    "GPT2LMHeadModel": (GPT2Config, GPT2Model),
}
REPLACEMENT_CHARACTER = "\ufffd"  # what the tokenizer decodes an incomplete UTF-8 sequence to


# ---- loading ----------------------------------------------------------------------

def read_json(path, required=True):
    path = Path(path)
    if not path.is_file():
        if required:
            raise RefimplError(f"{path}: not found")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RefimplError(f"{path}: cannot read: {error}") from None


def token_text(value):
    """Return the text of a special token entry of tokenizer_config.json (a string or {"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Decoder:
    """A decoder model folder: config, weights, tokenizer and chat template."""

    def __init__(self, model_dir, mode="reference", chunk_rows=DEFAULT_CHUNK_ROWS, budget_bytes=None,
                 schedule=None, prefetch=1, dtype=np.float32):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        values = read_json(model_dir / "config.json")
        architecture = next((a for a in values.get("architectures", []) if a in ARCHITECTURES), None)
        if architecture is None:
            raise RefimplError(f"{model_dir / 'config.json'}: architectures {values.get('architectures')} "
                               f"name no supported decoder; use one of {', '.join(ARCHITECTURES)}")
        config_class, model_class = ARCHITECTURES[architecture]
        self.config = config_class.from_dict(values)

        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise RefimplError(f"{weights}: not found; a model folder needs model.safetensors")
        self.store = WeightStore(weights, chunk_rows=chunk_rows, budget_bytes=budget_bytes,
                                 schedule=schedule, prefetch=prefetch)
        self.ops = Ops(mode, dtype)
        self.model = model_class(self.config, self.store, self.ops)

        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise RefimplError(f"{tokenizer_path}: not found; a model folder needs tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise RefimplError(f"{tokenizer_path}: cannot load the tokenizer: {error}") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.tokenizer_config = read_json(model_dir / "tokenizer_config.json", required=False)
        self.generation_config = read_json(model_dir / "generation_config.json", required=False)

    def eos_token_ids(self):
        """End-of-sequence ids: those of config.json, generation_config.json and the tokenizer's eos_token."""
        ids = set(self.config.eos_token_ids)
        extra = self.generation_config.get("eos_token_id")
        if isinstance(extra, list):
            ids |= set(extra)
        elif extra is not None:
            ids.add(extra)
        eos_text = token_text(self.tokenizer_config.get("eos_token"))
        if eos_text is not None and self.tokenizer.token_to_id(eos_text) is not None:
            ids.add(self.tokenizer.token_to_id(eos_text))
        return ids

    def encode(self, text, chat=False):
        """Token ids of a prompt: plain text with the tokenizer's special tokens, or one chat user turn."""
        if not chat:
            return self.tokenizer.encode(text).ids
        rendered = self.render_chat([{"role": "user", "content": text}])
        # As transformers' apply_chat_template: the template already contains the special tokens.
        return self.tokenizer.encode(rendered, add_special_tokens=False).ids

    def render_chat(self, messages):
        template = self.tokenizer_config.get("chat_template")
        if not template:
            raise RefimplError("this model has no chat_template in tokenizer_config.json; run without --chat")
        special = {key: token_text(value) for key, value in self.tokenizer_config.items()
                   if key.endswith("_token") and token_text(value) is not None}
        return render_chat_template(template, messages, special)


def render_chat_template(template, messages, special_tokens):
    """Render a chat template as transformers' apply_chat_template(add_generation_prompt=True) does.

    The environment matches transformers 5.x: a sandbox with trim_blocks,
    lstrip_blocks and loop controls, and the raise_exception and strftime_now
    globals.
    """
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        compiled = environment.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as error:
        raise RefimplError(f"the chat template failed: {error}") from None


# ---- choosing tokens --------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """Settings of the next-token choice: greedy at temperature 0, else sampled."""

    temperature: float = 0.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    seed: int = 0

    def check(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RefimplError(f"--temperature {self.temperature} is invalid; use 0 (greedy) or more")
        if self.seed < 0:
            raise RefimplError(f"--seed {self.seed} is invalid; use 0 or more")
        if self.top_k < 0:
            raise RefimplError(f"--top-k {self.top_k} is invalid; use 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise RefimplError(f"--top-p {self.top_p} is invalid; use a value in (0, 1]")


def softmax(scores):
    e = np.exp(scores - scores.max())
    return e / e.sum()


def choose_token(logits, sampling, rng):
    """Pick the next token from logits [V]: argmax at temperature 0, else a filtered sample."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature  # [V]
    if 0 < sampling.top_k < scores.size:
        # As transformers' TopKLogitsWarper: ties with the k-th score are kept.
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores[scores < kth] = -np.inf
    if sampling.top_p < 1:
        # Keep the most likely tokens until their probability reaches top_p (at least one).
        order = np.argsort(-scores, kind="stable")
        probs = softmax(scores[order])
        before = np.cumsum(probs) - probs  # probability of the tokens ranked above each
        scores[order[before >= sampling.top_p]] = -np.inf
    return int(rng.choice(scores.size, p=softmax(scores)))


# ---- streaming text ---------------------------------------------------------------

class TextStream:
    """Decode generated ids incrementally; emit only complete text that cannot start a stop string."""

    def __init__(self, tokenizer, stop_strings=(), on_text=None):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.on_text = on_text
        self.ids = []
        self.emitted = 0  # characters of the text already passed to on_text
        self.text = ""
        self.stopped = False

    def push(self, token_id):
        """Add one token; return True when a stop string has appeared."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(self.text)
        for stop in self.stop_strings:
            found = self.text.find(stop)
            if found >= 0:
                self.text = self.text[:found]
                self.stopped = True
        if self.stopped:
            self._emit(len(self.text))
            return True
        if self.text.endswith(REPLACEMENT_CHARACTER):
            end = len(self.text.rstrip(REPLACEMENT_CHARACTER))
        self._emit(end - self._stop_prefix_length(self.text[:end]))
        return False

    def finish(self):
        """Emit what is held back at the end of generation."""
        self._emit(len(self.text))

    def _stop_prefix_length(self, text):
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def _emit(self, end):
        if end > self.emitted:
            if self.on_text is not None:
                self.on_text(self.text[self.emitted:end])
            self.emitted = end


# ---- the generation loop ----------------------------------------------------------

@dataclass
class Generation:
    """The result of generate(): new token ids, their text, and timings."""

    prompt_ids: list
    ids: list = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"  # "length", "eos" or "stop string"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prefill_bytes_read: int = 0
    decode_bytes_read: int = 0


def generate(decoder, prompt_ids, max_new_tokens=64, sampling=Sampling(), stop_strings=(), on_text=None):
    """Generate up to ``max_new_tokens`` after ``prompt_ids``, stopping at an EOS token or a stop string.

    ``on_text`` is called with each new piece of complete text as it is decoded.
    """
    sampling.check()
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise RefimplError("the prompt is empty after tokenization; give a non-empty prompt")
    if max_new_tokens < 1:
        raise RefimplError(f"--max-new-tokens {max_new_tokens} is invalid; use 1 or more")
    limit = decoder.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise RefimplError(f"the prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens exceeds "
                           f"the model's max_position_embeddings {limit}; shorten the prompt or lower "
                           "--max-new-tokens")

    rng = np.random.default_rng(sampling.seed)
    eos = decoder.eos_token_ids()
    stream = TextStream(decoder.tokenizer, stop_strings, on_text)
    result = Generation(prompt_ids)
    cache = KVCache(decoder.config.num_hidden_layers)
    stats = decoder.store.stats

    started, bytes_before = time.perf_counter(), stats.bytes_read
    logits = decoder.model.forward(np.array([prompt_ids]), cache=cache, last_only=True)  # [1, 1, V]
    result.prefill_seconds = time.perf_counter() - started
    result.prefill_bytes_read = stats.bytes_read - bytes_before

    started, bytes_before = time.perf_counter(), stats.bytes_read
    while True:
        token = choose_token(logits[0, -1], sampling, rng)
        if token in eos:
            result.stop_reason = "eos"
            break
        result.ids.append(token)
        if stream.push(token):
            result.stop_reason = "stop string"
            break
        if len(result.ids) == max_new_tokens:
            break
        logits = decoder.model.forward(np.array([[token]]), cache=cache)  # [1, 1, V]
        result.decode_steps += 1
    result.decode_seconds = time.perf_counter() - started
    result.decode_bytes_read = stats.bytes_read - bytes_before
    stream.finish()
    result.text = stream.text
    return result


# ---- command line -----------------------------------------------------------------

def decoder_from_args(args):
    from refimpl.cli import budget_bytes
    from refimpl.registry import resolve_model

    if args.chunk_rows < 1:
        raise RefimplError(f"--chunk-rows {args.chunk_rows} is invalid; use 1 or more")
    return Decoder(resolve_model(args.model), mode=args.mode, chunk_rows=args.chunk_rows,
                   budget_bytes=budget_bytes(args), schedule=args.schedule, prefetch=args.prefetch)


def print_generation_stats(decoder, result):
    from refimpl.cli import print_stats

    def rate(tokens, seconds):
        return tokens / max(seconds, 1e-9)

    MIB = 1 << 20
    prompt_tokens = len(result.prompt_ids)
    print(f"prefill: {prompt_tokens} tokens in {result.prefill_seconds:.2f} s "
          f"({rate(prompt_tokens, result.prefill_seconds):.1f} tokens/s)", file=sys.stderr)
    print(f"decode: {result.decode_steps} tokens in {result.decode_seconds:.2f} s "
          f"({rate(result.decode_steps, result.decode_seconds):.1f} tokens/s)", file=sys.stderr)
    if result.decode_steps:
        # The store counts the bytes of chunks that were not resident, so a resident run reads 0 after prefill.
        print(f"weight bytes read per decoded token: {result.decode_bytes_read / result.decode_steps / MIB:.1f} MiB "
              "(chunks not already resident)", file=sys.stderr)
    print_stats(decoder.store, prompt_tokens + result.decode_steps, result.prefill_seconds + result.decode_seconds)


def cmd_generate(args):
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    decoder = decoder_from_args(args)
    prompt_ids = decoder.encode(args.prompt, chat=args.chat)

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(decoder, prompt_ids, args.max_new_tokens, sampling, args.stop, on_text=write)
    write("\n")
    if args.stats:
        print_generation_stats(decoder, result)


def parse_ids(text):
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RefimplError(f"--ids {text!r} is invalid; use comma-separated integers such as 1,2,3") from None
    if not ids:
        raise RefimplError("--ids is empty; give at least one token id")
    return ids


def cmd_logits(args):
    from refimpl.cli import print_stats, write_npy

    decoder = decoder_from_args(args)
    ids = parse_ids(args.ids) if args.ids is not None else decoder.encode(args.text)
    if not ids:
        raise RefimplError("the text is empty after tokenization; give a non-empty --text or --ids")
    vocab = decoder.store.shape(decoder.model.weight_order()[0])[0]  # rows of the token embedding
    if min(ids) < 0 or max(ids) >= vocab:
        raise RefimplError(f"token id {max(ids) if max(ids) >= vocab else min(ids)} is out of range "
                           f"for a vocabulary of {vocab}")
    if len(ids) > decoder.config.max_position_embeddings:
        raise RefimplError(f"{len(ids)} tokens exceed the model's max_position_embeddings "
                           f"{decoder.config.max_position_embeddings}")
    started = time.perf_counter()
    logits = decoder.model.forward(np.array([ids]))[0]  # [T, V]
    seconds = time.perf_counter() - started
    write_npy(args.output, logits.astype(np.float32))
    if args.stats:
        print_stats(decoder.store, len(ids), seconds)


def add_generate_parser(subparsers):
    from refimpl.cli import add_weight_options

    parser = subparsers.add_parser(
        "generate", help="generate text with a decoder model",
        description="Generate a continuation of PROMPT with a Llama or GPT-2 model, streaming it to stdout. "
                    "Greedy unless --temperature is above 0.")
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    add_weight_options(parser)
    parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--chat", action="store_true",
                        help="wrap PROMPT as one user message with the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="stop after N new tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="divide logits by T before sampling; 0 picks the most likely token (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample among the K most likely tokens; 0 for all (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample among the most likely tokens whose probabilities sum to P (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of numpy's default_rng for sampling, 0 or more (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when TEXT appears in the output, which then ends before it; repeatable")
    parser.set_defaults(run=cmd_generate)
    return parser


def add_logits_parser(subparsers):
    from refimpl.cli import add_weight_options

    parser = subparsers.add_parser(
        "logits", help="write the next-token logits of a decoder model",
        description="Run a Llama or GPT-2 model over one sequence and write float32 logits [seq, vocab_size].")
    add_weight_options(parser)
    parser.set_defaults(model=DEFAULT_MODEL)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="TEXT", help="tokenize TEXT with the model's tokenizer")
    source.add_argument("--ids", metavar="IDS", help="comma-separated token ids, such as 1,2,3")
    parser.add_argument("--output", required=True, metavar="FILE.npy", help="write the logits to FILE.npy")
    parser.set_defaults(run=cmd_logits)
    return parser
