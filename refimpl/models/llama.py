"""Llama decoder (Touvron et al., 2023): pre-RMSNorm layers with rotary embeddings,
grouped-query attention and a SwiGLU MLP.

Weights are read through a ``WeightStore`` by the names of transformers'
``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ...). The output projection is
``lm_head.weight``, or the token embedding when ``tie_word_embeddings`` is set
or the file has no ``lm_head.weight``. Shapes use B (batch), T (new tokens),
S (cached plus new tokens), C (hidden_size), H (attention heads), Hkv (key and
value heads), D (head_dim) and V (vocab_size).

This file also contains what both decoders share: the KV cache, the
positions of left-padded rows, and the causal mask.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError
from refimpl_kernels.rope import inverse_frequencies


def read_config_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RefimplError(f"{path}: cannot read the model config: {error}") from None


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        # transformers 5 writes rope_theta inside rope_parameters; older configs
        # write rope_theta and rope_scaling at the top level.
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise RefimplError(f"rope type {rope_type!r} is not supported; only the default rotary "
                               "embedding (no scaling) is implemented")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})

        if config.hidden_act != "silu":
            raise RefimplError(f"hidden_act {config.hidden_act!r} is not supported; Llama here uses 'silu'")
        if config.num_attention_heads % config.kv_heads:
            raise RefimplError(f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                               f"num_key_value_heads {config.kv_heads}")
        if config.head_size % 2:
            raise RefimplError(f"head_dim {config.head_size} is odd; rotary embeddings need an even head size")
        return config

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(read_config_json(path))

    @property
    def kv_heads(self):
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self):
        return token_id_set(self.eos_token_id)


# ---- shared by the decoders -------------------------------------------------------

def token_id_set(value):
    """Return a config's token id field (None, one id or a list of ids) as a set."""
    if value is None:
        return set()
    if isinstance(value, list):
        return set(value)
    return {value}


