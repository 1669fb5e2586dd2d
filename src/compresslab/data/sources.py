"""Where text comes from. Offline, files under $COMPRESSLAB_DATA_DIR; online, `datasets.load_dataset`.

Both paths produce the same thing (a list of rows), so everything after loading is shared.

Local layout (see each folder's SOURCE.md)::

    $COMPRESSLAB_DATA_DIR/wikitext-2/wiki.valid.tokens   calibration
    $COMPRESSLAB_DATA_DIR/wikitext-2/wiki.test.raw       perplexity

Note: the local wiki.test.raw has no blank lines (2891 rows) where the hub's wikitext-2-raw-v1
test split has 4358 rows with empty ones, so the joined text differs in whitespace only.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

DATA_ENV = "COMPRESSLAB_DATA_DIR"
DATASETS = ("wikitext2", "c4", "text")

# (dataset, split) -> file under $COMPRESSLAB_DATA_DIR
LOCAL_FILES = {
    ("wikitext2", "calibration"): "wikitext-2/wiki.valid.tokens",
    ("wikitext2", "eval"): "wikitext-2/wiki.test.raw",
}


def data_dir() -> Path | None:
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value) if value else None


def check_dataset(dataset: str, path: str | None = None, split: str | None = None) -> None:
    """Fail early, before any model is loaded, on an unknown dataset or a missing local file."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if dataset == "text":
        if not path:
            raise ConfigError("data.dataset=text needs data.path=<a UTF-8 text file>")
        if not Path(path).is_file():
            raise ConfigError(f"data.path={path} does not exist; point it at a UTF-8 text file")
        return
    root = data_dir()
    if root is None:
        return  # online: checked when loading
    for (name, sp), rel in LOCAL_FILES.items():
        if name == dataset and split in (None, sp) and not (root / rel).is_file():
            raise ConfigError(
                f"{DATA_ENV}={root} but the expected file {root / rel} is missing. Point {DATA_ENV} at the "
                f"folder that holds {rel} (the repo's Makefile uses ../shared/data), or unset it to use the hub"
            )
    if dataset == "c4":
        raise ConfigError(
            f"c4 has no local copy under {DATA_ENV}={root}; unset {DATA_ENV} to read allenai/c4 from the hub, "
            "or use data.dataset=wikitext2 / data.dataset=text"
        )


def _read_local(rel: str) -> list[str]:
    root = data_dir()
    f = root / rel
    if not f.is_file():
        raise ConfigError(f"{DATA_ENV}={root} but the expected file {f} is missing")
    text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
    # One row per line with its newline, as the hub's wikitext rows are.
    return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]


def _hub(*args, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as e:  # no network, no hub
        raise ConfigError(
            f"could not load {args[0]} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, set "
            f"{DATA_ENV} to a folder with wikitext-2/wiki.valid.tokens and wiki.test.raw (make uses ../shared/data)"
        ) from e


def rows(dataset: str, split: str, path: str | None = None) -> list[str]:
    """Text rows of `dataset` for split 'calibration' or 'eval'."""
    check_dataset(dataset, path, split)
    if dataset == "text":
        return Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    if data_dir() is not None and (dataset, split) in LOCAL_FILES:
        return _read_local(LOCAL_FILES[(dataset, split)])
    if dataset == "wikitext2":
        hub_split = "train" if split == "calibration" else "test"
        return list(_hub("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])
    # c4: the GPTQ protocol's shards
    if split == "calibration":
        ds = _hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        ds = _hub("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                  split="validation")
    return list(ds["text"])


def joined_text(dataset: str, split: str, path: str | None = None) -> str:
    """The rows joined as in the GPTQ/SparseGPT protocol ("\\n\\n" for wikitext2, " " for c4)."""
    r = rows(dataset, split, path)
    if dataset == "c4":
        return " ".join(r[:1100] if split == "eval" else r)
    return "\n\n".join(r)
