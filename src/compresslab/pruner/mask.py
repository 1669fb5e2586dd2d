"""Apply learned masks from a safetensors file (e.g. MaskLLM's) and verify their pattern."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .base import Pruner
from .masks import nm_valid

SUFFIXES = ("", ".mask", ".weight_mask", ".weight")


class MaskFile(Pruner):
    """`pruner=mask`: `path` to a safetensors file with one boolean/0-1 tensor per Linear, keyed by
    the Linear's name (e.g. `model.layers.0.mlp.down_proj`, optionally with `.mask`,
    `.weight_mask` or `.weight` after it). `pattern` is verified on every mask; with
    `pattern=unstructured`, `sparsity` (null = any) is checked to within 1%."""

    def check_level(self, key: str, value) -> None:
        if key == "sparsity":
            raise ConfigError("pruner=mask reads its masks from a file: their sparsity cannot be allocated per layer")

    def __init__(self, path: str | None = None, pattern: str = "2:4", sparsity: float | None = None):
        if not path:
            raise ConfigError("pruner=mask needs pruner.path=<masks.safetensors>")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"pruner.path={self.path} does not exist; point it at a safetensors file of masks")
        super().__init__(sparsity if sparsity is not None else (0.0 if pattern == "unstructured" else None), pattern)
        self.check_sparsity = sparsity is not None
        self._keys: set[str] | None = None

    def _key(self, name: str) -> str:
        from safetensors import safe_open

        if self._keys is None:
            with safe_open(str(self.path), "pt") as f:
                self._keys = set(f.keys())
        for suffix in SUFFIXES:
            if name + suffix in self._keys:
                return name + suffix
        raise ConfigError(f"{self.path} has no mask for {name} (tried suffixes {SUFFIXES}); "
                          f"its keys start with {sorted(self._keys)[:3]}")

    def check(self, name, layer):
        super().check(name, layer)
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            shape = tuple(f.get_slice(self._key(name)).get_shape())
        if shape != tuple(layer.weight.shape):
            raise ConfigError(f"mask for {name} has shape {shape}, the weight has {tuple(layer.weight.shape)}")

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            keep = f.get_tensor(self._key(name)) != 0
        if self.nm is not None and not nm_valid(keep, self.nm):
            raise ConfigError(f"the mask for {name} in {self.path} is not {self.pattern}")
        if self.nm is None and self.check_sparsity:
            got = 1 - keep.float().mean().item()
            if abs(got - self.sparsity) > 0.01:
                raise ConfigError(f"the mask for {name} has sparsity {got:.3f}, expected {self.sparsity}")
        return keep

    def prune(self, name, W, stats=None, numerics=None):
        keep = self.load(name).to(W.device)
        return W * keep, keep
