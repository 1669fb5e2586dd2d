"""Loaders for the offline zero-shot tasks: each reads one folder under $COMPRESSLAB_DATA_DIR (see its
SOURCE.md) into the fields lm-eval's stock task of the same name expects, so the stock prompts apply.

lm-eval imports this file by path (`!function local.<name>` in the YAMLs next to it) and calls
`loader(**metadata, **dataset_kwargs)`, hence the `**kwargs` catch-alls.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path


def _root(data_dir: str | None = None) -> Path:
    from compresslab.data.sources import DATA_ENV, data_dir as env_dir
    from compresslab.errors import ConfigError

    root = Path(data_dir) if data_dir else env_dir()
    if root is None:
        raise ConfigError(f"the local zero-shot tasks read {DATA_ENV}; set it (make uses ../shared/data) "
                          "or use eval.source=hub for lm-eval's stock tasks")
    return root


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split()


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ---- row readers (plain lists: what the tests compare) ----

def piqa_rows(root: Path) -> list[dict]:
    docs, labels = _jsonl(root / "piqa" / "valid.jsonl"), _lines(root / "piqa" / "valid-labels.lst")
    if len(docs) != len(labels):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def arc_rows(root: Path, subset: str) -> list[dict]:
    return [{"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]}}
            for d in _jsonl(root / "arc" / f"ARC-{subset}-Test.jsonl")]


def winogrande_rows(root: Path) -> list[dict]:
    return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")}
            for d in _jsonl(root / "winogrande" / "dev.jsonl")]


def boolq_rows(root: Path) -> list[dict]:
    # SuperGLUE's copy (what lm-eval reads) names the boolean answer `label` (1 = yes).
    return [{"question": d["question"], "passage": d["passage"], "label": int(bool(d["answer"]))}
            for d in _jsonl(root / "boolq" / "dev.jsonl")]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocessing; the local file already had its known tags removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_rows(root: Path) -> list[dict]:
    """The derived text form (6 lines per item: context, gold, 4 endings). Unlike lm-eval's input,
    the ctx_a/ctx_b boundary is lost, so ctx_b is not capitalized (see hellaswag/SOURCE.md)."""
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    return [{"query": _hellaswag_clean(lines[i]), "label": int(lines[i + 1]),
             "choices": [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]]} for i in range(0, len(lines), 6)]


# ---- lm-eval entry points (custom_dataset) ----

def piqa(data_dir=None, **kwargs):
    return _dataset("validation", piqa_rows(_root(data_dir)))


def arc_easy(data_dir=None, **kwargs):
    return _dataset("test", arc_rows(_root(data_dir), "Easy"))


def arc_challenge(data_dir=None, **kwargs):
    return _dataset("test", arc_rows(_root(data_dir), "Challenge"))


def winogrande(data_dir=None, **kwargs):
    return _dataset("validation", winogrande_rows(_root(data_dir)))


def boolq(data_dir=None, **kwargs):
    return _dataset("validation", boolq_rows(_root(data_dir)))


def hellaswag(data_dir=None, **kwargs):
    return _dataset("validation", hellaswag_rows(_root(data_dir)))


# ---- winogrande's partial scoring: the choices are the two contexts, the target the shared rest ----

def winogrande_context_index(doc) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + doc[f"option{i}"] for i in (1, 2)]


def winogrande_continuation(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()
