"""FastV and PDrop against their official code's rule, rewritten here in plain torch from the model's own weights, on
the official codes' layout: LLaVA-1.5 with 576 image tokens at columns 35..610, 40 text tokens after, a 32-layer
Llama decoder, the official layer numbers as written (``reference_depth=32``: nothing is mapped).

FastV (pkunlp-icler/FastV @ d1659729, ``src/FastV/llava-hf/transformers/src/transformers/models/llama/
modeling_llama.py``, ``LlamaModel.fastv_forward``; the same rule as ``src/transformers/.../modeling_llama.py``'s
``FASTV_INPLACE`` branch): layer K (1-indexed; 0-based ``K - 1``, run with ``output_attentions=True``) returns its
own attention probabilities (softmax of its q and k with RoPE at the original positions, causal, fp32); at the loop
step ``layer_idx == K`` the code takes ``mean(attn, dim=1)[0]`` (mean over heads), the last query row ``[-1]``, the
image span ``[start:start + 576]``, ``topk(round(576 * (1 - R)))``, sorts the kept indices with all text tokens,
slices layer K's output with them and sets ``position_ids = keep_indexs`` (kept tokens keep their positions).

PDrop (Cooperx521/PyramidDrop @ 6444f304, ``llava/model/modeling_llama_pdrop.py``, ``LlamaModel.pdrop_forward`` and
``pdrop_rank_drop``; the ratio list as ``llava/eval/model_vqa_loader.py`` loads it: ``[1.0] + [0.5, 0.25, 0.125]``):
after the decoder layer ``layer_idx`` with ``rank_layer = layer_idx + 1`` in ``layer_list = [8, 16, 24]``, its
output goes through ``self.layers[rank_layer]`` (the NEXT layer, 1-indexed ``rank_layer + 1``): its input layernorm,
q/k projections, RoPE at the current ``position_ids``; the query is the row ``prompt_len + image_tokens - 1`` (the
last instruction token: the last token of an inference prompt), softmax in fp32 over all keys it may see (causal),
mean over heads, the current image span ``[posi:posi + int(576 * ratio_list[stage])]``, mean over the (one) query
row, ``topk(int(576 * ratio_list[stage + 1]))`` (a fraction of the ORIGINAL count, floored), sorted; the sequence
is text before, kept image tokens, text after, and ``position_ids`` become ``arange(new_len)``.

Checked: the kept image tokens of every stage (count, members, sequence order, numbered 0..575 by their original
image rank) and the final logits of the pruned forward against the decoder run by hand on the official sequence.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import transprune
from official_layout import IMAGE_END, IMAGE_START, IMAGE_TOKENS, layout_inputs, llava_576

DEPTH = 32
SEEDS = range(3)


class HandDecoder:
    """The model's Llama decoder in plain torch: RMSNorm, q/k/v, RoPE, causal softmax attention with KV heads
    repeated, o_proj, SiLU-gated MLP; every layer runs on (S, d) hidden states at explicit positions."""

    def __init__(self, model):
        config = model.config.text_config
        self.lm, self.head = model.model.language_model, model.lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta, "rope_type": "default"}
        assert rope.get("rope_type", "default") == "default"
        self.inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def norm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rotate(self, x, positions):
        angles = positions.float()[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def qkv(self, i, h, positions):
        """Layer ``i``'s (0-based) rotated q (H, S, hd), k and v (H, S, hd, KV heads repeated) of (S, d) ``h``."""
        layer = self.lm.layers[i]
        attn = layer.self_attn
        x = self.norm(h, layer.input_layernorm.weight)
        s = x.shape[0]
        q = F.linear(x, attn.q_proj.weight).view(s, self.heads, self.head_dim).transpose(0, 1)
        k = F.linear(x, attn.k_proj.weight).view(s, self.kv_heads, self.head_dim).transpose(0, 1)
        v = F.linear(x, attn.v_proj.weight).view(s, self.kv_heads, self.head_dim).transpose(0, 1)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        return self.rotate(q, positions), self.rotate(k, positions), v

    def probs(self, q, k, rows):
        """(H, T, S) causal softmax attention of the query rows ``rows`` (indices into the S tokens), fp32."""
        logits = q[:, rows] @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        future = torch.arange(k.shape[1])[None, :] > rows[:, None]
        return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32)

    def attention_of_row(self, i, h, positions, row):
        """(H, S): layer ``i``'s (0-based) attention from token ``row`` to every token, on its input ``h``."""
        q, k, _ = self.qkv(i, h, positions)
        return self.probs(q, k, torch.tensor([row]))[:, 0]

    def layer(self, i, h, positions):
        layer = self.lm.layers[i]
        q, k, v = self.qkv(i, h, positions)
        rows = torch.arange(h.shape[0])
        out = (self.probs(q, k, rows) @ v).transpose(0, 1).reshape(h.shape[0], -1)
        h = h + F.linear(out, layer.self_attn.o_proj.weight)
        x = self.norm(h, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        return h + F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                            mlp.down_proj.weight)

    def logits(self, h):
        return F.linear(self.norm(h[-1], self.lm.norm.weight), self.head.weight)


