"""The peers under the same guarantees as TransPrune: counts, order, batch == one-by-one, backends,
switched off == unpruned, and scores against independent references written here."""

import functools
import math

import pytest
import torch

import transprune
from transprune.compat import cache_kwargs, cache_of
from transprune import FastVConfig, PDropConfig, RandomConfig, TransPruneConfig, UniformConfig, VisionZipConfig
from transprune.flops import estimate
from transprune.methods import build, preset, split_methods
from transprune.testing import sample_inputs, sample_inputs_unbatched, tiny_llava, tiny_llava_next, tiny_processor

import conftest
from conftest import assert_batch_matches_single, left_pad, make_prompt, pixels, tiny_config

ABS = dict(reference_depth=None)
METHODS = {
    "fastv": FastVConfig(k=2, r=0.5, **ABS),
    "pdrop": PDropConfig(layers=(2, 4, 6), ratio=0.5, **ABS),
    "random": RandomConfig(pruning_layers=(2, 3, 5), keep_ratios=(0.875, 0.5, 0.25), seed=3, **ABS),
    "uniform": UniformConfig(pruning_layers=(2, 5), keep_ratios=(0.5, 0.25), **ABS),
    "visionzip": VisionZipConfig(dominant=12, contextual=4),
    "visionzip+transprune": [VisionZipConfig(24, 8), tiny_config(keep_ratios=(0.5, 0.25, 0.125))],
}
EXPECTED_COUNTS = {  # kept image tokens after each stage for 64 image tokens
    "fastv": [32], "pdrop": [32, 16, 8], "random": [56, 32, 16], "uniform": [32, 16], "visionzip": [16],
    "visionzip+transprune": [32, 16, 8, 4],
}
OFF = {
    "fastv": FastVConfig(k=2, r=0.0, **ABS),
    "pdrop": PDropConfig(layers=(2, 4), ratio=1.0, **ABS),
    "random": RandomConfig(pruning_layers=(2,), keep_ratios=(1.0,), **ABS),
    "uniform": UniformConfig(pruning_layers=(2,), keep_ratios=(1.0,), **ABS),
    "visionzip": VisionZipConfig(dominant=64, contextual=0, keep_cls=False),
}


greedy = functools.partial(conftest.greedy, n=12)


@pytest.fixture(scope="module")
def batch(llava):
    prompts = [make_prompt(llava, 2, 5, seed=1), make_prompt(llava, 7, 12, seed=2), make_prompt(llava, 4, 3, seed=3)]
    return prompts, pixels(llava, 3, seed=4)


# -- FLOPs: the published numbers ------------------------------------------------------------------
@pytest.mark.parametrize("config, tflops", [
    (FastVConfig(k=2, r=0.5), 2.01), (FastVConfig(k=2, r=0.75), 1.12), (PDropConfig(), 1.78),
    (VisionZipConfig(256, 32), 1.89), (VisionZipConfig(162, 30), 1.25),
    ([VisionZipConfig(256, 32), FastVConfig()], 1.00),
    (preset("visionzip288+transprune"), 0.66), (preset("visionzip192+transprune"), 0.44),
])
def test_flops_reproduce_the_paper(config, tflops):
    assert round(estimate(config, "llava-1.5-7b").tflops, 2) == tflops


def test_flops_visionzip_on_next_counts_every_crop():
    report = estimate(VisionZipConfig(54, 10), "llava-next-7b")
    assert report.visual_tokens_per_layer == (5 * 64,) * 32


def test_flops_reference_sum_for_pdrop_on_next():
    d, m = 4096, 11008
    counts = [2880] * 8 + [1440] * 8 + [720] * 8 + [360] * 8
    ref = sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in counts) / 1e12
    assert math.isclose(estimate(PDropConfig(), "llava-next-7b").tflops, ref) and round(ref, 2) == 9.46


