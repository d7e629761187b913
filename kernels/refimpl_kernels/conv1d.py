"""The reference product ``out += x @ w`` for weights stored [in_features, out_features].

GPT-2 stores its projections as Conv1D weights of shape [in, out], so the rows
that the weight store streams are the reduction dimension k. Each chunk of
rows w[k0:k1] adds its share into the same output, element by element and one
k at a time:

    out[m, n] = out[m, n] + x[m, k] * w[k - k0, n]    for k = k0, k0 + 1, ..., k1 - 1

Started from out = 0 and fed the chunks in increasing k0, every output element
is the strictly sequential sum (...((0 + x[m, 0] w[0, n]) + x[m, 1] w[1, n]) + ...),
the order ``matmul.matmul_wt`` uses, whatever the chunk size. Storing the
float32 partial sum in ``out`` between chunks does not round it again.
"""

from numba import njit, prange

BLOCK = 64  # output columns per parallel task; the inner loop over them vectorises


@njit(parallel=True, cache=True)
def accumulate_xw(x, w, out, k0):
    """Add ``x[:, k0 : k0 + K] @ w`` into ``out`` with k ascending per element.

    x: [M, >= k0 + K], w: [K, N] (rows k0 to k0 + K of an [in, out] weight),
    out: [M, N] in x's dtype.
    """
    M = x.shape[0]
    K, N = w.shape
    n_blocks = (N + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        n0 = b * BLOCK
        n1 = min(N, n0 + BLOCK)
        for m in range(M):
            for k in range(K):
                xk = x[m, k0 + k]
                for n in range(n0, n1):
                    out[m, n] = out[m, n] + xk * w[k, n]
