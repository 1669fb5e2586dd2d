"""Pipeline: the object that conf/config.yaml composes. It owns the stages, the engine and the evaluators."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .api import compress, evaluate
from .engine import SequentialEngine
from .errors import ConfigError
from .metrics import current_rss_gb, environment, fault_in, peak_rss_gb, reset_peak_rss, write_json_atomic
from .stages import fuse_stages

log = logging.getLogger(__name__)

STAGES = ("pruner", "quantizer", "lowrank")


class Pipeline:
    def __init__(self, model, data=None, pruner=None, quantizer=None, lowrank=None, recovery=None,
                 eval=None, logger=None, engine: SequentialEngine | None = None, seed: int = 0,
                 save: dict | None = None, rotation=None, allocation=None):
        self.model_loader, self.data, self.rotation, self.allocation = model, data, rotation, allocation
        self.pruner, self.quantizer, self.lowrank, self.recovery = pruner, quantizer, lowrank, recovery
        self.evaluator, self.logger = eval, logger
        if self.allocation is None:  # a stage may bring its own (SVD-LLM V2's ratios); allocation=... replaces it
            from .allocation.base import stage_default

            self.allocation = stage_default(self.stages)
        self.engine = engine or SequentialEngine(device=str(getattr(model, "device", "auto")))
        self.seed = seed
        self.save = dict(save or {})
        if self.save.get("path"):  # a bad shard size fails now, not after compression
            from .checkpoint.io import parse_size

            parse_size(self.save.get("max_shard_size"))

    @property
    def stages(self):
        return [s for s in (self.pruner, self.quantizer, self.lowrank) if s is not None]

    @property
    def streamed(self) -> bool:
        """`model.offload=disk`: blocks read from the checkpoint one at a time (stream.py)."""
        return getattr(self.model_loader, "offload", None) == "disk"

    def _check_streamed(self) -> None:
        """What a streamed run cannot do fails before anything loads."""
        if self.stages and not self.save.get("path"):
            raise ConfigError("model.offload=disk writes each compressed block into the packed checkpoint and "
                              "frees it: set save.path=<dir>")
        if self.evaluator is not None and not getattr(self.evaluator, "streams", False):
            raise ConfigError(f"model.offload=disk evaluates block by block, which {type(self.evaluator).__name__} "
                              "cannot (it needs the whole model): use eval=ppl or eval=null, and evaluate the "
                              "packed checkpoint afterwards on a machine that holds it")
        if self.recovery is not None and not hasattr(self.recovery, "recover"):
            raise ConfigError(f"model.offload=disk keeps one block in memory, and {type(self.recovery).__name__} "
                              "trains the whole model at once: use a block-wise recovery (recovery=beam) "
                              "or model.offload=null")
        if self.rotation is not None:
            raise ConfigError("model.offload=disk streams the blocks from the checkpoint as they are, and a rotation "
                              "rewrites the whole model first: use rotation=null, or model.offload=null")
        fisher = [type(s).__name__ for s in self.stages if "fisher" in s.needs]
        if fisher:
            raise ConfigError(f"{', '.join(fisher)} needs the Fisher information, from gradients of the whole model, "
                              "which model.offload=disk (one block in memory) cannot give: use model.offload=null")
        if self.allocation is not None and self.allocation.needs_calibration:
            raise ConfigError("model.offload=disk runs one pass over the blocks, and an allocation measures them in a "
                              "pass of its own first: allocate in memory once (its allocation.yaml), then pass "
                              "allocation.path=<that file> here")

    @property
    def uses_calibration(self) -> bool:
        # engine.layer_error: Hessians for the per-layer error even of weight-only methods (magnitude, RTN)
        layer_error = bool(getattr(self.engine, "layer_error", False)) and any(s is not None for s in self.stages)
        rotation = self.rotation is not None and self.rotation.needs_calibration
        allocation = self.allocation is not None and self.allocation.needs_calibration
        return (any(s.needs for s in self.stages if s is not None) or self.recovery is not None or layer_error
                or rotation or allocation)

    def validate(self) -> None:
        """Catch bad input before any weights are loaded: data files, and every stage on every layer's shape."""
        if self.streamed:
            self._check_streamed()
        if self.uses_calibration:
            if self.data is None:
                raise ConfigError("these stages need calibration data; set data=calibration")
            self.data.check()
        if self.evaluator is not None and hasattr(self.evaluator, "check"):
            self.evaluator.check()
        self.engine.check_ranks(self.stages, self.recovery)  # several ranks: what can share the work
        if self.rotation is not None and self.engine.ranks.world > 1 and not self.rotation.data_parallel:
            raise ConfigError(f"{type(self.rotation).__name__} learns its rotation in one process: learn it once "
                              "without torchrun/srun (it is saved), then pass rotation.path=<that file> here")
        if self.allocation is not None:
            if not self.stages:
                raise ConfigError("allocation=... sets levels of the pruner or quantizer, and there is none: add one "
                                  "or set allocation=null")
            self.allocation.check(self.stages)
            if self.engine.ranks.world > 1 and self.allocation.needs_calibration:
                raise ConfigError("an allocation is measured in one process: allocate once without torchrun/srun (it "
                                  "writes allocation.yaml), then pass allocation.path=<that file> here")
        if not self.stages and self.rotation is None:
            return
        stages = fuse_stages(self.stages)  # a pair that cannot share one pass as configured fails here
        try:
            from .models.discover import meta_twin

            meta = meta_twin(self.model_loader.config())  # as the loader will build it (Conv1D as Linear)
        except ConfigError:
            raise
        except Exception as e:  # the engine checks again after loading
            log.warning("could not build %s on the meta device for early checks (%s)", self.model_loader, e)
            return
        if self.rotation is not None:
            self.rotation.check(meta)
        if not self.stages:
            return
        self.engine.check(meta, stages)
        if self.data is not None and self.uses_calibration:  # an explicit engine.max_memory too small fails now
            self.engine.check_plan(meta, self.data.nsamples, self.data.seqlen, stages, self.recovery,
                                   getattr(self.model_loader, "dtype", torch.float32))

    def _log_recovery(self, rows) -> None:
        """Per-block loss before/after and the training curves, to W&B (metrics.json has `recovery`)."""
        if self.logger is None:
            return
        for row in rows:
            if "loss_before" not in row:
                continue
            entry = {"recovery/block": row.get("block", -1), "recovery/loss_before": row["loss_before"],
                     "recovery/loss_after": row["loss_after"]}
            for epoch, loss in enumerate(row.get("curve", [])):
                entry[f"recovery/curve/epoch_{epoch}"] = loss
            self.logger.log(entry)

    def _log_curves(self) -> None:
        """A learned rotation's loss per step and a searched allocation's fitness per generation, to W&B."""
        if self.logger is None:
            return
        for group, obj in (("rotation", self.rotation), ("allocation", self.allocation)):
            for step, value in enumerate(getattr(obj, "curve", None) or []):
                self.logger.log({f"{group}/step": step, f"{group}/curve": value})

    def run(self, output_dir: str | Path | None = None, config: dict | None = None,
            meta: dict | None = None) -> dict[str, Any]:
        """Validate, load, (dense eval), compress, eval; write metrics.json (atomically, also on failure).
        `meta` (e.g. method, config_hash) is copied into the record as is."""
        metrics: dict[str, Any] = {}
        record: dict[str, Any] = {"status": "failed", "error": None, **(meta or {}), "config": config,
                                  "metrics": metrics}
        t_start = time.perf_counter()
        ranks = self.engine.ranks  # several ranks (torchrun, srun): joined now, before anything loads
        if not ranks.is_main:  # only rank 0 writes, logs and evaluates (distributed.py)
            output_dir, self.logger, self.evaluator = None, None, None
            self.save = {**self.save, "path": None}
        try:
            if self.streamed and ranks.world > 1:
                raise ConfigError("model.offload=disk streams one model in one process: run it without torchrun/srun "
                                  "tasks, or load the model in memory (model.offload=null) on several ranks")
            if self.logger is not None:
                self.logger.start(config or {}, str(output_dir) if output_dir else None)
            torch.manual_seed(self.seed)
            self.validate()
            source = writer = None
            if self.streamed:
                from .stream import StreamedModel

                model, tok, source = self.model_loader.load_streamed()
                eval_model = StreamedModel(model, source, self.engine)
            else:
                model, tok = self.model_loader.load()
                eval_model = model
                fault_in(model)  # resident now, not page by page during compression (see memory/rss_after_load_gb)
            metrics["time/load_s"] = time.perf_counter() - t_start
            metrics["memory/rss_after_load_gb"] = current_rss_gb()
            evals = [self.evaluator] if self.evaluator is not None else []
            if evals and getattr(self.evaluator, "dense_baseline", False):
                t0 = time.perf_counter()
                metrics.update(evaluate(eval_model, tok, evals, prefix="dense/"))
                metrics["time/dense_eval_s"] = time.perf_counter() - t0
            calib = self.data(tok) if self.uses_calibration else None
            if self.rotation is not None:  # exact: the rotated dense model computes the same logits
                metrics.update(self.rotation.apply(model, calib, output_dir))
            self.engine.levels = {}  # (an engine used before keeps no earlier run's levels; compress() sets them)
            sink = None
            if source is not None:  # streamed: each final block is summarised (and written) before it is freed
                from .checkpoint.io import CheckpointWriter
                from .models.adapters import adapter_for
                from .stream import BlockSink

                if self.stages:
                    writer = CheckpointWriter(self.save["path"], adapter_for(model), self.save.get("max_shard_size"))
                sink = BlockSink(writer, adapter_for(model))
            reset_peak_rss()  # memory/compress_peak_rss_gb: the compression's own peak, not loading's
            report = compress(model, tok, pruner=self.pruner, quantizer=self.quantizer, lowrank=self.lowrank,
                              recovery=self.recovery, calibration=calib, allocation=self.allocation,
                              allocation_dir=output_dir, engine=self.engine, source=source, sink=sink)
            metrics.update(report.metrics)
            self._log_curves()
            record["layers"], record["recovery"] = report.layers, report.recovery
            for row in report.layers:  # what the allocation gave each layer
                for k, v in (self.engine.levels.get(row.get("name")) or {}).items():
                    row[f"allocated_{k}"] = v
            if report.experts:
                record["experts"] = report.experts
            self._log_recovery(report.recovery)
            if self.save.get("path") and (writer is not None or source is None):  # before eval: a failing eval loses nothing
                from .checkpoint import save_compressed

                t0 = time.perf_counter()
                if writer is not None:  # streamed: the blocks are written; the rest and the manifest now
                    manifest = writer.finish(model, tok, extra={"metrics": dict(metrics)})
                    from .stream import reread_outside

                    reread_outside(model, source)  # the writer paged in the whole embedding and head
                else:
                    manifest = save_compressed(model, self.save["path"], tok, self.save.get("max_shard_size"),
                                               extra={"metrics": dict(metrics)})
                metrics["save/bytes"] = float(sum(f["bytes"] for f in manifest["files"].values()))
                metrics["save/compressed_bytes"] = manifest["compressed"]["bytes"]
                metrics["time/save_s"] = time.perf_counter() - t0
                record["checkpoint"] = str(self.save["path"])
            if source is not None:
                metrics["stream/max_live_blocks"] = float(source.max_live)
                if writer is not None:  # the compressed blocks: dense shards + the checkpoint's packed Linears
                    from .stream import PackedBlocks, StreamedModel

                    eval_model = StreamedModel(model, PackedBlocks(model, source.tensors, self.save["path"]),
                                               self.engine)
            if self.logger is not None and report.layers:
                self.logger.table("layers", report.layers)
                if report.experts:
                    self.logger.table("experts", report.experts)
            if evals:
                t0 = time.perf_counter()
                metrics.update(evaluate(eval_model, tok, evals))
                metrics["time/eval_s"] = time.perf_counter() - t0
            record["status"] = "ok"
            return record
        except BaseException as e:
            record["error"] = f"{type(e).__name__}: {e}"
            ranks.fail(record["error"])  # first: this rank's error where rank 0 finds it (SIGTERM ignored from here)
            record["traceback"] = traceback.format_exc()
            peer = ranks.peer_error()  # another rank failed first: its error is the cause
            if peer is not None:
                record["error"] = f"{peer} (on rank {ranks.rank}: {record['error']})"
            raise
        finally:
            metrics["memory/peak_rss_gb"] = peak_rss_gb()
            metrics["time/total_s"] = time.perf_counter() - t_start
            record["env"] = environment()
            if output_dir is not None:
                write_json_atomic(Path(output_dir) / "metrics.json", record)
            if self.logger is not None:
                self.logger.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                self.logger.finish(ok=record["status"] == "ok")
