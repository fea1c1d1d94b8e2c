"""The ``transprune_mini`` lmms-eval task: the mini testbed's held-out questions (`transprune eval --suite mini`'s,
in the same order), generated on the fly: the question list is written once to a local JSON file (no download)
and each image is rendered again from its index."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from transprune.mini import data
from transprune.mini.evaluate import questions

N_QUESTIONS = 500  # the test split `transprune eval --suite mini` reads by default; --limit takes the first k


def _write_questions() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transprune" / "lmms_eval"
    path = cache / f"mini_test_{N_QUESTIONS}.json"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        rows = [{"index": i, "question": s.question, "answer": s.answer, "qtype": s.qtype}
                for i, s in enumerate(questions(N_QUESTIONS))]
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(path)  # atomic: concurrent processes (accelerate launch) never read half a file
    return str(path)


DATA_FILES = {"test": _write_questions()}


@functools.lru_cache(maxsize=64)
def _image(index: int):
    return data.sample("test", index).image


def doc_to_visual(doc):
    return [_image(int(doc["index"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip().split()[0] if results and results[0].strip() else ""
    return {"accuracy": float(answer == doc["answer"])}