def llm_inputs(model, inputs):
    """LLaVA-1.5's LLM input for one sample, by hand: the text embeddings with the image span replaced by the projected
    patches (vision layer -2, CLS dropped: ``vision_feature_select_strategy="default"``)."""
    tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    patches = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])[0]
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0].clone()
    assert patches.shape[0] == IMAGE_END - IMAGE_START == IMAGE_TOKENS
    embeds[IMAGE_START:IMAGE_END] = patches
    return embeds


@functools.lru_cache(maxsize=None)
def setup(seed):
    """The model, its inputs, the hand decoder and the LLM input; checked once: the hand decoder, unpruned, gives
    the model's own logits."""
    model, inputs = llava_576(seed, num_hidden_layers=DEPTH), layout_inputs(seed)
    ref = HandDecoder(model)
    with torch.no_grad():
        embeds = llm_inputs(model, inputs)
        h, positions = embeds, torch.arange(embeds.shape[0])
        for i in range(DEPTH):
            h = ref.layer(i, h, positions)
        want = model(**inputs).logits[0, -1]
    assert torch.allclose(ref.logits(h), want, atol=1e-4), (ref.logits(h) - want).abs().max()
    return model, inputs, ref, embeds


def top_margin(score, k):
    """Gap between the k-th and the (k+1)-th highest scores. The scores are attention probabilities near 1 / 651;
    fp32 rounding moves them by ~1e-10, so a gap above ``MARGIN`` is a choice that rounding cannot flip."""
    values = score.sort(descending=True).values
    return float(values[k - 1] - values[k])


MARGIN = 1e-8


def differs(got, want):
    """'' when the kept lists agree (count, members, order), else a short account (no long list diff)."""
    if got == want:
        return ""
    return (f"kept {len(got)} tokens, the official code {len(want)}; {len(set(got) - set(want))} not in the official "
            f"set, {len(set(want) - set(got))} of it missing; sorted: {got == sorted(got)}")


def official_fastv(ref, embeds, k_layer, r, attention_layer=None):
    """`fastv_forward` of the official llava-hf path, on one sample: (kept image tokens 0..575 in sequence order,
    final logits, the selection's margin). ``attention_layer``: the 1-indexed layer whose attention ranks (the
    official: K itself; another one only to show the test tells them apart)."""
    attention_layer = k_layer if attention_layer is None else attention_layer
    length = embeds.shape[0]
    h, positions = embeds, torch.arange(length)
    for i in range(k_layer):  # layers 1..K on the whole prompt
        if i == attention_layer - 1:
            attn = ref.attention_of_row(i, h, positions, length - 1)  # layer K's own attention, from its input
        h = ref.layer(i, h, positions)
    image = attn.mean(0)[IMAGE_START:IMAGE_END]  # mean over heads; the last row; the image span
    count = round(IMAGE_TOKENS * (1 - r))
    top = image.topk(count).indices + IMAGE_START
    keep = torch.cat([torch.arange(IMAGE_START), top, torch.arange(IMAGE_END, length)]).sort().values
    h, positions = h[keep], keep  # the kept tokens keep their original positions
    for i in range(k_layer, DEPTH):
        h = ref.layer(i, h, positions)
    return (top.sort().values - IMAGE_START).tolist(), ref.logits(h), top_margin(image, count)


