"""Decode steps (or any continuation) after a pruned prefill: every group of layers that holds the same
tokens (a stage) keeps its own key mask and position shift."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stage:
    """Decode-time state of one group of layers that hold the same tokens."""

    first_layer: int  # 0-based index of the stage's first layer
    key_valid: torch.Tensor  # (B, kv_len) bool over this stage's cached tokens
    shift: torch.Tensor  # (B,) dropped tokens whose positions were closed up before this stage
    all_valid: bool = False  # known on the host: key_valid is all True (no padding), so a 1-token step needs no mask


@dataclass
class Generation:
    """What a pruned prefill leaves for the calls that continue its cache."""

    stages: list[Stage] = field(default_factory=list)
    next_position: torch.Tensor | None = None  # (B,) position of the next token, unpruned numbering


def continue_generation(adapter, generation: Generation, call):
    """Run the decoder over the new tokens of ``call`` (a `prefill.DecoderCall`) on a pruned cache: per-stage masks
    and positions (``call.blocks``: the new tokens' blocks; cached tokens are in no block of theirs)."""
    embeds, new_valid, position_ids, cache, hidden, blocks = (call.embeds, call.valid, call.position_ids, call.cache,
                                                              call.hidden, call.blocks)
    q_len = embeds.shape[1]
    starts = {s.first_layer: s for s in generation.stages}
    # One host check per step (HF's own mask does the same): are the new tokens all real? Stages whose
    # cache has no padding then need no mask for a 1-token step (all keys are visible), in any backend
    # whose mask only hides padding and future keys; their mask is None, as HF's sdpa mask would be.
    no_mask_ok = adapter.decode_needs_no_mask(q_len)
    new_all = bool(new_valid.all()) if any(s.all_valid for s in generation.stages) else False
    h = embeds
    for i, layer in enumerate(adapter.layers):
        if i in starts:
            stage = starts[i]
            if cache.get_seq_length(i) != stage.key_valid.shape[1]:  # host ints: no sync
                raise RuntimeError(f"layer {i}'s KV cache holds {cache.get_seq_length(i)} tokens where the pruned "
                                   f"prefill and decode steps left {stage.key_valid.shape[1]}: the cache was cropped "
                                   "or edited outside transprune (e.g. assisted generation), which pruning does not "
                                   "support")
            stage.key_valid = torch.cat([stage.key_valid, new_valid], dim=1)
            stage.all_valid = stage.all_valid and new_all
            positions = adapter.shift_positions(position_ids, stage.shift)
            key_blocks = None if blocks is None else torch.cat(
                [blocks.new_full((blocks.shape[0], stage.key_valid.shape[1] - q_len), -1), blocks], dim=1)
            masks = (None if no_mask_ok and stage.all_valid and blocks is None
                     else adapter.stage_masks(h, stage.key_valid, q_len, key_blocks))
            rope = adapter.rope(h, positions)
        h, _ = adapter.run_layer(layer, h, mask=None if masks is None else adapter.mask_for(masks, i),
                                 position_embeddings=adapter.rope_for(rope, i), position_ids=adapter.layer_position_ids(positions),
                                 cache=cache, use_cache=True, capture=False)
        if hidden is not None:
            hidden.append(h)
    h = adapter.final_norm(h)
    if hidden is not None:
        hidden[-1] = h
        hidden.insert(0, embeds)
    return h
