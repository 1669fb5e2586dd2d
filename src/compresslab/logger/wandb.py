"""`logger=wandb`: one W&B run per job, offline unless told otherwise; never needs an account."""

from __future__ import annotations

import logging
import os

from ..errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class WandbLogger:
    """`mode` (offline|online|disabled), `project`, `group`, `name`, `job_type`, `tags`."""

    def __init__(self, mode: str = "offline", project: str = "compresslab", group: str | None = None,
                 name: str | None = None, job_type: str | None = None, tags: list[str] | None = None):
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r}; use one of {', '.join(MODES)}")
        self.mode, self.project, self.group, self.name = mode, project, group, name
        self.job_type, self.tags = job_type, list(tags or [])
        self.run = None

    def start(self, config: dict, output_dir: str | None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(mode=self.mode, project=self.project, group=self.group, name=self.name,
                              job_type=self.job_type, tags=self.tags, config=config, dir=output_dir,
                              reinit="finish_previous")
        if self.mode == "offline":
            log.info("W&B offline run in %s (upload later with `wandb sync %s`)", self.run.dir, self.run.dir)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
