"""compresslab: one-shot compression of Hugging Face causal LMs, and what it cost.

The public API is loaded lazily, so ``import compresslab`` does no work::

    from compresslab import compress, evaluate
    from compresslab.pruner.magnitude import Magnitude
    from compresslab.quantizer.rtn import RTN
"""

__version__ = "0.1.0"

_LAZY = {
    "compress": "compresslab.api",
    "evaluate": "compresslab.api",
    "recover": "compresslab.api",
    "Pipeline": "compresslab.pipeline",
    "SequentialEngine": "compresslab.engine",
    "save_compressed": "compresslab.checkpoint",
    "load_compressed": "compresslab.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compresslab' has no attribute {name!r}")


__all__ = sorted(_LAZY)
