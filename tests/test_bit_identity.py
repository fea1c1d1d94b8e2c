"""Behaviour pinned against a record: kept indices, stats, logits and 20 greedy tokens of every method.

Discrete results (kept indices, stats, generated tokens) must match exactly, on any machine: they are hashed.
Floating results (the prefill's logits) differ in their last bits between CPU kernel paths (AVX2, AVX-512, the
portable ones), thread counts and torch builds, so they are stored as values and compared with a tolerance:
each sample's logits, projected on ``N_PROJECTIONS`` fixed random directions (all its positions together, and
its last position alone: the row generation starts from), normalised so a projection is of the order of one
logit. Kernel noise moves a projection by about 1e-6; a real change (another kept token, another position, a
changed weight) moves it by 1e-2 and more (`test_the_tolerance_catches_a_real_change` shows it).

History: the discrete hashes of the two LLaVA families were recorded before the seams redesign (issue 13), the
Qwen families' when they were complete (issue 14), LLaVA-OneVision, SmolVLM, InternVL and Gemma 3 with the newer
methods (DART, V2Drop, DivPrune, CDPruner) when those were complete (issues 17, 18). A family recorded before a
method existed has no entry for it; a recorded hash is never rewritten. The logit values replaced hashes of the
logits' bits (issue 30), recorded where every discrete hash still matched; the record names the torch build and
CPU capability they were written with.

    python tests/test_bit_identity.py --record   # add what the file lacks (never rewrites an entry)
    python tests/test_bit_identity.py --record --rewrite llava_onevision:divprune/batch   # a change meant

Stats fields added after a family was recorded (`NEWER_FIELDS`) are left out of its hashes. Presets pass
``reference_depth=32`` explicitly: the layer numbers then map to the tiny 8-layer decoder as the presets did
before layer numbers became absolute.
"""

from __future__ import annotations

import hashlib
import json
import re
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
# Entries whose kept tokens are decided by rounding on the tiny models, so the CPU's kernels change them: CDPruner
# asked for 100 of a sample's 200 tokens in a 64-wide embedding space picks its last tokens before the kernel's rank
# runs out from residuals near zero, which any rounding difference reorders. Their discrete hashes are compared
# only on the torch build and CPU capability the record names, and left out elsewhere (their logits follow the choice).
CPU_DEPENDENT = {"llava_onevision": {"cdpruner+transprune/batch"}}


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


N_PROJECTIONS = 8
ATOL = 1e-4  # on projections of the order of one logit; kernel noise is ~1e-6, a real change >= 1e-2


def _directions(n: int, salt: int) -> torch.Tensor:
    """(n, N_PROJECTIONS) fixed random unit-variance directions over n values, the same on every machine."""
    generator = torch.Generator().manual_seed(1000003 * n + salt)
    return torch.randn(n, N_PROJECTIONS, generator=generator, dtype=torch.float64)


def logit_values(logits: torch.Tensor) -> list[list[float]]:
    """Per sample: the projections of all its logits, then of its last position's (float64, ~one logit each)."""
    rows = []
    for sample in logits.detach().double().cpu():
        whole, last = sample.flatten(), sample[-1]
        projected = torch.cat([whole @ _directions(whole.numel(), 0) / whole.numel() ** 0.5,
                               last @ _directions(last.numel(), 1) / last.numel() ** 0.5])
        rows.append([round(float(v), 7) for v in projected])
    return rows


def fingerprints(kind: str, model=None, names=None) -> dict:
    """Per method and input ("batch": 3 padded prompts, "single": the first alone): the hash of the discrete
    results (kept indices + tokens), the hash of the stats, and the logits' projections. ``model``: another
    model to fingerprint on the same inputs (default: the tiny model); ``names``: only those methods."""
    torch.manual_seed(0)
    model, processor = model if model is not None else tiny_model(kind, seed=0), tiny_processor(kind)
    make = qwen_sample_inputs if kind in QWEN_KINDS else sample_inputs
    sizes = None if kind == "gemma3" else [(64, 64), (128, 64), (64, 128)]  # Gemma 3 resizes every image
    batch = dict(make(processor, n=3, seed=0, sizes=sizes))
    newer = NEWER_FIELDS.get(kind, set())
    single = _last_sample(batch)  # the longest prompt: no padding (the aligned path)
    out = {}
    recorded = json.loads(RECORD.read_text()).get(kind) if RECORD.exists() else None
    for name, config in methods(kind).items():
        if (recorded is not None and f"{name}/batch" not in recorded) or (names is not None and name not in names):
            continue  # a method newer than this family's record
        for label, inputs in (("batch", batch), ("single", single)):
            with transprune.pruned(model, config) as handle, torch.no_grad():
                logits = model(**inputs).logits
                stats = [{k: v for k, v in s.to_dict().items() if k not in newer} for s in handle.last_stats]
                tokens = model.generate(**inputs, max_new_tokens=20, do_sample=False)
                kept = [s.kept_indices for s in handle.last_stats]
            out[f"{name}/{label}"] = {"discrete": _digest(kept, tokens), "stats": _digest(stats),
                                      "logits": logit_values(logits)}
    return out


