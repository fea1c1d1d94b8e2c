"""The pruned decoder loop on a tiny random-init Qwen3-VL (mRoPE, GQA, q/k norms, DeepStack into layers 0-2; fp32, CPU).

DeepStack: the decoder adds one vision feature row per visual token to the hidden states after each of its
first three layers. A method that prunes after layer 1 or 2 must add the later rows only at the kept
visual tokens, each token its own row; the reference below runs transformers' own layers by hand on the
hand-gathered sequence with the kept tokens' rows.
"""

import pytest
import torch

import transprune
from transprune.compat import rows_of
from conftest import mixed_batch
from transprune import FastVConfig, PDropConfig, RandomConfig, TransPruneConfig, VisionZipConfig
from transprune.adapters import adapter_for, family_for
from transprune.testing import (QWEN3_DEEPSTACK_LAYERS, qwen_sample_inputs, qwen_sample_inputs_unbatched, tiny_llava,
                                tiny_qwen3_vl, tiny_qwen3_vl_config, tiny_qwen_processor)

# the same sizes (16, 48 and 48 visual tokens), schedules and helpers as the Qwen2/2.5-VL tests
from test_runtime_qwen import KEEP_ALL, SCHEDULE, SIZES, TINY, greedy, logits, n_visual  # noqa: E402,F401


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl(seed=0), tiny_qwen_processor("qwen3_vl")


# -- the family, its position rule, its hooks -------------------------------------------------------------
def test_adapter_position_rule_and_hooks(qwen3):
    model, _ = qwen3
    decoder = model.model.language_model
    with transprune.pruned(model, TINY) as handle:
        assert handle.adapter.family == "qwen3-vl" and handle.llm.positions == "original"
        assert not decoder._forward_pre_hooks and not decoder._forward_hooks  # extras come from the call itself
    assert "forward" not in vars(decoder)
    with pytest.raises(ValueError, match=r"positions='compact' is not supported on the qwen3-vl family"):
        transprune.apply(model, TransPruneConfig(**SCHEDULE, keep_ratios=(0.5, 0.5, 0.5), positions="compact"))
    assert adapter_for(tiny_llava(seed=0)).layer_extras({"visual_pos_masks": None}) is None  # the default: none


# -- 1. keep everything == unpruned: DeepStack is injected where the decoder injects it ------------------------
def test_keep_all_equals_unpruned(qwen3):
    model, processor = qwen3
    inputs = qwen_sample_inputs(processor, 3, seed=1, sizes=SIZES)
    ref_tokens, ref_logits = greedy(model, inputs), logits(model, inputs)
    with transprune.pruned(model, KEEP_ALL) as handle:
        tokens, got_logits = greedy(model, inputs), logits(model, inputs)
        assert [s.visual_tokens_per_layer for s in handle.last_stats] == [[n] * 8 for n in n_visual(inputs)]
    valid = inputs["attention_mask"].bool()
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(got_logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)
    # DeepStack matters here: the same loop without the injection gives other logits.
    with transprune.pruned(model, KEEP_ALL) as handle:
        handle.adapter.after_layer = lambda i, h, layout, extras: h  # this handle's adapter instance only
        without = logits(model, inputs)
    assert not torch.allclose(without[valid], ref_logits[valid], atol=1e-3)


# -- 2. exact kept counts ---------------------------------------------------------------------------------------
def test_exact_kept_counts_per_sample(qwen3):
    model, processor = qwen3
    inputs = qwen_sample_inputs(processor, 3, seed=2, sizes=SIZES)
    with transprune.pruned(model, TINY) as handle:
        greedy(model, inputs, n=2)
    for n, stats in zip(n_visual(inputs), handle.last_stats):
        counts = [int(n * r) for r in TINY.keep_ratios]
        assert [len(k) for k in stats.kept_indices] == counts
        assert all(k == sorted(k) for k in stats.kept_indices)
        assert all(set(b) <= set(a) for a, b in zip(stats.kept_indices, stats.kept_indices[1:]))
        assert stats.visual_tokens_per_layer == [n, n] + [counts[0]] + [counts[1]] * 2 + [counts[2]] * 3


