"""The pruned decoder loop on tiny random-init Qwen2.5-VL and Qwen2-VL models (mRoPE positions, GQA; fp32, CPU).

Inputs come from the tiny processor (`transprune.testing.tiny_qwen_processor`): images of different sizes
give different visual-token counts (dynamic resolution), and `mm_token_type_ids` / `image_grid_thw` give
the model its own 3-D positions, (3, B, L) in a forward call and (4, B, L) in `generate()`.
"""

import pytest
import torch

import transprune
from transprune.compat import cache_kwargs, cache_of
from conftest import greedy_on as greedy, mixed_batch
from transprune import FastVConfig, PDropConfig, RandomConfig, TransPruneConfig, UniformConfig
from transprune.testing import (qwen_sample_inputs, qwen_sample_inputs_unbatched, tiny_qwen2_5_vl, tiny_qwen2_vl,
                                tiny_qwen_processor)

# (width, height) per image: 16, 48 and 48 visual tokens (one per 16x16 pixels)
SIZES = [(64, 64), (128, 96), (96, 128)]
SCHEDULE = dict(accumulation_layers=(2, 3, 4, 5), pruning_layers=(2, 3, 5), reference_depth=None)
KEEP_ALL = TransPruneConfig(**SCHEDULE, keep_ratios=(1.0, 1.0, 1.0))
TINY = TransPruneConfig(**SCHEDULE, keep_ratios=(0.875, 0.5, 0.25))
BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen2_vl": tiny_qwen2_vl}


@pytest.fixture(scope="module", params=list(BUILDERS))
def qwen(request):
    """(model, processor) of each class."""
    return BUILDERS[request.param](seed=0), tiny_qwen_processor(request.param)


@pytest.fixture(scope="module")
def qwen25():
    return tiny_qwen2_5_vl(seed=0), tiny_qwen_processor("qwen2_5_vl")




def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def n_visual(inputs) -> list[int]:
    return (inputs["mm_token_type_ids"] > 0).sum(1).tolist()


# -- the family is found, positions are the family's --------------------------------------------------
def test_adapter_and_position_rule(qwen):
    model, _ = qwen
    assert TINY.positions == "compact"  # left at the default: the family's rule is used
    with transprune.pruned(model, TINY) as handle:
        assert handle.adapter.family == "qwen2-vl"
        assert handle.llm.positions == "original" and handle.config.to_dict()["positions"] == "original"
        greedy(model, qwen_sample_inputs(tiny_qwen_processor(model.config.model_type), 1, seed=0), n=1)
        assert handle.last_stats[0].positions == "original"  # what was used, in every call's stats
    with transprune.pruned(model, transprune.VisionZipConfig(8, 2)) as handle:
        greedy(model, qwen_sample_inputs(tiny_qwen_processor(model.config.model_type), 1, seed=0), n=1)
        assert handle.last_stats[0].positions == "original"
    with pytest.raises(ValueError, match=r"positions='compact' is not supported on the qwen2-vl family: its positions "
                                         r"are 3-D multimodal RoPE"):
        transprune.apply(model, TransPruneConfig(**SCHEDULE, keep_ratios=(0.5, 0.5, 0.5), positions="compact"))
    assert "forward" not in vars(model.model.language_model)
    with pytest.raises(ValueError, match="not supported on the qwen2-vl family"):
        transprune.apply(model, PDropConfig(layers=(2, 4, 6), positions="compact"))


# -- 1. keep everything == unpruned (logits, 20 greedy tokens: decode positions included) ----------------
def test_keep_all_equals_unpruned(qwen):
    model, processor = qwen
    inputs = qwen_sample_inputs(processor, 3, seed=1, sizes=SIZES)
    ref_tokens, ref_logits = greedy(model, inputs), logits(model, inputs)
    with transprune.pruned(model, KEEP_ALL) as handle:
        tokens, got_logits = greedy(model, inputs), logits(model, inputs)
        assert [s.visual_tokens_per_layer for s in handle.last_stats] == [[n] * 8 for n in n_visual(inputs)]
    valid = inputs["attention_mask"].bool()
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(got_logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)


