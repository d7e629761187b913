"""Reference backward kernels, each with a fixed reduction order per output element.

The rule that keeps training bitwise identical under every chunking, budget and
micro-batch split:

- A sum over features (k, n, c, d, j) runs in increasing index order, inside
  one row, as in the forward kernels.
- A sum over rows (the token rows of a batch: weight, bias, layer-norm and
  embedding gradients) is accumulated straight into the gradient buffer, one
  row at a time, in increasing global row order, skipping padding rows:

      grad[n, k] = (...((grad[n, k] + dy[m0, n] x[m0, k]) + dy[m1, n] x[m1, k]) + ...)

  Micro-batches that hold consecutive slices of the same rows therefore give
  the same bits as one batch: the second micro-batch continues the running
  sum where the first stopped. ``rows`` lists the non-padding rows, so the
  length a batch is padded to does not change the order either.

Threads split the output elements, never one sum. Numba compiles without
fastmath, so LLVM neither reorders the sums nor fuses multiply and add.
"""

import math

import numpy as np
from numba import njit, prange

MR = 6  # rows per register tile
NR = 16  # columns per register tile: one 512-bit vector of float32
BLOCK = 64  # columns per parallel task in the row-sum kernels

INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


# ---- linear: y = x @ w.T + b ---------------------------------------------------------


@njit(parallel=True, cache=True)
def linear_backward_input(dy, w, dx, col0):
    """Add ``dy[:, col0 : col0 + N] @ w`` into ``dx``, n ascending per element.

    dy: [M, out_features], w: [N, K] (rows col0 .. col0 + N of the weight),
    dx: [M, K]. Fed the weight's chunks in increasing col0, each dx[m, k] is the
    sequential sum over n = 0, 1, ..., out_features - 1 whatever the chunk size.
    """
    M, K = dx.shape
    N = w.shape[0]
    n_tiles = (K + NR - 1) // NR
    m_full = M - M % MR
    for t in prange(n_tiles):
        k0 = t * NR
        width = min(NR, K - k0)
        acc = np.empty((MR, NR), dtype=dx.dtype)
        for m0 in range(0, m_full, MR):
            for r in range(MR):
                for j in range(width):
                    acc[r, j] = dx[m0 + r, k0 + j]
            for n in range(N):
                d0 = dy[m0, col0 + n]
                d1 = dy[m0 + 1, col0 + n]
                d2 = dy[m0 + 2, col0 + n]
                d3 = dy[m0 + 3, col0 + n]
                d4 = dy[m0 + 4, col0 + n]
                d5 = dy[m0 + 5, col0 + n]
                for j in range(width):
                    wk = w[n, k0 + j]
                    acc[0, j] += d0 * wk
                    acc[1, j] += d1 * wk
                    acc[2, j] += d2 * wk
                    acc[3, j] += d3 * wk
                    acc[4, j] += d4 * wk
                    acc[5, j] += d5 * wk
            for r in range(MR):
                for j in range(width):
                    dx[m0 + r, k0 + j] = acc[r, j]
        for m in range(m_full, M):
            for j in range(width):
                total = dx[m, k0 + j]
                for n in range(N):
                    total += dy[m, col0 + n] * w[n, k0 + j]
                dx[m, k0 + j] = total


