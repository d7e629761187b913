"""Reference row-wise kernels: normalisation and activations.

Each output row depends only on its own input row, and every sum runs in
increasing index order, so the result does not depend on how rows are batched.
"""

import math

import numpy as np
from numba import njit, prange, vectorize

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


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def gelu_erf(x):
    """GELU as defined with the Gaussian CDF: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1 + math.erf(x * SQRT_HALF))


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def gelu_tanh(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1 + math.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def silu(x):
    """x * sigmoid(x), the gate activation of Llama's SwiGLU MLP."""
    return x / (1 + math.exp(-x))
