"""Reference backward kernels of the decoder layers: RMSNorm, rotary embeddings, SiLU and tanh GELU.

They follow the ordering rule of ``refimpl_kernels.backward``: a sum over
features runs in increasing index order inside one row, and a sum over rows
(the RMSNorm weight gradient) is accumulated straight into the gradient
buffer one row at a time, in the order of ``rows``. Threads split output
elements, never one sum.
"""

import math

import numpy as np
from numba import njit, prange

from refimpl_kernels.backward import BLOCK

SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), as in elementwise.gelu_tanh


# ---- RMSNorm: y = weight * (x * inv_rms), inv_rms = 1 / sqrt(mean(x^2) + eps) ----------


@njit(parallel=True, cache=True)
def rms_norm_inverse(x, eps, inv_rms):
    """Per row of x: [N, C], 1 / sqrt(mean(x^2) + eps), computed as the forward kernel computes it."""
    N, C = x.shape
    for n in prange(N):
        ms = x.dtype.type(0)
        for c in range(C):
            ms += x[n, c] * x[n, c]
        ms /= C
        inv_rms[n] = 1 / math.sqrt(ms + eps)


@njit(parallel=True, cache=True)
def rms_norm_backward_input(dy, x, weight, inv_rms, dx):
    """dx for y = weight * (x * inv_rms), per row of x: [N, C].

    With xhat = x * inv_rms and g = dy * weight:
    dx = (g - xhat * sum(g * xhat) / C) * inv_rms.
    """
    N, C = x.shape
    for n in prange(N):
        sum_g_xhat = x.dtype.type(0)
        for c in range(C):
            sum_g_xhat += dy[n, c] * weight[c] * (x[n, c] * inv_rms[n])
        mean_g_xhat = sum_g_xhat / C
        for c in range(C):
            xhat = x[n, c] * inv_rms[n]
            dx[n, c] = (dy[n, c] * weight[c] - xhat * mean_g_xhat) * inv_rms[n]


@njit(parallel=True, cache=True)
def rms_norm_backward_weight(dy, x, inv_rms, rows, dweight):
    """Add the sum over ``rows`` (in the given order) of dy * x * inv_rms into dweight: [C]."""
    C = x.shape[1]
    for b in prange((C + BLOCK - 1) // BLOCK):
        c0 = b * BLOCK
        c1 = min(C, c0 + BLOCK)
        for i in range(rows.size):
            m = rows[i]
            for c in range(c0, c1):
                dweight[c] += dy[m, c] * (x[m, c] * inv_rms[m])


# ---- rotary embeddings --------------------------------------------------------------


@njit(parallel=True, cache=True)
def rope_backward(dy, positions, inv_freq, dx):
    """dx for ``refimpl_kernels.rope.rope``: dy: [N, H, D] rotated by the negative angle.

    The rotation of each pair (i, i + D/2) is orthogonal, so its gradient is the
    transposed rotation. The angles are computed as the forward kernel computes them.
    """
    N, H, D = dy.shape
    half = D // 2
    for n in prange(N):
        position = dy.dtype.type(positions[n])
        for i in range(half):
            angle = position * inv_freq[i]
            c = math.cos(angle)
            s = math.sin(angle)
            for h in range(H):
                first = dy[n, h, i]
                second = dy[n, h, i + half]
                dx[n, h, i] = first * c + second * s
                dx[n, h, i + half] = second * c - first * s


# ---- activations --------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _map_silu_backward(x, dy, dx):
    for i in prange(x.size):
        v = x[i]
        sigmoid = 1 / (1 + math.exp(-v))
        dx[i] = dy[i] * (sigmoid * (1 + v * (1 - sigmoid)))


@njit(parallel=True, cache=True)
def _map_gelu_tanh_backward(x, dy, dx):
    for i in prange(x.size):
        v = x[i]
        t = math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))
        dt = (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * v * v)
        dx[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * dt)


def _map_backward(kernel, x, dy):
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    dx = np.empty_like(x)
    kernel(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    return dx


def silu_backward(x, dy):
    """dx for y = x * sigmoid(x): dy * sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    return _map_backward(_map_silu_backward, x, dy)


def gelu_tanh_backward(x, dy):
    """dx for y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    return _map_backward(_map_gelu_tanh_backward, x, dy)
