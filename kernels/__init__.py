"""Triton kernels and their torch references (importable as ``compresslab.kernels``)."""
