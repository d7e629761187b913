"""Numba kernels of refimpl, imported as ``refimpl_kernels``."""

from contextlib import contextmanager

import numba

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
