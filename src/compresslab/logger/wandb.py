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
            run_dir = os.path.dirname(self.run.dir)  # .../wandb/offline-run-*/files -> the run folder
            log.info("W&B offline run in %s (upload later with `wandb sync %s`)", run_dir, run_dir)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, name: str, rows: list[dict]) -> None:
        """Rows of dicts (e.g. the per-layer error/sparsity table) as one wandb.Table."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[r.get(c) if isinstance(r.get(c), (int, float, str, bool)) or r.get(c) is None else str(r.get(c))
                 for c in columns] for r in rows]
        self.run.log({name: wandb.Table(columns=columns, data=data)})

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def _log_records(path: str):
    """Raw records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style log blocks."""
    import struct

    block, header = 32768, 7
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, pending = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: str) -> dict:
    """{'config', 'summary', 'run': {group, job_type}, 'history': [rows]} of an offline run folder
    (wandb/offline-run-*), read without syncing."""
    import glob
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    logs = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    out: dict = {"config": {}, "summary": {}, "run": {}, "history": []}
    for raw in _log_records(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in rec.history.item})
        elif kind == "run":
            out["run"] = {"group": rec.run.run_group, "job_type": rec.run.job_type}
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
    return out