# -- 3. batch == one by one (padding, per-sample counts: each sample's DeepStack rows found in the flat list) ----
@pytest.mark.parametrize("config", [TINY, FastVConfig(k=1, r=0.5), PDropConfig(layers=(2, 4, 6), ratio=0.5),
                                    RandomConfig(pruning_layers=(1, 3), keep_ratios=(0.5, 0.25))],
                         ids=["transprune", "fastv-k1", "pdrop", "random"])
def test_batch_matches_one_by_one(qwen3, config):
    model, processor = qwen3
    batch = qwen_sample_inputs(processor, 3, seed=3, sizes=SIZES)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=10)
        stats = handle.last_stats
        for b, inputs in enumerate(qwen_sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=10)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices


# -- 4. DeepStack under FastV: the scores and the pruned forward against an independent reference -------------------
def fastv_expected(inputs, k: int, r: float) -> list[int]:
    """FastV's choice from transformers' own eager attention weights of layer k (its input carries the DeepStack
    rows of the layers before it; the scores use the q/k norms)."""
    eager = tiny_qwen3_vl(seed=0, attn_implementation="eager")
    with torch.no_grad():  # reference only: the library never asks for attention weights
        attn = eager(**inputs, output_attentions=True).attentions[k - 1][0]
    image = (inputs["mm_token_type_ids"][0] > 0).nonzero().squeeze(1)
    score = attn[:, -1].mean(0)[image]
    return sorted(torch.topk(score, int(len(image) * (1 - r))).indices.tolist())


@torch.no_grad()
def reference_last_logits(model, inputs, k: int, kept: list[int], deepstack_rows=None):
    """Layers 1..k on the whole sequence, then the remaining layers on the text + the ``kept`` visual tokens at
    their own mRoPE positions, with transformers' own layers; DeepStack row j of layer i is added to visual token
    j after layer i while i < 3 (``deepstack_rows``: which rows the kept tokens get; default their own)."""
    mm, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    image = model.config.image_token_id
    encoded = mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    features = [rows_of(f) for f in encoded.deepstack_features]
    assert len(features) == QWEN3_DEEPSTACK_LAYERS
    h = lm.embed_tokens(ids)
    visual = ids[0] == image
    h[0, visual] = torch.cat(encoded.pooler_output)
    positions, _ = mm.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    rows = torch.arange(int(visual.sum()))  # the visual tokens present, by their feature row
    for i, layer in enumerate(lm.layers):
        if i == k:  # drop the visual tokens FastV did not keep
            cols = visual.nonzero().squeeze(1)
            keep = ~visual
            keep[cols[kept]] = True
            h, positions, visual = h[:, keep], positions[:, :, keep], visual[keep]
            rows = torch.tensor(kept) if deepstack_rows is None else torch.tensor(deepstack_rows)
        h = layer(h, attention_mask=None, position_ids=None, position_embeddings=lm.rotary_emb(h, positions))
        if i < len(features):
            h = h.clone()
            h[0, visual] += features[i][rows]
    return model.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("k", [1, 2])
