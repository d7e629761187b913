"""GPT-2 for causal language modelling, each layer's forward beside its backward.

The forward steps are the ones of ``refimpl.models.gpt2.GPT2Model`` (the same
operations in the same order, so the logits of non-padding positions are
bitwise the same), with the inputs that the backward pass needs saved in a
dict. Parameter names are the ones of transformers' ``GPT2LMHeadModel`` with
the ``transformer.`` prefix.
The output projection is tied to ``transformer.wte.weight``, which receives
the gradient of both uses. The projections are Conv1D weights stored
[in_features, out_features], whose gradients ``TrainOps.conv1d_backward``
computes. The loss and its normalisation are the ones of
``refimpl.train.llama_backward``.

Shapes: B (batch), T (sequence length), C (n_embd), H (n_head), D (C / H),
F (n_inner, 4C by default), V (vocab_size), N = B*T rows.

NOTE: dropout is not applied. Padding must be on the right.
"""

import numpy as np

from refimpl.models.gpt2 import ACTIVATIONS
from refimpl.train.backward_ops import TrainOps
from refimpl.train.llama_backward import accumulate_causal_lm_gradients, save_batch_layout
from refimpl.train.offload import TrainingState

PREFIX = "transformer."


def gpt2_parameter_shapes(config):
    """Name -> shape of every trainable parameter, in the order the forward pass uses them."""
    C, V = config.n_embd, config.vocab_size
    F = config.n_inner or 4 * C
    shapes = {PREFIX + "wte.weight": (V, C), PREFIX + "wpe.weight": (config.n_positions, C)}
    conv1d = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}
    for i in range(config.n_layer):
        layer = f"{PREFIX}h.{i}."
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            shape = conv1d.get(part, (C,))  # the LayerNorm weights are [C]
            shapes[f"{layer}{part}.weight"] = shape
            shapes[f"{layer}{part}.bias"] = (shape[-1],)
    shapes[PREFIX + "ln_f.weight"] = (C,)
    shapes[PREFIX + "ln_f.bias"] = (C,)
    return shapes


