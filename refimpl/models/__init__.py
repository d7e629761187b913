"""Model architectures built on the weight store and the kernels."""
