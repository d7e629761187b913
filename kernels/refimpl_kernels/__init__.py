"""Numba kernels of refimpl, imported as ``refimpl_kernels``."""
