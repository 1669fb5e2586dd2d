"""Low-rank compensation of the compression error E = W − C(W): y = C(W)x + B(Ax)."""