def official_pdrop(ref, embeds, layer_list, ratio_list, score_offset=1):
    """`pdrop_forward` / `pdrop_rank_drop` in inference, on one sample: (kept image tokens of each stage, 0..575 in
    sequence order, final logits, the smallest selection margin). ``ratio_list``: with the loader's leading 1.0.
    ``score_offset``: which layer's weights score, relative to the pruning layer (the official: 1, the next layer;
    0 only to show the test tells them apart)."""
    image_index = IMAGE_START  # `image_token_posi`: text before the image is never dropped
    prompt_len = embeds.shape[0] - IMAGE_TOKENS  # `prompt_len`: the input ids but the image placeholder
    h, positions = embeds, torch.arange(embeds.shape[0])
    ranks = torch.arange(IMAGE_TOKENS)  # each image token's original index, in sequence order
    kept, margins = [], []
    for layer_idx in range(DEPTH):
        h_in = h
        h = ref.layer(layer_idx, h, positions)
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        stage = layer_list.index(rank_layer)
        image_tokens = int(IMAGE_TOKENS * ratio_list[stage])
        keep_length = int(IMAGE_TOKENS * ratio_list[stage + 1])
        query = prompt_len + image_tokens - 1
        assert query == h.shape[0] - 1  # the last instruction token is the prompt's last token
        source = h if score_offset == 1 else h_in
        attn = ref.attention_of_row(layer_idx + score_offset, source, positions, query)  # self.layers[rank_layer]
        score = attn.mean(0)[image_index:image_index + image_tokens]  # mean over heads, then over the one row
        top = score.topk(keep_length).indices.sort().values
        margins.append(top_margin(score, keep_length))
        start = image_index + image_tokens
        h = torch.cat([h[:image_index], h[top + image_index], h[start:]])
        ranks = ranks[top]
        kept.append(ranks.tolist())
        positions = torch.arange(h.shape[0])  # re-assigned contiguously
    return kept, ref.logits(h), min(margins)


def pruned_run(model, inputs, config):
    with transprune.pruned(model, config) as handle, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return handle.last_stats[0], logits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("r", [0.5, 0.75, 0.7, 0.9])  # 0.7, 0.9: the code's round(576 (1 - R)) = 173, 58
def test_fastv_keeps_the_official_codes_tokens_on_its_layout(seed, r):
    model, inputs, ref, embeds = setup(seed)
    with torch.no_grad():
        want, want_logits, margin = official_fastv(ref, embeds, 2, r)
    assert margin > MARGIN  # the official choice is far from a tie: rounding cannot decide it
    stats, logits = pruned_run(model, inputs, transprune.FastVConfig(k=2, r=r, reference_depth=DEPTH))
    assert stats.kept_after_layer == [2] and stats.positions == "original"
    assert len(want) == {0.5: 288, 0.75: 144, 0.7: 173, 0.9: 58}[r]
    assert len(stats.kept_indices) == 1
    assert not differs(stats.kept_indices[0], want), differs(stats.kept_indices[0], want)  # count, members, order
    assert torch.allclose(logits, want_logits, atol=1e-4), (logits - want_logits).abs().max()
    # the reference tells the official layer from its neighbours: layer 1's or layer 3's attention is another set
    with torch.no_grad():
        assert official_fastv(ref, embeds, 2, r, attention_layer=1)[0] != want
        assert official_fastv(ref, embeds, 3, r)[0] != want


@pytest.mark.parametrize("seed", SEEDS)
def test_pdrop_keeps_the_official_codes_tokens_on_its_layout(seed):
    model, inputs, ref, embeds = setup(seed)
    layer_list, ratio_list = [8, 16, 24], [1.0, 0.5, 0.25, 0.125]
    with torch.no_grad():
        want, want_logits, margin = official_pdrop(ref, embeds, layer_list, ratio_list)
    assert margin > MARGIN
    assert [len(k) for k in want] == [288, 144, 72]
    stats, logits = pruned_run(model, inputs, transprune.PDropConfig(layers=(8, 16, 24), ratio=0.5,
                                                                     reference_depth=DEPTH))
    assert stats.kept_after_layer == layer_list and stats.positions == "compact"
    assert len(stats.kept_indices) == len(want)
    for stage, (got, official) in enumerate(zip(stats.kept_indices, want)):  # count, members and sequence order
        assert not differs(got, official), f"stage {stage}: {differs(got, official)}"
    assert torch.allclose(logits, want_logits, atol=1e-4), (logits - want_logits).abs().max()
    # the reference tells the official rule from its neighbours: the pruning layer's own weights choose otherwise
    with torch.no_grad():
        assert official_pdrop(ref, embeds, layer_list, ratio_list, score_offset=0)[0] != want
