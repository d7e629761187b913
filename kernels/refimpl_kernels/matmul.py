"""The reference matrix product ``out = x @ w.T`` with a fixed reduction order.

Every output element is computed the same way, whatever the shapes:

    out[m, n] = (...((0 + x[m, 0] * w[n, 0]) + x[m, 1] * w[n, 1]) + ...) + x[m, K-1] * w[n, K-1]

in the dtype of the inputs, with a separate multiply and add (no fused
multiply-add: Numba compiles without fastmath, so LLVM does not contract them).
Nothing in this order depends on M, on which rows of ``w`` a chunk holds, or on
how work is shared between threads. So splitting the rows of ``x`` (a batch or
a decode step) or the rows of ``w`` (a weight chunk) gives bitwise identical
results. numpy's BLAS makes no such promise: its blocking, and so its rounding,
changes with the shape.

Speed comes from vectorising across outputs, never across k: a panel of NR
rows of ``w`` is transposed into a small buffer, and MR rows of ``x`` update an
MR x NR block of accumulators per step of k.
"""

import numpy as np
from numba import njit, prange

MR = 6  # rows of x per micro-tile; 6 x 16 float32 accumulators fit in AVX-512 registers
NR = 16  # rows of w per panel (output columns), one 512-bit vector of float32


@njit(parallel=True, cache=True)
def matmul_wt(x, w, out, col0):
    """Write ``x @ w.T`` into ``out[:, col0 : col0 + N]``.

    x: [M, K], w: [N, K] (a chunk of a weight stored as [out_features, in_features]),
    out: [M, >= col0 + N]. Accumulates in out's dtype, which must match x's.
    """
    M, K = x.shape
    N = w.shape[0]
    n_panels = (N + NR - 1) // NR

    for p in prange(n_panels):
        n0 = p * NR
        width = min(NR, N - n0)

        # panel[k, j] = w[n0 + j, k], zero beyond the last row of w: [K, NR]
        panel = np.zeros((K, NR), dtype=w.dtype)
        for j in range(width):
            for k in range(K):
                panel[k, j] = w[n0 + j, k]

        # Full micro-tiles: MR rows of x against the NR columns of the panel.
        acc = np.empty((MR, NR), dtype=out.dtype)
        m_full = M - M % MR
        for m0 in range(0, m_full, MR):
            acc[:, :] = 0
            for k in range(K):
                x0 = x[m0, k]
                x1 = x[m0 + 1, k]
                x2 = x[m0 + 2, k]
                x3 = x[m0 + 3, k]
                x4 = x[m0 + 4, k]
                x5 = x[m0 + 5, k]
                for j in range(NR):
                    wk = panel[k, j]
                    acc[0, j] += x0 * wk
                    acc[1, j] += x1 * wk
                    acc[2, j] += x2 * wk
                    acc[3, j] += x3 * wk
                    acc[4, j] += x4 * wk
                    acc[5, j] += x5 * wk
            for r in range(MR):
                for j in range(width):
                    out[m0 + r, col0 + n0 + j] = acc[r, j]

        # Remaining rows (all of them when M < MR, as in decoding): the same
        # sum in the same order, one output at a time.
        for m in range(m_full, M):
            for j in range(width):
                total = out.dtype.type(0)
                for k in range(K):
                    total += x[m, k] * panel[k, j]
                out[m, col0 + n0 + j] = total


@njit(parallel=True, cache=True)
def matvec_wt(x, w, out, col0):
    """Write ``x @ w.T`` into ``out[:, col0 : col0 + N]`` for a few rows of x.

    The same reduction order as ``matmul_wt``, so the two agree bitwise. It
    reads ``w`` row by row without packing a panel, which is faster when M is
    small and the product is bound by memory (a decode step).
    """
    M, K = x.shape
    N = w.shape[0]
    n_blocks = (N + 7) // 8
    for b in prange(n_blocks):
        n0 = b * 8
        for m in range(M):
            if n0 + 8 <= N:
                # Eight independent running sums hide the latency of the adds.
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = out.dtype.type(0)
                for k in range(K):
                    xk = x[m, k]
                    s0 += xk * w[n0, k]
                    s1 += xk * w[n0 + 1, k]
                    s2 += xk * w[n0 + 2, k]
                    s3 += xk * w[n0 + 3, k]
                    s4 += xk * w[n0 + 4, k]
                    s5 += xk * w[n0 + 5, k]
                    s6 += xk * w[n0 + 6, k]
                    s7 += xk * w[n0 + 7, k]
                c = col0 + n0
                out[m, c] = s0
                out[m, c + 1] = s1
                out[m, c + 2] = s2
                out[m, c + 3] = s3
                out[m, c + 4] = s4
                out[m, c + 5] = s5
                out[m, c + 6] = s6
                out[m, c + 7] = s7
            else:
                for n in range(n0, N):
                    total = out.dtype.type(0)
                    for k in range(K):
                        total += x[m, k] * w[n, k]
                    out[m, col0 + n] = total


SMALL_M = 4  # below this many rows of x, matvec_wt is faster than packing panels


def linear_reference(x, w, out, col0=0):
    """Write ``x @ w.T`` into ``out[:, col0:col0+N]`` with the fixed reduction order."""
    if x.shape[0] < SMALL_M:
        matvec_wt(x, w, out, col0)
    else:
        matmul_wt(x, w, out, col0)
