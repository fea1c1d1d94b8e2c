"""The pruned decoder loop on a tiny random-init LLaVA-OneVision (SigLIP tower, anyres-max packing with newline
tokens, Qwen2 decoder with GQA and q/k/v biases; fp32, CPU)."""

import pytest
import torch
import torch.nn.functional as F

import transprune
from conftest import greedy_on as greedy, mixed_batch
from transprune import FastVConfig, PDropConfig, RandomConfig, TransPruneConfig, UniformConfig, VisionZipConfig
from transprune.testing import random_image, sample_inputs, sample_inputs_unbatched, tiny_llava_onevision, tiny_processor

SIZES = [(64, 64), (128, 64), (64, 128)]  # (width, height): 136, 208 and 200 visual tokens (packing, newlines)
SCHEDULE = dict(accumulation_layers=(2, 3, 4, 5), pruning_layers=(2, 3, 5), reference_depth=None)
KEEP_ALL = TransPruneConfig(**SCHEDULE, keep_ratios=(1.0, 1.0, 1.0))
TINY = TransPruneConfig(**SCHEDULE, keep_ratios=(0.875, 0.5, 0.25))


@pytest.fixture(scope="module")
def onevision():
    return tiny_llava_onevision(seed=0), tiny_processor("llava_onevision")




def n_visual(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


def test_family_positions_and_visionzip_limits(onevision):
    model, processor = onevision
    with transprune.pruned(model, TINY) as handle:
        assert handle.adapter.family == "llava-onevision" and handle.llm.positions == "compact"
    with pytest.raises(ValueError, match="more than the model's 64 patches per tile"):
        transprune.apply(model, VisionZipConfig(60, 8))
    assert "forward" not in vars(model.model) and "get_image_features" not in vars(model.model)
    from transprune.adapters import adapter_for

    adapter = adapter_for(model)
    inputs = sample_inputs(processor, 3, seed=0, sizes=SIZES)
    assert n_visual(model, inputs) == [adapter.image_tokens_for((h, w)) for w, h in SIZES]


def test_keep_all_equals_unpruned(onevision):
    model, processor = onevision
    inputs = sample_inputs(processor, 3, seed=1, sizes=SIZES)
    ref_tokens = greedy(model, inputs)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    with transprune.pruned(model, KEEP_ALL) as handle:
        tokens = greedy(model, inputs)
        with torch.no_grad():
            got = model(**inputs).logits
        assert [s.visual_tokens_per_layer for s in handle.last_stats] == [[n] * 8 for n in n_visual(model, inputs)]
    valid = inputs["attention_mask"].bool()
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(got[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)


def test_exact_kept_counts_per_sample(onevision):
    model, processor = onevision
    inputs = sample_inputs(processor, 3, seed=2, sizes=SIZES)
    with transprune.pruned(model, TINY) as handle:
        greedy(model, inputs, n=2)
    for n, stats in zip(n_visual(model, inputs), handle.last_stats):
        counts = [int(n * r) for r in TINY.keep_ratios]
        assert [len(k) for k in stats.kept_indices] == counts
        assert all(k == sorted(k) for k in stats.kept_indices)
        assert stats.visual_tokens_per_layer == [n, n] + [counts[0]] + [counts[1]] * 2 + [counts[2]] * 3


@pytest.mark.parametrize("config", [TINY, FastVConfig(k=2, r=0.5), PDropConfig(layers=(2, 4, 6), ratio=0.5),
                                    RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25)),
                                    UniformConfig(pruning_layers=(2, 4), keep_ratios=(0.5, 0.25))],
                         ids=["transprune", "fastv", "pdrop", "random", "uniform"])
