"""compresslab entry point: `python run.py pruner=sparsegpt quantizer=gptq ...` (see README)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from compresslab.cli import run_from_config

    hc = HydraConfig.get()
    code = run_from_config(cfg, hc.runtime.output_dir)
    # In a sweep, one failed job must not stop the others: its metrics.json says "failed".
    if code and hc.mode != RunMode.MULTIRUN:
        sys.exit(code)


if __name__ == "__main__":
    main()
