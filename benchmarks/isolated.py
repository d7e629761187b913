"""Run one benchmark row in a fresh Python process.

PyTorch and Numba each load their own OpenMP runtime, and with PyTorch merely
imported, the worker threads of its runtime slowed refimpl's fast-mode prefill
from about 360 to 140 tokens/s on a 2-core machine. Running each row in its
own spawned process measures every backend as its users run it, alone.
"""

import multiprocessing


def run_isolated(function, *args):
    """Return ``function(*args)`` computed in a spawned child process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)
