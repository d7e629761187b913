"""Llama for causal language modelling, each layer's forward beside its backward.

The forward steps are the ones of ``refimpl.models.llama.LlamaModel`` (the
same operations in the same order, so the logits of non-padding positions
are bitwise the same), with the inputs that the backward pass needs saved in a dict. Parameter names are
the ones of transformers' ``LlamaForCausalLM``. With tied embeddings the
output projection is ``model.embed_tokens.weight``, which then receives the
gradient of both uses.

The loss is the pretraining objective: position t predicts token t + 1, and
the mean cross-entropy runs over the targets whose label is not -100, summed
over all micro-batches of an optimizer step and divided by their count.

Shapes: B (batch), T (sequence length), C (hidden_size), H (attention heads),
Hkv (key and value heads), D (head_dim), F (intermediate_size), V
(vocab_size), N = B*T rows. ``saved["rows"]`` lists the non-padding rows.

NOTE: there is no KV cache here, so a batch is one full sequence per row, and
padding must be on the right (positions count from 0 at the first column).
"""

import math

import numpy as np

from refimpl.errors import RefimplError
from refimpl.models.llama import causal_mask
from refimpl.train.backward_ops import IGNORE_INDEX, TrainOps
from refimpl.train.offload import TrainingState
from refimpl_kernels.rope import inverse_frequencies


