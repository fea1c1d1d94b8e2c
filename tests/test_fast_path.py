"""The fast paths (issue 5) give exactly the results of the general code they short-cut."""

import pytest
import torch

import transprune
from transprune import FastVConfig, PDropConfig, RandomConfig
from transprune.runtime import select as select_module
from transprune.surgery import keep_index

from conftest import make_prompt, pixels, tiny_config

METHODS = {
    "transprune": tiny_config(),
    "iga": tiny_config(score="iga"),
    "fastv": FastVConfig(k=2, reference_depth=None),
    "pdrop": PDropConfig(layers=(2, 4, 6), reference_depth=None),
    "random": RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25), reference_depth=None),
}


def aligned_batch(model, n=3):
    """Same-length prompts (different text and images): no padding, image tokens in the same columns."""
    ids = torch.stack([make_prompt(model, 4, 7, seed=s) for s in range(n)])
    return ids, torch.ones_like(ids), pixels(model, n, seed=11)


def run(model, config, ids, mask, pix, n=6, batched=True, adapt=None):
    with transprune.pruned(model, config, record_scores=True) as handle, torch.no_grad():
        handle.batched_selection = batched
        if adapt is not None:
            adapt(handle.adapter)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits), handle.last_stats


@pytest.mark.parametrize("name", list(METHODS))
def test_batched_selection_equals_the_per_sample_loop(llava, name, monkeypatch):
    ids, mask, pix = aligned_batch(llava)
    views, calls = select_module._view, []
    monkeypatch.setattr(select_module, "_view", lambda *a: calls.append(a[4]) or views(*a))
    fast = run(llava, METHODS[name], ids, mask, pix)
    assert calls == [slice(None)] * len(fast[2][0].kept_indices)  # every stage took one batched view
    calls.clear()
    loop = run(llava, METHODS[name], ids, mask, pix, batched=False)
    assert calls == [slice(b, b + 1) for _ in fast[2][0].kept_indices for b in range(3)]  # ... and now one per sample
    assert torch.equal(fast[0], loop[0]) and torch.equal(fast[1], loop[1])
    for a, b in zip(fast[2], loop[2]):
        assert a.kept_indices == b.kept_indices
        for sa, sb in zip(a.scores, b.scores):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_free_decode_steps_equal_masked_ones(llava, llava_eager, attn, monkeypatch):
    model = llava if attn == "sdpa" else llava_eager
    ids, mask, pix = aligned_batch(model, 2)
    fast = run(model, METHODS["transprune"], ids, mask, pix, n=8)
    masked = run(model, METHODS["transprune"], ids, mask, pix, n=8, adapt=lambda a: setattr(a, "mask_free_decode", ()))
    assert torch.equal(fast[0], masked[0]) and torch.equal(fast[1], masked[1])


def test_decode_builds_no_mask_when_nothing_is_padded(llava, monkeypatch):
    ids, mask, pix = aligned_batch(llava, 2)
    calls = []

    def count_masks(adapter):
        build = adapter.stage_masks
        adapter.stage_masks = lambda *a: calls.append(a[2]) or build(*a)

    run(llava, METHODS["transprune"], ids, mask, pix, n=5, adapt=count_masks)
    assert len(calls) == 4  # the prefill's 4 stages; the 4 decode steps x 4 stages build none


def test_keep_index_with_a_known_length_matches_the_general_one():
    gen = torch.Generator().manual_seed(0)
    keep = torch.zeros(4, 30, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(30, generator=gen)[:17]] = True
    assert torch.equal(keep_index(keep, 17)[0], keep_index(keep)[0])
    assert keep_index(keep, 17)[1].all()