# -- 2. exact kept counts, each sample by its own count ------------------------------------------------
def test_exact_kept_counts_per_sample(qwen):
    model, processor = qwen
    inputs = qwen_sample_inputs(processor, 3, seed=2, sizes=SIZES)
    with transprune.pruned(model, TINY) as handle:
        greedy(model, inputs, n=2)
    for n, stats in zip(n_visual(inputs), handle.last_stats):
        counts = [int(n * r) for r in TINY.keep_ratios]
        assert stats.n_image_tokens == n
        assert [len(k) for k in stats.kept_indices] == counts
        assert all(k == sorted(k) for k in stats.kept_indices)
        assert all(set(b) <= set(a) for a, b in zip(stats.kept_indices, stats.kept_indices[1:]))
        assert stats.visual_tokens_per_layer == [n, n] + [counts[0]] + [counts[1]] * 2 + [counts[2]] * 3


# -- 3. batch == one by one (padding, different image sizes and prompt lengths) --------------------------
@pytest.mark.parametrize("config", [TINY, FastVConfig(k=2, r=0.5), RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25)),
    UniformConfig(pruning_layers=(2, 4), keep_ratios=(0.5, 0.25)),
    PDropConfig(layers=(2, 4, 6), ratio=0.5)], ids=["transprune", "fastv", "random", "uniform", "pdrop"])
