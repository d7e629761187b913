"""BERT for token classification, each layer's forward beside its backward.

The forward steps are the ones of ``refimpl.models.bert.BertModel`` (the same
operations in the same order, so the hidden states are bitwise the same),
with the inputs that the backward pass needs saved in a dict. The head is
transformers' BertForTokenClassification: dropout on the last hidden state,
then ``classifier`` [num_labels, C]. Parameter names are the Hugging Face
ones, with or without the ``bert.`` prefix.

Shapes: B (batch), T (sequence length), C (hidden_size), H (heads), D (C / H),
F (intermediate_size), L (num_labels), N = B*T rows, R = the non-padding rows.

NOTE: dropout is applied to the classifier input only. The dropout of the
embeddings, attention probabilities and layer outputs that transformers also
applies in training is not implemented.
"""

import math

import numpy as np

from refimpl.errors import RefimplError
from refimpl.train.backward_ops import IGNORE_INDEX
from refimpl_kernels import backward as kernels

LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "attention.output.LayerNorm",
               "intermediate.dense", "output.dense", "output.LayerNorm")


def parameter_shapes(config, num_labels, prefix="bert."):
    """Name -> shape of every trainable parameter, in the order the forward pass uses them."""
    C, F = config.hidden_size, config.intermediate_size
    p = prefix + "embeddings."
    shapes = {p + "word_embeddings.weight": (config.vocab_size, C),
              p + "position_embeddings.weight": (config.max_position_embeddings, C),
              p + "token_type_embeddings.weight": (config.type_vocab_size, C),
              p + "LayerNorm.weight": (C,), p + "LayerNorm.bias": (C,)}
    matrices = {"attention.self.query": (C, C), "attention.self.key": (C, C),
                "attention.self.value": (C, C), "attention.output.dense": (C, C),
                "intermediate.dense": (F, C), "output.dense": (C, F)}
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{i}."
        for part in LAYER_PARTS:
            shape = matrices.get(part, (C,))  # the LayerNorm weights are [C]
            shapes[f"{layer}{part}.weight"] = shape
            shapes[f"{layer}{part}.bias"] = (shape[0],)
    shapes["classifier.weight"] = (num_labels, C)
    shapes["classifier.bias"] = (num_labels,)
    return shapes


