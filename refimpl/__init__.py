"""refimpl: a small, exact, readable transformer engine on NumPy and Numba."""

__version__ = "0.1.0"
