"""Packed checkpoints: `save_compressed(model, dir)` and `load_compressed(dir)` (see io.py, layer.py)."""

from .io import CheckpointError, load_compressed, read_manifest, save_compressed

__all__ = ["CheckpointError", "load_compressed", "read_manifest", "save_compressed"]