def mismatches(now: dict, recorded: dict, exact_only: set = frozenset()) -> list[str]:
    """What differs between two fingerprints of a family: hashes exactly, logit projections beyond ``ATOL``;
    ``exact_only``: entries left out (`CPU_DEPENDENT` on another machine than the record's)."""
    wrong = [f"{key}: no longer produced" for key in recorded if key not in now]
    wrong += [f"{key}: new, not in the record" for key in now if key not in recorded]
    for key in sorted(set(now) & set(recorded) - set(exact_only)):
        got, want = now[key], recorded[key]
        wrong += [f"{key}: {field} {got[field]} != recorded {want[field]}" for field in ("discrete", "stats")
                  if got[field] != want[field]]
        deviation = (torch.tensor(got["logits"], dtype=torch.float64)
                     - torch.tensor(want["logits"], dtype=torch.float64)).abs().max().item()
        if deviation > ATOL:
            wrong.append(f"{key}: logits moved by {deviation:.3g} (tolerance {ATOL:g})")
    return wrong


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
    record = json.loads(RECORD.read_text())
    same_machine = (record["torch"], record["cpu_capability"]) == (torch.__version__,
                                                                   torch.backends.cpu.get_cpu_capability())
    wrong = mismatches(fingerprints(kind), record[kind], set() if same_machine else CPU_DEPENDENT.get(kind, set()))
    assert not wrong, (f"{kind} differs from the record (written with torch {record['torch']} on a "
                       f"{record['cpu_capability']} CPU):\n" + "\n".join(wrong))


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


def test_the_tolerance_catches_a_real_change():
    """A change far smaller than a refactor's bug (one layer's MLP output 0.1% larger) moves the logits beyond the
    tolerance, and the same model fingerprinted again does not."""
    names = {"transprune-high", "visionzip"}
    record = {k: v for k, v in json.loads(RECORD.read_text())["llava"].items() if k.split("/")[0] in names}
    model = tiny_model("llava", seed=0)
    assert not mismatches(fingerprints("llava", model, names), record)
    with torch.no_grad():
        model.model.language_model.layers[5].mlp.down_proj.weight.mul_(1.001)
    wrong = mismatches(fingerprints("llava", model, names), record)
    assert len([w for w in wrong if "logits moved" in w]) == len(record), wrong


def _record(rewrite: set[str]) -> None:
    """Add the families the file lacks; add stats hashes and logit values to entries that lack them (the
    format before issue 30), only where the entry's discrete hash still matches. Never rewrites a value, but the
    entries named in ``rewrite`` ("family:method/input"), for a change of behaviour meant and said in the commit
    (issue 30: DivPrune / CDPruner ties on OneVision; issue 24: DART's official pivot order)."""
    torch.set_num_threads(1)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    capability = torch.backends.cpu.get_cpu_capability()
    written = (record.get("torch"), record.get("cpu_capability"))
    has_values = any("logits" in e for k in KINDS for e in record.get(k, {}).values())
    if has_values and written != (torch.__version__, capability):
        sys.exit(f"{RECORD}'s values were written with torch {written[0]} on a {written[1]} CPU; add to it there")
    for kind in KINDS:
        entries = record.get(kind)
        named = any(name.startswith(f"{kind}:") for name in rewrite)
        if entries is not None and all("logits" in e for e in entries.values()) and not named:
            continue
        now = fingerprints(kind)
        if entries is None:
            record[kind] = now
        else:
            for key, entry in entries.items():
                if "logits" in entry and f"{kind}:{key}" not in rewrite:
                    continue  # already in this format: never rewritten unless named
                if now[key]["discrete"] != entry["discrete"] and f"{kind}:{key}" not in rewrite:
                    sys.exit(f"{kind} {key}: the discrete results changed since they were recorded; fix that first "
                             f"(or, for a change meant, name it: --rewrite {kind}:{key})")
                entries[key] = {"discrete": now[key]["discrete"], "stats": now[key]["stats"],
                                "logits": now[key]["logits"]}
        record.update(torch=torch.__version__, cpu_capability=capability)
        print("recorded", kind)
    text = json.dumps(record, indent=1)
    text = re.sub(r"\[[-0-9.e,\s]+\]", lambda m: re.sub(r"\s+", "", m.group()).replace(",", ", "), text)  # one row a line
    RECORD.write_text(text + "\n")
    print(RECORD)


if __name__ == "__main__" and "--record" in sys.argv:
    _record(set(sys.argv[sys.argv.index("--rewrite") + 1:]) if "--rewrite" in sys.argv else set())
