"""The `rotation` group: orthogonal rotations of the dense model before the engine (QuaRot, SpinQuant)."""
