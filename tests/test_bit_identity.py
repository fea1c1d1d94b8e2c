"""Behaviour pinned bit for bit: kept indices, stats, logits and 20 greedy tokens of every method, hashed and
compared with recorded hashes: the two LLaVA families' were recorded before the seams redesign (issue 13),
the Qwen families' when they were complete (issue 14), LLaVA-OneVision, SmolVLM, InternVL and Gemma 3 with the
newer methods (DART, V2Drop, DivPrune, CDPruner) when those were complete (issues 17, 18). A family recorded
before a method existed has no hash of it (the record is never rewritten).

    python tests/test_bit_identity.py --record   # add the families the file lacks (never rewrites one)

Stats fields added after a family was recorded (`NEWER_FIELDS`) are left out of its hashes.

Presets pass ``reference_depth=32`` explicitly: the layer numbers then map to the tiny 8-layer decoder as the
presets did before layer numbers became absolute. Hashes of floats depend on the torch build and the CPU's
kernels, so the recorded file names the torch version; on another version only the discrete parts (kept
indices, generated tokens) are compared.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import transprune
from transprune import (CDPrunerConfig, DARTConfig, DivPruneConfig, FastVConfig, PDropConfig, RandomConfig,
                        TransPruneConfig, UniformConfig, V2DropConfig, VisionZipConfig)
from transprune.testing import IMAGE_ID, QWEN_KINDS, qwen_sample_inputs, sample_inputs, tiny_model, tiny_processor

RECORD = Path(__file__).parent / "data" / "bit_identity.json"
DEPTH = dict(reference_depth=32)
KINDS = ("llava", "llava_next") + QWEN_KINDS + ("llava_onevision", "smolvlm", "internvl", "gemma3")
SMALL_TILES = ("smolvlm", "internvl", "gemma3")  # 16 visual tokens per crop / tile / image: VisionZip keeps 6 + 2
NEWER_FIELDS = {"llava": {"positions"}, "llava_next": {"positions"}}


def methods(kind: str = "llava") -> dict:
    high = TransPruneConfig.preset("high", **DEPTH)
    zip_ = VisionZipConfig(dominant=6, contextual=2) if kind in SMALL_TILES else VisionZipConfig(dominant=20, contextual=6)
    return {
        "transprune-high": high,
        "transprune-low": TransPruneConfig.preset("low", **DEPTH),
        "transprune-off": TransPruneConfig.preset("off", **DEPTH),
        "ttv": replace(high, score="ttv"),
        "iga": replace(high, score="iga"),
        "abs-cos": replace(high, direction="1-abs-cos"),
        "original-positions": replace(high, positions="original"),
        "fastv": FastVConfig(**DEPTH),
        "pdrop": PDropConfig(**DEPTH),
        "random": RandomConfig(**DEPTH),
        "uniform": UniformConfig(**DEPTH),
        "visionzip": zip_,
        "visionzip+transprune": [zip_, TransPruneConfig(keep_ratios=(0.5, 0.25, 0.125), **DEPTH)],
        "dart": DARTConfig(keep_ratios=(0.3,)),
        "v2drop": V2DropConfig(**DEPTH),
        "divprune": DivPruneConfig(0.25),
        "cdpruner": CDPrunerConfig(0.25),
        "cdpruner+transprune": [CDPrunerConfig(0.5), TransPruneConfig(keep_ratios=(0.5, 0.25, 0.125), **DEPTH)],
    }


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().contiguous().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:24]


def fingerprints(kind: str) -> dict:
    """Per method and input ("batch": 3 padded prompts, "single": the first alone): hashes of the discrete
    results (kept indices + tokens) and of everything (stats, logits, tokens)."""
    torch.manual_seed(0)
    model, processor = tiny_model(kind, seed=0), tiny_processor(kind)
    make = qwen_sample_inputs if kind in QWEN_KINDS else sample_inputs
    sizes = None if kind == "gemma3" else [(64, 64), (128, 64), (64, 128)]  # Gemma 3 resizes every image
    batch = dict(make(processor, n=3, seed=0, sizes=sizes))
    newer = NEWER_FIELDS.get(kind, set())
    single = _last_sample(batch)  # the longest prompt: no padding (the aligned path)
    out = {}
    recorded = json.loads(RECORD.read_text()).get(kind) if RECORD.exists() else None
    for name, config in methods(kind).items():
        if recorded is not None and f"{name}/batch" not in recorded:
            continue  # a method newer than this family's record
        for label, inputs in (("batch", batch), ("single", single)):
            with transprune.pruned(model, config) as handle, torch.no_grad():
                logits = model(**inputs).logits
                stats = [{k: v for k, v in s.to_dict().items() if k not in newer} for s in handle.last_stats]
                tokens = model.generate(**inputs, max_new_tokens=20, do_sample=False)
                kept = [s.kept_indices for s in handle.last_stats]
            out[f"{name}/{label}"] = {"discrete": _digest(kept, tokens), "all": _digest(stats, logits, tokens)}
    return out


def _last_sample(batch: dict) -> dict:
    """The batch's last sample alone (Qwen's pixel rows are those of its image, per `image_grid_thw`; InternVL's
    tiles are stacked for the whole batch, 16 visual tokens each)."""
    if "image_grid_thw" not in batch:
        sample = {k: v[-1:] for k, v in batch.items()}
        if batch["pixel_values"].shape[0] != batch["input_ids"].shape[0]:  # InternVL: every sample's tiles in one stack
            tiles = int((sample["input_ids"] == IMAGE_ID).sum()) // 16
            sample["pixel_values"] = batch["pixel_values"][-tiles:]
        return sample
    rows = int(batch["image_grid_thw"][-1].prod())
    out = {k: v[-1:] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    return {**out, "pixel_values": batch["pixel_values"][-rows:], "image_grid_thw": batch["image_grid_thw"][-1:]}


def _check(kind: str):
    recorded = json.loads(RECORD.read_text())
    now = fingerprints(kind)
    same_build = recorded["torch"] == torch.__version__
    for key, want in recorded[kind].items():
        assert now[key]["discrete"] == want["discrete"], key
        if same_build:
            assert now[key]["all"] == want["all"], key
    assert set(now) == set(recorded[kind])


def test_llava_bit_identical_to_the_record():
    _check("llava")


def test_llava_next_bit_identical_to_the_record():
    _check("llava_next")


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_qwen_bit_identical_to_the_record(kind):
    _check(kind)


@pytest.mark.parametrize("kind", ["llava_onevision", "smolvlm", "internvl", "gemma3"])
def test_newer_families_bit_identical_to_the_record(kind):
    _check(kind)


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"torch": torch.__version__}
    if record["torch"] != torch.__version__:
        sys.exit(f"{RECORD} was recorded on torch {record['torch']}; add families with that build")
    for kind in KINDS:
        if kind not in record:
            record[kind] = fingerprints(kind)
            print("recorded", kind)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(RECORD)
