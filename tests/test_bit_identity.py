"""Behaviour pinned bit for bit: kept indices, stats, logits and 20 greedy tokens of every method on both
LLaVA families, hashed and compared with the hashes recorded before the seams redesign (issue 13).

    python tests/test_bit_identity.py --record   # rewrite tests/data/bit_identity.json (only on purpose)

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

import torch

import transprune
from transprune import FastVConfig, PDropConfig, RandomConfig, TransPruneConfig, UniformConfig, VisionZipConfig
from transprune.testing import sample_inputs, tiny_model, tiny_processor

RECORD = Path(__file__).parent / "data" / "bit_identity.json"
DEPTH = dict(reference_depth=32)


def methods() -> dict:
    high = TransPruneConfig.preset("high", **DEPTH)
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
        "visionzip": VisionZipConfig(dominant=20, contextual=6),
        "visionzip+transprune": [VisionZipConfig(dominant=20, contextual=6),
                                 TransPruneConfig(keep_ratios=(0.5, 0.25, 0.125), **DEPTH)],
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
    batch = dict(sample_inputs(processor, n=3, seed=0, sizes=[(64, 64), (128, 64), (64, 128)]))
    single = {k: v[-1:] for k, v in batch.items()}  # the longest prompt: no padding (the aligned path)
    out = {}
    for name, config in methods().items():
        for label, inputs in (("batch", batch), ("single", single)):
            with transprune.pruned(model, config) as handle, torch.no_grad():
                logits = model(**inputs).logits
                stats = [s.to_dict() for s in handle.last_stats]
                tokens = model.generate(**inputs, max_new_tokens=20, do_sample=False)
                kept = [s.kept_indices for s in handle.last_stats]
            out[f"{name}/{label}"] = {"discrete": _digest(kept, tokens), "all": _digest(stats, logits, tokens)}
    return out


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


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    RECORD.write_text(json.dumps({"torch": torch.__version__, "llava": fingerprints("llava"),
                                  "llava_next": fingerprints("llava_next")}, indent=1) + "\n")
    print(RECORD)
