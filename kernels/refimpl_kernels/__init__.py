"""Numba kernels of refimpl, imported as ``refimpl_kernels``."""

import os
from contextlib import contextmanager

# Numba's OpenMP workers spin for a long time after each parallel region by
# default, which takes the cores from OpenBLAS's threads when fast mode
# alternates Numba kernels with BLAS calls. libgomp reads GOMP_SPINCOUNT when it
# loads, so it is set here, before the first parallel call. On a 2-core EPYC a
# short spin raised fast-mode training from 733 to 1,039 tokens/s and 64-token
# prefill from 135 to 405 tokens/s, and left reference decoding unchanged
# (benchmarks/bench_train.py and bench_decode.py). A value set by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numba  # noqa: E402  (after the environment setting above)

# Below this many multiply-adds or elements, a call runs on one thread: waking
# the thread pool costs tens of microseconds, and far more on a busy machine,
# which is more than a decode step's row norm or rotary embedding takes. The
# thread count never changes a result, because each output element is
# computed by one thread in a fixed order.
PARALLEL_MIN_WORK = 1 << 16


@contextmanager
def threads_for(work):
    """Run the enclosed kernel calls on one thread when ``work`` is small."""
    if work >= PARALLEL_MIN_WORK:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
