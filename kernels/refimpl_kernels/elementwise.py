"""Reference row-wise kernels: normalisation and activations.

Each output row depends only on its own input row, and every sum runs in
increasing index order, so the result does not depend on how rows are batched.
"""

import math

import numpy as np
from numba import njit, prange

SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2), for the erf form of GELU
SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), for the tanh form of GELU


@njit(parallel=True, cache=True)
def layer_norm(x, weight, bias, eps, out):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last axis of x: [N, C]."""
    N, C = x.shape
    for n in prange(N):
        mean = x.dtype.type(0)
        for c in range(C):
            mean += x[n, c]
        mean /= C
        var = x.dtype.type(0)
        for c in range(C):
            d = x[n, c] - mean
            var += d * d
        var /= C
        inv_std = 1 / math.sqrt(var + eps)
        for c in range(C):
            out[n, c] = (x[n, c] - mean) * inv_std * weight[c] + bias[c]


@njit(parallel=True, cache=True)
def rms_norm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight over the last axis of x: [N, C]."""
    N, C = x.shape
    for n in prange(N):
        ms = x.dtype.type(0)
        for c in range(C):
            ms += x[n, c] * x[n, c]
        ms /= C
        inv_rms = 1 / math.sqrt(ms + eps)
        for c in range(C):
            out[n, c] = weight[c] * (x[n, c] * inv_rms)


@njit(parallel=True, cache=True)
def _map_gelu_erf(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1 + math.erf(v * SQRT_HALF))


@njit(parallel=True, cache=True)
def _map_gelu_tanh(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1 + math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))


@njit(parallel=True, cache=True)
def _map_silu(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v / (1 + math.exp(-v))


def _elementwise(kernel, x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    kernel(x.reshape(-1), out.reshape(-1))
    return out


def gelu_erf(x):
    """GELU as defined with the Gaussian CDF: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return _elementwise(_map_gelu_erf, x)


def gelu_tanh(x):
    """GPT-2's tanh approximation of GELU ("gelu_new")."""
    return _elementwise(_map_gelu_tanh, x)


def silu(x):
    """x * sigmoid(x), the gate activation of Llama's SwiGLU MLP."""
    return _elementwise(_map_silu, x)
