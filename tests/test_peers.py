"""DART, V2Drop, DivPrune and CDPruner: each against an independent reference written here from its rule, exact
counts in order, batch == one by one on every family, sdpa == eager, switched off == unpruned, compositions and
their published operating points in the FLOPs tool."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import transprune
from transprune import CDPrunerConfig, DARTConfig, DivPruneConfig, TransPruneConfig, V2DropConfig
from conftest import greedy_on
from transprune.testing import (QWEN_KINDS, qwen_sample_inputs, qwen_sample_inputs_unbatched, sample_inputs,
                                sample_inputs_unbatched, tiny_llava, tiny_model, tiny_processor)

DART = DARTConfig(keep_ratios=(0.3,))
V2DROP = V2DropConfig(pruning_layers=(2, 4, 6), keep_ratios=(0.5, 0.25, 0.125))
DIVPRUNE = DivPruneConfig(0.25)
CDPRUNER = CDPrunerConfig(0.25)
ALL = [DART, V2DROP, DIVPRUNE, CDPRUNER]
IDS = ["dart", "v2drop", "divprune", "cdpruner"]


greedy = functools.partial(greedy_on, n=8)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0), tiny_processor("llava")


def decoder_inputs(model, inputs):
    """The decoder's input embeddings and every layer's output, unpruned (hidden_states[i]: after layer i)."""
    seen = {}
    lm = model.get_decoder()
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    hook.remove()
    return seen["embeds"][0], [h[0] for h in hidden]


def image_rows(model, inputs):
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)


# -- references, written from each method's rule ------------------------------------------------------------

@torch.no_grad()
def dart_reference(model, inputs, config, keep):
    """DART at its one pruning layer p: pivots by the L1 norm of layer p's rotated keys (from its input), then each
    pivot in the official code's order (a Python set's) takes its share of the least cosine-similar image tokens
    (final-norm space)."""
    lm = model.get_decoder()
    _, hidden = decoder_inputs(model, inputs)
    p = config.pruning_layers[0]
    layer = lm.layers[p - 1]
    x = layer.input_layernorm(hidden[p - 1])
    attn = layer.self_attn
    k = attn.k_proj(x).view(len(x), -1, attn.head_dim)
    pos = torch.arange(len(x))
    cos, sin = lm.rotary_emb(x[None], pos[None])
    half = attn.head_dim // 2
    k = k * cos[0][:, None] + torch.cat((-k[..., half:], k[..., :half]), -1) * sin[0][:, None]
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1).flatten(1)  # GQA: each KV head serves its group
    norms = k.abs().sum(-1)
    normed = lm.norm(hidden[p])
    image = image_rows(model, inputs).tolist()
    text = list(range(image[-1] + 1, len(x)))
    image_pivots = sorted(image, key=lambda i: -float(norms[i]))[: config.image_pivots]
    text_pivots = sorted(text, key=lambda i: -float(norms[i]))[: config.text_pivots]
    chosen = list(image_pivots)
    pool = [i for i in image if i not in image_pivots]
    share = math.ceil((keep - len(chosen)) / (len(image_pivots) + len(text_pivots)))
    for pivot in list(set(image_pivots + text_pivots)):
        sims = {i: float(F.cosine_similarity(normed[pivot], normed[i], dim=0)) for i in pool}
        picks = sorted(pool, key=lambda i: (sims[i], i))[: min(share, keep - len(chosen))]
        chosen += picks
        pool = [i for i in pool if i not in picks]
    return sorted(image.index(i) for i in chosen)


def divprune_reference(features: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min under 1 - cos, in float64: first the token whose nearest neighbour is farthest."""
    x = F.normalize(features.double(), dim=-1)
    d = 1 - x @ x.T
    n = len(x)
    first = max(range(n), key=lambda j: min(float(d[i, j]) for i in range(n) if i != j))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(float(d[c, j]) for c in chosen)))
    return sorted(chosen)


