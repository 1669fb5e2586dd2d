"""The `allocation` group: per-layer sparsity or bits under one global budget (OWL, dynamic programming)."""
