"""The operations a model is built from, in two modes.

``reference`` runs the Numba kernels, whose reduction order is fixed per
output element, so any chunking, batching or schedule gives bitwise identical
results. ``fast`` runs numpy and its BLAS: faster on large products, but the
rounding depends on shapes, so it is checked against the reference by
tolerance, never bitwise.
"""

import numpy as np

from refimpl.errors import RefimplError
from refimpl_kernels import attention as attention_kernels
from refimpl_kernels import threads_for
from refimpl_kernels import elementwise
from refimpl_kernels import rope as rope_kernels
from refimpl_kernels.conv1d import accumulate_xw
from refimpl_kernels.matmul import linear_reference

MODES = ("reference", "fast")


class Ops:
    """Kernels for one mode and one activation dtype (float32, or float64 for checking)."""

    def __init__(self, mode="reference", dtype=np.float32):
        if mode not in MODES:
            raise RefimplError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        self.mode = mode
        self.dtype = np.dtype(dtype)

    def cast(self, x):
        return np.ascontiguousarray(x, dtype=self.dtype)

    # x: [N, in_features] -> [N, out_features], weight chunks of [rows, in_features]
    def linear(self, x, store, prefix, bias=True):
        x = self.cast(x)
        out_features = store.shape(prefix + ".weight")[0]
        out = np.empty((x.shape[0], out_features), dtype=self.dtype)
        for start, stop, w in store.chunks(prefix + ".weight"):
            if self.mode == "reference":
                with threads_for(x.shape[0] * w.size):
                    linear_reference(x, w, out, start)
            elif start == 0 and stop == out_features:
                np.matmul(x, w.T, out=out)
            else:
                out[:, start:stop] = np.matmul(x, w.T)
        if bias:
            out += store.tensor(prefix + ".bias")
        return out

    # q: [B, Tq, H, D], k, v: [B, Tk, Hkv, D], mask: [B, Tq, Tk] additive -> [B, Tq, H, D]
    def attention(self, q, k, v, mask, scale):
        q, k, v, mask = self.cast(q), self.cast(k), self.cast(v), self.cast(mask)
        scale = self.dtype.type(scale)
        if self.mode == "reference":
            out = np.empty_like(q)
            with threads_for(q.size * k.shape[1]):
                attention_kernels.attention(q, k, v, mask, scale, out)
            return out
        return attention_numpy(q, k, v, mask, scale)

    # x: [N, C] -> [N, C]
    def layer_norm(self, x, weight, bias, eps):
        x = self.cast(x)
        if self.mode == "reference":
            out = np.empty_like(x)
            with threads_for(x.size):
                elementwise.layer_norm(x, self.cast(weight), self.cast(bias), self.dtype.type(eps), out)
            return out
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(self.dtype)

    def rms_norm(self, x, weight, eps):
        x = self.cast(x)
        if self.mode == "reference":
            out = np.empty_like(x)
            with threads_for(x.size):
                elementwise.rms_norm(x, self.cast(weight), self.dtype.type(eps), out)
            return out
        inv_rms = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        return (weight * (x * inv_rms)).astype(self.dtype)

    # x: [N, H, D], positions: [N] -> [N, H, D], pairs (i, i + D/2) rotated by position * inv_freq[i]
    def rope(self, x, positions, inv_freq):
        x = self.cast(x)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        inv_freq = self.cast(inv_freq)
        if self.mode == "reference":
            out = np.empty_like(x)
            with threads_for(x.size):
                rope_kernels.rope(x, positions, inv_freq, out)
            return out
        angles = positions[:, None].astype(self.dtype) * inv_freq  # [N, D/2]
        cos = np.cos(angles)[:, None, :]
        sin = np.sin(angles)[:, None, :]
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    # x: [N, in_features] -> [N, out_features], weight stored [in_features, out_features] (GPT-2's Conv1D)
    def conv1d(self, x, store, prefix, bias=True):
        """Apply a linear layer whose weight is stored transposed, so chunks are rows of in_features.

        The reference path adds each chunk's share into one accumulator with k
        ascending per element, so the chunk size does not change the bits.
        """
        x = self.cast(x)
        out_features = store.shape(prefix + ".weight")[1]
        out = np.zeros((x.shape[0], out_features), dtype=self.dtype)
        for start, stop, w in store.chunks(prefix + ".weight"):
            if self.mode == "reference":
                with threads_for(x.shape[0] * w.size):
                    accumulate_xw(x, w, out, start)
            else:
                out += np.matmul(x[:, start:stop], w)
        if bias:
            out += store.tensor(prefix + ".bias")
        return out

    def gelu(self, x):
        # The rational erf is accurate to float32 rounding only, so float64 keeps libm's erf.
        approximate = self.mode == "fast" and self.dtype == np.float32
        kernel = elementwise.gelu_erf_fast if approximate else elementwise.gelu_erf
        with threads_for(x.size):
            return kernel(self.cast(x))

    def gelu_tanh(self, x):
        with threads_for(x.size):
            return elementwise.gelu_tanh(self.cast(x))

    def silu(self, x):
        with threads_for(x.size):
            return elementwise.silu(self.cast(x))


def attention_numpy(q, k, v, mask, scale):
    """Compute the reference kernel's attention with numpy batched products, in place where possible."""
    B, Tq, H, D = q.shape
    group = H // k.shape[2]
    if group > 1:
        k = np.repeat(k, group, axis=2)
        v = np.repeat(v, group, axis=2)
    # [B, H, Tq, D] @ [B, H, D, Tk] -> [B, H, Tq, Tk]
    scores = np.matmul(np.ascontiguousarray(q.transpose(0, 2, 1, 3)), np.ascontiguousarray(k.transpose(0, 2, 3, 1)))
    scores *= scale
    scores += mask[:, None]
    row_max = scores.max(axis=-1, keepdims=True)
    all_masked = np.isneginf(row_max)
    row_max[all_masked] = 0  # a fully masked row stays -inf, so its weights are exp(-inf) = 0
    scores -= row_max
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    total[all_masked] = 1
    scores /= total
    # [B, H, Tq, Tk] @ [B, H, Tk, D] -> [B, H, Tq, D] -> [B, Tq, H, D]
    out = np.matmul(scores, np.ascontiguousarray(v.transpose(0, 2, 1, 3)))
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3), dtype=q.dtype)