def cdpruner_reference(features: torch.Tensor, text: torch.Tensor, k: int) -> list[int]:
    """The greedy MAP by determinants, in float64: each step adds the token that maximises det(L_S) for
    L = diag(r) S diag(r), r = min-max of minus the mean cosine with the instruction tokens."""
    x, t = F.normalize(features.double(), dim=-1), F.normalize(text.double(), dim=-1)
    r = -(x @ t.T).mean(-1)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    kernel = r[:, None] * (x @ x.T) * r[None, :]
    chosen = []
    for _ in range(k):
        rest = [j for j in range(len(x)) if j not in chosen]
        chosen.append(max(rest, key=lambda j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))))
    return sorted(chosen)


def test_dart_matches_its_rule(llava):
    model, processor = llava
    for b, inputs in enumerate(sample_inputs_unbatched(processor, 3, seed=2)):
        config = DARTConfig(keep_ratios=(0.3 + 0.1 * b,), image_pivots=2 + b, text_pivots=4 - b)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        keep = int(n * config.keep_ratios[0])
        with transprune.pruned(model, config) as handle, torch.no_grad():
            model(**inputs)
        assert handle.last_stats[0].kept_indices == [dart_reference(model, inputs, config, keep)]


def test_v2drop_matches_its_rule_at_every_stage(llava):
    """Each stage keeps the tokens whose residual stream the pruning layer changed most (L2), with the layers run
    here on the kept tokens at their original positions."""
    model, processor = llava
    inputs = sample_inputs_unbatched(processor, 3, seed=3)[1]
    lm = model.get_decoder()
    embeds, _ = decoder_inputs(model, inputs)
    h, pos = embeds[None], torch.arange(embeds.shape[0])
    rank = torch.full((len(pos),), -1)
    image = image_rows(model, inputs)
    rank[image] = torch.arange(len(image))
    n, expected = len(image), []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            out = layer(h, attention_mask=None, position_ids=pos[None], position_embeddings=lm.rotary_emb(h, pos[None]))
            if i + 1 in V2DROP.pruning_layers:
                stage = V2DROP.pruning_layers.index(i + 1)
                img = (rank >= 0).nonzero().squeeze(1)
                change = (out[0, img] - h[0, img]).norm(dim=-1)
                top = img[torch.topk(change, int(n * V2DROP.keep_ratios[stage])).indices]
                keep = rank < 0
                keep[top] = True
                expected.append(sorted(rank[top].tolist()))
                out, pos, rank = out[:, keep], pos[keep], rank[keep]
            h = out
        logits = model.lm_head(lm.norm(h))[0, -1]
    with transprune.pruned(model, V2DROP) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_stats[0].kept_indices == expected
    assert torch.allclose(got, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_divprune_and_cdpruner_match_their_rules(kind):
    model, processor = tiny_model(kind, seed=0), tiny_processor(kind)
    for inputs in sample_inputs_unbatched(processor, 2, seed=4):
        embeds, _ = decoder_inputs(model, inputs)
        image = image_rows(model, inputs)
        text = embeds[image[-1] + 1:]
        k = round(len(image) * 0.25)
        for config, expected in ((DIVPRUNE, divprune_reference(embeds[image], k)),
                                 (CDPRUNER, cdpruner_reference(embeds[image], text, k))):
            with transprune.pruned(model, config) as handle, torch.no_grad():
                model(**inputs)
            assert handle.last_stats[0].kept_indices == [expected]
            assert handle.last_stats[0].kept_after_layer == [0]


@pytest.mark.parametrize("config", ALL, ids=IDS)
def test_exact_counts_in_order_sdpa_equals_eager_and_off_equals_unpruned(llava, config):
    model, processor = llava
    batch = sample_inputs(processor, 3, seed=5, sizes=[(64, 64)] * 3)
    runs = []
    for m in (model, tiny_llava(seed=0, attn_implementation="eager")):
        with transprune.pruned(m, config) as handle:
            runs.append((greedy(m, batch), [s.kept_indices for s in handle.last_stats]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    ratios = getattr(config, "keep_ratios", None) or (config.keep_ratio,)
    for kept in runs[0][1]:
        counts = [round(64 * config.keep_ratio)] if config.stage == "pre" else [int(64 * r) for r in ratios]
        assert [len(k) for k in kept] == counts and all(k == sorted(k) for k in kept)
    import dataclasses

    off = (dataclasses.replace(config, keep_ratio=1.0) if config.stage == "pre"
           else dataclasses.replace(config, keep_ratios=(1.0,) * len(config.keep_ratios)))
    with torch.no_grad():
        ref = model(**batch).logits
    ref_tokens = greedy(model, batch)
    with transprune.pruned(model, off), torch.no_grad():
        got = model(**batch).logits
        assert torch.equal(greedy(model, batch), ref_tokens)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


FAMILIES = ["llava_next", "llava_onevision", "smolvlm", "internvl", "gemma3", "qwen2_5_vl", "qwen3_vl"]


def family_inputs(kind, processor, seed):
    sizes = [(64, 64), (128, 64), (64, 128)] if kind != "gemma3" else None
    if kind in QWEN_KINDS:
        return qwen_sample_inputs(processor, 3, seed, sizes), qwen_sample_inputs_unbatched(processor, 3, seed, sizes)
    return sample_inputs(processor, 3, seed=seed, sizes=sizes), sample_inputs_unbatched(processor, 3, seed=seed, sizes=sizes)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_batch_matches_one_by_one(kind):
    model, processor = tiny_model(kind, seed=0), tiny_processor(kind)
    batch, singles = family_inputs(kind, processor, seed=6)
    for config in ALL + [[CDPrunerConfig(0.5), TransPruneConfig(reference_depth=32)]]:
        with transprune.pruned(model, config) as handle:
            tokens = greedy(model, batch, n=6)
            kept = [s.kept_indices for s in handle.last_stats]
            for b, inputs in enumerate(singles):
                assert torch.equal(greedy(model, inputs, n=6)[0], tokens[b]), (kind, config)
                assert handle.last_stats[0].kept_indices == kept[b]


def test_operating_points_in_the_flops_tool():
    from transprune.flops import estimate
    from transprune.methods import build

    # DART's code points on LLaVA-1.5-7B: 4 pivots + 8 x 24 / 16 / 8 tokens after layer 2
    for name, tokens in (("192", 196), ("128", 132), ("64", 68)):
        report = estimate(build(f"dart-{name}"), "llava-1.5-7b")
        assert report.visual_tokens_per_layer == (576, 576) + (tokens,) * 30
    # V2Drop's LLaVA-1.5 schedule: 576 -> 288 -> 144 -> 1 before 0-based layers 3, 17, 22
    assert estimate(build("v2drop"), "llava-1.5-7b").visual_tokens_per_layer == (576,) * 3 + (288,) * 14 + (144,) * 5 + (1,) * 10
    assert estimate(build("divprune"), "llava-1.5-7b").visual_tokens_per_layer == (56,) * 32  # 0.098 of 576
    assert [estimate(build(f"cdpruner-{n}"), "llava-1.5-7b").visual_tokens_per_layer[0] for n in (64, 128, 192)] == [64, 128, 192]
    # the paper's CDPruner + TransPrune rows: 0.66 and 0.44 TFLOPs, as VisionZip + TransPrune
    assert [round(estimate(transprune.preset(f"cdpruner{n}+transprune"), "llava-1.5-7b").tflops, 2) for n in (288, 192)] == [0.66, 0.44]
    with pytest.raises(ValueError, match="at most one pre-LLM method"):
        transprune.methods.split_methods([DIVPRUNE, CDPRUNER])
    # each method's own selection work is counted in the full prefill
    assert estimate(DivPruneConfig(), "llava-1.5-7b").tflops_scoring == pytest.approx(576 * 576 * 4096 / 1e12)


def test_cdpruner_beyond_the_kernel_rank_still_keeps_exactly_k_distinct_tokens():
    """More tokens asked than the embedding width (64 on the tiny LLaVA-NeXT): the DPP's volume runs out; the
    rest come by relevance, and every count is exact."""
    model, processor = tiny_model("llava_next", seed=0), tiny_processor("llava_next")
    batch = sample_inputs(processor, 3, seed=7, sizes=[(64, 64), (128, 64), (64, 128)])
    n = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert min(n) * 0.75 > model.config.text_config.hidden_size
    with transprune.pruned(model, CDPrunerConfig(0.75)) as handle, torch.no_grad():
        model(**batch)
    assert [len(set(s.kept_indices[0])) for s in handle.last_stats] == [round(c * 0.75) for c in n]


def test_v2drop_keeps_a_token_at_every_stage_on_any_count():
    """The code's max(1, ...): a ratio of 0 keeps one token, on LLaVA-1.5's 576 as on a 16-token image."""
    from transprune.flops import estimate
    from transprune.methods import build

    assert estimate(build("v2drop"), "gemma3-4b").visual_tokens_per_layer[-1] == 1
    assert estimate(build("v2drop-qwen"), "qwen2.5-vl-7b").visual_tokens_per_layer[-12:] == (3,) * 6 + (1,) * 6
    model, processor = tiny_model("gemma3", seed=0), tiny_processor("gemma3")
    with transprune.pruned(model, V2DropConfig(reference_depth=32)) as handle, torch.no_grad():
        model(**sample_inputs(processor, 2, seed=8))
    assert [[len(k) for k in s.kept_indices] for s in handle.last_stats] == [[8, 4, 1]] * 2
    with pytest.raises(ValueError, match=r"keep_ratios must lie in \[0, 1\]"):
        V2DropConfig(keep_ratios=(0.5, 0.25, -0.1))


def official_dart(keys, states, start, length, image_pivots, text_pivots, max_num_trunction):
    """`get_retained_image_token` of DART's LLaVA code, rewritten here on its layout (one sample, image tokens at
    ``start .. start + length - 1``, text after): its pivots, its set, its loop, its share."""
    per_pivot = math.ceil(max_num_trunction // (image_pivots + text_pivots))
    image_norms = keys[start:start + length].abs().sum(-1)
    query_norms = keys[start + length:].abs().sum(-1)
    image_indices = (image_norms.topk(image_pivots).indices + start).tolist()
    query_indices = (query_norms.topk(text_pivots).indices + start + length).tolist()
    indices = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices):
        similarity = -F.cosine_similarity(states[item], states[valid_list], dim=-1)
        picks = [valid_list[i] for i in similarity.topk(per_pivot).indices]
        indices.update(picks)
        valid.difference_update(picks)
        valid_list = list(valid)
    indices.difference_update(query_indices)
    return sorted(indices)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("point", ["192", "128", "64"])
def test_dart_keeps_the_official_codes_tokens_on_its_layout(seed, point):
    """LLaVA-1.5's layout (576 image tokens at 35..610, 40 text tokens after): the default DART and each preset keep
    the official loop's set, in count and members; the position-ordered variant is another rule."""
    from transprune.methods.dart import _PRESETS

    gen = torch.Generator().manual_seed(seed)
    start, length, total = 35, 576, 35 + 576 + 40
    keys, states = torch.randn(total, 64, generator=gen), torch.randn(total, 32, generator=gen)
    image_at = torch.arange(start, start + length)
    config = DARTConfig.preset(point)
    keep = int(length * config.keep_ratios[0])
    assert keep == _PRESETS[point]  # 196 / 132 / 68: the code's 4 + 8 x (max_num_trunction // 8)
    score = config._priority(keys, states, image_at, start + length - 1, keep)
    mine = sorted((image_at[torch.topk(score, keep).indices]).tolist())
    want = official_dart(keys, states, start, length, 4, 4, {"192": 192, "128": 128, "64": 64}[point])
    assert len(want) == keep and mine == want
    other = DARTConfig.preset(point, pivot_order="position")._priority(keys, states, image_at, start + length - 1, keep)
    assert len(set(torch.topk(other, keep).indices.tolist())) == keep