def test_batch_matches_one_by_one(qwen25, config):
    model, processor = qwen25
    batch = qwen_sample_inputs(processor, 3, seed=3, sizes=SIZES)
    alone = qwen_sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=12)
        stats = handle.last_stats
        for b, inputs in enumerate(alone):
            assert torch.equal(greedy(model, inputs, n=12)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices
    assert all(len(s.kept_indices) == len(config.pruning_layers) for s in stats)


def test_batch_matches_one_by_one_qwen2_vl():
    model, processor = tiny_qwen2_vl(seed=0), tiny_qwen_processor("qwen2_vl")
    batch = qwen_sample_inputs(processor, 3, seed=4, sizes=SIZES)
    with transprune.pruned(model, TINY):
        tokens = greedy(model, batch, n=12)
        for b, inputs in enumerate(qwen_sample_inputs_unbatched(processor, 3, seed=4, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=12)[0], tokens[b])


def farthest_point_reference(rows: int, cols: int, k: int) -> list[int]:
    """The uniform baseline's rule on a rows x cols grid (row-major tokens): the token nearest the centre,
    then repeatedly the one farthest from all chosen (ties to the earlier token)."""
    coords = [(i // cols, i % cols) for i in range(rows * cols)]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    chosen = [min(range(len(coords)), key=lambda i: ((coords[i][0] - cy) ** 2 + (coords[i][1] - cx) ** 2, i))]
    while len(chosen) < k:
        dist = [min((coords[i][0] - coords[j][0]) ** 2 + (coords[i][1] - coords[j][1]) ** 2 for j in chosen)
                if i not in chosen else -1 for i in range(len(coords))]
        chosen.append(max(range(len(coords)), key=lambda i: (dist[i], -i)))
    return sorted(chosen)


def test_uniform_spreads_over_each_images_merged_grid(qwen):
    """Each sample's grid is its own image's (h, w) merged grid (from its mRoPE positions), not sequence order."""
    model, processor = qwen
    sizes = [(128, 96), (96, 128)]  # (width, height): 6 x 8 and 8 x 6 merged grids
    inputs = qwen_sample_inputs(processor, 2, seed=21, sizes=sizes)
    with transprune.pruned(model, UniformConfig(pruning_layers=(2,), keep_ratios=(0.25,))) as handle:
        greedy(model, inputs, n=1)
    for (width, height), stats in zip(sizes, handle.last_stats):
        assert stats.kept_indices[0] == farthest_point_reference(height // 16, width // 16, 12)


# -- 4. FastV ranks by layer k's attention: reference from HF's own eager attention weights (mRoPE, GQA) ------
def test_fastv_keeps_the_tokens_the_last_token_attends_to_most(qwen):
    model, processor = qwen
    eager = BUILDERS[model.config.model_type](seed=0, attn_implementation="eager")
    inputs = qwen_sample_inputs_unbatched(processor, 2, seed=5, sizes=SIZES[1:])[1]
    config = FastVConfig(k=2, r=0.75)
    with torch.no_grad():  # reference only: the library itself never asks for attention weights
        attn = eager(**inputs, output_attentions=True).attentions[config.k - 1][0]  # (H, L, L), KV heads repeated
    image = (inputs["mm_token_type_ids"][0] > 0).nonzero().squeeze(1)
    score = attn[:, -1].mean(0)[image]
    keep = int(len(image) * (1 - config.r))
    expected = sorted(torch.topk(score, keep).indices.tolist())
    with transprune.pruned(model, config) as handle:
        greedy(model, inputs, n=2)
    assert handle.last_stats[0].kept_indices == [expected]


# -- 5. presets as written on a deep-enough decoder, with no extra argument ----------------------------------
def test_presets_run_with_no_extra_argument():
    model, processor = tiny_qwen2_5_vl(seed=0, num_hidden_layers=14), tiny_qwen_processor("qwen2_5_vl")
    inputs = qwen_sample_inputs(processor, 2, seed=6, sizes=SIZES[:2])
    for name, ratios in (("high", (0.875, 0.625, 0.125)), ("low", (0.625, 0.1875, 0.0625))):
        with transprune.pruned(model, TransPruneConfig.preset(name)) as handle:
            greedy(model, inputs, n=3)
            assert handle.config.positions == "original"
        for n, s in zip(n_visual(inputs), handle.last_stats):
            a, b, c = (int(n * r) for r in ratios)
            assert s.pruning_layers == (7, 9, 12)
            assert s.visual_tokens_per_layer == [n] * 7 + [a] * 2 + [b] * 3 + [c] * 2
    with transprune.pruned(model, FastVConfig()) as handle:  # FastV's defaults too (k=2, r=0.5)
        greedy(model, inputs, n=3)
    assert [len(s.kept_indices[0]) for s in handle.last_stats] == [n // 2 for n in n_visual(inputs)]


# -- 6. attention backends ---------------------------------------------------------------------------
def test_sdpa_and_eager_agree():
    sdpa, eager = tiny_qwen2_5_vl(seed=0), tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    inputs = qwen_sample_inputs(tiny_qwen_processor("qwen2_5_vl"), 3, seed=7, sizes=SIZES)
    outputs = []
    for model in (sdpa, eager):
        with transprune.pruned(model, TINY) as handle:
            outputs.append((greedy(model, inputs, n=12), [s.kept_indices for s in handle.last_stats],
                            logits(model, inputs)))
    assert eager.config.text_config._attn_implementation == "eager"
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    assert outputs[0][1] == outputs[1][1] and torch.equal(outputs[0][0], outputs[1][0])
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(outputs[0][2][valid], outputs[1][2][valid], atol=1e-4)


# -- 7. rope_deltas: prompts in a row each get their own positions ----------------------------------------
def test_prompts_in_a_row_get_their_own_positions(qwen25):
    model, processor = qwen25
    prompts = qwen_sample_inputs_unbatched(processor, 3, seed=8, sizes=[(128, 96), (64, 64), (96, 128)])
    expected = []
    for inputs in prompts:  # a fresh model for each prompt: nothing cached from an earlier call
        fresh = tiny_qwen2_5_vl(seed=0)
        with transprune.pruned(fresh, TINY):
            expected.append(greedy(fresh, inputs, n=10))
    with transprune.pruned(model, TINY):
        for _ in range(2):
            for inputs, ref in zip(prompts, expected):
                assert torch.equal(greedy(model, inputs, n=10), ref)


def test_manual_decode_loop_uses_the_unpruned_positions(qwen25):
    """A hand-written loop that passes only the cache: the model adds its cached rope_deltas to the cache length,
    which layer 0 keeps unpruned; keep-all pruning then equals the unpruned loop, and pruning a second prompt
    after a first one equals pruning it on a fresh model."""
    model, processor = qwen25
    first, second = qwen_sample_inputs_unbatched(processor, 2, seed=9, sizes=[(128, 96), (64, 64)])

    def loop(m, inputs, steps=6):
        with torch.no_grad():
            out = m(**inputs, use_cache=True)
            cache, tokens = cache_of(out), [out.logits[:, -1].argmax(-1)]
            for _ in range(steps - 1):
                out = m(input_ids=tokens[-1][:, None], **cache_kwargs(cache), use_cache=True)
                cache = cache_of(out)
                tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, 1)

    reference = loop(model, second)
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(loop(model, second), reference)
    fresh = tiny_qwen2_5_vl(seed=0)
    with transprune.pruned(fresh, TINY):
        expected = loop(fresh, second)
    with transprune.pruned(model, TINY):
        loop(model, first)
        assert torch.equal(loop(model, second), expected)
        assert torch.equal(greedy(model, second, n=6), expected)  # generate() agrees with the manual loop


# -- 8. sliding-window layers, prompts without images ------------------------------------------------------
SLIDING = dict(use_sliding_window=True, sliding_window=24, max_window_layers=4)


def test_sliding_window_layers_keep_all_equals_unpruned():
    """Layers of type sliding_attention get their own mask."""
    model = tiny_qwen2_5_vl(seed=0, **SLIDING)
    assert model.config.text_config.layer_types[4:] == ["sliding_attention"] * 4
    inputs = qwen_sample_inputs(tiny_qwen_processor("qwen2_5_vl"), 2, seed=10, sizes=SIZES[1:])
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
        with transprune.pruned(model, KEEP_ALL):
            got = model(**inputs, use_cache=False).logits
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the sliding mask matters: all-full masks give other logits
        full = tiny_qwen2_5_vl(seed=0)(**inputs, use_cache=False).logits
    assert not torch.allclose(full[valid], ref[valid], atol=1e-3)


def greedy_without_cache(model, inputs, n):
    """Greedy tokens from full forwards over the growing sequence, no KV cache: the decode reference."""
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = []
    for _ in range(n):
        with torch.no_grad():
            step = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **vision)
        token = step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], 1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("config", [KEEP_ALL, RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25))],
                         ids=["keep-all", "random"])
