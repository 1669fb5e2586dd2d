"""Compress and write a packed checkpoint, without evaluating:

    python -m compresslab.save --out ckpt/sparsegpt24-w4 pruner=sparsegpt pruner.pattern=2:4 quantizer=gptq ...

The overrides are run.py's (same config groups). Equivalent to `python run.py ... save.path=<out> eval=null`.
Load the result with `compresslab.load_compressed(<out>)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compresslab.save", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--max-shard-size", default="2GB", help="split the safetensors files above this size")
    ap.add_argument("overrides", nargs="*", help="run.py overrides, e.g. quantizer=gptq quantizer.bits=4")
    args = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir

    from .cli import run_from_config

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    overrides = [*args.overrides, f"save.path={Path(args.out).resolve()}",
                 f"save.max_shard_size={args.max_shard_size}", "eval=null", "logger=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run_from_config(cfg, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
