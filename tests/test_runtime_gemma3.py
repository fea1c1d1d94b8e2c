"""The pruned decoder loop on a tiny random-init Gemma 3 (SigLIP tower pooled 2 x 2, image tokens bidirectional
within their block, sliding and global layers alternating with a RoPE each, four norms per layer, q/k norms;
fp32, CPU). The sliding window (24) is shorter than the prompts, so windows matter in prefill and decode."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

import transprune
from transprune.compat import cache_kwargs
from transprune import FastVConfig, VisionZipConfig
from transprune.testing import (GEMMA3_SLIDING_WINDOW, random_image, sample_inputs, sample_inputs_unbatched,
                                tiny_gemma3, tiny_processor)

from family_checks import (IN_LLM_CONFIGS, IN_LLM_IDS, counts_and_batch_match_one_by_one,  # noqa: E402
                           scores_and_forward_match_the_spec, sdpa_eager_no_image_half_precision_and_save_load,
                           visionzip_batch_matches_one_by_one)
from test_runtime_llava_onevision import KEEP_ALL, TINY, greedy, n_visual  # noqa: E402


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3(seed=0), tiny_processor("gemma3")


def rotate(x, cos, sin):  # x (S, H, hd), cos/sin (S, hd)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


def reference(model, inputs, cfg, kept=None):
    """The spec on transformers' own Gemma 3 layers for one unpadded sample, each stage's masks built by
    transformers' `create_masks_for_vision_model` from the kept tokens' ``token_type_ids``: TTV from each branch's
    input (after its pre-norm) and what it adds (after its post-norm), IGA from the next layer's q and k (q/k
    norms, RoPE of its layer type, ``query_pre_attn_scalar``, its window when it slides), compact positions.
    ``kept``: per stage, the image-token ranks to keep (instead of the scores' choice). Returns the stages and
    the logits of the last token."""
    lm = model.get_decoder()
    text = lm.config
    seen = {}
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    h = seen["embeds"]
    types = inputs["token_type_ids"][0]
    visual = inputs["input_ids"][0] == model.config.image_token_id
    rank = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    pos = torch.arange(h.shape[1])
    ttv = torch.zeros(h.shape[1])
    captured, hooks = {}, []
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    for i, layer in enumerate(lm.layers):
        for name in names:
            hooks.append(getattr(layer, name).register_forward_hook(
                lambda mod, a, out, key=(i, name): captured.__setitem__(key, out)))
    stages = []

    def masks_now():
        return create_masks_for_vision_model(config=text, inputs_embeds=h, attention_mask=None, **cache_kwargs(None),
                                             position_ids=pos[None],
                                             block_sequence_ids=get_block_sequence_ids_for_mask(types[None]))

    masks = masks_now()
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                kind = text.layer_types[i]
                h = layer(h, attention_mask=masks[kind], position_ids=pos[None],
                          position_embeddings=lm.rotary_emb(h, pos[None], kind))
                if i + 1 in cfg.accumulation_layers and i + 1 <= cfg.pruning_layers[-1]:
                    for a, b in ((names[0], names[1]), (names[2], names[3])):
                        x, y = captured[(i, a)][0].double(), captured[(i, b)][0].double()
                        u = 1 - F.cosine_similarity(x, y, dim=-1)
                        ttv += (torch.exp(u) / torch.exp(u).sum() * (y.norm(dim=-1) / x.norm(dim=-1))).float()
                if i + 1 not in cfg.pruning_layers:
                    continue
                stage = cfg.pruning_layers.index(i + 1)
                img = (rank >= 0).nonzero().squeeze(1)
                nxt = lm.layers[i + 1]
                attn, kind = nxt.self_attn, text.layer_types[i + 1]
                x = nxt.input_layernorm(h[0])
                q = attn.q_norm(attn.q_proj(x).view(len(x), -1, attn.head_dim))
                k = attn.k_norm(attn.k_proj(x).view(len(x), -1, attn.head_dim))
                cos, sin = lm.rotary_emb(h, pos[None], kind)
                q, k = rotate(q, cos[0], sin[0]).double(), rotate(k, cos[0], sin[0]).double()
                groups = q.shape[1] // k.shape[1]
                window = text.sliding_window if kind == "sliding_attention" else len(x)
                rows = list(range(int(img[-1]) + 1, len(x)))
                att = torch.zeros(len(x), dtype=torch.float64)
                for head in range(q.shape[1]):
                    for r in rows:
                        lo = max(0, r - window + 1)
                        att[lo: r + 1] += torch.softmax(
                            (k[lo: r + 1, head // groups] @ q[r, head]) * text.query_pre_attn_scalar ** -0.5, 0)
                iga = (att / (q.shape[1] * len(rows)))[img].float()
                t_img = ttv[img]
                t_hat, i_hat = t_img / (t_img.sum() + 1e-8), iga / (iga.sum() + 1e-8)
                score = cfg.alpha * t_hat + (1 - cfg.alpha) * i_hat
                if kept is None:
                    count = int(int(visual.sum()) * cfg.keep_ratios[stage])
                    chosen = sorted(torch.topk(score.double(), count).indices.tolist())
                    ranks = rank[img[chosen]].tolist()
                else:
                    ranks = kept[stage]
                stages.append(dict(ttv=t_hat, iga=i_hat, kept=ranks))
                keep = (rank < 0) | torch.isin(rank, torch.tensor(ranks, dtype=torch.long))
                h, ttv, rank, types = h[:, keep], ttv[keep], rank[keep], types[keep]
                pos = torch.arange(int(keep.sum()))  # compact: the kept tokens are renumbered
                masks = masks_now()
            logits = model.lm_head(lm.norm(h))[0, -1]
    finally:
        for hk in hooks:
            hk.remove()
    return stages, logits


def test_family_blocks_and_counts(gemma):
    model, processor = gemma
    from transprune.adapters import adapter_for

    adapter = adapter_for(model)
    assert adapter.family == "gemma3" and type(adapter.decoder).__name__ == "Gemma3TextModel"
    inputs = sample_inputs(processor, 3, seed=0)
    assert n_visual(model, inputs) == [16] * 3 == [adapter.image_tokens_for((64, 64))] * 3
    blocks = adapter.attention_blocks(inputs)
    assert torch.equal(blocks >= 0, inputs["input_ids"] == model.config.image_token_id)
    with transprune.pruned(model, TINY) as handle:
        assert handle.llm.positions == "compact"
    with pytest.raises(ValueError, match="more than the model's 16 patches per tile"):
        transprune.apply(model, VisionZipConfig(14, 4))
    with pytest.raises(ValueError, match="resizes every image to the tower's 64x64"):
        adapter.image_tokens_for((128, 64))
    assert "forward" not in vars(model.model) and "forward" not in vars(adapter.decoder)


def test_keep_all_equals_unpruned_and_the_blocks_matter(gemma):
    model, processor = gemma
    inputs = sample_inputs(processor, 3, seed=1)
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # the model is then causal everywhere
    with torch.no_grad():
        ref, ref_causal = model(**inputs).logits, model(**causal).logits
    valid = inputs["attention_mask"].bool()
    assert not torch.allclose(ref[valid], ref_causal[valid], atol=1e-3)  # the image blocks change the model
    ref_tokens = greedy(model, inputs, n=24)  # 36 + 24 tokens: decode steps run past the sliding window
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs, n=24), ref_tokens)
        with torch.no_grad():
            got, got_causal = model(**inputs).logits, model(**causal).logits
    assert torch.allclose(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_causal[valid], ref_causal[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", IN_LLM_CONFIGS, ids=IN_LLM_IDS)
def test_exact_counts_and_batch_matches_one_by_one(gemma, config):
    model, processor = gemma
    counts_and_batch_match_one_by_one(model, config, sample_inputs(processor, 3, seed=3),
                                      sample_inputs_unbatched(processor, 3, seed=3), in_order=True)


def test_scores_kept_tokens_and_forward_match_the_spec(gemma):
    model, processor = gemma
    inputs = sample_inputs_unbatched(processor, 3, seed=4)[2]
    assert inputs["input_ids"].shape[1] > GEMMA3_SLIDING_WINDOW
    scores_and_forward_match_the_spec(model, inputs, reference)


def test_decode_steps_match_full_forwards_on_the_kept_tokens(gemma):
    """Every greedy step of a pruned generate (sliding layers' cache holding only their window) is the argmax of
    transformers' layers run without a cache on the kept prompt tokens plus the tokens generated so far."""
    model, processor = gemma
    inputs = sample_inputs_unbatched(processor, 3, seed=6)[1]
    with transprune.pruned(model, TINY) as handle:
        tokens = greedy(model, inputs, n=16)[0]
        kept = handle.last_stats[0].kept_indices
    for t in range(len(tokens)):
        extra = tokens[None, :t]
        longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], 1),
                  "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + t, dtype=torch.long),
                  "token_type_ids": torch.cat([inputs["token_type_ids"], torch.zeros_like(extra)], 1)}
        _, logits = reference(model, longer, TINY, kept=kept)
        assert int(logits.argmax()) == int(tokens[t])