class KVCache:
    """Keys and values of every token seen so far, per layer, and which of them are padding."""

    def __init__(self, n_layers):
        self.keys = [None] * n_layers  # each [B, S, Hkv, D]
        self.values = [None] * n_layers
        self.key_mask = None  # [B, S] bool, False at padding

    @property
    def length(self):
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def keys_mask_with(self, attention_mask):
        """Return the mask of the cached keys followed by the new tokens': [B, T] -> [B, S]."""
        new = np.asarray(attention_mask).astype(bool)
        if self.key_mask is None:
            return new
        if self.key_mask.shape[0] != new.shape[0]:
            raise RefimplError(f"batch size {new.shape[0]} does not match the cache's {self.key_mask.shape[0]}")
        return np.concatenate([self.key_mask, new], axis=1)

    def update(self, layer, k, v):
        """Append this step's k, v: [B, T, Hkv, D] to a layer; return all of them: [B, S, Hkv, D]."""
        if self.keys[layer] is not None:
            k = np.concatenate([self.keys[layer], k], axis=1)
            v = np.concatenate([self.values[layer], v], axis=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def positions_from_mask(key_mask, past):
    """Positions of the new tokens: [B, S] mask -> [B, T], counting only non-padding tokens.

    A left-padded row gets the positions it would have alone, as transformers'
    generate() computes them (attention_mask.cumsum(-1) - 1). Padding tokens
    get position 0; their outputs are never used.
    """
    positions = np.cumsum(key_mask, axis=1) - 1
    return np.maximum(positions[:, past:], 0).astype(np.int64)


def causal_mask(key_mask, past, dtype):
    """Additive mask [B, T, S]: new token t (at cache index past + t) attends to key s if s <= past + t and s is no padding."""
    B, S = key_mask.shape
    T = S - past
    query_index = past + np.arange(T)[:, None]  # [T, 1]
    allowed = (np.arange(S)[None, :] <= query_index)[None] & key_mask[:, None, :]  # [B, T, S]
    return np.where(allowed, 0.0, -np.inf).astype(dtype)


def prepare_step(input_ids, attention_mask, cache, position_ids, max_positions):
    """Check the inputs of a forward step; return ids [B, T], the key mask [B, S], positions [B, T] and past."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise RefimplError(f"input ids of shape {input_ids.shape} are invalid; pass [batch, tokens] with tokens >= 1")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    past = cache.length if cache is not None else 0
    if cache is not None:
        key_mask = cache.keys_mask_with(attention_mask)
    else:
        key_mask = np.asarray(attention_mask).astype(bool)
    if key_mask.shape != (input_ids.shape[0], past + input_ids.shape[1]):
        raise RefimplError(f"attention mask of shape {np.shape(attention_mask)} does not match "
                           f"input ids of shape {input_ids.shape}")
    if position_ids is None:
        position_ids = positions_from_mask(key_mask, past)
    position_ids = np.asarray(position_ids, dtype=np.int64)
    if position_ids.size and position_ids.max() >= max_positions:
        raise RefimplError(f"position {position_ids.max()} exceeds the model's max_position_embeddings "
                           f"{max_positions}; use a shorter prompt or fewer new tokens")
    if cache is not None:
        cache.key_mask = key_mask
    return input_ids, key_mask, position_ids, past


# ---- the model --------------------------------------------------------------------

class LlamaModel:
    """LlamaForCausalLM: token ids in, next-token logits out."""

    def __init__(self, config, store, ops):
        self.config = config
        self.store = store
        self.ops = ops
        tied = config.tie_word_embeddings or "lm_head.weight" not in store.index
        self.lm_head = "model.embed_tokens" if tied else "lm_head"
        self.inv_freq = inverse_frequencies(config.head_size, config.rope_theta)  # [D/2]
        store.set_execution_order(self.weight_order())

    def weight_order(self):
        """Weight names in the order forward() uses them."""
        c = self.config
        names = ["model.embed_tokens.weight"]
        for i in range(c.num_hidden_layers):
            layer = f"model.layers.{i}."
            names.append(layer + "input_layernorm.weight")
            for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names.append(f"{layer}self_attn.{part}.weight")
                if c.attention_bias:
                    names.append(f"{layer}self_attn.{part}.bias")
            names.append(layer + "post_attention_layernorm.weight")
            for part in ("gate_proj", "up_proj", "down_proj"):
                names.append(f"{layer}mlp.{part}.weight")
                if c.mlp_bias:
                    names.append(f"{layer}mlp.{part}.bias")
        names += ["model.norm.weight", self.lm_head + ".weight"]
        return names

    # ---- pieces ------------------------------------------------------------------

    def rms_norm(self, x, name):
        return self.ops.rms_norm(x, self.store.tensor(name), self.config.rms_norm_eps)

    def self_attention(self, x, mask, positions, cache, B, T, i):
        """[B*T, C] -> [B*T, C]: rotary grouped-query attention over the cache and the new tokens."""
        c, ops, store = self.config, self.ops, self.store
        H, Hkv, D = c.num_attention_heads, c.kv_heads, c.head_size
        prefix = f"model.layers.{i}.self_attn."
        bias = c.attention_bias
        q = ops.linear(x, store, prefix + "q_proj", bias).reshape(B * T, H, D)
        k = ops.linear(x, store, prefix + "k_proj", bias).reshape(B * T, Hkv, D)
        v = ops.linear(x, store, prefix + "v_proj", bias).reshape(B, T, Hkv, D)
        q = ops.rope(q, positions, self.inv_freq).reshape(B, T, H, D)
        k = ops.rope(k, positions, self.inv_freq).reshape(B, T, Hkv, D)
        if cache is not None:
            k, v = cache.update(i, k, v)  # [B, S, Hkv, D]
        heads = ops.attention(q, k, v, mask, D ** -0.5)  # [B, T, H, D]
        return ops.linear(heads.reshape(B * T, H * D), store, prefix + "o_proj", bias)

    def mlp(self, x, i):
        """SwiGLU: [B*T, C] -> [B*T, F] -> [B*T, C], down(silu(gate(x)) * up(x))."""
        ops, store, bias = self.ops, self.store, self.config.mlp_bias
        prefix = f"model.layers.{i}.mlp."
        gate = ops.silu(ops.linear(x, store, prefix + "gate_proj", bias))  # [B*T, F]
        up = ops.linear(x, store, prefix + "up_proj", bias)  # [B*T, F]
        return ops.linear(gate * up, store, prefix + "down_proj", bias)

    def layer(self, x, mask, positions, cache, B, T, i):
        """Apply one pre-norm layer: [B*T, C] -> [B*T, C]."""
        prefix = f"model.layers.{i}."
        x = x + self.self_attention(self.rms_norm(x, prefix + "input_layernorm.weight"),
                                    mask, positions, cache, B, T, i)
        x = x + self.mlp(self.rms_norm(x, prefix + "post_attention_layernorm.weight"), i)
        self.store.release(prefix)
        return x

    # ---- whole model ------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None,
                hidden_states=None, last_only=False):
        """[B, T] ids and mask (1 = token, 0 = padding) -> logits [B, T, V].

        With a ``KVCache`` the new tokens attend to the cached ones too, and
        their keys and values are appended to it. Without ``position_ids``,
        positions count the non-padding tokens of each row. ``last_only``
        computes the logits of the last position alone: [B, 1, V]. If
        ``hidden_states`` is a list, the output of the embedding and of every
        layer (before the final norm) is appended to it, each [B, T, C].
        """
        input_ids, key_mask, positions, past = prepare_step(
            input_ids, attention_mask, cache, position_ids, self.config.max_position_embeddings)
        B, T = input_ids.shape
        mask = causal_mask(key_mask, past, self.ops.dtype)  # [B, T, S]
        positions = positions.reshape(B * T)

        x = self.store.rows("model.embed_tokens.weight", input_ids.reshape(-1)).astype(self.ops.dtype)  # [B*T, C]
        if hidden_states is not None:
            hidden_states.append(x.reshape(B, T, -1))
        for i in range(self.config.num_hidden_layers):
            x = self.layer(x, mask, positions, cache, B, T, i)
            if hidden_states is not None:
                hidden_states.append(x.reshape(B, T, -1))

        x = self.rms_norm(x, "model.norm.weight")
        if last_only:
            x = x.reshape(B, T, -1)[:, -1]  # [B, C]
            T = 1
        logits = self.ops.linear(x, self.store, self.lm_head, bias=False)  # [B*T, V]
        return logits.reshape(B, T, -1)
