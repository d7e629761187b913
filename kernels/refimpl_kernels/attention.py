"""Reference scaled dot-product attention with an additive mask.

For one query row the steps are, with every sum taken in increasing index order:

    score[j] = (q . k[j]) * scale + mask[j]      -inf in the mask means "do not attend"
    p[j]     = exp(score[j] - max(score)) / sum(exp(score - max(score)))
    out      = sum over j of p[j] * v[j]

Keys whose mask is -inf are skipped, not added as zeros, which gives the same
bits as leaving them out. So a padded batch gives each row the result it gets
alone, and a decode step over a KV cache of length t gives the same bits as the
full causal pass at position t. A row whose keys are all masked yields zeros
rather than the NaN that 0/0 would give.
"""

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def attention(q, k, v, mask, scale, out):
    """Attention of every query against the keys, per head.

    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D] with H a multiple of Hkv (grouped-
    query attention: query head h reads key/value head h // (H // Hkv));
    mask: [B, Tq, Tk], additive, -inf where attention is not allowed;
    out: [B, Tq, H, D].
    """
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    group = H // k.shape[2]
    neg_inf = -np.inf

    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        kv = h // group

        # k_t[d, j] = k[b, j, kv, d]: [D, Tk], so that the dot products of one
        # query with all keys vectorise across keys while each one still sums
        # over d in increasing order.
        k_t = np.empty((D, Tk), dtype=k.dtype)
        for j in range(Tk):
            for d in range(D):
                k_t[d, j] = k[b, j, kv, d]

        scores = np.empty(Tk, dtype=q.dtype)
        acc = np.empty(D, dtype=q.dtype)
        for i in range(Tq):
            # scores: [Tk] = q[b, i, h] . k[b, j, kv] for every j
            scores[:] = 0
            for d in range(D):
                q_d = q[b, i, h, d]
                for j in range(Tk):
                    scores[j] += q_d * k_t[d, j]

            row_max = q.dtype.type(neg_inf)
            for j in range(Tk):
                if mask[b, i, j] == neg_inf:
                    scores[j] = neg_inf
                else:
                    scores[j] = scores[j] * scale + mask[b, i, j]
                    if scores[j] > row_max:
                        row_max = scores[j]

            acc[:] = 0
            if row_max == neg_inf:  # every key masked
                out[b, i, h, :] = acc
                continue

            total = q.dtype.type(0)
            for j in range(Tk):
                if scores[j] != neg_inf:
                    e = math.exp(scores[j] - row_max)
                    scores[j] = e
                    total += e
            for j in range(Tk):
                if mask[b, i, j] != neg_inf:
                    p = scores[j] / total
                    for d in range(D):
                        acc[d] += p * v[b, j, kv, d]
            out[b, i, h, :] = acc