def test_two_images_in_one_prompt_are_two_blocks(gemma):
    model, processor = gemma
    prompt = "USER: <start_of_image> <start_of_image> what is the colour ? ASSISTANT:"
    inputs = processor(images=[[random_image(1), random_image(2)]], text=[prompt], return_tensors="pt")
    from transprune.adapters import adapter_for

    blocks = adapter_for(model).attention_blocks(inputs)
    assert sorted(set(blocks[0].tolist())) == [-1, 0, 1]
    ref = greedy(model, inputs, n=8)
    with transprune.pruned(model, KEEP_ALL):
        assert torch.equal(greedy(model, inputs, n=8), ref)
    stages, ref_logits = reference(model, inputs, TINY)
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_stats[0].kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)


def test_sdpa_eager_no_image_half_precision_and_save_load(tmp_path):
    sdpa_eager_no_image_half_precision_and_save_load("gemma3", None, tmp_path)


def test_flops_arch_and_bench_inputs():
    from transprune.adapters import family_for
    from transprune.bench.inputs import synthetic_inputs
    from transprune.flops import ARCHS, estimate
    from transprune.testing import tiny_gemma3_config

    assert family_for("gemma3").arch_spec(tiny_gemma3_config(), "tiny").image_tokens == 16
    arch = ARCHS["gemma3-4b"]
    assert (arch.num_layers, arch.hidden_size, arch.head_dim, arch.image_tokens) == (34, 2560, 256, 256)
    # the default is the paper's 64-of-576 share of each image: 24 dominant + 4 contextual of 256
    assert estimate(VisionZipConfig(), "gemma3-4b").visual_tokens_per_layer[0] == 28
    model = tiny_gemma3(seed=0)
    inputs = synthetic_inputs(model, 2, text_tokens=30)
    assert inputs.image_tokens == [16, 16]
    assert torch.equal(inputs.tensors["token_type_ids"],
                       (inputs.tensors["input_ids"] == model.config.image_token_id).long())
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        model(**inputs.tensors)
    assert [len(k) for k in handle.last_stats[0].kept_indices] == [14, 8, 4]


