"""Rotary position embeddings (Su et al., 2021, RoFormer) in the rotate_half convention.

Transformers' Llama rotates the pairs (i, i + D/2) of each head, not the
adjacent pairs (2i, 2i + 1) of the paper and of llama.cpp:

    angle    = position * inv_freq[i]                     for i < D/2
    out[i]       = x[i] * cos(angle) - x[i + D/2] * sin(angle)
    out[i + D/2] = x[i + D/2] * cos(angle) + x[i] * sin(angle)

Each output element depends only on its own row, position and pair, so the
result does not depend on how rows are batched or split between prefill and
decode steps.
"""

import math

import numpy as np
from numba import njit, prange


def inverse_frequencies(head_dim, theta, dtype=np.float32):
    """inv_freq[i] = 1 / theta^(2i / head_dim) for i < head_dim / 2, as transformers computes it in float32."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(dtype)


@njit(parallel=True, cache=True)
def rope(x, positions, inv_freq, out):
    """Rotate x: [N, H, D] by the angles of positions: [N] into out: [N, H, D]."""
    N, H, D = x.shape
    half = D // 2
    for n in prange(N):
        position = x.dtype.type(positions[n])
        for i in range(half):
            angle = position * inv_freq[i]
            c = math.cos(angle)
            s = math.sin(angle)
            for h in range(H):
                first = x[n, h, i]
                second = x[n, h, i + half]
                out[n, h, i] = first * c - second * s
                out[n, h, i + half] = second * c + first * s
