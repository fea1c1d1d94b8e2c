"""VisionZip against the official code's rule (dvlab-research/VisionZip: `clip_encoder.py` for the tokens,
`llava_arch.py` for their order on LLaVA-NeXT), rewritten here on its layout: LLaVA-1.5 with 576 patches whose
image tokens sit at 35..610. The rule: the CLS token and the top ``dominant - 1`` patches by CLS attention (summed
over heads) of the feature layer; of the rest, ``contextual`` targets at ``arange(0, M, M // contextual)``, each
the sum of itself and the mean of the patches whose head-averaged key is most similar to it; the LLM gets
CLS, dominant patches in order, contextual tokens, projected. Checked: the kept patches in order, the count, and
the logits of the LLM run by hand on the official sequence."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import transprune
from transprune import VisionZipConfig
from official_layout import IMAGE_END, IMAGE_START, layout_inputs, llava_576
from transprune.testing import IMAGE_ID, _build, tiny_llava_next_config


def official_tile_tokens(vision_out, encoder_layer, dominant, contextual):
    """`CLIPVisionTower_VisionZip.forward` on a batch of tiles (its `visionzip(model, dominant, contextual)` passes
    ``dominant - 1``): (tiles, dominant + contextual, d) vision-space tokens and `all_indices` (CLS first)."""
    attn_weights = vision_out.attentions[-2]
    hidden_states = vision_out.hidden_states[-2]
    attn = encoder_layer.self_attn
    b, t, _ = hidden_states.shape
    raw_keys = attn.k_proj(encoder_layer.layer_norm1(vision_out.hidden_states[-3]))
    metric = raw_keys.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2).mean(1)
    dominant_num = dominant - 1
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((b, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(b, dominant_num + 1, -1)
    metric_filtered = metric[mask].view(b, t - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(b, t - (dominant_num + 1), -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(b, int(others.sum()), contextual, dtype=hidden_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    # which patch each contextual token is written from (the target), for the kept-index check
    remaining = torch.stack([m[1:].nonzero().squeeze(1) for m in mask])  # patches not dominant, in order
    targets = remaining[:, target_indices]
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices, targets


def run_llm(model, ids, image_at, image_tokens):
    """The LLM on the text embeddings with the image span replaced by ``image_tokens`` (the official sequence)."""
    embeds = model.get_input_embeddings()(ids)
    seq = torch.cat([embeds[:, :image_at.start], image_tokens[None], embeds[:, image_at.stop:]], 1)
    out = model.model.language_model(inputs_embeds=seq)
    return model.lm_head(out.last_hidden_state[:, -1])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dominant,contextual", [(54, 10), (108, 20), (162, 30)])
def test_visionzip_keeps_the_official_tokens_in_order_on_llava(seed, dominant, contextual):
    model = llava_576(seed, num_hidden_layers=8)
    inputs = layout_inputs(seed)
    ids, pix = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        eager = _build(model.config, LlavaForConditionalGeneration, seed, "eager", torch.float32)
        vis = eager.model.vision_tower(pix, output_attentions=True, output_hidden_states=True)
        layer = eager.model.vision_tower.vision_model.encoder.layers[-2] if hasattr(
            eager.model.vision_tower, "vision_model") else eager.model.vision_tower.encoder.layers[-2]
        tokens, all_indices, targets = official_tile_tokens(vis, layer, dominant, contextual)
        want_logits = run_llm(model, ids, range(IMAGE_START, IMAGE_END), model.model.multi_modal_projector(tokens)[0])
        with transprune.pruned(model, VisionZipConfig(dominant, contextual)) as handle:
            logits = model(input_ids=ids, pixel_values=pix).logits[:, -1]
    kept = handle.last_stats[0].kept_indices[0]
    want = [-1] + sorted((all_indices[0, 1:] - 1).tolist()) + targets[0].tolist()  # CLS, dominant, contextual
    assert len(kept) == dominant + contextual and kept == want
    assert torch.allclose(logits, want_logits, atol=1e-4), (logits - want_logits).abs().max()


def official_next_image(image_feature, keep_idx, grid_h, grid_w, side):
    """`prepare_inputs_labels_for_multimodal_visionzip`'s anyres branch with `restore_image_features_sorted` for one
    image (projected tiles (tiles, kept, d), base first): the base tile's tokens, then the other tiles' dominant
    patches in reading order over the whole grid, their CLS tokens, their contextual tokens."""
    base, tiles, keep_idx = image_feature[0], image_feature[1:], keep_idx[1:]
    num_img, total, d = tiles.shape
    num_keep = keep_idx.shape[1]
    restore = keep_idx.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros((num_img, side * side, d))
    mask = torch.zeros(num_img, side * side, dtype=torch.bool).scatter_(1, restore, True)
    restored[mask] = tiles[:, 1:num_keep, :].reshape(-1, d)
    restored = restored.view(grid_h, grid_w, side, side, d).permute(0, 2, 1, 3, 4).reshape(grid_h * side, grid_w * side, d)
    mask = mask.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).reshape(grid_h * side, grid_w * side)
    grid = torch.cat([restored[mask], tiles[:, 0], tiles[:, num_keep:].reshape(-1, d)])
    return torch.cat([base, grid])


@pytest.mark.parametrize("size,grid", [((96, 96), (2, 2)), ((48, 96), (1, 2)), ((96, 48), (2, 1))])
def test_visionzip_follows_the_official_next_path(size, grid):
    config = tiny_llava_next_config()
    config.vision_config.image_size, config.vision_config.patch_size = 48, 2
    config.image_grid_pinpoints = [[48, 48], [48, 96], [96, 48], [96, 96]]
    config.image_seq_length = 576
    model = _build(config, LlavaNextForConditionalGeneration, 1, "sdpa", torch.float32)
    adapter = transprune.adapters.adapter_for(model)
    n_image = adapter.image_tokens_for(size)
    tiles = 1 + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 40, (1, 35 + n_image + 40), generator=gen)
    ids[0, 35:35 + n_image] = IMAGE_ID
    pix = torch.randn(1, tiles, 3, 48, 48, generator=gen)
    sizes = torch.tensor([list(size)])
    with torch.no_grad():
        eager = _build(config, LlavaNextForConditionalGeneration, 1, "eager", torch.float32)
        vis = eager.model.vision_tower(pix[0], output_attentions=True, output_hidden_states=True)
        tower = getattr(eager.model.vision_tower, "vision_model", eager.model.vision_tower)
        tokens, all_indices, _ = official_tile_tokens(vis, tower.encoder.layers[-2], 54, 10)
        image_tokens = official_next_image(model.model.multi_modal_projector(tokens), all_indices, *grid, 24)
        want_logits = run_llm(model, ids, range(35, 35 + n_image), image_tokens)
        with transprune.pruned(model, VisionZipConfig(54, 10)) as handle:
            logits = model(input_ids=ids, pixel_values=pix, image_sizes=sizes).logits[:, -1]
    assert handle.last_stats[0].visual_tokens_per_layer[0] == 64 * tiles == image_tokens.shape[0]
    assert torch.allclose(logits, want_logits, atol=1e-4), (logits - want_logits).abs().max()