@njit(parallel=True, cache=True)
def linear_backward_weight(dy, x, rows, dw, col0):
    """Add ``dy[rows, col0 : col0 + N].T @ x[rows]`` into ``dw``: [N, K], rows in the given order.

    dy: [M, out_features], x: [M, K], rows: int64 indices of the rows that count.
    """
    N, K = dw.shape
    n_tiles = (N + MR - 1) // MR
    k_tiles = (K + NR - 1) // NR
    for tile in prange(n_tiles * k_tiles):
        n0 = (tile // k_tiles) * MR
        k0 = (tile % k_tiles) * NR
        height = min(MR, N - n0)
        width = min(NR, K - k0)
        acc = np.zeros((MR, NR), dtype=dw.dtype)
        for r in range(height):
            for j in range(width):
                acc[r, j] = dw[n0 + r, k0 + j]
        if height == MR and width == NR:
            for i in range(rows.size):
                m = rows[i]
                d0 = dy[m, col0 + n0]
                d1 = dy[m, col0 + n0 + 1]
                d2 = dy[m, col0 + n0 + 2]
                d3 = dy[m, col0 + n0 + 3]
                d4 = dy[m, col0 + n0 + 4]
                d5 = dy[m, col0 + n0 + 5]
                for j in range(NR):
                    xk = x[m, k0 + j]
                    acc[0, j] += d0 * xk
                    acc[1, j] += d1 * xk
                    acc[2, j] += d2 * xk
                    acc[3, j] += d3 * xk
                    acc[4, j] += d4 * xk
                    acc[5, j] += d5 * xk
        else:
            for i in range(rows.size):
                m = rows[i]
                for r in range(height):
                    d = dy[m, col0 + n0 + r]
                    for j in range(width):
                        acc[r, j] += d * x[m, k0 + j]
        for r in range(height):
            for j in range(width):
                dw[n0 + r, k0 + j] = acc[r, j]


@njit(parallel=True, cache=True)
def sum_rows_into(dy, rows, out, col0):
    """Add ``dy[rows, col0 : col0 + N]`` summed over rows (in the given order) into ``out``: [N]."""
    N = out.shape[0]
    for b in prange((N + BLOCK - 1) // BLOCK):
        n0 = b * BLOCK
        n1 = min(N, n0 + BLOCK)
        for i in range(rows.size):
            m = rows[i]
            for n in range(n0, n1):
                out[n] += dy[m, col0 + n]


# ---- layer norm -------------------------------------------------------------------


@njit(parallel=True, cache=True)
def layer_norm_statistics(x, eps, mean, inv_std):
    """Per row of x: [N, C], the mean and 1 / sqrt(var + eps), computed as the forward kernel does."""
    N, C = x.shape
    for n in prange(N):
        mu = x.dtype.type(0)
        for c in range(C):
            mu += x[n, c]
        mu /= C
        var = x.dtype.type(0)
        for c in range(C):
            d = x[n, c] - mu
            var += d * d
        var /= C
        mean[n] = mu
        inv_std[n] = 1 / math.sqrt(var + eps)


@njit(parallel=True, cache=True)
def layer_norm_backward_input(dy, x, weight, mean, inv_std, dx):
    """dx for y = (x - mean) * inv_std * weight + bias, per row of x: [N, C].

    With xhat = (x - mean) * inv_std and g = dy * weight:
    dx = (g - sum(g) / C - xhat * sum(g * xhat) / C) * inv_std.
    """
    N, C = x.shape
    for n in prange(N):
        sum_g = x.dtype.type(0)
        sum_g_xhat = x.dtype.type(0)
        for c in range(C):
            xhat = (x[n, c] - mean[n]) * inv_std[n]
            g = dy[n, c] * weight[c]
            sum_g += g
            sum_g_xhat += g * xhat
        mean_g = sum_g / C
        mean_g_xhat = sum_g_xhat / C
        for c in range(C):
            xhat = (x[n, c] - mean[n]) * inv_std[n]
            g = dy[n, c] * weight[c]
            dx[n, c] = (g - mean_g - xhat * mean_g_xhat) * inv_std[n]


@njit(parallel=True, cache=True)
def layer_norm_backward_params(dy, x, mean, inv_std, rows, dweight, dbias):
    """Add sum over rows of dy * xhat into dweight and of dy into dbias, rows in the given order."""
    C = x.shape[1]
    for b in prange((C + BLOCK - 1) // BLOCK):
        c0 = b * BLOCK
        c1 = min(C, c0 + BLOCK)
        for i in range(rows.size):
            m = rows[i]
            for c in range(c0, c1):
                xhat = (x[m, c] - mean[m]) * inv_std[m]
                dweight[c] += dy[m, c] * xhat
                dbias[c] += dy[m, c]


# ---- GELU ---------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _map_gelu_erf_backward(x, dy, dx):
    for i in prange(x.size):
        v = x[i]
        cdf = 0.5 * (1 + math.erf(v * SQRT_HALF))
        pdf = INV_SQRT_2PI * math.exp(-0.5 * v * v)
        dx[i] = dy[i] * (cdf + v * pdf)


def gelu_erf_backward(x, dy):
    """dx for y = 0.5 x (1 + erf(x / sqrt(2))): dy * (Phi(x) + x phi(x))."""
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    dx = np.empty_like(x)
    _map_gelu_erf_backward(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
    return dx


# ---- attention ----------------------------------------------------------------------


@njit(parallel=True, cache=True)
def attention_backward(q, k, v, mask, scale, dout, query_valid, dq, dk, dv):
    """Gradients of ``refimpl_kernels.attention.attention`` with respect to q, k and v.

    q, k, v, dout, dq, dk, dv: [B, T, H, D] (one key/value head per query head);
    mask: [B, Tq, Tk] additive; query_valid: [B, Tq], 0 for padding queries,
    which carry no gradient and are skipped. The probabilities are recomputed
    exactly as the forward kernel computes them. Per query i:

        dp[j] = dout[i] . v[j]
        ds[j] = p[j] (dp[j] - sum over j' of p[j'] dp[j'])
        dq[i] = scale * sum over j of ds[j] k[j]
        dk[j] += scale * ds[j] q[i],  dv[j] += p[j] dout[i]   (i ascending)

    Masked keys are skipped, so they get zero gradient.
    """
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    neg_inf = -np.inf
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        for j in range(Tk):
            for d in range(D):
                dk[b, j, h, d] = 0
                dv[b, j, h, d] = 0
        scores = np.empty(Tk, dtype=q.dtype)
        dp = np.empty(Tk, dtype=q.dtype)
        for i in range(Tq):
            for d in range(D):
                dq[b, i, h, d] = 0
            if query_valid[b, i] == 0:
                continue
            row_max = q.dtype.type(neg_inf)
            for j in range(Tk):
                if mask[b, i, j] == neg_inf:
                    scores[j] = neg_inf
                    continue
                s = q.dtype.type(0)
                for d in range(D):
                    s += q[b, i, h, d] * k[b, j, h, d]
                scores[j] = s * scale + mask[b, i, j]
                if scores[j] > row_max:
                    row_max = scores[j]
            if row_max == neg_inf:
                continue
            total = q.dtype.type(0)
            for j in range(Tk):
                if scores[j] != neg_inf:
                    e = math.exp(scores[j] - row_max)
                    scores[j] = e
                    total += e
            weighted = q.dtype.type(0)  # sum over j of p[j] dp[j]
            for j in range(Tk):
                if mask[b, i, j] == neg_inf:
                    continue
                p = scores[j] / total
                scores[j] = p
                s = q.dtype.type(0)
                for d in range(D):
                    s += dout[b, i, h, d] * v[b, j, h, d]
                dp[j] = s
                weighted += p * s
            for j in range(Tk):
                if mask[b, i, j] == neg_inf:
                    continue
                p = scores[j]
                ds = p * (dp[j] - weighted)
                for d in range(D):
                    dq[b, i, h, d] += scale * ds * k[b, j, h, d]
                    dk[b, j, h, d] += scale * ds * q[b, i, h, d]
                    dv[b, j, h, d] += p * dout[b, i, h, d]


# ---- embeddings ---------------------------------------------------------------------


@njit(parallel=True, cache=True)
def embedding_backward(dx, ids, rows, table_grad):
    """Add dx[m] into table_grad[ids[m]] for each m of ``rows``, in the given order.

    dx: [M, C], ids: [M] int64, table_grad: [V, C]. Threads split the columns, so
    a table row that several tokens share is still summed in row order.
    """
    C = dx.shape[1]
    for b in prange((C + BLOCK - 1) // BLOCK):
        c0 = b * BLOCK
        c1 = min(C, c0 + BLOCK)
        for i in range(rows.size):
            m = rows[i]
            row = ids[m]
            for c in range(c0, c1):
                table_grad[row, c] += dx[m, c]


# ---- loss ---------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def cross_entropy(logits, labels, ignore_index, scale, losses, dlogits):
    """Softmax cross-entropy per row of logits: [N, L], with ``scale`` folded into dlogits.

    losses[n] = logsumexp(logits[n]) - logits[n, labels[n]], and
    dlogits[n] = (softmax(logits[n]) - onehot(labels[n])) * scale. Rows whose
    label is ``ignore_index`` get loss 0 and zero gradient.
    """
    N, L = logits.shape
    for n in prange(N):
        label = labels[n]
        if label == ignore_index:
            losses[n] = 0
            for c in range(L):
                dlogits[n, c] = 0
            continue
        row_max = logits[n, 0]
        for c in range(1, L):
            if logits[n, c] > row_max:
                row_max = logits[n, c]
        total = logits.dtype.type(0)
        for c in range(L):
            total += math.exp(logits[n, c] - row_max)
        log_total = math.log(total)
        losses[n] = log_total + row_max - logits[n, label]
        for c in range(L):
            p = math.exp(logits[n, c] - row_max) / total
            if c == label:
                p -= 1
            dlogits[n, c] = p * scale


# ---- dropout ------------------------------------------------------------------------


@njit(cache=True)
def _splitmix64(z):
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(parallel=True, cache=True)
def dropout_keep(seed, epoch, example_ids, T, C, keep_below, keep):
    """Fill keep: [B, T, C] with 1 where an element is kept, 0 where it is dropped.

    Each element's draw is a hash of (seed, epoch, example id, position,
    feature), so it does not depend on batching, micro-batches or resuming.
    An element is kept when the top 53 bits of its hash, as a fraction of 2^53,
    are below ``keep_below`` (the keep probability times 2^53).
    """
    B = example_ids.size
    for b in prange(B):
        base = _splitmix64(np.uint64(seed) ^ _splitmix64(np.uint64(epoch) + _splitmix64(np.uint64(example_ids[b]))))
        for t in range(T):
            row = _splitmix64(base + np.uint64(t))
            for c in range(C):
                draw = _splitmix64(row + np.uint64(c)) >> np.uint64(11)
                keep[b, t, c] = 1 if draw < keep_below else 0


# ---- optimizer ----------------------------------------------------------------------


@njit(cache=True)
def sum_of_squares(x, total):
    """Return total + the sum of x[i]**2 over the flat array x, i ascending, in float64."""
    for i in range(x.size):
        value = np.float64(x[i])
        total += value * value
    return total


def _adamw_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                 bias_correction1, bias_correction2_sqrt, grad_scale):
    """Apply one AdamW step to flat arrays, in the order of operations of torch.optim.AdamW (single tensor).

    param = param * (1 - lr * weight_decay); m = beta1 m + (1 - beta1) g;
    v = beta2 v + (1 - beta2) g^2; param -= (lr / bias_correction1) * m / (sqrt(v) / sqrt(bc2) + eps),
    with g = grad * grad_scale (the clipping factor, 1 when not clipping).
    """
    dtype = param.dtype.type
    decay = dtype(1 - lr * weight_decay)
    step_size = dtype(lr / bias_correction1)
    b1 = dtype(beta1)
    b2 = dtype(beta2)
    one_minus_b1 = dtype(1 - beta1)
    one_minus_b2 = dtype(1 - beta2)
    bc2 = dtype(bias_correction2_sqrt)
    epsilon = dtype(eps)
    scale = dtype(grad_scale)
    for i in prange(param.size):
        g = grad[i] * scale if grad_scale != 1.0 else grad[i]
        p = param[i] * decay if weight_decay != 0.0 else param[i]
        m = exp_avg[i] * b1 + g * one_minus_b1
        v = exp_avg_sq[i] * b2 + g * g * one_minus_b2
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] = p - step_size * (m / (math.sqrt(v) / bc2 + epsilon))


# Launching a parallel region costs a thread wake-up, which dominates on small
# tensors (biases, LayerNorm weights); both versions compute the same values.
_adamw_parallel = njit(parallel=True, cache=True)(_adamw_update)
_adamw_serial = njit(cache=True)(_adamw_update)
SERIAL_BELOW = 1 << 16  # elements


def adamw_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                 bias_correction1, bias_correction2_sqrt, grad_scale):
    """Apply one AdamW step to flat arrays in place; see ``_adamw_update``."""
    kernel = _adamw_serial if param.size < SERIAL_BELOW else _adamw_parallel
    kernel(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
           bias_correction1, bias_correction2_sqrt, grad_scale)