def llama_parameter_shapes(config):
    """Name -> shape of every trainable parameter, in the order the forward pass uses them."""
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, Hkv, D = config.num_attention_heads, config.kv_heads, config.head_size
    shapes = {"model.embed_tokens.weight": (V, C)}
    projections = {"self_attn.q_proj": (H * D, C), "self_attn.k_proj": (Hkv * D, C),
                   "self_attn.v_proj": (Hkv * D, C), "self_attn.o_proj": (C, H * D),
                   "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (C,)
        shapes[layer + "post_attention_layernorm.weight"] = (C,)
        for part, shape in projections.items():
            shapes[f"{layer}{part}.weight"] = shape
            bias = config.attention_bias if part.startswith("self_attn") else config.mlp_bias
            if bias:
                shapes[f"{layer}{part}.bias"] = (shape[0],)
    shapes["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def causal_lm_labels(labels, attention_mask):
    """Shift labels [B, T] left by one, so the target of position t is labels[t + 1] and the last target is -100.

    Padding positions get -100 as well, whatever the label after them, so
    that padding rows carry no gradient.
    """
    labels = np.asarray(labels, dtype=np.int64)
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    shifted[np.asarray(attention_mask) == 0] = IGNORE_INDEX
    return shifted


def save_batch_layout(input_ids, attention_mask, max_positions, dtype, saved):
    """Check a right-padded batch, save its ids, causal mask, positions and non-padding rows, and return (B, T)."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise RefimplError(f"input ids of shape {input_ids.shape} and attention mask of shape "
                           f"{attention_mask.shape} are invalid; pass two arrays of [batch, tokens]")
    B, T = input_ids.shape
    if T > max_positions:
        raise RefimplError(f"sequence length {T} exceeds max_position_embeddings {max_positions}; "
                           "cut the sequences shorter")
    key_mask = attention_mask.astype(bool)
    if np.any(key_mask[:, 1:] & ~key_mask[:, :-1]):
        raise RefimplError("attention mask is invalid for training: padding precedes a token. "
                           "Pad the sequences on the right")
    saved["mask"] = causal_mask(key_mask, 0, dtype)  # [B, T, T]
    saved["valid"] = attention_mask.astype(np.int64)
    saved["rows"] = np.flatnonzero(key_mask.reshape(-1)).astype(np.int64)
    saved["positions"] = np.tile(np.arange(T, dtype=np.int64), B)  # [N]
    saved["ids"] = input_ids.reshape(-1)
    saved["shape"] = (B, T)
    return B, T


class GradientBuffer:
    """Named gradient arrays with the ``block`` interface of a ``TensorSet``."""

    def __init__(self, arrays):
        self.arrays = arrays

    def block(self, name, start, stop):
        return self.arrays[name][start:stop]


class LlamaCausalLM:
    """Forward and backward of LlamaForCausalLM over a WeightStore-like ``store``."""

    def __init__(self, config, store, ops):
        self.config = config
        self.store = store
        self.ops = ops
        tied = config.tie_word_embeddings or "lm_head.weight" not in store.index
        self.lm_head = "model.embed_tokens" if tied else "lm_head"
        self.inv_freq = inverse_frequencies(config.head_size, config.rope_theta)  # [D/2]

    # ---- RMSNorm -----------------------------------------------------------------------

    # [N, C] -> [N, C]
    def rms_norm_forward(self, x, name, saved):
        if saved is not None:
            saved[name] = x
        return self.ops.rms_norm(x, self.store.tensor(name), self.config.rms_norm_eps)

    # dy: [N, C] -> dx: [N, C]
    def rms_norm_backward(self, dy, name, saved, grads):
        weight = self.store.tensor(name)
        return self.ops.rms_norm_backward(dy, saved[name], weight, self.config.rms_norm_eps, saved["rows"],
                                          grads.block(name, 0, weight.shape[0]))

    # ---- self-attention ----------------------------------------------------------------

    # [N, C] -> [N, C]: rotary grouped-query attention and its output projection
    def self_attention_forward(self, x, B, T, i, saved):
        c, ops, store = self.config, self.ops, self.store
        H, Hkv, D = c.num_attention_heads, c.kv_heads, c.head_size
        prefix = f"model.layers.{i}.self_attn."
        bias = c.attention_bias
        positions = saved["positions"]
        q = ops.linear(x, store, prefix + "q_proj", bias).reshape(B * T, H, D)
        k = ops.linear(x, store, prefix + "k_proj", bias).reshape(B * T, Hkv, D)
        v = ops.linear(x, store, prefix + "v_proj", bias).reshape(B, T, Hkv, D)
        q = ops.rope(q, positions, self.inv_freq).reshape(B, T, H, D)
        k = ops.rope(k, positions, self.inv_freq).reshape(B, T, Hkv, D)
        heads = ops.attention(q, k, v, saved["mask"], D ** -0.5)  # [B, T, H, D]
        heads = heads.reshape(B * T, H * D)
        saved[prefix] = (x, q, k, v, heads)
        return ops.linear(heads, store, prefix + "o_proj", bias)

    # dy: [N, C] -> dx: [N, C]
    def self_attention_backward(self, dy, B, T, i, saved, grads):
        c, ops, store = self.config, self.ops, self.store
        H, Hkv, D = c.num_attention_heads, c.kv_heads, c.head_size
        prefix = f"model.layers.{i}.self_attn."
        bias = c.attention_bias
        rows, positions = saved["rows"], saved["positions"]
        x, q, k, v, heads = saved[prefix]
        dheads = ops.linear_backward(dy, heads, rows, store, grads, prefix + "o_proj", bias)  # [N, H*D]
        dq, dk, dv = ops.grouped_attention_backward(q, k, v, saved["mask"], D ** -0.5,
                                                    dheads.reshape(B, T, H, D), saved["valid"])
        dq = ops.rope_backward(dq.reshape(B * T, H, D), positions, self.inv_freq)
        dk = ops.rope_backward(dk.reshape(B * T, Hkv, D), positions, self.inv_freq)
        # dx accumulates the query, key and value products in that order.
        dx = ops.linear_backward(dq.reshape(B * T, H * D), x, rows, store, grads, prefix + "q_proj", bias)
        ops.linear_backward(dk.reshape(B * T, Hkv * D), x, rows, store, grads, prefix + "k_proj", bias, dx=dx)
        ops.linear_backward(dv.reshape(B * T, Hkv * D), x, rows, store, grads, prefix + "v_proj", bias, dx=dx)
        return dx

    # ---- SwiGLU MLP --------------------------------------------------------------------

    # [N, C] -> [N, F] -> [N, C]: down(silu(gate(x)) * up(x))
    def mlp_forward(self, x, i, saved):
        ops, store, bias = self.ops, self.store, self.config.mlp_bias
        prefix = f"model.layers.{i}.mlp."
        gate_pre = ops.linear(x, store, prefix + "gate_proj", bias)  # [N, F]
        gate = ops.silu(gate_pre)
        up = ops.linear(x, store, prefix + "up_proj", bias)  # [N, F]
        product = gate * up
        saved[prefix] = (x, gate_pre, gate, up, product)
        return ops.linear(product, store, prefix + "down_proj", bias)

    # dy: [N, C] -> dx: [N, C]
    def mlp_backward(self, dy, i, saved, grads):
        ops, store, bias = self.ops, self.store, self.config.mlp_bias
        prefix = f"model.layers.{i}.mlp."
        rows = saved["rows"]
        x, gate_pre, gate, up, product = saved[prefix]
        dproduct = ops.linear_backward(dy, product, rows, store, grads, prefix + "down_proj", bias)  # [N, F]
        dgate_pre = ops.silu_backward(gate_pre, dproduct * up)
        dup = dproduct * gate
        dx = ops.linear_backward(dgate_pre, x, rows, store, grads, prefix + "gate_proj", bias)
        ops.linear_backward(dup, x, rows, store, grads, prefix + "up_proj", bias, dx=dx)
        return dx

    # ---- decoder layer -----------------------------------------------------------------

    # [N, C] -> [N, C]: x + attention(norm(x)), then h + mlp(norm(h))
    def layer_forward(self, x, B, T, i, saved):
        prefix = f"model.layers.{i}."
        normed = self.rms_norm_forward(x, prefix + "input_layernorm.weight", saved)
        x = x + self.self_attention_forward(normed, B, T, i, saved)
        normed = self.rms_norm_forward(x, prefix + "post_attention_layernorm.weight", saved)
        x = x + self.mlp_forward(normed, i, saved)
        self.store.release(prefix)
        return x

    # dy: [N, C] -> dx: [N, C]
    def layer_backward(self, dy, B, T, i, saved, grads):
        prefix = f"model.layers.{i}."
        dnormed = self.mlp_backward(dy, i, saved, grads)
        dx = dy + self.rms_norm_backward(dnormed, prefix + "post_attention_layernorm.weight", saved, grads)
        dnormed = self.self_attention_backward(dx, B, T, i, saved, grads)
        dx = dx + self.rms_norm_backward(dnormed, prefix + "input_layernorm.weight", saved, grads)
        self.store.release(prefix)
        return dx

    # ---- whole model -------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, saved):
        """[B, T] ids and mask (1 = token, 0 = padding on the right) -> logits [B, T, V].

        ``saved``, a dict, receives what backward() needs.
        """
        B, T = save_batch_layout(input_ids, attention_mask, self.config.max_position_embeddings,
                                 self.ops.dtype, saved)
        x = self.store.rows("model.embed_tokens.weight", saved["ids"]).astype(self.ops.dtype)  # [N, C]
        for i in range(self.config.num_hidden_layers):
            x = self.layer_forward(x, B, T, i, saved)
        x = self.rms_norm_forward(x, "model.norm.weight", saved)
        saved["lm_head"] = x
        logits = self.ops.linear(x, self.store, self.lm_head, bias=False)  # [N, V]
        return logits.reshape(B, T, -1)

    def backward(self, dlogits, saved, grads, head_grads):
        """Add the gradients of every parameter for dlogits [B, T, V] into ``grads`` (a TensorSet).

        The output projection's gradient goes to ``head_grads`` (a
        GradientBuffer of ``self.lm_head + ".weight"``), so that with tied
        embeddings the two uses of the table are summed separately and
        splitting a step into micro-batches keeps the order of every sum.
        """
        B, T = saved["shape"]
        rows = saved["rows"]
        dx = self.ops.linear_backward(dlogits.reshape(B * T, -1), saved["lm_head"], rows, self.store,
                                      head_grads, self.lm_head, bias=False)
        dx = self.rms_norm_backward(dx, "model.norm.weight", saved, grads)
        for i in reversed(range(self.config.num_hidden_layers)):
            dx = self.layer_backward(dx, B, T, i, saved, grads)
        self.ops.embedding_backward(dx, saved["ids"], rows, grads.array("model.embed_tokens.weight"))

    def accumulate_gradients(self, micro_batches, grads):
        """Run forward and backward over the micro-batches of one optimizer step and return the mean loss."""
        return accumulate_causal_lm_gradients(self, self.lm_head + ".weight", micro_batches, grads)


def accumulate_causal_lm_gradients(model, head_name, micro_batches, grads):
    """Run ``model`` forward and backward over the micro-batches of one optimizer step and return the mean loss.

    Each micro-batch is a dict of input_ids, attention_mask and labels
    [B, T], with -100 at padding and at tokens that are no target. The loss
    is the sum of the token losses divided by the number of labelled targets
    of the whole step, so splitting a step into micro-batches changes neither
    the loss nor the gradients, provided the micro-batches hold the step's
    sequences in order. ``head_name`` is the output projection's weight,
    whose gradient is summed apart and added after the last micro-batch.
    """
    targets = [causal_lm_labels(batch["labels"], batch["attention_mask"]).reshape(-1) for batch in micro_batches]
    labelled = sum(int(np.count_nonzero(t != IGNORE_INDEX)) for t in targets)
    if labelled == 0:
        raise RefimplError("the optimizer step has no labelled target token, because every label after the "
                           "first position of each sequence is -100 or padding; pass labels with token ids")
    scale = 1.0 / labelled
    # NOTE: this buffer is a plain array in memory, outside an offload budget.
    head_grads = GradientBuffer({head_name: np.zeros(model.store.shape(head_name), dtype=model.ops.dtype)})
    token_losses = []
    for batch, target in zip(micro_batches, targets):
        saved = {}
        logits = model.forward(batch["input_ids"], batch["attention_mask"], saved)
        B, T, V = logits.shape
        losses, dlogits = model.ops.cross_entropy(logits.reshape(B * T, V), target, scale)
        token_losses.extend(losses[target != IGNORE_INDEX].tolist())
        model.backward(dlogits, saved, grads, head_grads)
    for start, stop, view in grads.blocks(head_name):
        view += head_grads.arrays[head_name][start:stop]
    # fsum is correctly rounded, so the order of the token losses does not matter.
    return math.fsum(token_losses) / labelled


def build_llama_training(config, weights, dtype=np.float32, mode="reference", offload_dir=None,
                         budget_bytes=None, chunk_rows=256):
    """Return (TrainingState, LlamaCausalLM) with the parameters set to ``weights`` (name -> array)."""
    shapes = llama_parameter_shapes(config)
    state = TrainingState({name: (shape, dtype) for name, shape in shapes.items()},
                          offload_dir=offload_dir, budget_bytes=budget_bytes, chunk_rows=chunk_rows)
    state.load_params(weights)
    return state, LlamaCausalLM(config, state.store, TrainOps(mode, dtype))
