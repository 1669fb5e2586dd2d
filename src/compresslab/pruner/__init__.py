"""Pruners (`pruner=...`): score functions and mask selection."""
