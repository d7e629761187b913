"""Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

Steps: tokenize (truncating to ``max_seq_length`` word pieces from
sentence_bert_config.json, 256 for this model), run the BERT encoder, average
the last hidden state over the tokens of the attention mask, and divide by the
L2 norm. tokenizer.json on its own truncates and pads to 128, so its padding
and truncation settings are replaced here.
"""

import json
import math
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from refimpl.errors import RefimplError
from refimpl.models.bert import BertConfig, BertModel
from refimpl.ops import Ops
from refimpl.store import DEFAULT_CHUNK_ROWS, WeightStore

DEFAULT_MAX_SEQ_LENGTH = 256


def load_tokenizer(model_dir, max_length=None):
    """Load the folder's tokenizer.json without padding, truncating to ``max_length`` tokens if given."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise RefimplError(f"{path}: not found; a model folder needs tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise RefimplError(f"{path}: cannot load the tokenizer: {error}") from None
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def read_max_seq_length(model_dir, config):
    path = Path(model_dir) / "sentence_bert_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
        except ValueError as error:
            raise RefimplError(f"{path}: invalid JSON: {error}") from None
        if value:
            return min(int(value), config.max_position_embeddings)
    return min(DEFAULT_MAX_SEQ_LENGTH, config.max_position_embeddings)


class SentenceEncoder:
    """A BERT model with mean pooling and L2 normalisation."""

    def __init__(self, model_dir, mode="reference", chunk_rows=DEFAULT_CHUNK_ROWS, budget_bytes=None,
                 schedule=None, prefetch=1, dtype=np.float32):
        model_dir = Path(model_dir)
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise RefimplError(f"{weights}: not found; a model folder needs model.safetensors")
        self.config = BertConfig.from_file(model_dir / "config.json")
        self.max_seq_length = read_max_seq_length(model_dir, self.config)
        self.tokenizer = load_tokenizer(model_dir, self.max_seq_length)
        self.store = WeightStore(weights, chunk_rows=chunk_rows, budget_bytes=budget_bytes,
                                 schedule=schedule, prefetch=prefetch)
        self.ops = Ops(mode, dtype)
        self.model = BertModel(self.config, self.store, self.ops)

    def tokenize(self, texts):
        """Return the word-piece ids of each text, truncated to max_seq_length."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def encode_ids(self, batch_ids):
        """Embed one batch of id lists: -> [len(batch_ids), hidden_size], L2-normalised."""
        B = len(batch_ids)
        T = max(len(ids) for ids in batch_ids)
        input_ids = np.full((B, T), self.config.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(batch_ids):
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
        hidden = self.model.forward(input_ids, attention_mask)  # [B, T, C]
        return mean_pool_normalize(hidden, attention_mask)

    def encode(self, texts, batch_size=32, progress=None):
        """Embed texts: -> float32 [len(texts), hidden_size].

        Texts are batched by length to save padding work. The batch a text
        lands in does not change its embedding, because the kernels are exact
        per row.
        ``progress``, if given, is called with the number of texts finished.
        """
        all_ids = self.tokenize(texts)
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        out = np.empty((len(all_ids), self.config.hidden_size), dtype=np.float32)
        for first in range(0, len(order), batch_size):
            batch = order[first: first + batch_size]
            out[batch] = self.encode_ids([all_ids[i] for i in batch])
            if progress is not None:
                progress(len(batch))
        return out


def mean_pool_normalize(hidden, attention_mask):
    """[B, T, C] and [B, T] -> [B, C]: mean over masked tokens, then divide by the L2 norm.

    The sums run over tokens in order, skipping padding, so padding never
    changes a row. The guards match sentence-transformers (token count at
    least 1e-9, norm at least 1e-12).
    """
    B, T, C = hidden.shape
    pooled = np.zeros((B, C), dtype=hidden.dtype)
    for b in range(B):
        tokens = np.flatnonzero(attention_mask[b])
        total = np.zeros(C, dtype=hidden.dtype)
        for t in tokens:  # an explicit loop keeps the summation order fixed
            total += hidden[b, t]
        pooled[b] = total / max(len(tokens), 1e-9)
        # math.fsum is correctly rounded, so the norm depends on the row alone.
        norm = math.sqrt(math.fsum((pooled[b].astype(np.float64) ** 2).tolist()))
        pooled[b] /= max(norm, 1e-12)
    return pooled.astype(np.float32)