@pytest.mark.parametrize("chunk", ["shared", "two-pass", 1024, 5])
def test_visionzip_matches_the_eager_received_attention_reference(gemma, chunk, monkeypatch):
    """Dominant tokens: the most-received attention of the tower's last layer (transformers' eager weights, mean
    over heads and queries), each visual token scored by the mean over its 2 x 2 pooled patches; one contextual
    token = the mean of the image's other tokens after the projector. ``chunk``: the CPU's two fused passes (the first one
    the layer's own, or both the score's), or the query rows per block of the blockwise sum (5: 13 blocks of the 64 patches, as a 4096-patch tower takes 4)."""
    monkeypatch.setattr("transprune.adapters.vision._FUSED", chunk in ("shared", "two-pass"))
    monkeypatch.setattr("transprune.adapters.vision._SHARE_LAYER_PASS", chunk == "shared")
    if isinstance(chunk, int):
        monkeypatch.setattr("transprune.adapters.vision._QUERY_CHUNK", chunk)
    model, processor = gemma
    inputs = sample_inputs_unbatched(processor, 3, seed=11)[1]
    eager = tiny_gemma3(seed=0, attn_implementation="eager")
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]  # (16, d)
    received = attentions[0].mean(0).mean(0).view(8, 8)  # heads, then queries
    score = received.view(4, 2, 4, 2).mean((1, 3)).flatten()  # each token's 2 x 2 patches, row-major
    top = sorted(torch.topk(score, 6).indices.tolist())
    rest = [i for i in range(16) if i not in top]
    with transprune.pruned(model, VisionZipConfig(dominant=6, contextual=1)) as handle, torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    assert handle.last_stats[0].kept_indices == [sorted(top + [rest[0]])]
    visual = embeds[inputs["input_ids"][0] == model.config.image_token_id]
    assert torch.allclose(visual[rest[0]], features[rest[0]] + features[rest[1:]].mean(0), atol=1e-5)  # official merge