def test_sliding_window_decode_matches_full_forwards(config):
    """Decoding with the sliding layers' short caches (they keep only their last window - 1 keys) == full
    forwards without a cache. Random pruning draws the same tokens whatever text follows the image, so the
    no-cache forwards prune exactly what the cached prefill pruned; each sliding window counts the tokens
    present in its layer."""
    model = tiny_qwen2_5_vl(seed=0, **SLIDING)
    inputs = qwen_sample_inputs(tiny_qwen_processor("qwen2_5_vl"), 2, seed=10, sizes=SIZES[1:])
    with transprune.pruned(model, config):
        expected = greedy_without_cache(model, inputs, 20)
        assert torch.equal(greedy(model, inputs, n=20), expected)
    if config is KEEP_ALL:
        assert torch.equal(greedy(model, inputs, n=20), expected)  # and == the unpruned model's own decode


def test_prompt_without_image(qwen25):
    model, processor = qwen25
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many dogs ? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    ref = greedy(model, inputs, n=6)
    with transprune.pruned(model, TINY) as handle:
        assert torch.equal(greedy(model, inputs, n=6), ref)
        assert [(s.n_image_tokens, s.kept_indices) for s in handle.last_stats] == [(0, []), (0, [])]


# -- 9. a video prompt, an image + a video in one batch, half precision --------------------------------------
def video_inputs(processor, seed: int, grid=(2, 8, 8), words="describe this video please ?"):
    """A prompt with one hand-built video (Qwen's video processor needs torchvision): ``grid`` (t, h, w)
    patches, t * h * w / 4 visual tokens of type 2."""
    t, h, w = grid
    n = t * h * w // 4
    text = f"USER: <|vision_start|>{'<|video_pad|>' * n}<|vision_end|> {words} ASSISTANT:"
    inputs = processor.tokenizer([text], return_tensors="pt")
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    gen = torch.Generator().manual_seed(seed)
    return {**inputs, "mm_token_type_ids": 2 * (inputs["input_ids"] == video_id).long(),
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 8 * 8, generator=gen),
            "video_grid_thw": torch.tensor([list(grid)]), "second_per_grid_ts": torch.tensor([1.0])}


