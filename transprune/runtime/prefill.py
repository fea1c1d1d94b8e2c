"""The pruned prefill: the decoder's layers in a plain loop, TTV captured where the method needs it, image
tokens dropped after each pruning layer (and before the first, for a pre-LLM method).

A family whose decoder adds inputs of its own between layers (e.g. Qwen3-VL's DeepStack features) reads them
from the decoder call's keyword arguments (`ModelAdapter.layer_extras`); the prefill hands them to
`ModelAdapter.after_layer` after every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import scoring
from ..devices import to_device
from ..surgery import Layout, drop_tokens, gather_tokens, last_tokens, scatter_to_input
from .decode import Generation, Stage
from .select import select
from .stats import NO_PROFILE

@dataclass
class DecoderCall:
    """One decoder call's inputs, filled where the call arrives (`PruneHandle._decoder_forward`, from the adapter's
    rules; a prefill's image mask and layer extras, then the pre-LLM choice before the layers run), for the prefill
    and the decode steps: a family quirk adds a field here, not a parameter to every function on the way."""

    embeds: torch.Tensor  # (B, L, d) the input embeddings
    valid: torch.Tensor  # (B, L) bool: real tokens (not padding)
    position_ids: torch.Tensor  # the family's layout: (B, L), or (3, B, L) under mRoPE
    cache: object | None  # the DynamicCache the layers fill (None: no cache)
    hidden: list | None  # collects every layer's hidden states (output_hidden_states), or None
    image_mask: torch.Tensor | None = None  # (B, L) bool: visual tokens (a prefill's; on the input ids' device)
    extras: object = None  # the family's `layer_extras` of this call (None: it adds nothing between layers)
    blocks: torch.Tensor | None = None  # (B, L) the family's `attention_blocks` (None: causal)
    # a pre-LLM method's choice: (B, L) bool, the visual tokens it keeps (None: no pre-LLM stage), and, where it
    # wrote other tokens into the image rows, how far from its own rank the token each row holds is (the long
    # minimum: none, rank -1), so the statistics and later stages number it so
    pre_keep: torch.Tensor | None = None
    pre_shift: torch.Tensor | None = None


@dataclass
class PrefillState:
    """Everything one prefill carries from layer to layer."""

    layout: Layout
    h: torch.Tensor  # (B, L, d) current hidden states
    kept_ranks: list[list[torch.Tensor]]  # per sample, per stage
    all_valid: bool  # host-side: no padding anywhere in the current sequence
    stage_dropped: torch.Tensor  # (B,) tokens whose positions were closed up so far
    profiler: object = NO_PROFILE
    h_in: torch.Tensor | None = None  # the current layer's input
    ttv: torch.Tensor | None = None  # (B, L) fp32 accumulated TTV
    rope: tuple | None = None  # the current stage's (cos, sin)
    scores: list[list[dict]] | None = None  # with record_scores
    generation: Generation = field(default_factory=Generation)

    def drop(self, keep, close_up=None, kind="drop_s", stage=-1, new_length=None) -> torch.Tensor:
        """Apply a keep mask; returns the gather index for other per-token tensors. ``close_up``: the family's
        compact rule (None: positions stay). ``new_length``: every row keeps exactly that many tokens (known on
        the host: no sync, no padding after)."""
        with self.profiler.span(kind, stage):
            before = self.layout.valid.sum(1)
            self.layout, index = drop_tokens(self.layout, keep, close_up=close_up, new_length=new_length)
            self.all_valid = new_length is not None or bool(self.layout.valid.all())
            if close_up is not None:  # decode positions close up by as many tokens
                self.stage_dropped = self.stage_dropped + before - self.layout.valid.sum(1)
            self.h = gather_tokens(self.h, index)
        return index


def prefill(handle, call: DecoderCall, profiler=NO_PROFILE, aligned: bool = True):
    """Run the pruned prefill of ``call``; returns the final hidden states at the caller's columns (dropped rows
    zero) and leaves the `Generation` for decode steps on its cache. Each stage's masks follow the tokens kept
    (``call.blocks`` included)."""
    method, sched, adapter = handle.llm, handle.schedule, handle.adapter
    embeds, valid, cache, hidden, extras, blocks = call.embeds, call.valid, call.cache, call.hidden, call.extras, call.blocks
    pre_keep, pre_shift = call.pre_keep, call.pre_shift
    layers = adapter.layers
    prune_at = {p - 1: i for i, p in enumerate(sched.pruning_layers)}  # 0-based layer -> stage
    last_prune = max(prune_at) if prune_at else -1
    needs_ttv = method is not None and method.needs_ttv
    accumulate = {a - 1 for a in sched.accumulation_layers if a - 1 <= last_prune} if needs_ttv else set()
    home = embeds.device  # where the layout, scores and masks live, whatever device each layer runs on
    layout = Layout.initial(valid, call.image_mask.to(embeds.device), call.position_ids)
    if pre_shift is not None:
        shift = pre_shift.to(layout.image_rank.device)
        layout.image_rank = torch.where(layout.image & (shift != torch.iinfo(torch.long).min),
                                        layout.image_rank + shift, -1)
    n_original = layout.image.sum(1).tolist()
    state = PrefillState(layout, embeds, [[] for _ in n_original], bool(valid.all()),
                         torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device), profiler)
    if pre_keep is not None:
        # Pre-LLM stage: the LLM never sees the other image tokens; positions close up where the family's
        # positions can (1-D RoPE, as the official VisionZip), else kept tokens keep theirs.
        # The prompt's last token always stays (it predicts the next token): an image token there that the method
        # drops stays beside its choice.
        keep = layout.valid & (~layout.image | pre_keep | last_tokens(layout.valid))
        for b in range(len(n_original)):
            state.kept_ranks[b].append(layout.image_rank[b][layout.image[b] & keep[b]])
        state.drop(keep, close_up=adapter.close_up if "compact" in adapter.position_rules else None,
                   kind="pre_llm_drop_s")
    n_image = state.layout.image.sum(1).tolist()  # in-LLM ratios apply to what reaches the LLM
    keep_counts = [[sched.runtime_keep_count(n, i) for i in range(len(sched.keep_ratios))] for n in n_image]
    state.ttv = torch.zeros(state.layout.valid.shape, dtype=torch.float32, device=embeds.device)
    state.scores = [[] for _ in n_original] if handle.record_scores else None
    close_up = adapter.close_up if method is not None and method.positions == "compact" else None

    def open_stage(first_layer):
        state.generation.stages.append(Stage(first_layer, state.layout.valid, state.stage_dropped.clone(),
                                             state.all_valid))
        state.rope = adapter.rope(state.h, state.layout.positions)
        kept_blocks = None
        if blocks is not None:  # each kept token stays in its block; padding slots in none
            kept_blocks = torch.where(state.layout.valid, blocks.gather(1, state.layout.orig_index), -1)
        return adapter.stage_masks(state.h, state.layout.valid, state.layout.length, kept_blocks)

    masks = open_stage(0)
    for i, layer in enumerate(layers):
        capture = i in accumulate
        state.h_in = state.h
        state.h, moved = adapter.run_layer(layer, state.h, mask=adapter.mask_for(masks, i),
                                           position_embeddings=adapter.rope_for(state.rope, i),
                                           position_ids=adapter.layer_position_ids(state.layout.positions),
                                           cache=cache, use_cache=cache is not None, capture=capture)
        state.h = state.h.to(home)  # a layer on another device (accelerate device maps): back to the bookkeeping's
        if capture:
            moved = to_device(moved, home)
            with profiler.span("ttv_s"):
                state.ttv += scoring.module_ttv(moved[0], moved[1], state.layout.valid, method.direction)
                state.ttv += scoring.module_ttv(moved[2], moved[3], state.layout.valid, method.direction)
        if hidden is not None:
            hidden.append(scatter_to_input(state.h, state.layout, valid.shape[1]))
        if extras is not None:  # what the decoder's own loop adds before the next layer (and before scoring)
            state.h = adapter.after_layer(i, state.h, state.layout, extras)
        if i in prune_at:
            stage = prune_at[i]
            with profiler.span("select_s", stage):
                keep, new_length = select(method, adapter, state, i, stage, [c[stage] for c in keep_counts],
                                          aligned=aligned)
            state.ttv = gather_tokens(state.ttv, state.drop(keep, close_up=close_up, stage=stage, new_length=new_length))
            masks = open_stage(i + 1)
    h = adapter.final_norm(state.h)
    if hidden is not None:
        hidden[-1] = scatter_to_input(h, state.layout, valid.shape[1])
        hidden.insert(0, embeds)
    return scatter_to_input(h, state.layout, valid.shape[1]), state, n_original, n_image