# -- config validation and composition -------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: FastVConfig(r=1.0), r"r must be a number in \[0, 1\)"),
    (lambda: FastVConfig(k=32, reference_depth=32), "k must be < reference_depth=32"),
    (lambda: PDropConfig(layers=(16, 8)), "layers must be strictly increasing"),
    (lambda: PDropConfig(ratio=0), r"ratio must be a number in \(0, 1\]"),
    (lambda: RandomConfig(keep_ratios=(0.5, 0.6, 0.1)), "keep_ratios must not increase"),
    (lambda: UniformConfig(positions="x"), "positions='x' is not allowed"),
    (lambda: VisionZipConfig(dominant=-1), "dominant must be an int >= 0"),
    (lambda: split_methods([VisionZipConfig(), VisionZipConfig()]), "at most one pre-LLM"),
    (lambda: build("fastv+nope"), "unknown method 'nope'"),
    (lambda: build("fastv,pdrop"), "compose methods with '\\+', e.g. 'fastv\\+pdrop'"),
    (lambda: build("transprune-high", "low"), "names preset 'high' but --preset says 'low'"),
    (lambda: build("fastv", params={"dominant": "3"}), r"unknown parameter\(s\) \['dominant'\]"),
])
def test_bad_method_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_build_applies_parameters_to_the_method_that_has_them():
    vz, tp = build("visionzip+transprune", "low", {"dominant": "100", "contextual": "20", "alpha": "0.4"})
    assert (vz.dominant, vz.contextual) == (100, 20)
    assert tp.keep_ratios == (0.625, 0.1875, 0.0625) and tp.alpha == 0.4
    assert build("pdrop", params={"layers": "4,8"}).layers == (4, 8)


def test_bad_visionzip_budget_is_refused_before_any_change(llava):
    with pytest.raises(ValueError, match="dominant \\+ contextual = 80 tokens per image"):
        transprune.apply(llava, VisionZipConfig(dominant=70, contextual=10))
    assert "forward" not in vars(llava.model) and "get_image_features" not in vars(llava.model)


# -- every method: counts, order, batch == one by one, backends, off == unpruned -------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_counts_order_and_batch_equals_one_by_one(llava, batch, name):
    prompts, pix = batch
    stats = assert_batch_matches_single(llava, METHODS[name], prompts, pix, n=12)
    for s in stats:
        assert [len(k) for k in s.kept_indices] == EXPECTED_COUNTS[name]
        previous = list(range(64))
        for stage, kept in enumerate(s.kept_indices):
            if stage == 0 and name.startswith("visionzip"):  # the official order: CLS (no image token), then patches
                assert kept[0] == -1 and len(set(kept[1:])) == len(kept) - 1 and set(kept[1:]) <= set(previous)
            else:  # sequence order, each stage a subsequence of the one before
                rest = iter(previous)
                assert all(k in rest for k in kept)
            previous = kept
    assert "forward" not in vars(llava.model) and "get_image_features" not in vars(llava.model)


@pytest.mark.parametrize("name", list(METHODS))
def test_sdpa_and_eager_agree(llava, llava_eager, batch, name):
    prompts, pix = batch
    ids, mask = left_pad(prompts[:2])
    results = []
    for model in (llava, llava_eager):
        with transprune.pruned(model, METHODS[name]) as handle:
            results.append((greedy(model, ids, mask, pix[:2], n=8), [s.kept_indices for s in handle.last_stats]))
    assert results[0][1] == results[1][1]
    assert torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize("name", list(OFF))
def test_switched_off_equals_unpruned(llava, batch, name):
    prompts, pix = batch
    ids, mask = left_pad(prompts)
    ref = greedy(llava, ids, mask, pix)
    with torch.no_grad():
        ref_logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    with transprune.pruned(llava, OFF[name]) as handle:
        got = greedy(llava, ids, mask, pix)
        with torch.no_grad():
            got_logits = llava(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        assert handle.last_stats[0].visual_tokens_per_layer == [64] * 8
    assert torch.equal(got, ref)
    valid = mask.bool()
    assert torch.allclose(got_logits[valid], ref_logits[valid], atol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_works_on_llava_next(name):
    """Anyres: samples with 136 / 200 / 336 image tokens (2 / 3 / 5 vision crops) in one batch."""
    model, processor = tiny_llava_next(seed=0), tiny_processor("llava_next")
    sizes = [(64, 64), (128, 64), (128, 128)]
    batch_inputs = sample_inputs(processor, 3, seed=5, sizes=sizes)
    singles = sample_inputs_unbatched(processor, 3, seed=5, sizes=sizes)
    with transprune.pruned(model, METHODS[name]) as handle, torch.no_grad():
        out = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)[:, batch_inputs["input_ids"].shape[1]:]
        stats = handle.last_stats
        for b, single in enumerate(singles):
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
            assert torch.equal(alone, out[b]) and handle.last_stats[0].kept_indices == stats[b].kept_indices
    pre, llm = split_methods(METHODS[name])
    for s, crops in zip(stats, (2, 3, 5)):
        counts = [pre.tokens_for(64) * crops] if pre else []  # VisionZip: D + C per 64-patch crop, no newline tokens
        start = counts[0] if pre else s.n_image_tokens
        counts += [int(start * r) for r in (llm.keep_ratios if llm else ())]
        assert [len(k) for k in s.kept_indices] == counts


# -- scores against independent references ---------------------------------------------------------
def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]


