"""LLaVA-NeXT (anyres): every image feature, newline tokens included, is an image token; samples in
one batch have different image-token counts and each keeps fractions of its own."""

import pytest
import torch

import transprune
from transprune.compat import cache_of
from transprune.testing import sample_inputs, sample_inputs_unbatched, tiny_llava_next, tiny_processor

from conftest import tiny_config

SIZES = [(64, 64), (128, 64), (128, 128)]  # 136, 200 and 336 image tokens


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=0)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor("llava_next")


def generate(model, inputs, n=20):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def test_image_tokens_are_every_anyres_feature(next_model, processor):
    inputs = sample_inputs(processor, 3, seed=1, sizes=SIZES)
    counts = (inputs["input_ids"] == next_model.config.image_token_id).sum(1).tolist()
    feats = next_model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert counts == [f.shape[0] for f in feats] == [136, 200, 336]
    with transprune.pruned(next_model, tiny_config()) as handle:
        generate(next_model, inputs, n=2)
    for s, n in zip(handle.last_stats, counts):
        assert s.n_image_tokens == n
        assert [len(k) for k in s.kept_indices] == [int(n * r) for r in (0.875, 0.5, 0.25)]
        assert all(k == sorted(k) and len(set(k)) == len(k) and max(k) < n for k in s.kept_indices)
        assert s.visual_tokens_per_layer == [n, n] + [int(n * 0.875)] + [int(n * 0.5)] * 2 + [int(n * 0.25)] * 3


def test_ratio_one_equals_unpruned(next_model, processor):
    inputs = sample_inputs(processor, 2, seed=2, sizes=SIZES[:2])
    with torch.no_grad():
        ref_logits = next_model(**inputs).logits
    ref_tokens = generate(next_model, inputs)
    with transprune.pruned(next_model, tiny_config(keep_ratios=(1.0, 1.0, 1.0))):
        with torch.no_grad():
            got_logits = next_model(**inputs).logits
        got_tokens = generate(next_model, inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(got_logits[valid], ref_logits[valid])
    assert torch.equal(got_tokens, ref_tokens)


def test_batch_matches_one_by_one(next_model, processor):
    batch = sample_inputs(processor, 3, seed=3, sizes=SIZES)
    singles = sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES)
    with transprune.pruned(next_model, tiny_config()) as handle:
        batch_tokens = generate(next_model, batch)
        batch_kept = [s.kept_indices for s in handle.last_stats]
        for b, single in enumerate(singles):
            assert torch.equal(generate(next_model, single)[0], batch_tokens[b])
            assert handle.last_stats[0].kept_indices == batch_kept[b]


def test_cache_lengths_follow_kept_tokens(next_model, processor):
    inputs = sample_inputs_unbatched(processor, 1, seed=4, sizes=[(128, 64)])[0]
    n = int((inputs["input_ids"] == next_model.config.image_token_id).sum())
    text = inputs["input_ids"].shape[1] - n
    with transprune.pruned(next_model, tiny_config()) as handle, torch.no_grad():
        out = next_model(**inputs, use_cache=True)
    lengths = [cache_of(out).get_seq_length(i) for i in range(8)]
    assert lengths == [text + c for c in handle.last_stats[0].visual_tokens_per_layer]


def test_sdpa_and_eager_agree(next_model, processor):
    eager = tiny_llava_next(seed=0, attn_implementation="eager")
    inputs = sample_inputs(processor, 2, seed=5, sizes=SIZES[1:])
    results = []
    for model in (next_model, eager):
        with transprune.pruned(model, tiny_config()) as handle:
            results.append((generate(model, inputs, n=10), [s.kept_indices for s in handle.last_stats]))
    assert results[0][1] == results[1][1]
    assert torch.equal(results[0][0], results[1][0])