def test_video_prompt(qwen25):
    model, processor = qwen25
    inputs = video_inputs(processor, seed=11)
    assert n_visual(inputs) == [32]
    ref = greedy(model, inputs, n=10)
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs, n=10), ref)
    with transprune.pruned(model, TINY) as handle:
        tokens = greedy(model, inputs, n=10)
    assert [len(k) for k in handle.last_stats[0].kept_indices] == [28, 16, 8]
    assert tokens.shape == (1, 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = tiny_qwen2_5_vl(seed=0, dtype=dtype)
    inputs = qwen_sample_inputs(tiny_qwen_processor("qwen2_5_vl"), 2, seed=12, sizes=SIZES[1:])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with transprune.pruned(model, TINY, record_scores=True) as handle:
        tokens = greedy(model, inputs, n=5)
    assert tokens.shape == (2, 5)
    for s in handle.last_stats:
        assert [len(k) for k in s.kept_indices] == [42, 24, 12]
        assert all(st["score"].dtype == torch.float32 and torch.isfinite(st["score"]).all() for st in s.scores)


def test_image_and_video_prompts_in_one_batch_match_one_by_one(qwen25):
    model, processor = qwen25
    image = qwen_sample_inputs_unbatched(processor, 1, seed=13, sizes=[(128, 96)])[0]
    video = video_inputs(processor, seed=14, words="what is there ?")
    batch = mixed_batch(image, video)
    with transprune.pruned(model, TINY) as handle:
        tokens = greedy(model, batch, n=10)
        assert [s.n_image_tokens for s in handle.last_stats] == [48, 32]
        for b, inputs in enumerate((image, video)):
            assert torch.equal(greedy(model, inputs, n=10)[0], tokens[b])


# -- facts for tools -----------------------------------------------------------------------------------------
def test_arch_spec_and_bench_inputs(qwen25):
    from transprune.adapters import adapter_for, family_for
    from transprune.bench.inputs import synthetic_inputs
    from transprune.testing import tiny_qwen2_5_vl_config, tiny_qwen2_vl_config

    for cfg in (tiny_qwen2_5_vl_config(), tiny_qwen2_vl_config()):
        spec = family_for(cfg.model_type).arch_spec(cfg, "tiny")
        assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                spec.image_tokens) == (64, 8, 4, 2, 16, 256)
    model, _ = qwen25
    adapter = adapter_for(model)
    assert adapter.default_image_size() == (256, 256) and adapter.image_tokens_for((64, 96)) == 24
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.image_tokens_for((60, 64))
    inputs = synthetic_inputs(model, 2, text_tokens=16, image_size=(64, 96))
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        model(**inputs.tensors)
    assert [s.n_image_tokens for s in handle.last_stats] == [24, 24]


def test_sampling_with_cache(qwen25):
    """Sampled generation: keep-all == unpruned draw for draw (same seed), and a pruned draw repeats."""
    model, processor = qwen25
    inputs = qwen_sample_inputs(processor, 2, seed=16, sizes=SIZES[1:])

    def sample():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=20)

    ref = sample()
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(sample(), ref)
    with transprune.pruned(model, TINY):
        first, second = sample(), sample()
    assert torch.equal(first, second) and first.shape == ref.shape
