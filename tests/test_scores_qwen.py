"""TransPrune's scores on the Qwen families, against the spec (../shared/method.md §3-6) written out here on
transformers' own layers: 3-D mRoPE positions kept by the kept tokens, GQA (k repeated over query heads),
Qwen3-VL's q/k norms and DeepStack rows. One unpadded sample; the pruned forward's logits must equal the
remaining layers run by hand on the hand-gathered kept sequence."""

import pytest
import torch
import torch.nn.functional as F

import transprune
import sys

from transprune import compat
from transprune.compat import rows_of
from transprune import TransPruneConfig
from transprune.testing import qwen_sample_inputs_unbatched, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_qwen_processor

from test_runtime_qwen import SCHEDULE  # noqa: E402

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin[:, None]


@torch.no_grad()
def reference(model, inputs, cfg: TransPruneConfig):
    """Per stage (ttv, iga, score, kept image ranks) and the last token's logits."""
    mm, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    encoded = mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    deepstack = [rows_of(f) for f in (getattr(encoded, "deepstack_features", None) or [])]
    visual = ids[0] == model.config.image_token_id
    h = lm.embed_tokens(ids)
    h[0, visual] = torch.cat(encoded.pooler_output)
    pos, _ = mm.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])  # (3, 1, L)
    rank = torch.where(visual, visual.long().cumsum(0) - 1, -1)
    n_image = int(visual.sum())
    ttv = torch.zeros(ids.shape[1])
    captured, hooks = {}, []
    for i, layer in enumerate(lm.layers):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            def hook(mod, args, out, key=(i, name)):
                captured[key] = out[0] if isinstance(out, tuple) else out
            hooks.append(getattr(layer, name).register_forward_hook(hook))
    stages = []
    try:
        for i, layer in enumerate(lm.layers):
            h = layer(h, attention_mask=None, position_ids=None, position_embeddings=lm.rotary_emb(h, pos))
            if i + 1 in cfg.accumulation_layers and i + 1 <= cfg.pruning_layers[-1]:
                for x_name, y_name in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
                    x, y = captured[(i, x_name)][0].double(), captured[(i, y_name)][0].double()
                    u = 1 - F.cosine_similarity(x, y, dim=-1)
                    ttv += (torch.exp(u) / torch.exp(u).sum() * (y.norm(dim=-1) / x.norm(dim=-1))).float()
            if i < len(deepstack):  # DeepStack: each visual token still present gets its own row
                h = h.clone()
                h[0, rank >= 0] += deepstack[i][rank[rank >= 0]]
            if i + 1 in cfg.pruning_layers:
                stage = cfg.pruning_layers.index(i + 1)
                img_now = (rank >= 0).nonzero().squeeze(1)
                attn = lm.layers[i + 1].self_attn
                x = lm.layers[i + 1].input_layernorm(h[0])
                hd = attn.head_dim
                q, k = attn.q_proj(x).view(len(x), -1, hd), attn.k_proj(x).view(len(x), -1, hd)
                if hasattr(attn, "q_norm"):  # Qwen3-VL normalises q and k per head before RoPE
                    q, k = attn.q_norm(q), attn.k_norm(k)
                cos, sin = lm.rotary_emb(h, pos)
                if compat.attention_composes_mrope(sys.modules[type(lm).__module__]):  # per-section rows (< 5.17)
                    cos, sin = compat.composed_mrope(cos, sin, lm.config.rope_parameters["mrope_section"])
                q, k = rotate(q, cos[0], sin[0]).double(), rotate(k, cos[0], sin[0]).double()
                groups = q.shape[1] // k.shape[1]
                rows = list(range(int(img_now[-1]) + 1, len(x)))
                att = torch.zeros(len(x), dtype=torch.float64)
                for head in range(q.shape[1]):
                    for r in rows:
                        att[: r + 1] += torch.softmax((k[: r + 1, head // groups] @ q[r, head]) / hd ** 0.5, 0)
                iga = (att / (q.shape[1] * len(rows)))[img_now].float()
                t_img = ttv[img_now]
                t_hat, i_hat = t_img / (t_img.sum() + 1e-8), iga / (iga.sum() + 1e-8)
                score = cfg.alpha * t_hat + (1 - cfg.alpha) * i_hat
                chosen = sorted(torch.topk(score.double(), int(n_image * cfg.keep_ratios[stage])).indices.tolist())
                stages.append(dict(ttv=t_hat, iga=i_hat, score=score, kept=rank[img_now[chosen]].tolist()))
                keep = rank < 0
                keep[img_now[chosen]] = True
                h, ttv, rank, pos = h[:, keep], ttv[keep], rank[keep], pos[:, :, keep]  # positions stay their own
    finally:
        for hk in hooks:
            hk.remove()
    return stages, model.lm_head(lm.norm(h))[0, -1]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_scores_kept_tokens_and_forward_match_the_spec(kind):
    model = BUILDERS[kind](seed=0)
    inputs = qwen_sample_inputs_unbatched(tiny_qwen_processor(kind), 3, seed=15, sizes=[(128, 96)] * 3)[2]
    cfg = TransPruneConfig(**SCHEDULE, keep_ratios=(0.875, 0.5, 0.25))
    stages, ref_logits = reference(model, inputs, cfg)
    with transprune.pruned(model, cfg, record_scores=True) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    stats = handle.last_stats[0]
    assert [len(s["kept"]) for s in stages] == [42, 24, 12]
    for mine, ref in zip(stats.scores, stages):
        assert torch.allclose(mine["ttv"], ref["ttv"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mine["iga"], ref["iga"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mine["score"], ref["score"], atol=1e-5, rtol=1e-4)
    assert stats.kept_indices == [s["kept"] for s in stages]
    assert torch.allclose(got, ref_logits, atol=1e-4, rtol=1e-4)
