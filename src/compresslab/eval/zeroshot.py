"""`eval=zeroshot`: zero-shot accuracy through lm-eval, on the in-memory model (no copy, no reload).

Offline (`source=local`, the default when $COMPRESSLAB_DATA_DIR is set) the tasks are the YAMLs in
`tasks/`: lm-eval's stock prompts and metrics over the local files. Online (`source=hub`) lm-eval's
stock tasks are used. Metrics: zeroshot/<task>/acc, zeroshot/<task>/acc_norm (where the stock task
defines it: not boolq, not winogrande), zeroshot/avg/acc.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..data.sources import DATA_ENV, data_dir
from ..errors import ConfigError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "tasks"
# task -> files it reads under $COMPRESSLAB_DATA_DIR
LOCAL_FILES = {
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "arc_easy": ["arc/ARC-Easy-Test.jsonl"],
    "arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
    "winogrande": ["winogrande/dev.jsonl"],
    "boolq": ["boolq/dev.jsonl"],
    "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"],
}
SOURCES = ("auto", "local", "hub")


class ZeroShot:
    """`tasks` (the SLiM seed's set), `limit` (docs per task, null = all), `num_fewshot` (0),
    `batch_size`, `source` (auto|local|hub), `dense_baseline`."""

    def __init__(self, tasks=tuple(LOCAL_FILES), limit: int | float | None = None, num_fewshot: int = 0,
                 batch_size: int = 8, source: str = "auto", dense_baseline: bool = False, seed: int = 0):
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not self.tasks:
            raise ConfigError("eval.tasks is empty; name at least one of " + ", ".join(LOCAL_FILES))
        if source not in SOURCES:
            raise ConfigError(f"eval.source={source!r}; use one of {', '.join(SOURCES)}")
        if num_fewshot < 0 or batch_size < 1 or (limit is not None and limit <= 0):
            raise ConfigError(f"eval.num_fewshot ({num_fewshot}) must be >= 0, eval.batch_size ({batch_size}) >= 1 "
                              f"and eval.limit ({limit}) > 0 or null")
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.source, self.dense_baseline, self.seed = source, dense_baseline, seed

    @property
    def local(self) -> bool:
        return self.source == "local" or (self.source == "auto" and data_dir() is not None)

    def task_manager(self):
        """lm-eval's TaskManager: only our offline YAMLs when local (indexing lm-eval's ~15,000 stock
        tasks takes ~17 s on 2 cores), the stock tasks otherwise. Built once."""
        if getattr(self, "_manager", None) is None:
            from lm_eval.tasks import TaskManager

            self._manager = (TaskManager(include_path=str(TASK_DIR), include_defaults=False) if self.local
                             else TaskManager())
        return self._manager

    def check(self) -> None:
        """Unknown tasks and missing local files fail before the model is loaded."""
        if not self.local:
            known = set(self.task_manager().all_tasks)
            unknown = [t for t in self.tasks if t not in known]
            if unknown:
                import difflib

                hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
                raise ConfigError(
                    f"unknown zero-shot task(s) {unknown}: lm-eval has no task of that name "
                    f"(close: {', '.join(f'{t} -> {h}' for t, h in hints.items() if h) or 'none'}). "
                    f"Offline tasks (with {DATA_ENV} set) are {', '.join(LOCAL_FILES)}")
            return
        root = data_dir()
        if root is None:
            raise ConfigError(f"eval.source=local needs {DATA_ENV} (make uses ../shared/data)")
        unknown = [t for t in self.tasks if t not in LOCAL_FILES]
        if unknown:
            raise ConfigError(f"unknown zero-shot task(s) {unknown}: the offline tasks are "
                              f"{', '.join(LOCAL_FILES)}; fix eval.tasks (or use eval.source=hub, with the hub, "
                              "for any lm-eval task)")
        for t in self.tasks:
            for rel in LOCAL_FILES[t]:
                if not (root / rel).is_file():
                    raise ConfigError(f"zero-shot task {t} needs {root / rel}; point {DATA_ENV} at the shared data "
                                      "folder or drop the task from eval.tasks")

    def task_names(self) -> list[str]:
        return [f"local_{t}" for t in self.tasks] if self.local else list(self.tasks)

    def __call__(self, model, tokenizer) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        self.check()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        manager = self.task_manager()
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=self.task_names(), num_fewshot=self.num_fewshot, limit=self.limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=0, random_seed=self.seed,
                              numpy_random_seed=self.seed, torch_random_seed=self.seed,
                              fewshot_random_seed=self.seed)
        out: dict[str, float] = {}
        for task, name in zip(self.tasks, self.task_names()):
            r = res["results"][name]
            for metric in ("acc", "acc_norm"):
                if f"{metric},none" in r:
                    out[f"zeroshot/{task}/{metric}"] = float(r[f"{metric},none"])
            log.info("zeroshot/%s: %s", task, {k.split("/")[-1]: round(v, 4) for k, v in out.items()
                                                if k.startswith(f"zeroshot/{task}/")})
        accs = [out[f"zeroshot/{t}/acc"] for t in self.tasks if f"zeroshot/{t}/acc" in out]
        if accs:
            out["zeroshot/avg/acc"] = sum(accs) / len(accs)
        out["time/zeroshot_s"] = time.perf_counter() - t0
        return out