def test_batch_matches_one_by_one(onevision, config):
    model, processor = onevision
    batch = sample_inputs(processor, 3, seed=3, sizes=SIZES)
    with transprune.pruned(model, config) as handle:
        tokens = greedy(model, batch, n=10)
        stats = handle.last_stats
        for b, inputs in enumerate(sample_inputs_unbatched(processor, 3, seed=3, sizes=SIZES)):
            assert torch.equal(greedy(model, inputs, n=10)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == stats[b].kept_indices


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin[:, None]


@torch.no_grad()
def reference(model, inputs, cfg: TransPruneConfig):
    """The spec on transformers' own layers for one unpadded sample: the decoder's input embeddings as the model
    builds them, TTV from the layers' parts, IGA from the next layer's q and k (GQA), compact positions."""
    lm = model.get_decoder()
    seen = {}
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    hook.remove()
    h = seen["embeds"]
    visual = inputs["input_ids"][0] == model.config.image_token_id
    rank = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    pos = torch.arange(h.shape[1])
    ttv = torch.zeros(h.shape[1])
    captured, hooks = {}, []
    for i, layer in enumerate(lm.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            hooks.append(getattr(layer, name).register_forward_hook(
                lambda mod, a, out, key=(i, name): captured.__setitem__(key, out[0] if isinstance(out, tuple) else out)))
    stages = []
    try:
        for i, layer in enumerate(lm.layers):
            h = layer(h, attention_mask=None, position_ids=pos[None], position_embeddings=lm.rotary_emb(h, pos[None]))
            if i + 1 in cfg.accumulation_layers and i + 1 <= cfg.pruning_layers[-1]:
                for x_name, y_name in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
                    x, y = captured[(i, x_name)][0].double(), captured[(i, y_name)][0].double()
                    u = 1 - F.cosine_similarity(x, y, dim=-1)
                    ttv += (torch.exp(u) / torch.exp(u).sum() * (y.norm(dim=-1) / x.norm(dim=-1))).float()
            if i + 1 in cfg.pruning_layers:
                stage = cfg.pruning_layers.index(i + 1)
                img = (rank >= 0).nonzero().squeeze(1)
                attn = lm.layers[i + 1].self_attn
                x = lm.layers[i + 1].input_layernorm(h[0])
                hd = attn.head_dim
                q, k = attn.q_proj(x).view(len(x), -1, hd), attn.k_proj(x).view(len(x), -1, hd)
                cos, sin = lm.rotary_emb(h, pos[None])
                q, k = rotate(q, cos[0], sin[0]).double(), rotate(k, cos[0], sin[0]).double()
                groups = q.shape[1] // k.shape[1]
                rows = list(range(int(img[-1]) + 1, len(x)))
                att = torch.zeros(len(x), dtype=torch.float64)
                for head in range(q.shape[1]):
                    for r in rows:
                        att[: r + 1] += torch.softmax((k[: r + 1, head // groups] @ q[r, head]) / hd ** 0.5, 0)
                iga = (att / (q.shape[1] * len(rows)))[img].float()
                t_img = ttv[img]
                t_hat, i_hat = t_img / (t_img.sum() + 1e-8), iga / (iga.sum() + 1e-8)
                score = cfg.alpha * t_hat + (1 - cfg.alpha) * i_hat
                n_image = int(visual.sum())
                chosen = sorted(torch.topk(score.double(), int(n_image * cfg.keep_ratios[stage])).indices.tolist())
                stages.append(dict(ttv=t_hat, iga=i_hat, kept=rank[img[chosen]].tolist()))
                keep = rank < 0
                keep[img[chosen]] = True
                h, ttv, rank = h[:, keep], ttv[keep], rank[keep]
                pos = torch.arange(int(keep.sum()))  # compact: the kept tokens are renumbered
    finally:
        for hk in hooks:
            hk.remove()
    return stages, model.lm_head(lm.norm(h))[0, -1]


def test_scores_kept_tokens_and_forward_match_the_spec(onevision):
    model, processor = onevision
    inputs = sample_inputs_unbatched(processor, 3, seed=4, sizes=SIZES)[1]
    stages, ref_logits = reference(model, inputs, TINY)
    with transprune.pruned(model, TINY, record_scores=True) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    stats = handle.last_stats[0]
    for mine, ref in zip(stats.scores, stages):
        assert torch.allclose(mine["ttv"], ref["ttv"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mine["iga"], ref["iga"], atol=1e-5, rtol=1e-4)
    assert stats.kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)


def test_sdpa_and_eager_agree(onevision):
    sdpa, processor = onevision
    eager = tiny_llava_onevision(seed=0, attn_implementation="eager")
    inputs = sample_inputs(processor, 3, seed=5, sizes=SIZES)
    outputs = []
    for model in (sdpa, eager):
        with transprune.pruned(model, TINY) as handle:
            outputs.append((greedy(model, inputs, n=8), [s.kept_indices for s in handle.last_stats]))
    assert outputs[0][1] == outputs[1][1] and torch.equal(outputs[0][0], outputs[1][0])


def test_prompt_without_image(onevision):
    model, processor = onevision
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=["USER: what is the colour ? ASSISTANT:", "USER: how many dogs ? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    ref = greedy(model, inputs, n=6)
    with transprune.pruned(model, TINY) as handle:
        assert torch.equal(greedy(model, inputs, n=6), ref)
        assert [s.n_image_tokens for s in handle.last_stats] == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = tiny_llava_onevision(seed=0, dtype=dtype)
    inputs = sample_inputs(tiny_processor("llava_onevision"), 2, seed=6, sizes=SIZES[1:])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with transprune.pruned(model, TINY, record_scores=True) as handle:
        assert greedy(model, inputs, n=4).shape == (2, 4)
    for n, s in zip(n_visual(model, inputs), handle.last_stats):
        assert [len(k) for k in s.kept_indices] == [int(n * r) for r in TINY.keep_ratios]
        assert all(torch.isfinite(st["score"]).all() for st in s.scores)


def test_save_load_round_trip(tmp_path, onevision):
    """A saved tiny checkpoint loads back through the tools' loader (its processor images-only: the video
    processor needs torchvision) with the same inputs, and prunes the same."""
    from transprune.loading import load_checkpoint
    from transprune.testing import save_tiny_checkpoint

    model, processor = onevision
    loaded, loaded_processor = load_checkpoint(str(save_tiny_checkpoint(tmp_path / "ov", kind="llava_onevision")))
    built = sample_inputs(processor, 2, seed=7, sizes=SIZES[1:])
    again = sample_inputs(loaded_processor, 2, seed=7, sizes=SIZES[1:])
    assert set(again) == set(built) and all(torch.equal(again[k], built[k]) for k in built)
    results = []
    for m in (model, loaded):
        with transprune.pruned(m, TINY) as handle:
            results.append((greedy(m, built, n=6), [s.kept_indices for s in handle.last_stats]))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_arch_spec_and_bench_inputs(onevision):
    from transprune.adapters import adapter_for, family_for
    from transprune.bench.inputs import synthetic_inputs
    from transprune.flops import ARCHS, estimate
    from transprune.testing import tiny_llava_onevision_config

    spec = family_for("llava_onevision").arch_spec(tiny_llava_onevision_config(), "tiny")
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.image_tokens) == (64, 8, 2, 64 + 8 * 9)
    model, _ = onevision
    adapter = adapter_for(model)
    assert adapter.image_tokens_for((64, 64)) == spec.image_tokens  # the nominal image, by the model's own packing
    inputs = synthetic_inputs(model, 2, text_tokens=16, image_size=(128, 128))
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        model(**inputs.tensors)
    assert [s.n_image_tokens for s in handle.last_stats] == inputs.image_tokens
    arch = ARCHS["llava-onevision-7b"]
    assert (arch.hidden_size, arch.num_layers, arch.num_kv_heads, arch.image_tokens) == (3584, 28, 4, 729 + 27 * 28)
    assert estimate(TransPruneConfig.preset("high"), "llava-onevision-7b").positions == "compact"


def video_inputs(model, processor, seed: int, frames: int = 2, words: str = "what is there ?"):
    """A prompt with one hand-built video (the video processor needs torchvision): ``frames`` frames, each pooled
    2x2 by the model to 16 tokens, plus one newline token: 16 * frames + 1 placeholders."""
    n = 16 * frames + 1
    tokenizer = processor.tokenizer
    inputs = tokenizer([f"USER: {'<video>' * n}\n{words} ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == n
    gen = torch.Generator().manual_seed(seed)
    return {**inputs, "pixel_values_videos": torch.randn(1, frames, 3, 64, 64, generator=gen)}


def test_video_prompts_and_an_image_video_batch(onevision):
    model, processor = onevision
    video = video_inputs(model, processor, seed=8)
    ref = greedy(model, video, n=8)
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, video, n=8), ref)
    with transprune.pruned(model, TINY) as handle:
        alone = [greedy(model, video, n=8)[0]]
        assert [len(k) for k in handle.last_stats[0].kept_indices] == [int(33 * r) for r in TINY.keep_ratios]
        image = sample_inputs_unbatched(processor, 1, seed=9, sizes=[(64, 64)])[0]
        alone.append(greedy(model, image, n=8)[0])
        tokens = greedy(model, mixed_batch(video, image), n=8)
        assert [s.n_image_tokens for s in handle.last_stats] == [33, 136]
    assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


def _received(eager, pixels):
    """The attention each patch receives in the feature layer (the last), transformers' eager weights: the mean
    over heads and over its crop's patches as queries; (crops, 8, 8)."""
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixels, output_attentions=True).attentions[-1]
    return attentions.mean(1).mean(1).view(-1, 8, 8)


def _zip_choice(score: torch.Tensor, dominant: int, contextual: int) -> list[int]:
    """Unit-local kept indices of VisionZip's rule: the top ``dominant`` scores plus ``contextual`` targets spaced
    ``len(rest) // contextual`` apart among the rest (the official spacing)."""
    top = torch.topk(score, dominant).indices.tolist()
    rest = [i for i in range(score.numel()) if i not in top]
    return sorted(top + [rest[j * (len(rest) // contextual)] for j in range(contextual)])


@pytest.mark.parametrize("path", ["shared", "two-pass", "blockwise"])
def test_visionzip_ranks_packed_features_by_received_attention(onevision, path, monkeypatch):
    """A 64x64 image is its base view (64 patches) and a 1x1 grid of 8 rows of 8 patches + a newline each: the
    base unit ranks patches by the attention they receive (eager reference), the grid unit its patches in
    row order; newline tokens are dropped; a contextual token is its target plus its members' mean, after the projector."""
    monkeypatch.setattr("transprune.adapters.vision._FUSED", path != "blockwise")
    monkeypatch.setattr("transprune.adapters.vision._SHARE_LAYER_PASS", path == "shared")
    model, processor = onevision
    eager = tiny_llava_onevision(seed=0, attn_implementation="eager")
    inputs = sample_inputs_unbatched(processor, 1, seed=13, sizes=[(64, 64)])[0]
    received = _received(eager, inputs["pixel_values"][0])  # (2 crops, 8, 8): base, the tile
    base = _zip_choice(received[0].flatten(), 6, 2)
    grid = [64 + (i // 8) * 9 + i % 8 for i in _zip_choice(received[1].flatten(), 6, 2)]  # rows of 9 (newline)
    with transprune.pruned(model, VisionZipConfig(6, 2)) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last_stats[0].kept_indices == [base + grid]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    dominant = torch.topk(received[0].flatten(), 6).indices.tolist()
    # the one contextual target of a 1-target base unit absorbs every other non-dominant patch: itself plus their mean
    with transprune.pruned(model, VisionZipConfig(6, 1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    rest = [i for i in range(64) if i not in dominant]
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id]
    assert torch.allclose(visual[rest[0]], features[rest[0]] + features[rest[1:]].mean(0), atol=1e-5)


def test_visionzip_scores_follow_anyres_max_downsampling(onevision):
    """With anyres_max_1 a 128x128 image's 16x16 grid is bilinearly downsampled to 8x8 (+ newlines): each packed
    feature is ranked by the bilinearly interpolated received attention of the patches it was made of."""
    model, processor = onevision
    eager = tiny_llava_onevision(seed=0, attn_implementation="eager")
    processor = tiny_processor("llava_onevision")
    processor.vision_aspect_ratio = "anyres_max_1"  # the processor counts the placeholders as the model packs
    inputs = sample_inputs_unbatched(processor, 1, seed=14, sizes=[(128, 128)])[0]
    for m in (model, eager):
        m.config.vision_aspect_ratio = "anyres_max_1"
    try:
        received = _received(eager, inputs["pixel_values"][0])  # base + 4 tiles
        tiles = received[1:].view(2, 2, 8, 8).permute(0, 2, 1, 3).reshape(1, 1, 16, 16)  # the tiles' grid
        small = F.interpolate(tiles, [8, 8], mode="bilinear")[0, 0].flatten()
        expected = _zip_choice(received[0].flatten(), 6, 2) + [64 + (i // 8) * 9 + i % 8
                                                               for i in _zip_choice(small, 6, 2)]
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n == 64 + 8 * 9
        with transprune.pruned(model, VisionZipConfig(6, 2)) as handle, torch.no_grad():
            model(**inputs)
        assert handle.last_stats[0].kept_indices == [expected]
    finally:
        for m in (model, eager):
            m.config.vision_aspect_ratio = "anyres_max_9"


def test_visionzip_video_frames_and_batch_match_one_by_one(onevision):
    model, processor = onevision
    video = video_inputs(model, processor, seed=15)
    eager = tiny_llava_onevision(seed=0, attn_implementation="eager")
    received = _received(eager, video["pixel_values_videos"][0])  # (2 frames, 8, 8), each pooled 2x2 to 4x4
    pooled = F.interpolate(received[:, None], [4, 4], mode="bilinear")[:, 0].flatten(1)
    expected = [f * 16 + i for f in range(2) for i in _zip_choice(pooled[f], 4, 2)]
    with transprune.pruned(model, [VisionZipConfig(4, 2), TINY]) as handle:
        alone = [greedy(model, video, n=8)[0]]
        assert handle.last_stats[0].kept_indices[0] == expected  # the video's closing newline is dropped
        image = sample_inputs_unbatched(processor, 1, seed=16, sizes=[(128, 64)])[0]
        alone.append(greedy(model, image, n=8)[0])
        kept = handle.last_stats[0].kept_indices
        tokens = greedy(model, mixed_batch(video, image), n=8)
        assert handle.last_stats[1].kept_indices == kept
    assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


def test_visionzip_on_a_multi_image_prompt_next_to_a_tiled_image(onevision):
    """Two images in one prompt are not tiled (``batch_num_images``): each is one unit (its base view); the single
    image of the other prompt is tiled (base view + grid). Batch == one by one."""
    model, processor = onevision
    processor.tokenizer.padding_side = "left"
    prompts = ["USER: <image>\n<image>\nwhat is there ? ASSISTANT:", "USER: <image>\nwhat is the colour ? ASSISTANT:"]
    images = [[random_image(1), random_image(2)], [random_image(3, (128, 64))]]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert batch["batch_num_images"].tolist() == [2, 1]
    singles = [processor(images=[i], text=[t], return_tensors="pt") for t, i in zip(prompts, images)]
    with transprune.pruned(model, [VisionZipConfig(6, 2), TINY]) as handle:
        tokens = greedy(model, batch, n=8)
        kept = [s.kept_indices for s in handle.last_stats]
        assert [len(k[0]) for k in kept] == [16, 16]  # 2 images x 8 / base + grid x 8
        for b, inputs in enumerate(singles):
            assert torch.equal(greedy(model, inputs, n=8)[0], tokens[b])
            assert handle.last_stats[0].kept_indices == kept[b]
