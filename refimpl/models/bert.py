"""BERT encoder (Devlin et al., 2019): embeddings, then post-LN transformer layers.

Weights are read through a ``WeightStore`` by their Hugging Face names
(``embeddings.word_embeddings.weight``, ``encoder.layer.{i}.attention.self.query.weight``,
...), with or without the ``bert.`` prefix. Shapes use B (batch), T (sequence
length), C (hidden_size), H (num_attention_heads) and D (head size, C / H).
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.hidden_act != "gelu":
            raise RefimplError(f"hidden_act {config.hidden_act!r} is not supported; BERT here uses exact 'gelu'")
        if config.hidden_size % config.num_attention_heads:
            raise RefimplError(f"hidden_size {config.hidden_size} is not a multiple of "
                               f"num_attention_heads {config.num_attention_heads}")
        return config

    @classmethod
    def from_file(cls, path):
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RefimplError(f"{path}: cannot read the model config: {error}") from None
        return cls.from_dict(values)


class BertModel:
    """The encoder: token ids in, the last hidden state out."""

    def __init__(self, config, store, ops):
        self.config = config
        self.store = store
        self.ops = ops
        self.prefix = "bert." if "bert.embeddings.word_embeddings.weight" in store.index else ""
        store.set_execution_order(self.weight_order())

    def weight_order(self):
        """Names of the weights that forward() streams, in the order it uses them.

        The embedding tables are left out: a lookup reads a few rows of them,
        so prefetching their chunks in row order would read what is not used.
        """
        p = self.prefix
        names = [f"{p}embeddings.LayerNorm.weight", f"{p}embeddings.LayerNorm.bias"]
        for i in range(self.config.num_hidden_layers):
            layer = f"{p}encoder.layer.{i}."
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "attention.output.LayerNorm",
                         "intermediate.dense", "output.dense", "output.LayerNorm"):
                names += [f"{layer}{part}.weight", f"{layer}{part}.bias"]
        return names

    # ---- pieces ------------------------------------------------------------------

    def embeddings(self, input_ids, token_type_ids):
        """[B, T] ids -> [B*T, C]: word + position + token type embeddings, then layer norm."""
        B, T = input_ids.shape
        p = self.prefix + "embeddings."
        positions = np.tile(np.arange(T), B)
        # The same order of additions as transformers' BertEmbeddings.
        x = self.store.rows(p + "word_embeddings.weight", input_ids.reshape(-1)).astype(self.ops.dtype)
        x += self.store.rows(p + "token_type_embeddings.weight", token_type_ids.reshape(-1))
        x += self.store.rows(p + "position_embeddings.weight", positions)
        return self.layer_norm(x, p + "LayerNorm")

    def layer_norm(self, x, prefix):
        weight = self.store.tensor(prefix + ".weight")
        bias = self.store.tensor(prefix + ".bias")
        return self.ops.layer_norm(x, weight, bias, self.config.layer_norm_eps)

    def self_attention(self, x, mask, B, T, prefix):
        """[B*T, C] -> [B*T, C]: multi-head attention and its output projection."""
        H = self.config.num_attention_heads
        D = self.config.hidden_size // H
        q = self.ops.linear(x, self.store, prefix + "self.query").reshape(B, T, H, D)
        k = self.ops.linear(x, self.store, prefix + "self.key").reshape(B, T, H, D)
        v = self.ops.linear(x, self.store, prefix + "self.value").reshape(B, T, H, D)
        heads = self.ops.attention(q, k, v, mask, 1 / math.sqrt(D))  # [B, T, H, D]
        return self.ops.linear(heads.reshape(B * T, H * D), self.store, prefix + "output.dense")

    def layer(self, x, mask, B, T, i):
        """Apply one post-LN layer: [B*T, C] -> [B*T, C]."""
        prefix = f"{self.prefix}encoder.layer.{i}."
        x = self.layer_norm(x + self.self_attention(x, mask, B, T, prefix + "attention."),
                            prefix + "attention.output.LayerNorm")
        h = self.ops.gelu(self.ops.linear(x, self.store, prefix + "intermediate.dense"))  # [B*T, 4C]
        x = self.layer_norm(x + self.ops.linear(h, self.store, prefix + "output.dense"),
                            prefix + "output.LayerNorm")
        self.store.release(prefix)
        return x

    # ---- whole model ------------------------------------------------------------

    def forward(self, input_ids, attention_mask, token_type_ids=None, hidden_states=None):
        """[B, T] ids and mask (1 = token, 0 = padding) -> last hidden state [B, T, C].

        If ``hidden_states`` is a list, the output of the embeddings and of
        every layer is appended to it, each [B, T, C].
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask)
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise RefimplError(f"sequence length {T} exceeds max_position_embeddings "
                               f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)

        # Padding keys are masked for every query: [B, T] -> [B, T(query), T(key)]
        key_mask = np.where(attention_mask.astype(bool), 0.0, -np.inf).astype(self.ops.dtype)
        mask = np.broadcast_to(key_mask[:, None, :], (B, T, T))

        x = self.embeddings(input_ids, token_type_ids)
        if hidden_states is not None:
            hidden_states.append(x.reshape(B, T, -1))
        for i in range(self.config.num_hidden_layers):
            x = self.layer(x, mask, B, T, i)
            if hidden_states is not None:
                hidden_states.append(x.reshape(B, T, -1))
        return x.reshape(B, T, -1)
