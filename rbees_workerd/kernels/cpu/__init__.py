"""Numba CPU kernels (quant.py, ops.py) and the CpuBackend built on them (backend.py)."""
