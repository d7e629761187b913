"""The reference kernels: exact reduction order, split invariance, and agreement with numpy."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.ops import attention_numpy
from refimpl_kernels.attention import attention
from refimpl_kernels.elementwise import gelu_erf, gelu_tanh, layer_norm, rms_norm
from refimpl_kernels.matmul import linear_reference, matmul_wt, matvec_wt


def sequential_product(x, w):
    """out[m, n] summed over k in increasing order, one multiply and one add per step."""
    dtype = x.dtype.type
    out = np.zeros((x.shape[0], w.shape[0]), dtype=x.dtype)
    for m in range(x.shape[0]):
        for n in range(w.shape[0]):
            total = dtype(0)
            for k in range(x.shape[1]):
                total = dtype(total + dtype(x[m, k] * w[n, k]))
            out[m, n] = total
    return out


def random_matrices(seed, M, K, N, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 3), (7, 33, 17), (13, 40, 16), (6, 16, 32), (2, 64, 9)])
def test_matmul_order_is_sequential(shape, dtype):
    x, w = random_matrices(0, *shape, dtype=dtype)
    expected = sequential_product(x, w)
    for kernel in (matmul_wt, matvec_wt):
        out = np.empty((shape[0], shape[2]), dtype=dtype)
        kernel(x, w, out, 0)
        assert np.array_equal(out, expected), kernel.__name__


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 70), N=st.integers(1, 70),
       row_split=st.integers(0, 40), col_split=st.integers(0, 70), seed=st.integers(0, 2**16))
def test_matmul_split_invariant(M, K, N, row_split, col_split, seed):
    x, w = random_matrices(seed, M, K, N)
    whole = np.empty((M, N), dtype=np.float32)
    linear_reference(x, w, whole)

    r = min(row_split, M)
    c = min(col_split, N)
    parts = np.empty((M, N), dtype=np.float32)
    for rows in (slice(0, r), slice(r, M)):
        xs = np.ascontiguousarray(x[rows])
        if xs.shape[0] == 0:
            continue
        for cols in (slice(0, c), slice(c, N)):
            ws = w[cols]
            if ws.shape[0] == 0:
                continue
            linear_reference(xs, ws, parts[rows], cols.start)
    assert np.array_equal(whole, parts)


def test_matmul_close_to_blas():
    x, w = random_matrices(3, 50, 384, 96)
    out = np.empty((50, 96), dtype=np.float32)
    matmul_wt(x, w, out, 0)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_matmul_reads_strided_weight_chunks():
    x, w = random_matrices(4, 9, 20, 30)
    view = w[::2]  # not C-contiguous
    out = np.empty((9, 15), dtype=np.float32)
    matmul_wt(x, view, out, 0)
    assert np.array_equal(out, sequential_product(x, np.ascontiguousarray(view)))


def causal_mask(B, Tq, Tk, offset=0):
    allowed = np.arange(Tk)[None, :] <= (np.arange(Tq)[:, None] + offset)
    mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(mask, (B, Tq, Tk)))


def run_attention(q, k, v, mask):
    out = np.empty_like(q)
    attention(q, k, v, mask, np.float32(1 / math.sqrt(q.shape[-1])), out)
    return out


def random_qkv(seed, B, Tq, Tk, H, Hkv, D):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Tq, H, D)).astype(np.float32),
            rng.standard_normal((B, Tk, Hkv, D)).astype(np.float32),
            rng.standard_normal((B, Tk, Hkv, D)).astype(np.float32))


def test_attention_fully_masked_row_is_zero():
    q, k, v = random_qkv(0, 2, 4, 4, 2, 2, 8)
    mask = np.zeros((2, 4, 4), dtype=np.float32)
    mask[1, 2, :] = -np.inf
    out = run_attention(q, k, v, mask)
    assert np.all(out[1, 2] == 0)
    assert np.all(np.isfinite(out))


def test_attention_matches_numpy_with_gqa():
    q, k, v = random_qkv(1, 3, 6, 6, 4, 2, 8)
    mask = causal_mask(3, 6, 6)
    out = run_attention(q, k, v, mask)
    expected = attention_numpy(q, k, v, mask, np.float32(1 / math.sqrt(8)))
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), t=st.integers(0, 11), seed=st.integers(0, 2**16))
def test_attention_decode_step_equals_full_pass(T, t, seed):
    t = min(t, T - 1)
    q, k, v = random_qkv(seed, 1, T, T, 4, 2, 8)
    full = run_attention(q, k, v, causal_mask(1, T, T))
    # One decode step: the query at position t against the first t + 1 keys.
    step = run_attention(np.ascontiguousarray(q[:, t:t + 1]), np.ascontiguousarray(k[:, :t + 1]),
                         np.ascontiguousarray(v[:, :t + 1]), causal_mask(1, 1, t + 1, offset=t))
    assert np.array_equal(full[:, t:t + 1], step)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 10), padded_to=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_attention_padding_does_not_change_rows(length, padded_to, seed):
    T = length + padded_to
    q, k, v = random_qkv(seed, 1, T, T, 2, 2, 4)
    key_mask = np.where(np.arange(T) < length, 0.0, -np.inf).astype(np.float32)
    padded = run_attention(q, k, v, np.ascontiguousarray(np.broadcast_to(key_mask, (1, T, T))))
    alone = run_attention(np.ascontiguousarray(q[:, :length]), np.ascontiguousarray(k[:, :length]),
                          np.ascontiguousarray(v[:, :length]), np.zeros((1, length, length), np.float32))
    assert np.array_equal(padded[:, :length], alone)


def test_layer_norm_matches_float64():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 384)).astype(np.float32) * 3 + 1
    weight, bias = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    out = np.empty_like(x)
    layer_norm(x, weight, bias, np.float32(1e-12), out)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * weight + bias
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_float64():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    weight = rng.standard_normal(64).astype(np.float32)
    out = np.empty_like(x)
    rms_norm(x, weight, np.float32(1e-5), out)
    x64 = x.astype(np.float64)
    expected = weight * x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5)
    assert np.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_gelu_forms():
    x = np.linspace(-6, 6, 101)
    erf_form = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.allclose(gelu_erf(x), erf_form, rtol=1e-12, atol=1e-15)
    # The tanh approximation differs from the exact form by up to about 5e-4.
    difference = np.abs(gelu_tanh(x) - erf_form).max()
    assert 1e-5 < difference < 1e-3


def test_fast_gelu_within_float32_rounding():
    from refimpl_kernels.elementwise import gelu_erf_fast

    x = np.linspace(-12, 12, 20001).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    error = np.abs(gelu_erf_fast(x).astype(np.float64) - exact)
    assert np.all(error <= 1e-6 + 2e-7 * np.abs(exact))
