"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's rule plus two differences of its decoder.

What is the same as Qwen2-VL / Qwen2.5-VL (`Qwen2VLAdapter`, subclassed here): image and video
placeholders (`image_token_id`, `video_token_id`), mRoPE positions in (3, B, L) or (4, B, L) rows that
kept tokens keep ("original"; "compact" is refused), the model's cached `rope_deltas`, the
``patch * merge`` pixels per visual token. The text decoder strips row 0 of 4-row positions itself and
its rotary embedding interleaves the (t, h, w) frequencies internally; the adapter hands it the same rows.

What differs:

* **q/k norms.** The attention normalises q and k per head (RMSNorm over head_dim) before RoPE, so the
  scoring q and k (`scoring_qk`) apply the layer's ``q_norm`` / ``k_norm``. The layer body is otherwise
  Llama-style (the `llama` body runs it; its attention module applies the norms itself).
* **DeepStack.** The decoder's forward receives ``visual_pos_masks`` (B, L) and ``deepstack_visual_embeds``
  (one (n_visual, d) tensor per injected layer, rows in the row-major order of the mask) and, after each
  of the first ``len(deepstack_visual_embeds)`` layers, adds row j to the hidden state of the j-th visual
  token. In a pruned prefill (`after_layer`) each token still present gets its own row, found through
  its column in the caller's input (``layout.orig_index``); a dropped token's rows are never added. So
  FastV after layer 1 or 2, or a pre-LLM drop, injects the later features only at the kept visual tokens.
  The features are added before the pruning step of the same layer, as the unpruned decoder hands them to
  the next layer (what a method's "next layer" attention reads).
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "Qwen3VLAdapter", "model_types": ('qwen3_vl',), "since": "5.16.1", "order": 70}

from dataclasses import dataclass
from functools import partial

import torch
from transformers import Qwen3VLForConditionalGeneration

from . import llama
from .qwen2_vl import QWEN_IDS, Qwen2VLAdapter, _qwen_text


@dataclass(frozen=True)
class DeepStack:
    """One decoder call's DeepStack inputs."""

    feature_row: torch.Tensor  # (B, L) long: the feature row of each visual input column, -1 elsewhere
    features: tuple[torch.Tensor, ...]  # per injected layer: (n_visual, d)


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

def qwen3_vision(**overrides) -> dict:
    """The Qwen3-VL vision tower's public facts (27 SigLIP-2 blocks, DeepStack from blocks 8, 16, 24), which the
    MoE models share; ``out_hidden_size`` follows the decoder."""
    return dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], **overrides)


def _qwen3_vl():
    from transformers import Qwen3VLConfig

    text = _qwen_text(4096, 12288, 36, 32, 8, (24, 20, 20), head_dim=128, vocab_size=151936,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True})
    return Qwen3VLConfig(vision_config=qwen3_vision(out_hidden_size=4096), text_config=text, tie_word_embeddings=False,
                         **QWEN_IDS)


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3-vl"
    model_classes = (Qwen3VLForConditionalGeneration,)
    model_types = ("qwen3_vl",)
    archs = {"qwen3-vl-8b": _qwen3_vl}
    reduced_archs = {}
    processor_classes = {"qwen3_vl": "Qwen3VLProcessor"}
    position_rule_reasons = {
        "compact": Qwen2VLAdapter.position_rule_reasons["compact"],
    }

    scoring_qk = staticmethod(partial(llama.scoring_qk, head_norms=True))

    # -- DeepStack ---------------------------------------------------------------------------------
    def layer_extras(self, decoder_kwargs: dict) -> DeepStack | None:
        features = decoder_kwargs.get("deepstack_visual_embeds")
        mask = decoder_kwargs.get("visual_pos_masks")
        if not features or mask is None:
            return None
        mask = mask.bool()
        row = mask.flatten().long().cumsum(0).view_as(mask) - 1  # as the decoder's `hidden[mask] += features`
        return DeepStack(torch.where(mask, row, -1), tuple(features))

    def after_layer(self, layer_index: int, h: torch.Tensor, layout, extras: DeepStack) -> torch.Tensor:
        if layer_index >= len(extras.features):
            return h
        row = extras.feature_row.to(h.device).gather(1, layout.orig_index)  # (B, L) of the tokens present now
        hit = (row >= 0) & layout.valid
        features = extras.features[layer_index].to(h.device, h.dtype)
        added = h + features[row.clamp(min=0)]  # no host sync; rows that are not visual are discarded below
        return torch.where(hit[..., None], added, h)
