"""VisionZip on Qwen2-VL, Qwen2.5-VL and Qwen3-VL (tiny random-init models; fp32, CPU).

The towers have no CLS token: a token's dominance is the attention it receives in the tower's last
full-attention block. The references here read that attention from transformers' own eager attention
weights (recorded in the test around the modeling file's `eager_attention_forward`), while the pruned
models run sdpa, and undo Qwen2.5-VL's window order with transformers' own `get_vision_window_index`.
"""

import sys

import pytest
import torch

import transprune
from transprune.compat import rows_of
from conftest import mixed_batch
from transprune import TransPruneConfig, VisionZipConfig
from transprune.testing import (qwen_sample_inputs, qwen_sample_inputs_unbatched, tiny_qwen2_5_vl, tiny_qwen2_vl,
                                tiny_qwen3_vl, tiny_qwen_processor)

from test_runtime_qwen import SIZES, greedy, video_inputs  # noqa: E402

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}
MERGE_UNIT = 4  # 2 x 2 patches per visual token


@pytest.fixture(scope="module", params=list(BUILDERS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def models():
    return {kind: build(seed=0) for kind, build in BUILDERS.items()}


def received_attention(kind, pixel_values, grid, monkeypatch) -> torch.Tensor:
    """Per visual token (the LLM's order): the attention its 2 x 2 patches receive in the last full-attention
    block, averaged over heads, queries and the 4 patches, from transformers' eager attention weights."""
    eager = BUILDERS[kind](seed=0, attn_implementation="eager")
    visual = eager.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    target = visual.blocks[max(full) if full else -1].attn
    module = sys.modules[type(target).__module__]
    original, recorded = module.eager_attention_forward, []

    def recording(attn, *args, **kwargs):
        out, weights = original(attn, *args, **kwargs)
        if attn is target:
            recorded.append(weights[0])  # (heads, n, n) of one image or frame
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        eager.model.get_image_features(pixel_values, grid)
    per_row = torch.cat([w.mean(0).mean(0) for w in recorded])  # by key, in the block's row order
    per_token = per_row.view(-1, MERGE_UNIT).mean(1)
    if kind == "qwen2_5_vl":  # rows are in window order there; the merger's output is put back in grid order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        per_token = per_token[torch.argsort(window_index)]
    return per_token


def expected_kept(score: torch.Tensor, dominant: int, contextual: int) -> tuple[list[int], list[int]]:
    """VisionZip's choice in one image, the official rule: (dominant tokens, contextual targets spaced
    ``len(rest) // contextual`` apart over the rest, from its first)."""
    top = sorted(torch.topk(score, dominant).indices.tolist())
    rest = [i for i in range(score.numel()) if i not in top]
    targets = [rest[j * (len(rest) // contextual)] for j in range(contextual)]
    return top, targets


def one_image(kind, seed=5, size=(128, 96)):
    return qwen_sample_inputs_unbatched(tiny_qwen_processor(kind), 1, seed=seed, sizes=[size])[0]


# -- the choice and the merged token, against the eager reference ---------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blockwise"])
def test_dominant_tokens_and_merged_token_match_the_eager_reference(kind, models, fused, monkeypatch):
    monkeypatch.setattr("transprune.adapters.vision._FUSED", fused)
    model = models[kind]
    inputs = one_image(kind)
    score = received_attention(kind, inputs["pixel_values"], inputs["image_grid_thw"], monkeypatch)
    assert score.numel() == 48
    top, targets = expected_kept(score, dominant=10, contextual=1)
    with torch.no_grad():
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    with transprune.pruned(model, VisionZipConfig(dominant=10, contextual=1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    stats = handle.last_stats[0]
    assert stats.kept_indices == [sorted(top + targets)] and stats.kept_after_layer == [0]
    assert stats.visual_tokens_per_layer == [11] * model.config.text_config.num_hidden_layers
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id]
    assert torch.allclose(visual[top], features[top], atol=1e-6)
    # one contextual token: the target plus the mean of every other token that is not dominant (the official merge)
    members = [i for i in range(48) if i not in top and i != targets[0]]
    assert torch.allclose(visual[targets[0]], features[targets[0]] + features[members].mean(0), atol=1e-5)


def test_images_smaller_than_the_budget_keep_every_token(models):
    model = models["qwen2_5_vl"]
    inputs = one_image("qwen2_5_vl", size=(64, 64))  # 16 visual tokens
    with transprune.pruned(model, VisionZipConfig(dominant=20, contextual=4)) as handle:
        greedy(model, inputs, n=2)
    assert handle.last_stats[0].kept_indices == [list(range(16))]


# -- DeepStack: the injected features follow the kept and merged tokens ---------------------------------------------
@torch.no_grad()
def deepstack_reference_logits(model, inputs, kept: list[int], groups: dict[int, list[int]]):
    """transformers' own Qwen3-VL layers on the text + the kept visual tokens at their own mRoPE positions; each
    contextual target's image feature and DeepStack rows are its own plus the mean of its members' (``groups``)."""
    mm, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    encoded = mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    rows = [torch.cat(encoded.pooler_output)] + [rows_of(f) for f in encoded.deepstack_features]
    rows = [r.clone() for r in rows]
    for target, members in groups.items():
        for r in rows:
            r[target] = r[target] + r[members].mean(0)
    h = lm.embed_tokens(ids)
    visual = ids[0] == model.config.image_token_id
    h[0, visual] = rows[0]
    positions, _ = mm.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    h, positions, visual = h[:, keep], positions[:, :, keep], visual[keep]
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=None, position_ids=None, position_embeddings=lm.rotary_emb(h, positions))
        if i < len(rows) - 1:
            h = h.clone()
            h[0, visual] += rows[1 + i][kept]
    return model.lm_head(lm.norm(h))[:, -1]


def test_qwen3_deepstack_features_follow_the_kept_and_merged_tokens(models, monkeypatch):
    model = models["qwen3_vl"]
    inputs = one_image("qwen3_vl", seed=6)
    score = received_attention("qwen3_vl", inputs["pixel_values"], inputs["image_grid_thw"], monkeypatch)
    top, targets = expected_kept(score, dominant=10, contextual=1)
    kept = sorted(top + targets)
    with transprune.pruned(model, VisionZipConfig(dominant=10, contextual=1)) as handle, torch.no_grad():
        got = model(**inputs).logits[:, -1]
    assert handle.last_stats[0].kept_indices == [kept]
    groups = {targets[0]: [i for i in range(48) if i not in top and i != targets[0]]}
    assert torch.allclose(got, deepstack_reference_logits(model, inputs, kept, groups), atol=1e-5, rtol=1e-5)
    # the reference tells merged DeepStack rows apart from the target's own rows
    own = deepstack_reference_logits(model, inputs, kept, {})
    assert not torch.allclose(own, got, atol=1e-4)


# -- batches, videos, compositions --------------------------------------------------------------------------------
def test_batch_matches_one_by_one(kind, models):
    model, processor = models[kind], tiny_qwen_processor(kind)
    config = VisionZipConfig(dominant=12, contextual=4)
    batch = qwen_sample_inputs(processor, 3, seed=7, sizes=SIZES)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=8)
        stats = [s.kept_indices for s in handle.last_stats]
        assert [[len(k) for k in s] for s in stats] == [[16], [16], [16]]
        for b, inputs in enumerate(qwen_sample_inputs_unbatched(processor, 3, seed=7, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=8)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b]


def test_video_frames_are_units_and_image_video_batch_matches_one_by_one(models):
    model, processor = models["qwen2_5_vl"], tiny_qwen_processor("qwen2_5_vl")
    config = VisionZipConfig(dominant=4, contextual=2)
    video = video_inputs(processor, seed=8)  # 2 frames of 16 visual tokens
    image = one_image("qwen2_5_vl", seed=9)
    with transprune.pruned(model, config) as handle:
        alone = [greedy(model, video, n=6)[0]]
        kept = handle.last_stats[0].kept_indices[0]
        assert sum(i < 16 for i in kept) == 6 and sum(i >= 16 for i in kept) == 6
        alone.append(greedy(model, image, n=6)[0])
        tokens = greedy(model, mixed_batch(video, image), n=6)
        assert [len(s.kept_indices[0]) for s in handle.last_stats] == [12, 6]
    assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


def test_composition_with_transprune_and_beams(models):
    model, processor = models["qwen2_5_vl"], tiny_qwen_processor("qwen2_5_vl")
    config = [VisionZipConfig(dominant=12, contextual=4),
              TransPruneConfig(accumulation_layers=(2, 3), pruning_layers=(3,), keep_ratios=(0.5,))]
    batch = qwen_sample_inputs(processor, 2, seed=10, sizes=SIZES[1:])
    with transprune.pruned(model, config) as handle, torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
        assert beams.shape[0] == 2
        for s in handle.last_stats:
            assert [len(k) for k in s.kept_indices] == [16, 8] and s.kept_after_layer == [0, 3]
            assert set(s.kept_indices[1]) <= set(s.kept_indices[0])