class BertTokenClassifier:
    """Forward and backward of BertForTokenClassification over a WeightStore-like ``store``."""

    def __init__(self, config, num_labels, store, ops, dropout=0.0, seed=0):
        if not 0.0 <= dropout < 1.0:
            raise RefimplError(f"dropout {dropout} is invalid; use a probability in [0, 1)")
        self.config = config
        self.num_labels = num_labels
        self.store = store
        self.ops = ops
        self.dropout = dropout
        self.seed = seed
        self.prefix = "bert." if "bert.embeddings.word_embeddings.weight" in store.index else ""
        self.head_size = config.hidden_size // config.num_attention_heads

    # ---- embeddings ------------------------------------------------------------------

    # [B, T] ids -> [N, C]
    def embeddings_forward(self, input_ids, token_type_ids, saved):
        B, T = input_ids.shape
        p = self.prefix + "embeddings."
        ids = input_ids.reshape(-1)
        types = token_type_ids.reshape(-1)
        positions = np.tile(np.arange(T), B)
        # The same order of additions as BertModel.embeddings.
        x = self.store.rows(p + "word_embeddings.weight", ids).astype(self.ops.dtype)
        x += self.store.rows(p + "token_type_embeddings.weight", types)
        x += self.store.rows(p + "position_embeddings.weight", positions)
        if saved is not None:
            saved["embeddings"] = (ids, types, positions)
        return self.layer_norm_forward(x, p + "LayerNorm", saved)

    # dy: [N, C] -> gradients of the three tables
    def embeddings_backward(self, dy, saved, grads):
        p = self.prefix + "embeddings."
        rows = saved["rows"]
        dx = self.layer_norm_backward(dy, p + "LayerNorm", saved, grads)
        ids, types, positions = saved["embeddings"]
        for table, index in (("word_embeddings", ids), ("token_type_embeddings", types),
                             ("position_embeddings", positions)):
            self.ops.embedding_backward(dx, index, rows, grads.array(f"{p}{table}.weight"))

    # ---- layer norm ------------------------------------------------------------------

    # [N, C] -> [N, C]
    def layer_norm_forward(self, x, prefix, saved):
        if saved is not None:
            saved[prefix] = x
        weight = self.store.tensor(prefix + ".weight")
        bias = self.store.tensor(prefix + ".bias")
        return self.ops.layer_norm(x, weight, bias, self.config.layer_norm_eps)

    # dy: [N, C] -> dx: [N, C]
    def layer_norm_backward(self, dy, prefix, saved, grads):
        weight = self.store.tensor(prefix + ".weight")
        C = weight.shape[0]
        return self.ops.layer_norm_backward(dy, saved[prefix], weight, self.config.layer_norm_eps, saved["rows"],
                                            grads.block(prefix + ".weight", 0, C),
                                            grads.block(prefix + ".bias", 0, C))

    # ---- self-attention ----------------------------------------------------------------

    # [N, C] -> [N, C]: multi-head attention and its output projection
    def self_attention_forward(self, x, mask, B, T, prefix, saved):
        H, D = self.config.num_attention_heads, self.head_size
        q = self.ops.linear(x, self.store, prefix + "self.query").reshape(B, T, H, D)
        k = self.ops.linear(x, self.store, prefix + "self.key").reshape(B, T, H, D)
        v = self.ops.linear(x, self.store, prefix + "self.value").reshape(B, T, H, D)
        heads = self.ops.attention(q, k, v, mask, 1 / math.sqrt(D)).reshape(B * T, H * D)
        if saved is not None:
            saved[prefix + "self"] = (x, q, k, v, heads)
        return self.ops.linear(heads, self.store, prefix + "output.dense")

    # dy: [N, C] -> dx: [N, C]
    def self_attention_backward(self, dy, B, T, prefix, saved, grads):
        H, D = self.config.num_attention_heads, self.head_size
        rows = saved["rows"]
        x, q, k, v, heads = saved[prefix + "self"]
        dheads = self.ops.linear_backward(dy, heads, rows, self.store, grads, prefix + "output.dense")
        dq, dk, dv = self.ops.attention_backward(q, k, v, saved["mask"], 1 / math.sqrt(D),
                                                 dheads.reshape(B, T, H, D), saved["valid"])
        # dx accumulates the query, key and value products in that order.
        C = H * D
        dx = self.ops.linear_backward(dq.reshape(B * T, C), x, rows, self.store, grads, prefix + "self.query")
        self.ops.linear_backward(dk.reshape(B * T, C), x, rows, self.store, grads, prefix + "self.key", dx=dx)
        self.ops.linear_backward(dv.reshape(B * T, C), x, rows, self.store, grads, prefix + "self.value", dx=dx)
        return dx

    # ---- transformer layer -------------------------------------------------------------

    # [N, C] -> [N, C]: one post-LN layer, as BertModel.layer
    def layer_forward(self, x, mask, B, T, i, saved):
        prefix = f"{self.prefix}encoder.layer.{i}."
        attended = self.self_attention_forward(x, mask, B, T, prefix + "attention.", saved)
        x = self.layer_norm_forward(x + attended, prefix + "attention.output.LayerNorm", saved)
        pre = self.ops.linear(x, self.store, prefix + "intermediate.dense")  # [N, F]
        h = self.ops.gelu(pre)
        if saved is not None:
            saved[prefix + "mlp"] = (x, pre, h)
        out = self.ops.linear(h, self.store, prefix + "output.dense")  # [N, C]
        x = self.layer_norm_forward(x + out, prefix + "output.LayerNorm", saved)
        self.store.release(prefix)
        return x

    # dy: [N, C] -> dx: [N, C]
    def layer_backward(self, dy, B, T, i, saved, grads):
        prefix = f"{self.prefix}encoder.layer.{i}."
        rows = saved["rows"]
        d_sum = self.layer_norm_backward(dy, prefix + "output.LayerNorm", saved, grads)  # d(x + out)
        x, pre, h = saved[prefix + "mlp"]
        dh = self.ops.linear_backward(d_sum, h, rows, self.store, grads, prefix + "output.dense")
        dpre = self.ops.gelu_backward(pre, dh)
        dx = self.ops.linear_backward(dpre, x, rows, self.store, grads, prefix + "intermediate.dense")
        dx += d_sum
        d_sum = self.layer_norm_backward(dx, prefix + "attention.output.LayerNorm", saved, grads)
        dx = self.self_attention_backward(d_sum, B, T, prefix + "attention.", saved, grads)
        dx += d_sum
        self.store.release(prefix)
        return dx

    # ---- head ------------------------------------------------------------------------

    def dropout_keep(self, example_ids, epoch, T):
        """Return the 0/1 keep mask [B, T, C] of the classifier dropout for these examples in this epoch."""
        keep = np.empty((len(example_ids), T, self.config.hidden_size), dtype=self.ops.dtype)
        keep_below = np.uint64(int((1.0 - self.dropout) * 2.0 ** 53))
        kernels.dropout_keep(np.uint64(self.seed), np.uint64(epoch),
                             np.ascontiguousarray(example_ids, dtype=np.int64), T,
                             self.config.hidden_size, keep_below, keep)
        return keep

    # [N, C] -> [N, L]
    def classifier_forward(self, hidden, B, T, saved, example_ids, epoch):
        if example_ids is not None and self.dropout > 0:
            scale = self.ops.dtype.type(1 / (1 - self.dropout))
            keep = self.dropout_keep(example_ids, epoch, T).reshape(B * T, -1) * scale
            hidden = hidden * keep
            if saved is not None:
                saved["dropout"] = keep
        if saved is not None:
            saved["classifier"] = hidden
        return self.ops.linear(hidden, self.store, "classifier")

    # dlogits: [N, L] -> dhidden: [N, C]
    def classifier_backward(self, dlogits, saved, grads):
        dx = self.ops.linear_backward(dlogits, saved["classifier"], saved["rows"], self.store, grads, "classifier")
        if "dropout" in saved:
            dx *= saved["dropout"]
        return dx

    # ---- whole model -------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, token_type_ids=None, saved=None, example_ids=None, epoch=0):
        """[B, T] ids and mask (1 = token, 0 = padding) -> logits [B, T, L].

        ``saved``, a dict, receives what backward() needs. ``example_ids`` [B]
        turns dropout on, with masks drawn from (seed, epoch, example id).
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
        if saved is not None:
            saved["mask"] = np.ascontiguousarray(mask)
            saved["valid"] = attention_mask.astype(np.int64)
            saved["rows"] = np.flatnonzero(attention_mask.reshape(-1)).astype(np.int64)
            saved["shape"] = (B, T)

        x = self.embeddings_forward(input_ids, token_type_ids, saved)
        for i in range(self.config.num_hidden_layers):
            x = self.layer_forward(x, mask, B, T, i, saved)
        return self.classifier_forward(x, B, T, saved, example_ids, epoch).reshape(B, T, -1)

    def backward(self, dlogits, saved, grads):
        """Add the gradients of every parameter for dlogits [B, T, L] into ``grads`` (a TensorSet)."""
        B, T = saved["shape"]
        dx = self.classifier_backward(dlogits.reshape(B * T, -1), saved, grads)
        for i in reversed(range(self.config.num_hidden_layers)):
            dx = self.layer_backward(dx, B, T, i, saved, grads)
        self.embeddings_backward(dx, saved, grads)

    def accumulate_gradients(self, micro_batches, grads, epoch=0, train=True):
        """Run forward and backward over the micro-batches of one optimizer step; return the mean loss.

        Each micro-batch is a dict of input_ids, attention_mask, labels [B, T]
        and example_ids [B]. The loss is the sum of the token losses divided
        by the number of labelled tokens (label != -100) of the whole step,
        so splitting a step into micro-batches changes neither the loss nor
        the gradients. The micro-batches must hold the step's examples in
        order: gradients are accumulated row by row in that order.
        """
        labelled = sum(int(np.count_nonzero(np.asarray(b["labels"]) != IGNORE_INDEX)) for b in micro_batches)
        if labelled == 0:
            raise RefimplError("the optimizer step has no labelled token")
        scale = 1.0 / labelled
        token_losses = []
        for batch in micro_batches:
            saved = {}
            logits = self.forward(batch["input_ids"], batch["attention_mask"], saved=saved,
                                  example_ids=batch["example_ids"] if train else None, epoch=epoch)
            B, T, L = logits.shape
            labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
            losses, dlogits = self.ops.cross_entropy(logits.reshape(B * T, L), labels, scale)
            token_losses.extend(losses[labels != IGNORE_INDEX].tolist())
            self.backward(dlogits, saved, grads)
        # fsum is correctly rounded, so the order of the token losses does not matter.
        return math.fsum(token_losses) / labelled
