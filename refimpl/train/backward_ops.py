"""Backward operations beside the forward ones of ``refimpl.ops.Ops``, in the same two modes.

``reference`` runs the kernels of ``refimpl_kernels.backward``, whose sums over
rows follow the rows in increasing global order (see that module), so
gradients are bitwise identical under every chunking and micro-batch split.
``fast`` replaces the two costly products, the linear layers and attention,
with numpy's BLAS; the row-wise steps use the reference kernels in both modes.

``rows`` is always the int64 array of non-padding row indices of the
flattened batch [B*T]: padding rows carry no gradient and are skipped.
"""

import numpy as np

from refimpl.ops import Ops
from refimpl_kernels import threads_for
from refimpl_kernels import backward as kernels
from refimpl_kernels import decoder_backward as decoder_kernels
from refimpl_kernels.matmul import linear_reference

IGNORE_INDEX = -100


class TrainOps(Ops):
    """``Ops`` with the backward of each forward operation."""

    # dy: [N, out_features], x: [N, in_features] -> dx: [N, in_features] (added into ``dx`` if given)
    def linear_backward(self, dy, x, rows, store, grads, prefix, bias=True, dx=None):
        """Accumulate the weight and bias gradients of ``prefix`` into ``grads``; return dx.

        The weight is read chunk by chunk from ``store``; the gradient of each
        chunk is the matching row block of the gradient tensor.
        """
        dy = self.cast(dy)
        x = self.cast(x)
        if dx is None:
            dx = np.zeros_like(x)
        name = prefix + ".weight"
        for start, stop, w in store.chunks(name):
            dw = grads.block(name, start, stop)
            if self.mode == "reference":
                kernels.linear_backward_input(dy, w, dx, start)
                kernels.linear_backward_weight(dy, x, rows, dw, start)
            else:
                dx += dy[:, start:stop] @ w
                dw += dy[rows, start:stop].T @ x[rows]
        if bias:
            name = prefix + ".bias"
            db = grads.block(name, 0, store.shape(name)[0])
            if self.mode == "reference":
                kernels.sum_rows_into(dy, rows, db, 0)
            else:
                db += dy[rows].sum(axis=0)
        return dx

    # dy, x: [N, C] -> dx: [N, C]; weight and bias gradients added into dweight, dbias: [C]
    def layer_norm_backward(self, dy, x, weight, eps, rows, dweight, dbias):
        dy = self.cast(dy)
        x = self.cast(x)
        N = x.shape[0]
        mean = np.empty(N, dtype=self.dtype)
        inv_std = np.empty(N, dtype=self.dtype)
        kernels.layer_norm_statistics(x, self.dtype.type(eps), mean, inv_std)
        dx = np.empty_like(x)
        kernels.layer_norm_backward_input(dy, x, self.cast(weight), mean, inv_std, dx)
        kernels.layer_norm_backward_params(dy, x, mean, inv_std, rows, dweight, dbias)
        return dx

    # x, dy: any shape -> dx: same shape
    def gelu_backward(self, x, dy):
        return kernels.gelu_erf_backward(self.cast(x), self.cast(dy))

    # q, k, v, dout: [B, T, H, D], mask: [B, T, T], query_valid: [B, T] -> dq, dk, dv: [B, T, H, D]
    def attention_backward(self, q, k, v, mask, scale, dout, query_valid):
        q, k, v, mask, dout = (self.cast(a) for a in (q, k, v, mask, dout))
        scale = self.dtype.type(scale)
        if self.mode == "reference":
            dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
            kernels.attention_backward(q, k, v, mask, scale, dout,
                                       np.ascontiguousarray(query_valid, dtype=np.int64), dq, dk, dv)
            return dq, dk, dv
        return attention_backward_numpy(q, k, v, mask, scale, dout, query_valid)

    # dx: [N, C], ids: [N] -> rows of table_grad: [V, C] += dx
    def embedding_backward(self, dx, ids, rows, table_grad):
        kernels.embedding_backward(self.cast(dx), np.ascontiguousarray(ids, dtype=np.int64), rows, table_grad)

    # logits: [N, L], labels: [N] -> per-row losses [N] and dlogits [N, L] = d(sum of losses * scale)
    def cross_entropy(self, logits, labels, scale):
        logits = self.cast(logits)
        losses = np.empty(logits.shape[0], dtype=self.dtype)
        dlogits = np.empty_like(logits)
        kernels.cross_entropy(logits, np.ascontiguousarray(labels, dtype=np.int64), IGNORE_INDEX,
                              self.dtype.type(scale), losses, dlogits)
        return losses, dlogits

    # ---- decoder layers (Llama, GPT-2) ----------------------------------------------

    # dy, x: [N, C] -> dx: [N, C]; the weight gradient is added into dweight: [C]
    def rms_norm_backward(self, dy, x, weight, eps, rows, dweight):
        dy = self.cast(dy)
        x = self.cast(x)
        inv_rms = np.empty(x.shape[0], dtype=self.dtype)
        decoder_kernels.rms_norm_inverse(x, self.dtype.type(eps), inv_rms)
        dx = np.empty_like(x)
        decoder_kernels.rms_norm_backward_input(dy, x, self.cast(weight), inv_rms, dx)
        decoder_kernels.rms_norm_backward_weight(dy, x, inv_rms, rows, dweight)
        return dx

    # dy: [N, H, D], positions: [N] -> dx: [N, H, D]
    def rope_backward(self, dy, positions, inv_freq):
        dy = self.cast(dy)
        dx = np.empty_like(dy)
        decoder_kernels.rope_backward(dy, np.ascontiguousarray(positions, dtype=np.int64), self.cast(inv_freq), dx)
        return dx

    # dy: [N, out_features], x: [N, in_features] -> dx: [N, in_features]; weight stored [in, out] (Conv1D)
    def conv1d_backward(self, dy, x, rows, store, grads, prefix, bias=True):
        """Accumulate the weight and bias gradients of the Conv1D layer ``prefix`` into ``grads`` and return dx.

        The store's chunks are rows k0:k1 of the [in, out] weight, so each
        chunk gives the whole columns dx[:, k0:k1] = dy @ w[k0:k1].T, and its
        gradient is x[rows, k0:k1].T @ dy[rows], summed over rows in the given order.
        """
        dy = self.cast(dy)
        x = self.cast(x)
        dx = np.empty_like(x)
        name = prefix + ".weight"
        for start, stop, w in store.chunks(name):
            dw = grads.block(name, start, stop)
            if self.mode == "reference":
                with threads_for(dy.shape[0] * w.size):
                    linear_reference(dy, np.ascontiguousarray(w), dx, start)
                # dw[k, n] += x[m, start + k] * dy[m, n]: the linear weight kernel with x and dy swapped.
                kernels.linear_backward_weight(x, dy, rows, dw, start)
            else:
                dx[:, start:stop] = dy @ w.T
                dw += x[rows, start:stop].T @ dy[rows]
        if bias:
            name = prefix + ".bias"
            db = grads.block(name, 0, store.shape(name)[0])
            if self.mode == "reference":
                kernels.sum_rows_into(dy, rows, db, 0)
            else:
                db += dy[rows].sum(axis=0)
        return dx

    # x, dy: any shape -> dx: same shape
    def silu_backward(self, x, dy):
        return decoder_kernels.silu_backward(self.cast(x), self.cast(dy))

    def gelu_tanh_backward(self, x, dy):
        return decoder_kernels.gelu_tanh_backward(self.cast(x), self.cast(dy))

    # q, dout: [B, T, H, D], k, v: [B, T, Hkv, D] -> dq: [B, T, H, D], dk, dv: [B, T, Hkv, D]
    def grouped_attention_backward(self, q, k, v, mask, scale, dout, query_valid):
        """Return the gradients of grouped-query attention, where query head h reads key/value head h // (H / Hkv).

        The key and value heads are repeated to H heads, as transformers'
        repeat_kv does, and the gradients of the copies of one head are summed
        in increasing query-head order.
        """
        group = q.shape[2] // k.shape[2]
        if group == 1:
            return self.attention_backward(q, k, v, mask, scale, dout, query_valid)
        dq, dk_full, dv_full = self.attention_backward(q, np.repeat(k, group, axis=2), np.repeat(v, group, axis=2),
                                                       mask, scale, dout, query_valid)
        B, T, H, D = dk_full.shape
        dk_full = dk_full.reshape(B, T, H // group, group, D)
        dv_full = dv_full.reshape(B, T, H // group, group, D)
        dk = dk_full[:, :, :, 0].copy()
        dv = dv_full[:, :, :, 0].copy()
        for copy in range(1, group):
            dk += dk_full[:, :, :, copy]
            dv += dv_full[:, :, :, copy]
        return dq, dk, dv


def attention_backward_numpy(q, k, v, mask, scale, dout, query_valid):
    """Return the gradients of ``refimpl.ops.attention_numpy`` computed with numpy batched products."""
    # [B, T, H, D] -> [B, H, T, D]
    qh, kh, vh, dh = (a.transpose(0, 2, 1, 3) for a in (q, k, v, dout))
    valid = np.asarray(query_valid, dtype=bool)[:, None, :, None]  # [B, 1, T, 1]
    dh = np.where(valid, dh, 0)
    scores = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale + mask[:, None]  # [B, H, T, T]
    row_max = scores.max(axis=-1, keepdims=True)
    all_masked = np.isneginf(row_max)
    weights = np.exp(scores - np.where(all_masked, 0, row_max))
    total = weights.sum(axis=-1, keepdims=True)
    p = np.divide(weights, total, out=np.zeros_like(weights), where=~all_masked)
    dv = np.matmul(p.transpose(0, 1, 3, 2), dh)  # [B, H, T, D]
    dp = np.matmul(dh, vh.transpose(0, 1, 3, 2))  # [B, H, T, T]
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = np.matmul(ds, kh) * scale
    dk = np.matmul(ds.transpose(0, 1, 3, 2), qh) * scale
    back = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3), dtype=q.dtype))
    return back(dq), back(dk), back(dv)