def _last_token_attention(layer, x_normed, cos, sin):
    """Mean over heads of the last row's causal softmax(q k^T / sqrt(d)), written out (fp64)."""
    hd = layer.self_attn.head_dim
    q = _rope(layer.self_attn.q_proj(x_normed).view(len(x_normed), -1, hd), cos, sin).double()
    k = _rope(layer.self_attn.k_proj(x_normed).view(len(x_normed), -1, hd), cos, sin).double()
    groups = q.shape[1] // k.shape[1]
    rows = [torch.softmax(k[:, h // groups] @ q[-1, h] / math.sqrt(hd), 0) for h in range(q.shape[1])]
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_last_token_scores_match_reference(llava, name):
    cfg = METHODS[name]
    ids = make_prompt(llava, 4, 9, seed=7)[None]
    pix = pixels(llava, 1, seed=8)
    lm = llava.model.language_model
    p = cfg.pruning_layers[0]  # first stage runs on the unpruned sequence
    seen = {}

    def grab_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def grab_output(module, args, out):
        seen["out"] = out

    hooks = [lm.layers[p - 1].register_forward_pre_hook(grab_input, with_kwargs=True),
             lm.layers[p - 1].register_forward_hook(grab_output)]
    try:
        with torch.no_grad():
            llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)  # plain HF run
    finally:
        for h in hooks:
            h.remove()
    with transprune.pruned(llava, cfg, record_scores=True) as handle, torch.no_grad():
        llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)
    got = handle.last_stats[0].scores[0]["score"]
    source, layer = (seen["in"][0], lm.layers[p - 1]) if name == "fastv" else (seen["out"][0], lm.layers[p])
    cos, sin = lm.rotary_emb(source[None], torch.arange(len(source))[None])
    with torch.no_grad():
        ref = _last_token_attention(layer, layer.input_layernorm(source), cos[0], sin[0])
    image = ids[0] == llava.config.image_token_id
    assert torch.allclose(got.double(), ref[image], atol=1e-6)
    assert handle.last_stats[0].kept_indices[0] == sorted(torch.topk(ref[image], 32).indices.tolist())


def test_random_is_seeded_and_seed_dependent(llava, batch):
    prompts, pix = batch
    p = prompts[0][None]
    kept = []
    for seed in (3, 3, 4):
        with transprune.pruned(llava, RandomConfig(pruning_layers=(2,), keep_ratios=(0.5,), seed=seed, **ABS)) as h:
            greedy(llava, p, torch.ones_like(p), pix[:1], n=1)
        kept.append(h.last_stats[0].kept_indices[0])
    assert kept[0] == kept[1] != kept[2]


def test_uniform_matches_farthest_point_reference(llava, batch):
    prompts, pix = batch
    p = prompts[0][None]
    with transprune.pruned(llava, UniformConfig(pruning_layers=(2,), keep_ratios=(0.25,), **ABS)) as h:
        greedy(llava, p, torch.ones_like(p), pix[:1], n=1)
    coords = [(i // 8, i % 8) for i in range(64)]
    # reference: start nearest the centre (3.5, 3.5), then repeatedly the farthest from all chosen
    chosen = [min(range(64), key=lambda i: ((coords[i][0] - 3.5) ** 2 + (coords[i][1] - 3.5) ** 2, i))]
    while len(chosen) < 16:
        dist = [min((coords[i][0] - coords[j][0]) ** 2 + (coords[i][1] - coords[j][1]) ** 2 for j in chosen)
                if i not in chosen else -1 for i in range(64)]
        chosen.append(max(range(64), key=lambda i: (dist[i], -i)))
    assert h.last_stats[0].kept_indices[0] == sorted(chosen)
    rows = {c // 8 for c in chosen}
    assert len(rows) >= 6  # spread over the grid, not a block


# VisionZip's selection against the official rule and an eager tower: tests/test_visionzip_official.py


def test_manual_decode_without_positions_matches_generate(llava):
    """A hand-written decode loop that passes only the cache (no mask, no positions) continues each
    layer at the right position even when layer 0 holds fewer tokens than the prompt (VisionZip)."""
    cfg = METHODS["visionzip+transprune"]
    ids = make_prompt(llava, 3, 6, seed=12)[None]
    pix = pixels(llava, 1, seed=13)
    with transprune.pruned(llava, cfg), torch.no_grad():
        expected = greedy(llava, ids, torch.ones_like(ids), pix, n=6)
        out = llava(input_ids=ids, pixel_values=pix, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(5):
            out = llava(input_ids=tokens[-1][:, None], **cache_kwargs(cache_of(out)), use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert cache_of(out).get_seq_length(0) == ids.shape[1] - (64 - 32) + 5
    assert torch.equal(torch.stack(tokens, 1), expected)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_visionzip_with_beams_and_several_sequences_keeps_each_samples_choice(kind):
    from transprune.testing import sample_inputs, tiny_model, tiny_processor

    model, processor = tiny_model(kind, seed=0), tiny_processor(kind)
    inputs = sample_inputs(processor, n=2, seed=1)
    config = [VisionZipConfig(dominant=20, contextual=6), TransPruneConfig(accumulation_layers=(2, 3),
                                                                          pruning_layers=(2, 3), keep_ratios=(0.5, 0.25))]
    with transprune.pruned(model, config) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        greedy = [s.kept_indices for s in handle.last_stats]
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
        assert out.shape[0] == 4
        beams = [s.kept_indices for s in handle.last_stats]
    assert beams == greedy  # one entry per input sample (its beams share it), each that sample's own choice


def test_iga_without_text_after_the_image_reads_the_last_tokens_row(llava):
    """A prompt that ends with the image: IGA falls back to the last token's attention (next layer), which is
    exactly PDrop's rule, so both keep the same tokens (L1 normalisation does not change the order)."""
    ids = make_prompt(llava, 6, 0, seed=21)[None]
    pix = pixels(llava, 1, seed=22)
    kept = {}
    for name, config in [("iga", tiny_config(accumulation_layers=(), pruning_layers=(2,), keep_ratios=(0.5,), score="iga")),
                         ("transprune", tiny_config(accumulation_layers=(2,), pruning_layers=(2,), keep_ratios=(0.5,))),
                         ("pdrop", PDropConfig(layers=(2,), ratio=0.5, reference_depth=None))]:
        with transprune.pruned(llava, config) as handle, torch.no_grad():
            llava.generate(input_ids=ids, pixel_values=pix, max_new_tokens=2, do_sample=False)
        kept[name] = handle.last_stats[0].kept_indices
        assert len(kept[name][0]) == 32
    assert kept["iga"] == kept["pdrop"]


def test_one_method_grammar_for_the_api_and_every_subcommand(capsys):
    """run/flops/demo's --method, bench's and eval's --methods entries and `build` read the same specs."""
    from transprune.bench import method_config
    from transprune.cli import main
    from transprune.mini.evaluate import resolve, suite_entry

    assert build("transprune-low") == TransPruneConfig.preset("low")
    assert build("transprune") == TransPruneConfig.preset("high")
    assert [c.method for c in build("visionzip+fastv")] == ["visionzip", "fastv"]
    for spec in ("transprune-low", "visionzip+fastv", "pdrop", "visionzip192+transprune"):
        assert method_config(spec) == build(spec)
        assert main(["flops", "--arch", "llava-1.5-7b", "--method", spec, "--json"]) == 0
    capsys.readouterr()
    assert resolve("none,visionzip+fastv,transprune-low") == ["none", "visionzip+fastv", "transprune-low"]
    assert suite_entry("visionzip+fastv")[1][1].reference_depth == 32  # mapped to the mini model like the suite
    # the other spelling gets the right one in its error
    assert main(["flops", "--arch", "llava-1.5-7b", "--method", "visionzip,fastv"]) == 2
    assert "compose methods with '+', e.g. 'visionzip+fastv'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compose methods with"):
        method_config("visionzip,fastv")


def test_visionzip_scales_to_a_budget_in_its_own_units():
    """Absolute counts scale as counts; shares (unset counts, or reference_tokens) as shares of the same unit; one
    count with one share is refused (no common unit)."""
    assert VisionZipConfig(100, 20).scaled(0.5) == VisionZipConfig(50, 10)
    assert VisionZipConfig().scaled(1.0).counts(256) == VisionZipConfig().counts(256) == (24, 4)
    assert VisionZipConfig(24, 4, reference_tokens=256).scaled(0.5).counts(1024) == (48, 8)
    assert VisionZipConfig(contextual=10, reference_tokens=576).scaled(1.0).counts(256) == (24, 4)
    with pytest.raises(ValueError, match="both dominant and contextual given, or neither"):
        VisionZipConfig(dominant=100).scaled(1.0)


def test_a_composition_is_split_once_into_a_plan_carried_by_the_handle():
    """`Plan.of` splits and validates once; `apply` resolves the positions on the family into the plan the
    handle carries, and the handle's `config` keeps the shape the user gave (a list stays a list)."""
    from transprune.methods import Plan

    zip_, tp = VisionZipConfig(6, 2), TransPruneConfig(**{**tiny_config().__dict__})
    plan = Plan.of([zip_, tp])
    assert (plan.pre, plan.llm, plan.names) == (zip_, tp, "visionzip+transprune") and Plan.of(plan) is plan
    assert Plan.of(tp).methods == [tp] and Plan.of(tp).config is tp
    with pytest.raises(ValueError, match="at most one pre-LLM method"):
        Plan.of([zip_, VisionZipConfig()])
    with pytest.raises(TypeError, match="config must be one of"):
        Plan.of([tp, "fastv"])
    model = tiny_llava(seed=0)
    with transprune.pruned(model, [zip_, tp]) as handle:
        assert isinstance(handle.config, list) and handle.plan.llm is handle.config[1] is handle.llm
        assert handle.plan.pre is zip_ and handle.llm.positions == "compact"
    fastv = FastVConfig(k=2, r=0.5, positions="compact")
    assert Plan.of(fastv).with_llm(FastVConfig(k=3)).config == FastVConfig(k=3)  # one config stays one config


def test_a_preset_name_finds_its_method_and_a_plan_goes_through_the_budget():
    from transprune.budget import plan_budget
    from transprune.methods import Plan, V2DropConfig

    assert preset("qwen") == V2DropConfig.preset("qwen") and preset("low") == TransPruneConfig.preset("low")
    with pytest.raises(ValueError, match="one of dart and cdpruner's: name the method, e.g. 'dart-64'"):
        preset("64")
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of 'high'"):
        preset("huge")
    from transprune.methods import CDPrunerConfig, DARTConfig

    assert preset("dart-192") == DARTConfig.preset("192")  # METHOD-PRESET, as the error asks
    assert build(None, "qwen") == V2DropConfig.preset("qwen")  # --preset alone: the method that has it
    with pytest.raises(ValueError, match="'192' is a preset of cdpruner and dart: name it on the one it is for, e.g. "
                                         "'cdpruner-192\\+dart'"):
        build("cdpruner+dart", "192")
    assert build("cdpruner-192+dart") == [CDPrunerConfig.preset("192"), DARTConfig.preset("192")]  # a bare name: its first
    tupled = Plan.of((CDPrunerConfig(), TransPruneConfig())).with_llm(FastVConfig())
    assert isinstance(tupled.config, tuple) and tupled.config[1] == FastVConfig()  # the shape given
    planned = plan_budget(Plan.of(TransPruneConfig.preset("high")), "llava-1.5-7b", 0.3)
    assert planned.achieved == pytest.approx(0.3, abs=0.01)
    assert planned.to_dict()["method"][0]["method"] == "transprune"