def test_visionzip_batch_matches_one_by_one(gemma):
    model, processor = gemma
    visionzip_batch_matches_one_by_one(model, sample_inputs(processor, 3, seed=12),
                                       sample_inputs_unbatched(processor, 3, seed=12), [8, 8, 8])


def test_pan_and_scan_crops_are_blocks_of_their_own(gemma):
    """A wide image with pan-and-scan: the image and its 2 crops are 3 blocks of 16; the pruned forward matches the
    spec reference on transformers' masks, and VisionZip + TransPrune match one by one."""
    model, processor = gemma
    scan = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=32, pan_and_scan_max_num_crops=4)
    inputs = processor(images=[[random_image(1, (128, 64))]], text=["USER: <start_of_image> what is there ? ASSISTANT:"],
                       return_tensors="pt", **scan)
    from transprune.adapters import adapter_for

    assert sorted(set(adapter_for(model).attention_blocks(inputs)[0].tolist())) == [-1, 0, 1, 2]
    stages, ref_logits = reference(model, inputs, TINY)
    with transprune.pruned(model, TINY) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_stats[0].kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)
    with transprune.pruned(model, [VisionZipConfig(6, 2), TINY]) as handle:
        greedy(model, inputs, n=4)
        assert len(handle.last_stats[0].kept_indices[0]) == 3 * 8  # 8 per image and per crop


def test_a_padded_batch_of_two_images_none_and_one_matches_one_by_one(gemma):
    model, processor = gemma
    prompts = ["USER: <start_of_image> <start_of_image> what is the colour of this ? ASSISTANT:",
               "USER: how many dogs ? ASSISTANT:", "USER: <start_of_image> what is there ? ASSISTANT:"]
    images = [[random_image(1), random_image(2)], [], [random_image(3)]]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    singles = [processor(images=[i] if i else None, text=[t], return_tensors="pt") for t, i in zip(prompts, images)]
    for config in (TINY, FastVConfig(k=2, r=0.5), [VisionZipConfig(6, 2), TINY]):
        with transprune.pruned(model, config) as handle:
            tokens = greedy(model, batch, n=30)  # past the sliding window
            kept = [s.kept_indices for s in handle.last_stats]
            assert kept[1] == [] and handle.last_stats[1].n_image_tokens == 0
            for b, inputs in enumerate(singles):
                assert torch.equal(greedy(model, inputs, n=30)[0], tokens[b])
                assert handle.last_stats[0].kept_indices == kept[b]
