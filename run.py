"""compresslab entry point: `python run.py pruner=sparsegpt quantizer=gptq ...` (see README)."""

import os
import sys
from pathlib import Path

# Set before torch allocates: PyTorch's CPU allocator then puts tensors of 2 MB and more on
# transparent huge pages (madvise), which removes most page faults of the engine's one-pass block
# activations (SmolLM2 at 128x512: 8.4 -> 6.8 s per block forward; experiments/results/compress_speed.md).
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from compresslab.cli import run_from_config

    hc = HydraConfig.get()
    sweep = str(hc.sweep.dir).removeprefix("multirun/") if hc.mode == RunMode.MULTIRUN else None
    code = run_from_config(cfg, hc.runtime.output_dir, choices=dict(hc.runtime.choices), sweep=sweep)
    # In a sweep, one failed job must not stop the others: its metrics.json says "failed".
    if code and hc.mode != RunMode.MULTIRUN:
        sys.exit(code)


if __name__ == "__main__":
    from compresslab.cli import rank_overrides, register_hydra_plugins, sweep_overrides

    register_hydra_plugins(Path(__file__).parent)  # hydra/launcher=slurm, +experiment=<name> presets
    sys.argv[1:] = sweep_overrides(sys.argv[1:])  # `-m pruner=a,b pruner.pattern=2:4` (see its docstring)
    sys.argv += rank_overrides()  # torchrun / srun: ranks other than 0 write nothing here
    main()