def test_fastv_inside_the_deepstack_layers_matches_the_reference(qwen3, k):
    model, processor = qwen3
    inputs = qwen_sample_inputs_unbatched(processor, 2, seed=5, sizes=SIZES[1:])[1]
    config = FastVConfig(k=k, r=0.75)
    with transprune.pruned(model, config) as handle:
        got = logits(model, inputs)[:, -1]
    kept = handle.last_stats[0].kept_indices[0]
    assert kept == fastv_expected(inputs, k, config.r)
    assert len(kept) == 12
    expected = reference_last_logits(model, inputs, k, kept)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The reference tells the rows apart: the first 12 rows (not each kept token's own) give other logits.
    wrong = reference_last_logits(model, inputs, k, kept, deepstack_rows=list(range(len(kept))))
    assert not torch.allclose(wrong, expected, atol=1e-3)


# -- videos: each frame its own vision block (Qwen3-VL's prompt layout), pruned like images --------------------------
def qwen3_video_inputs(processor, seed: int, grid=(2, 8, 8), words="describe this video please ?"):
    """A prompt with one hand-built video (Qwen's video processor needs torchvision): ``grid`` (t, h, w) patches,
    each of the t frames its own <|vision_start|> ... <|vision_end|> block of h * w / 4 tokens of type 2, as
    Qwen3-VL's processor lays frames out (without the timestamp text between them)."""
    t, h, w = grid
    frames = "".join(f"<|vision_start|>{'<|video_pad|>' * (h * w // 4)}<|vision_end|>" for _ in range(t))
    inputs = processor.tokenizer([f"USER: {frames} {words} ASSISTANT:"], return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    gen = torch.Generator().manual_seed(seed)
    return {**inputs, "mm_token_type_ids": 2 * (inputs["input_ids"] == video_id).long(),
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 8 * 8, generator=gen),
            "video_grid_thw": torch.tensor([list(grid)])}


def test_video_prompt(qwen3):
    model, processor = qwen3
    inputs = qwen3_video_inputs(processor, seed=11)
    assert n_visual(inputs) == [32]
    ref = greedy(model, inputs, n=10)
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs, n=10), ref)
    with transprune.pruned(model, TINY) as handle:
        assert greedy(model, inputs, n=10).shape == (1, 10)
    assert [len(k) for k in handle.last_stats[0].kept_indices] == [28, 16, 8]


@pytest.mark.parametrize("config", [TINY, VisionZipConfig(dominant=4, contextual=2)], ids=["transprune", "visionzip"])
def test_image_and_video_in_one_batch_match_one_by_one(qwen3, config):
    model, processor = qwen3
    image = qwen_sample_inputs_unbatched(processor, 1, seed=13, sizes=[(128, 96)])[0]
    video = qwen3_video_inputs(processor, seed=14, words="what is there ?")
    batch = mixed_batch(image, video)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=8)
        kept = [s.kept_indices for s in handle.last_stats]
        assert [s.n_image_tokens for s in handle.last_stats] == [48, 32]
        for b, inputs in enumerate((image, video)):
            assert torch.equal(greedy(model, inputs, n=8)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == kept[b]
    if isinstance(config, VisionZipConfig):  # per image, per video frame: 6 tokens each
        assert [len(k[0]) for k in kept] == [6, 12]
        assert sum(i < 16 for i in kept[1][0]) == 6


# -- 5. backends, prompts without images, facts for tools ------------------------------------------------------------
def test_sdpa_and_eager_agree(qwen3):
    sdpa, processor = qwen3
    eager = tiny_qwen3_vl(seed=0, attn_implementation="eager")
    inputs = qwen_sample_inputs(processor, 3, seed=7, sizes=SIZES)
    outputs = []
    for model in (sdpa, eager):
        with transprune.pruned(model, TINY) as handle:
            outputs.append((greedy(model, inputs, n=8), [s.kept_indices for s in handle.last_stats]))
    assert outputs[0][1] == outputs[1][1] and torch.equal(outputs[0][0], outputs[1][0])


def test_prompt_without_image(qwen3):
    model, processor = qwen3
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many dogs ? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    ref = greedy(model, inputs, n=6)
    with transprune.pruned(model, TINY) as handle:
        assert torch.equal(greedy(model, inputs, n=6), ref)
        assert handle.last_stats is None or [s.n_image_tokens for s in handle.last_stats] == [0] * 2


def test_arch_spec():
    cfg = tiny_qwen3_vl_config()
    assert family_for("qwen3_vl").__name__ == "Qwen3VLAdapter"
    spec = family_for(cfg.model_type).arch_spec(cfg, "tiny")
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.image_tokens) == (64, 8, 4, 2, 16, 256)


def test_bench_inputs_carry_token_types(qwen3):
    from transprune.bench.inputs import synthetic_inputs

    model, _ = qwen3
    inputs = synthetic_inputs(model, 2, text_tokens=16, image_size=(64, 96))
    assert torch.equal(inputs.tensors["mm_token_type_ids"], (inputs.tensors["input_ids"] == model.config.image_token_id).int())
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        model(**inputs.tensors)
    assert [s.n_image_tokens for s in handle.last_stats] == [24, 24]
