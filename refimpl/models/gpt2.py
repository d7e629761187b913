"""GPT-2 decoder (Radford et al., 2019): learned positions, pre-LN layers, tanh GELU.

Weights are read through a ``WeightStore`` by the names of transformers'
``GPT2LMHeadModel`` (``transformer.wte.weight``, ``transformer.h.{i}.attn.c_attn.weight``,
...), with or without the ``transformer.`` prefix. The projections are Conv1D
weights stored [in_features, out_features], which ``Ops.conv1d`` multiplies
with a fixed reduction order. The output projection is tied to ``wte``. Shapes
use B (batch), T (new tokens), S (cached plus new tokens), C (n_embd), H
(n_head), D (head size, C / H) and V (vocab_size).
"""

from dataclasses import dataclass, fields

from refimpl.errors import RefimplError
from refimpl.models.llama import causal_mask, prepare_step, read_config_json, token_id_set

# transformers' names of the activations GPT-2 configs use, and the Ops method of each.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list | None = 50256

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.activation_function not in ACTIVATIONS:
            raise RefimplError(f"activation_function {config.activation_function!r} is not supported; "
                               f"use one of {', '.join(ACTIVATIONS)}")
        if config.scale_attn_by_inverse_layer_idx:
            raise RefimplError("scale_attn_by_inverse_layer_idx is not supported; set it to false or use another model")
        if config.n_embd % config.n_head:
            raise RefimplError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        return config

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(read_config_json(path))

    @property
    def max_position_embeddings(self):
        return self.n_positions

    @property
    def num_hidden_layers(self):
        return self.n_layer

    @property
    def eos_token_ids(self):
        return token_id_set(self.eos_token_id)


class GPT2Model:
    """GPT2LMHeadModel: token ids in, next-token logits out."""

    def __init__(self, config, store, ops):
        self.config = config
        self.store = store
        self.ops = ops
        self.prefix = "transformer." if "transformer.wte.weight" in store.index else ""
        self.activation = getattr(ops, ACTIVATIONS[config.activation_function])
        store.set_execution_order(self.weight_order())

    def weight_order(self):
        """Weight names in the order forward() uses them."""
        p = self.prefix
        names = [f"{p}wte.weight", f"{p}wpe.weight"]
        for i in range(self.config.n_layer):
            for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                names += [f"{p}h.{i}.{part}.weight", f"{p}h.{i}.{part}.bias"]
        names += [f"{p}ln_f.weight", f"{p}ln_f.bias", f"{p}wte.weight"]
        return names

    # ---- pieces ------------------------------------------------------------------

    def layer_norm(self, x, prefix):
        weight = self.store.tensor(prefix + ".weight")
        bias = self.store.tensor(prefix + ".bias")
        return self.ops.layer_norm(x, weight, bias, self.config.layer_norm_epsilon)

    def self_attention(self, x, mask, cache, B, T, i):
        """[B*T, C] -> [B*T, C]: causal multi-head attention over the cache and the new tokens."""
        C, H = self.config.n_embd, self.config.n_head
        D = C // H
        prefix = f"{self.prefix}h.{i}.attn."
        qkv = self.ops.conv1d(x, self.store, prefix + "c_attn")  # [B*T, 3C]
        q = qkv[:, :C].reshape(B, T, H, D)
        k = qkv[:, C:2 * C].reshape(B, T, H, D)
        v = qkv[:, 2 * C:].reshape(B, T, H, D)
        if cache is not None:
            k, v = cache.update(i, k, v)  # [B, S, H, D]
        scale = D ** -0.5 if self.config.scale_attn_weights else 1.0
        heads = self.ops.attention(q, k, v, mask, scale)  # [B, T, H, D]
        return self.ops.conv1d(heads.reshape(B * T, C), self.store, prefix + "c_proj")

    def mlp(self, x, i):
        """[B*T, C] -> [B*T, 4C] -> [B*T, C] with the tanh GELU."""
        prefix = f"{self.prefix}h.{i}.mlp."
        h = self.activation(self.ops.conv1d(x, self.store, prefix + "c_fc"))  # [B*T, 4C]
        return self.ops.conv1d(h, self.store, prefix + "c_proj")

    def layer(self, x, mask, cache, B, T, i):
        """Apply one pre-LN layer: [B*T, C] -> [B*T, C]."""
        prefix = f"{self.prefix}h.{i}."
        x = x + self.self_attention(self.layer_norm(x, prefix + "ln_1"), mask, cache, B, T, i)
        x = x + self.mlp(self.layer_norm(x, prefix + "ln_2"), i)
        self.store.release(prefix)
        return x

    # ---- whole model ------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None,
                hidden_states=None, last_only=False):
        """[B, T] ids and mask (1 = token, 0 = padding) -> logits [B, T, V].

        The arguments mean what they mean for ``LlamaModel.forward``.
        """
        input_ids, key_mask, positions, past = prepare_step(
            input_ids, attention_mask, cache, position_ids, self.config.n_positions)
        B, T = input_ids.shape
        mask = causal_mask(key_mask, past, self.ops.dtype)  # [B, T, S]

        # Word then position embeddings, the order of additions of transformers' GPT2Model.
        x = self.store.rows(self.prefix + "wte.weight", input_ids.reshape(-1)).astype(self.ops.dtype)  # [B*T, C]
        x += self.store.rows(self.prefix + "wpe.weight", positions.reshape(-1))
        if hidden_states is not None:
            hidden_states.append(x.reshape(B, T, -1))
        for i in range(self.config.n_layer):
            x = self.layer(x, mask, cache, B, T, i)
            if hidden_states is not None:
                hidden_states.append(x.reshape(B, T, -1))

        x = self.layer_norm(x, self.prefix + "ln_f")
        if last_only:
            x = x.reshape(B, T, -1)[:, -1]  # [B, C]
            T = 1
        # The tied output projection: wte is [V, C], stored as a Linear weight is.
        logits = self.ops.linear(x, self.store, self.prefix + "wte", bias=False)  # [B*T, V]
        return logits.reshape(B, T, -1)