class GPT2CausalLM:
    """Forward and backward of GPT2LMHeadModel over a WeightStore-like ``store``."""

    def __init__(self, config, store, ops):
        self.config = config
        self.store = store
        self.ops = ops
        activation = ACTIVATIONS[config.activation_function]
        self.activation = getattr(ops, activation)
        self.activation_backward = getattr(ops, activation + "_backward")

    # ---- layer norm --------------------------------------------------------------------

    # [N, C] -> [N, C]
    def layer_norm_forward(self, x, prefix, saved):
        saved[prefix] = x
        weight = self.store.tensor(prefix + ".weight")
        bias = self.store.tensor(prefix + ".bias")
        return self.ops.layer_norm(x, weight, bias, self.config.layer_norm_epsilon)

    # dy: [N, C] -> dx: [N, C]
    def layer_norm_backward(self, dy, prefix, saved, grads):
        weight = self.store.tensor(prefix + ".weight")
        C = weight.shape[0]
        return self.ops.layer_norm_backward(dy, saved[prefix], weight, self.config.layer_norm_epsilon, saved["rows"],
                                            grads.block(prefix + ".weight", 0, C),
                                            grads.block(prefix + ".bias", 0, C))

    # ---- self-attention ----------------------------------------------------------------

    # [N, C] -> [N, C]: causal multi-head attention and its output projection
    def self_attention_forward(self, x, B, T, i, saved):
        C, H = self.config.n_embd, self.config.n_head
        D = C // H
        prefix = f"{PREFIX}h.{i}.attn."
        qkv = self.ops.conv1d(x, self.store, prefix + "c_attn")  # [N, 3C]
        q = qkv[:, :C].reshape(B, T, H, D)
        k = qkv[:, C:2 * C].reshape(B, T, H, D)
        v = qkv[:, 2 * C:].reshape(B, T, H, D)
        heads = self.ops.attention(q, k, v, saved["mask"], self.attention_scale()).reshape(B * T, C)
        saved[prefix] = (x, q, k, v, heads)
        return self.ops.conv1d(heads, self.store, prefix + "c_proj")

    # dy: [N, C] -> dx: [N, C]
    def self_attention_backward(self, dy, B, T, i, saved, grads):
        C, H = self.config.n_embd, self.config.n_head
        D = C // H
        prefix = f"{PREFIX}h.{i}.attn."
        rows = saved["rows"]
        x, q, k, v, heads = saved[prefix]
        dheads = self.ops.conv1d_backward(dy, heads, rows, self.store, grads, prefix + "c_proj")  # [N, C]
        dq, dk, dv = self.ops.attention_backward(q, k, v, saved["mask"], self.attention_scale(),
                                                 dheads.reshape(B, T, H, D), saved["valid"])
        dqkv = np.concatenate([dq.reshape(B * T, C), dk.reshape(B * T, C), dv.reshape(B * T, C)], axis=1)
        return self.ops.conv1d_backward(dqkv, x, rows, self.store, grads, prefix + "c_attn")

    def attention_scale(self):
        return (self.config.n_embd // self.config.n_head) ** -0.5 if self.config.scale_attn_weights else 1.0

    # ---- MLP ---------------------------------------------------------------------------

    # [N, C] -> [N, F] -> [N, C]
    def mlp_forward(self, x, i, saved):
        prefix = f"{PREFIX}h.{i}.mlp."
        pre = self.ops.conv1d(x, self.store, prefix + "c_fc")  # [N, F]
        h = self.activation(pre)
        saved[prefix] = (x, pre, h)
        return self.ops.conv1d(h, self.store, prefix + "c_proj")

    # dy: [N, C] -> dx: [N, C]
    def mlp_backward(self, dy, i, saved, grads):
        prefix = f"{PREFIX}h.{i}.mlp."
        rows = saved["rows"]
        x, pre, h = saved[prefix]
        dh = self.ops.conv1d_backward(dy, h, rows, self.store, grads, prefix + "c_proj")  # [N, F]
        dpre = self.activation_backward(pre, dh)
        return self.ops.conv1d_backward(dpre, x, rows, self.store, grads, prefix + "c_fc")

    # ---- decoder layer -----------------------------------------------------------------

    # [N, C] -> [N, C]: x + attention(ln_1(x)), then h + mlp(ln_2(h))
    def layer_forward(self, x, B, T, i, saved):
        prefix = f"{PREFIX}h.{i}."
        x = x + self.self_attention_forward(self.layer_norm_forward(x, prefix + "ln_1", saved), B, T, i, saved)
        x = x + self.mlp_forward(self.layer_norm_forward(x, prefix + "ln_2", saved), i, saved)
        self.store.release(prefix)
        return x

    # dy: [N, C] -> dx: [N, C]
    def layer_backward(self, dy, B, T, i, saved, grads):
        prefix = f"{PREFIX}h.{i}."
        dnormed = self.mlp_backward(dy, i, saved, grads)
        dx = dy + self.layer_norm_backward(dnormed, prefix + "ln_2", saved, grads)
        dnormed = self.self_attention_backward(dx, B, T, i, saved, grads)
        dx = dx + self.layer_norm_backward(dnormed, prefix + "ln_1", saved, grads)
        self.store.release(prefix)
        return dx

    # ---- whole model -------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, saved):
        """[B, T] ids and mask (1 = token, 0 = padding on the right) -> logits [B, T, V].

        ``saved``, a dict, receives what backward() needs.
        """
        B, T = save_batch_layout(input_ids, attention_mask, self.config.n_positions, self.ops.dtype, saved)
        # Word then position embeddings, the order of additions of transformers' GPT2Model.
        x = self.store.rows(PREFIX + "wte.weight", saved["ids"]).astype(self.ops.dtype)  # [N, C]
        x += self.store.rows(PREFIX + "wpe.weight", saved["positions"])
        for i in range(self.config.n_layer):
            x = self.layer_forward(x, B, T, i, saved)
        x = self.layer_norm_forward(x, PREFIX + "ln_f", saved)
        saved["lm_head"] = x
        logits = self.ops.linear(x, self.store, PREFIX + "wte", bias=False)  # [N, V]
        return logits.reshape(B, T, -1)

    def backward(self, dlogits, saved, grads, head_grads):
        """Add the gradients of every parameter for dlogits [B, T, V] into ``grads`` (a TensorSet).

        The tied output projection's gradient goes to ``head_grads`` (a
        GradientBuffer of ``transformer.wte.weight``); see
        ``LlamaCausalLM.backward`` for the reason.
        """
        B, T = saved["shape"]
        rows = saved["rows"]
        dx = self.ops.linear_backward(dlogits.reshape(B * T, -1), saved["lm_head"], rows, self.store,
                                      head_grads, PREFIX + "wte", bias=False)
        dx = self.layer_norm_backward(dx, PREFIX + "ln_f", saved, grads)
        for i in reversed(range(self.config.n_layer)):
            dx = self.layer_backward(dx, B, T, i, saved, grads)
        self.ops.embedding_backward(dx, saved["ids"], rows, grads.array(PREFIX + "wte.weight"))
        self.ops.embedding_backward(dx, saved["positions"], rows, grads.array(PREFIX + "wpe.weight"))

    def accumulate_gradients(self, micro_batches, grads):
        """Run forward and backward over the micro-batches of one optimizer step and return the mean loss."""
        return accumulate_causal_lm_gradients(self, PREFIX + "wte.weight", micro_batches, grads)


def build_gpt2_training(config, weights, dtype=np.float32, mode="reference", offload_dir=None,
                        budget_bytes=None, chunk_rows=256):
    """Return (TrainingState, GPT2CausalLM) with the parameters set to ``weights`` (name -> array).

    ``weights`` uses the names with the ``transformer.`` prefix, as GPT2LMHeadModel saves them.
    """
    shapes = gpt2_parameter_shapes(config)
    state = TrainingState({name: (shape, dtype) for name, shape in shapes.items()},
                          offload_dir=offload_dir, budget_bytes=budget_bytes, chunk_rows=chunk_rows)
    state.load_params(weights)
    return state, GPT2CausalLM(config, state.store, TrainOps(mode, dtype))
