"""QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"):
randomised Hadamard rotations of the residual stream (R1) and of each block's attention values (R2),
and an online Hadamard on down_proj's input (R4). See rotation/base.py for where each acts."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import adapter_for
from .base import Rotation, _head_dim, layout
from .hadamard import Orthogonal, base_order, random_hadamard, random_orthogonal


class QuaRot(Rotation):
    """Args:
        seed: the random signs (and the random orthogonal fallback for widths with no known Hadamard).
        randomize: random signs before each Hadamard (QuaRot's randomised Hadamard); false: plain H/√n.
        online_down: R4, an online Hadamard on each down_proj's input (folded into its weight).
    """

    def __init__(self, seed: int = 0, randomize: bool = True, online_down: bool = True):
        super().__init__(seed, online_down)
        if not isinstance(randomize, bool):
            raise ConfigError(f"rotation.randomize must be true or false, got {randomize!r}")
        self.randomize = randomize

    def _matrix(self, n: int, gen: torch.Generator) -> Orthogonal:
        if self.randomize:
            return random_hadamard(n, gen)
        return Orthogonal(n=n) if base_order(n) is not None else Orthogonal(random_orthogonal(n, gen))

    def matrices(self, model: nn.Module, calibration=None, output_dir=None) -> tuple[Orthogonal, list[Orthogonal]]:
        """(R1 (hidden, hidden), [R2 (head_dim, head_dim) per block]), orthogonal."""
        gen = torch.Generator().manual_seed(self.seed)
        lay = layout(model)
        hidden = model.get_submodule(lay.embed).weight.shape[1]
        R1 = self._matrix(hidden, gen)
        d = _head_dim(model)
        R2 = [self._matrix(d, gen) for _ in adapter_for(model).block_list(model)]
        return R1, R2
