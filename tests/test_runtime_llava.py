"""The pruned decoder loop on tiny random-init LLaVA-1.5 models (fp32, CPU)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import transprune
from transprune.compat import cache_of
from transprune import TransPruneConfig
from transprune.testing import tiny_llava

from conftest import assert_batch_matches_single, greedy, left_pad, make_prompt, n_image_tokens, pixels, tiny_config




def logits(model, ids, mask, pix):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits


# -- 1. switched off == unpruned --------------------------------------------------------------------
def test_ratio_one_equals_unpruned(llava):
    prompts = [make_prompt(llava, 3, 6, seed=1), make_prompt(llava, 5, 9, seed=2)]
    ids, mask = left_pad(prompts)
    pix = pixels(llava, 2, seed=3)
    ref_logits, ref_tokens = logits(llava, ids, mask, pix), greedy(llava, ids, mask, pix)
    with transprune.pruned(llava, tiny_config(keep_ratios=(1.0, 1.0, 1.0))) as handle:
        got_logits, got_tokens = logits(llava, ids, mask, pix), greedy(llava, ids, mask, pix)
        assert handle.last_stats[0].visual_tokens_per_layer == [n_image_tokens(llava)] * 8
    valid = mask.bool()
    assert torch.equal(got_logits[valid], ref_logits[valid])
    assert torch.equal(got_tokens, ref_tokens)


def test_off_preset_and_remove_restore_the_model(llava):
    ids, mask = left_pad([make_prompt(llava, 4, 7, seed=4)])
    pix = pixels(llava, 1, seed=5)
    ref = greedy(llava, ids, mask, pix)
    with transprune.pruned(llava, TransPruneConfig.preset("off")) as handle:
        assert torch.equal(greedy(llava, ids, mask, pix), ref)
        assert handle.last_stats[0].visual_tokens_per_layer == [n_image_tokens(llava)] * 8
    handle = transprune.apply(llava, tiny_config())
    assert "forward" in vars(llava.model) and "forward" in vars(llava.model.language_model)
    assert not torch.equal(greedy(llava, ids, mask, pix), ref)  # pruning does change this random model
    handle.remove()
    assert "forward" not in vars(llava.model) and "forward" not in vars(llava.model.language_model)
    assert torch.equal(greedy(llava, ids, mask, pix), ref)


# -- 2-4. scores, counts and the pruned forward against an independent reference --------------------
def reference_run(model, ids, pix, cfg: TransPruneConfig, forced=None):
    """The spec (method.md §3-6) written out for one unpadded sample, on HF's own layers.

    ``forced`` (kept image ranks per stage) replaces the top-k choice, to replay a pruning decision.

    Returns per stage (ttv, iga, score, kept image ranks) and the final-norm hidden states of the
    surviving tokens with their input columns.
    """
    lm = model.model.language_model
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        feats = torch.cat(list(model.model.get_image_features(pixel_values=pix).pooler_output))
        is_image = ids[0] == model.config.image_token_id
        embeds[0, is_image] = feats
        h = embeds
        cols = torch.arange(ids.shape[1])  # input column of each current token
        pos = torch.arange(ids.shape[1])
        rank = torch.where(is_image, is_image.long().cumsum(0) - 1, torch.full_like(cols, -1))
        n_image = int(is_image.sum())
        ttv = torch.zeros(ids.shape[1])
        captured = {}
        hooks = []
        for i, layer in enumerate(lm.layers):
            for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
                def hook(mod, args, out, key=(i, name)):
                    captured[key] = out[0] if isinstance(out, tuple) else out
                hooks.append(getattr(layer, name).register_forward_hook(hook))
        stages = []
        try:
            for i, layer in enumerate(lm.layers):
                rope = lm.rotary_emb(h, pos[None])
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos[None])
                if i + 1 in cfg.accumulation_layers and i + 1 <= cfg.pruning_layers[-1]:
                    for x_name, y_name in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
                        x, y = captured[(i, x_name)][0].double(), captured[(i, y_name)][0].double()
                        mag = y.norm(dim=-1) / x.norm(dim=-1)
                        c = F.cosine_similarity(x, y, dim=-1)
                        u = 1 - c if cfg.direction == "1-cos" else 1 - c.abs()
                        ttv += (torch.exp(u) / torch.exp(u).sum() * mag).float()
                if i + 1 in cfg.pruning_layers:
                    stage = cfg.pruning_layers.index(i + 1)
                    img_now = (rank >= 0).nonzero().squeeze(1)
                    nxt = lm.layers[i + 1]
                    x = nxt.input_layernorm(h[0])
                    hd = nxt.self_attn.head_dim
                    q = nxt.self_attn.q_proj(x).view(len(x), -1, hd)
                    k = nxt.self_attn.k_proj(x).view(len(x), -1, hd)
                    cos, sin = lm.rotary_emb(h, pos[None])

                    def rot(t):
                        half = t.shape[-1] // 2
                        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
                        return t * cos[0][:, None] + rotated * sin[0][:, None]

                    q, k = rot(q).double(), rot(k).double()
                    groups = q.shape[1] // k.shape[1]
                    rows = list(range(int(img_now[-1]) + 1, len(x)))
                    att = torch.zeros(len(x), dtype=torch.float64)
                    for head in range(q.shape[1]):
                        for r in rows:
                            logit = (k[: r + 1, head // groups] @ q[r, head]) / hd ** 0.5
                            att[: r + 1] += torch.softmax(logit, 0)
                    iga = (att / (q.shape[1] * len(rows)))[img_now].float()
                    t_img = ttv[img_now]
                    t_hat, i_hat = t_img / (t_img.sum() + 1e-8), iga / (iga.sum() + 1e-8)
                    score = {"transprune": cfg.alpha * t_hat + (1 - cfg.alpha) * i_hat, "ttv": t_hat, "iga": i_hat}[cfg.score]
                    k_keep = int(n_image * cfg.keep_ratios[stage])
                    chosen = sorted(torch.topk(score.double(), k_keep).indices.tolist())
                    if forced is not None:
                        chosen = [j for j, r in enumerate(rank[img_now].tolist()) if r in forced[stage]]
                    stages.append(dict(ttv=t_hat, iga=i_hat, score=score, kept=rank[img_now[chosen]].tolist()))
                    keep = (rank < 0).clone()
                    keep[img_now[chosen]] = True
                    h, cols, ttv, rank = h[:, keep], cols[keep], ttv[keep], rank[keep]
                    pos = torch.arange(int(keep.sum())) if cfg.positions == "compact" else pos[keep]
        finally:
            for hk in hooks:
                hk.remove()
        return stages, lm.norm(h)[0], cols


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(direction="1-abs-cos"), dict(positions="original"), dict(score="ttv"), dict(score="iga"),
     dict(alpha=0.3)],
    ids=["default", "abs-cos", "original-positions", "ttv-only", "iga-only", "alpha0.3"],
)
def test_scores_counts_and_forward_match_reference(llava, overrides):
    cfg = tiny_config(**overrides)
    prompt = make_prompt(llava, 4, 9, seed=11)
    ids = prompt[None]
    pix = pixels(llava, 1, seed=12)
    stages, ref_hidden, ref_cols = reference_run(llava, ids, pix, cfg)
    n = n_image_tokens(llava)
    with transprune.pruned(llava, cfg, record_scores=True) as handle:
        got_logits = logits(llava, ids, torch.ones_like(ids), pix)
        stats = handle.last_stats[0]
    # 2. TTV and IGA (L1-normalised over image tokens) and the combined score equal the reference
    for got, ref in zip(stats.scores, stages):
        if cfg.score != "iga":
            assert torch.allclose(got["ttv"], ref["ttv"], atol=1e-5, rtol=1e-4)
        if cfg.score != "ttv":
            assert torch.allclose(got["iga"], ref["iga"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(got["score"], ref["score"], atol=1e-5, rtol=1e-4)
        assert got["image_index"].tolist() == sorted(got["image_index"].tolist())
    # 3. exact counts in original order, per-layer visual tokens
    assert [len(k) for k in stats.kept_indices] == [int(n * r) for r in cfg.keep_ratios]
    assert stats.kept_indices == [s["kept"] for s in stages]
    for kept in stats.kept_indices:
        assert kept == sorted(kept)
    assert stats.visual_tokens_per_layer == [n, n, 56, 32, 32, 16, 16, 16]
    # 4. the pruned forward equals HF's layers run on the hand-gathered sequence
    ref_logits = llava.lm_head(ref_hidden)
    assert torch.allclose(got_logits[0, ref_cols], ref_logits, atol=1e-4, rtol=1e-4)
    dropped = torch.ones(ids.shape[1], dtype=torch.bool)
    dropped[ref_cols] = False
    assert dropped.sum() == n - int(n * cfg.keep_ratios[-1])
    assert torch.all(got_logits[0, dropped] == 0)  # dropped tokens have no output: zero rows


def test_text_never_dropped_and_cache_lengths_follow_tokens(llava):
    cfg = tiny_config()
    ids = make_prompt(llava, 6, 10, seed=21)[None]
    pix = pixels(llava, 1, seed=22)
    n, text = n_image_tokens(llava), ids.shape[1] - n_image_tokens(llava)
    with transprune.pruned(llava, cfg) as handle, torch.no_grad():
        out = llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, use_cache=True)
        stats = handle.last_stats[0]
    cache = cache_of(out)
    lengths = [cache.get_seq_length(i) for i in range(8)]
    assert lengths == [text + c for c in stats.visual_tokens_per_layer]
    assert lengths == [text + t for t in (64, 64, 56, 32, 32, 16, 16, 16)]


# -- 5. batch == one by one --------------------------------------------------------------------------
def test_batch_matches_one_by_one(llava):
    prompts = [make_prompt(llava, 2, 5, seed=31), make_prompt(llava, 7, 12, seed=32), make_prompt(llava, 4, 3, seed=33)]
    assert_batch_matches_single(llava, tiny_config(), prompts, pixels(llava, 3, seed=34))


def test_padding_content_never_matters(llava):
    """Whatever sits in padded slots (token id, hence embedding) changes no score and no output."""
    prompts = [make_prompt(llava, 2, 5, seed=41), make_prompt(llava, 9, 11, seed=42)]
    pix = pixels(llava, 2, seed=43)
    results = []
    with transprune.pruned(llava, tiny_config(), record_scores=True) as handle:
        for pad_id in (0, 7):
            ids, mask = left_pad(prompts, pad_id=pad_id)
            results.append((greedy(llava, ids, mask, pix, n=8), handle.last_stats[0].scores))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a["score"], b["score"])


# -- 6. attention backends -------------------------------------------------------------------------
def test_sdpa_and_eager_agree(llava, llava_eager):
    cfg = tiny_config()
    prompts = [make_prompt(llava, 3, 8, seed=51), make_prompt(llava, 6, 4, seed=52)]
    ids, mask = left_pad(prompts)
    pix = pixels(llava, 2, seed=53)
    outputs = []
    for model in (llava, llava_eager):
        assert model.config.text_config._attn_implementation in ("sdpa", "eager")
        with transprune.pruned(model, cfg) as handle:
            outputs.append((greedy(model, ids, mask, pix), [s.kept_indices for s in handle.last_stats],
                            logits(model, ids, mask, pix)))
    assert llava_eager.config.text_config._attn_implementation == "eager"
    assert outputs[0][1] == outputs[1][1]
    assert torch.equal(outputs[0][0], outputs[1][0])
    valid = mask.bool()
    assert torch.allclose(outputs[0][2][valid], outputs[1][2][valid], atol=1e-4)


def test_flash_attention_2_when_installed():
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA device")
    fa = tiny_llava(seed=0, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    ref = tiny_llava(seed=0, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    ids, mask = left_pad([make_prompt(ref, 3, 8, seed=54)])
    pix = pixels(ref, 1, seed=55).cuda().bfloat16()
    kept = []
    for model in (fa, ref):
        with transprune.pruned(model, tiny_config()) as handle:
            greedy(model, ids.cuda(), mask.cuda(), pix, n=4)
            kept.append(handle.last_stats[0].kept_indices)
    assert kept[0] == kept[1]


def test_nothing_forces_eager_or_output_attentions(llava):
    calls = []

    def spy(module, args, kwargs, out):
        calls.append(kwargs.get("output_attentions"))

    hooks = [layer.self_attn.register_forward_hook(spy, with_kwargs=True) for layer in llava.model.language_model.layers]
    try:
        with transprune.pruned(llava, tiny_config()):
            ids = make_prompt(llava, 3, 5, seed=61)[None]
            greedy(llava, ids, torch.ones_like(ids), pixels(llava, 1, seed=62), n=2)
    finally:
        for h in hooks:
            h.remove()
    assert calls and not any(calls)
    assert llava.config.text_config._attn_implementation == "sdpa"


# -- 7. generation modes, inputs without images, dtypes, save/load ---------------------------------
def test_sampling_with_cache_is_reproducible_and_batch_consistent(llava):
    prompts = [make_prompt(llava, 3, 6, seed=71), make_prompt(llava, 5, 4, seed=72)]
    ids, mask = left_pad(prompts)
    pix = pixels(llava, 2, seed=73)
    with transprune.pruned(llava, tiny_config()):
        torch.manual_seed(0)
        a = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=12, do_sample=True, top_k=20)
        torch.manual_seed(0)
        b = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=12, do_sample=True, top_k=20)
    assert torch.equal(a, b) and a.shape == (2, ids.shape[1] + 12)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_decode_with_cache_matches_reference(llava, positions):
    """Each decode step over the per-layer caches equals HF's layers run on the kept prefill tokens
    followed by the generated tokens (same pruning decision, positions by the configured rule)."""
    cfg = tiny_config(positions=positions)
    ids = make_prompt(llava, 3, 6, seed=74)[None]
    pix = pixels(llava, 1, seed=75)
    with transprune.pruned(llava, cfg) as handle:
        generated = greedy(llava, ids, torch.ones_like(ids), pix, n=6)
        kept = handle.last_stats[0].kept_indices
        assert handle.last_stats[0].positions == positions
    full = torch.cat([ids, generated[:, :-1]], dim=1)
    _, hidden, cols = reference_run(llava, full, pix, cfg, forced=kept)
    with torch.no_grad():
        ref_next = llava.lm_head(hidden[-6:]).argmax(-1)
    assert cols[-6:].tolist() == list(range(ids.shape[1] - 1, full.shape[1]))
    assert torch.equal(ref_next, generated[0])


def test_prompts_without_image(llava):
    cfg = llava.config
    ids = torch.randint(5, cfg.text_config.vocab_size - 1, (2, 9))
    ids[ids == cfg.image_token_id] = 5
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = llava.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with transprune.pruned(llava, tiny_config()) as handle:
            got = llava.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            # every prefill sets last_stats: one entry per sample, no image tokens, nothing pruned
            assert [(s.n_image_tokens, s.kept_indices) for s in handle.last_stats] == [(0, []), (0, [])]
    assert torch.equal(ref, got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = tiny_llava(seed=0, dtype=dtype)
    ids, mask = left_pad([make_prompt(model, 3, 7, seed=81), make_prompt(model, 6, 5, seed=82)])
    pix = pixels(model, 2, seed=83).to(dtype)
    with transprune.pruned(model, tiny_config(), record_scores=True) as handle:
        out = greedy(model, ids, mask, pix, n=5)
        stats = handle.last_stats
    assert out.shape == (2, 5)
    for s in stats:
        assert [len(k) for k in s.kept_indices] == [56, 32, 16]
        for stage in s.scores:
            assert stage["score"].dtype == torch.float32 and torch.isfinite(stage["score"]).all()


def test_save_pretrained_round_trip(llava, tmp_path):
    ids = make_prompt(llava, 3, 6, seed=91)[None]
    pix = pixels(llava, 1, seed=92)
    with transprune.pruned(llava, tiny_config()):
        llava.save_pretrained(tmp_path)
        before = greedy(llava, ids, torch.ones_like(ids), pix)
    loaded = type(llava).from_pretrained(tmp_path).eval()
    assert "forward" not in vars(loaded.model.language_model)
    with transprune.pruned(loaded, tiny_config()):
        after = greedy(loaded, ids, torch.ones_like(ids), pix)
    assert torch.equal(before, after)


# -- API guarantees ----------------------------------------------------------------------------------
def test_bad_config_and_double_apply_leave_the_model_untouched(llava):
    with pytest.raises(ValueError, match="do not fit a 8-layer decoder"):
        transprune.apply(llava, TransPruneConfig(pruning_layers=(2, 8), keep_ratios=(0.5, 0.2), accumulation_layers=(2,),
                                                 reference_depth=None))
    assert "forward" not in vars(llava.model.language_model)
    with pytest.raises(TypeError, match="TransPruneConfig"):
        transprune.apply(llava, {"keep_ratios": (0.5,)})
    handle = transprune.apply(llava, tiny_config())
    try:
        with pytest.raises(ValueError, match="already applied"):
            transprune.apply(llava, tiny_config())
    finally:
        handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in vars(llava.model.language_model)


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=50))
    with pytest.raises(TypeError, match="supported model classes: LlavaForConditionalGeneration"):
        transprune.apply(lm, tiny_config())


def test_presets_map_to_the_model_depth():
    model = tiny_llava(seed=0, num_hidden_layers=32)
    ids = make_prompt(model, 3, 5, seed=95)[None]
    with transprune.pruned(model, TransPruneConfig.preset("high")) as handle:
        greedy(model, ids, torch.ones_like(ids), pixels(model, 1, seed=96), n=2)
    s = handle.last_stats[0]
    assert s.pruning_layers == (7, 9, 12) and s.accumulation_layers == (7, 8, 9, 10, 11, 12)
    assert s.visual_tokens_per_layer == [64] * 7 + [56] * 2 + [40] * 3 + [8] * 20
    small = tiny_llava(seed=0, num_hidden_layers=12)
    with transprune.pruned(small, TransPruneConfig.preset("low", reference_depth=32)) as handle:
        greedy(small, ids, torch.ones_like(ids), pixels(small, 1, seed=96), n=2)
    assert handle.last_stats[0].pruning_layers == (3, 4, 5)
    assert handle.last_stats[0].visual_tokens_per_layer == [64] * 3 + [40] + [12] + [4] * 7


def test_concurrent_generations_do_not_mix(llava):
    prompts = [make_prompt(llava, 3, 6, seed=101), make_prompt(llava, 8, 4, seed=102)]
    pix = pixels(llava, 2, seed=103)
    with transprune.pruned(llava, tiny_config()):
        expected = [greedy(llava, p[None], torch.ones(1, len(p), dtype=torch.long), pix[b:b + 1], n=10)
                    for b, p in enumerate(prompts)]
        results = [None, None]
        barrier = threading.Barrier(2)

        def work(b):
            barrier.wait()
            p = prompts[b]
            for _ in range(3):
                out = greedy(llava, p[None], torch.ones(1, len(p), dtype=torch.long), pix[b:b + 1], n=10)
                assert torch.equal(out, expected[b])
            results[b] = out

        threads = [threading.Thread(target=work, args=(b,)) for b in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_a_pruned_model_dropped_without_remove_is_freed():
    import gc
    import weakref

    model = tiny_llava(seed=0, num_hidden_layers=2)
    transprune.apply(model, transprune.TransPruneConfig(accumulation_layers=(1,), pruning_layers=(1,),
                                                        keep_ratios=(0.5,)))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_deep_copy_carries_no_pruning_and_runs_its_own_weights(llava):
    import copy

    ids = make_prompt(llava, 3, 5, seed=7)[None]
    pix = pixels(llava, 1, seed=8)
    with torch.no_grad():
        unpruned = llava(input_ids=ids, pixel_values=pix).logits
    with transprune.pruned(llava, tiny_config()) as handle:
        twin = copy.deepcopy(llava)
        with torch.no_grad():
            assert torch.equal(twin(input_ids=ids, pixel_values=pix).logits, unpruned)  # no pruning on the copy
            for p in twin.model.language_model.layers[-1].parameters():
                p.mul_(0.5)
            assert not torch.equal(twin(input_ids=ids, pixel_values=pix).logits, unpruned)  # its own weights
            llava(input_ids=ids, pixel_values=pix)
        assert handle.last_stats[0].kept_indices  # the original still prunes


def test_static_caches_are_refused_up_front(llava):
    ids = make_prompt(llava, 3, 5, seed=9)[None]
    with transprune.pruned(llava, tiny_config()):
        with pytest.raises(ValueError, match="StaticCache is not supported while transprune prunes.*DynamicCache"):
            llava.generate(input_ids=ids, pixel_values=pixels(llava, 1, seed=10), max_new_tokens=2,
                           cache_implementation="static")


def test_a_lost_handle_can_be_found_and_removed(llava):
    handle = transprune.apply(llava, tiny_config())
    assert transprune.handle_of(llava) is handle
    with pytest.raises(ValueError, match=r"transprune.remove\(model\).*transprune.handle_of\(model\)"):
        transprune.apply(llava, tiny_config())
    assert transprune.remove(llava) and not handle.active and transprune.handle_of(llava) is None
    assert not transprune.remove(llava)


def test_last_stats_belong_to_the_last_call_and_to_its_thread(llava):
    image_prompt, text_prompt = make_prompt(llava, 3, 5, seed=11), make_prompt(llava, 6, 4, seed=12, n_image=0)
    with transprune.pruned(llava, tiny_config()) as handle, torch.no_grad():
        greedy(llava, image_prompt[None], torch.ones(1, len(image_prompt), dtype=torch.long), pixels(llava, 1, 13), n=2)
        assert handle.last_stats[0].n_image_tokens == 64
        llava.generate(input_ids=text_prompt[None], max_new_tokens=2, do_sample=False)  # text only: reset
        assert [s.n_image_tokens for s in handle.last_stats] == [0] and handle.last_stats[0].kept_indices == []
        prompts = {n: make_prompt(llava, n, 3, seed=n) for n in (2, 9)}
        expected = {}
        for n, p in prompts.items():
            llava(input_ids=p[None], pixel_values=pixels(llava, 1, n))
            expected[n] = handle.last_stats[0].kept_indices
        assert expected[2] != expected[9]
        seen, barrier = {}, threading.Barrier(2)

        def call(n_before):
            barrier.wait()
            for _ in range(5):
                llava(input_ids=prompts[n_before][None], pixel_values=pixels(llava, 1, n_before))
                seen.setdefault(n_before, []).append(handle.last_stats[0].kept_indices)

        threads = [threading.Thread(target=call, args=(n,)) for n in (2, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert handle.last_stats[0].kept_indices == expected[9]  # this thread's last call, not the others'
    assert seen == {n: [expected[n]] * 5 for n in (2, 9)}
