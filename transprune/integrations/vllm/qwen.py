"""What the Qwen families (Qwen2.5-VL, Qwen3-VL) share in vLLM: image units are the frames of the patch grid,
VisionZip reads the tower's scored block, kept tokens keep their own mRoPE positions.

The model appends the four position columns vLLM's multimodal-pruning path reads (``video_prune/evs.py``): each
kept token's own (t, h, w) and, for the text after the image, the *full* grid's ``max + 1``, so positions are those
of the unpruned model (transprune's "original" rule) whatever was kept; vLLM's runner writes them per prefill
chunk (`PrunedQwenModel.recompute_mrope_positions`).
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
import torch
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, recompute_mrope_positions
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ...adapters.qwen2_vl import frame_units, token_order, write_merged
from ...adapters.vision import received_from_qk, similarity_keys
from ...patching import patch
from .common import PrunedModel, PrunedProcessor, rows, served_of

# The scored block's (received attention, keys) of the encoding in flight (None: nothing captures).
_CAPTURE: ContextVar["list | None"] = ContextVar("transprune_vllm_capture", default=None)


class PrunedQwenProcessor(PrunedProcessor):
    def units_of(self, item, placeholders: int) -> list[int]:
        t, h, w = item["image_grid_thw"].data.tolist()
        return [h * w // self.info.get_hf_config().vision_config.spatial_merge_size ** 2] * t


class PrunedQwenModel(PrunedModel):
    """The model half for vLLM's Qwen classes: the library's selection on the tower's output, and positions."""

    windows = False  # whether the tower's rows are in window order (Qwen2.5-VL)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # vLLM's runner takes its multimodal-pruning path (positions recomputed from the columns we append) where
        # the model supports it and this config method says so; it says so only for video pruning (EVS): answer
        # for this engine's config instance.
        mm_config = vllm_config.model_config.get_multimodal_config()
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
        self.is_multimodal_pruning_enabled = True
        attention = self.scored_block().attn.attn
        patch(attention, "forward", _capturing(attention.forward, attention.scale))

    def scored_block(self):
        """The vision block whose attention VisionZip reads (as `QwenVisionHooks.attention_layer`)."""
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return self.visual.blocks[max(full) if full else len(self.visual.blocks) - 1]

    # -- positions ---------------------------------------------------------------------------------
    def layout_positions(self, input_tokens, items) -> tuple[torch.Tensor, int]:
        """mRoPE positions of a prompt whose items ((offset, placeholders, t, h, w, t_factor), merged grids) may
        hold fewer placeholders than their grid: the text after an item continues from the full grid's ``max + 1``
        (as the unpruned model); an item's own columns are placeholders vLLM rewrites from the kept rows' columns."""
        columns, start, following = [], 0, 0
        for offset, length, t, h, w, t_factor in items:
            text = offset - start
            columns.append(np.broadcast_to(np.arange(text), (3, text)) + following)
            base = following + text
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            columns.append(grid[:, :length] + base)
            following, start = base + int(grid.max()) + 1, offset + length
        text = len(input_tokens) - start
        columns.append(np.broadcast_to(np.arange(text), (3, text)) + following)
        positions = np.concatenate(columns, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

    def with_positions(self, embeds, grid, kept=None, **timing):
        """``embeds`` (the kept rows) with the four columns vLLM reads: each row's own (t, h, w) relative to the
        item's start and the full grid's ``max + 1``, where the text after the item continues."""
        positions = compute_mrope_for_media(grid, self.visual.spatial_merge_size, **timing)
        positions[:, 3] = positions[:, :3].max() + 1
        if kept is not None:
            embeds, positions = embeds[kept], positions[kept.cpu()]
        return torch.cat([embeds, positions.to(embeds.device, embeds.dtype)], dim=1)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """What vLLM's runner calls per prefill chunk: strip the four columns from each item's rows and write the
        positions they hold into the chunk's media columns (and the text after them), vLLM's own rule
        (``video_prune/evs.py``; its 4-column form: the text continues at the item's start + column 3)."""
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(device)
        positions = [mm[:, -4:].permute(1, 0).long() for mm in multimodal_embeddings]
        with gpu_sync_allowed():
            recomputed, delta = recompute_mrope_positions(ids, positions, mrope_positions, num_computed_tokens,
                                                          self.config.vision_start_token_id,
                                                          self.config.image_token_id, self.config.video_token_id)
        return [mm[:, :-4] for mm in multimodal_embeddings], recomputed, delta

    # -- the encoder and the selection ---------------------------------------------------------------
    def embed_images(self, inputs, ours) -> tuple:
        served = [served_of(s) for s in rows(ours["transprune_setting"])]
        instructions = rows(ours["transprune_instruction"])
        captured = [] if any(s.scores_tower for s in served) else None
        if captured is not None and inputs["type"] == "image_embeds":
            raise ValueError("transprune: VisionZip scores the vision tower's attention, and precomputed image "
                             "embeddings have none; send pixels, or use divprune / cdpruner")
        token = _CAPTURE.set(captured)
        try:
            embeds = self._process_image_input(inputs)
        finally:
            _CAPTURE.reset(token)
        merge = self.visual.spatial_merge_size
        start = 0  # the scored block's rows before this image (merge**2 per visual token)
        out = []
        for i, (e, grid) in enumerate(zip(embeds, inputs["image_grid_thw"])):
            kept, written = self._select(served[i], e, grid, captured, start, instructions[i] if instructions else None)
            start += e.shape[0] * merge ** 2
            t, h, w = grid.tolist()
            self.record(grid.tolist(), served[i], e.shape[0], kept, served[i].kept_of([h * w // merge ** 2] * t))
            out.append(self.with_positions(written, grid.tolist(), kept))
        return tuple(out)

    def _select(self, served, embeds, grid, captured, start: int, instruction):
        """(kept indices in order, or None for all; the rows to take them from) of one image's feature rows."""
        config = served.config
        if config is None:
            return None, embeds
        if not served.scores_tower:
            return self.choose_from_embeddings(served, embeds, instruction), embeds
        merge = self.visual.spatial_merge_size  # VisionZip: its plan per frame on this image's scored-block rows
        received, keys = (torch.cat(parts) for parts in zip(*captured))
        span = slice(start, start + embeds.shape[0] * merge ** 2)
        grid = grid.view(1, 3).cpu()
        order = token_order(grid, merge, (self.visual.window_size, self.visual.patch_size) if self.windows else None)
        plans = [config.plan(score, k) for score, k in frame_units(received[span], keys[span], grid, merge ** 2, order)]
        merged = write_merged([embeds], plans)[0]  # every column: Qwen3-VL's DeepStack levels merge as the features
        return torch.cat([p.keep for p in plans]).nonzero().squeeze(1).to(embeds.device), merged


def _capturing(forward, scale: float):
    """The scored block's attention kernel call, capturing (received attention per row, keys per row) from its
    rotated q and k, each row's attention from the rows of its own image or frame (``cu_seqlens``), when an
    encoding in flight asks for it."""

    def capture_then_attend(*args, **kwargs):
        found = _CAPTURE.get()
        if found is not None:
            q, k = kwargs["query"], kwargs["key"]  # (1, rows, heads, head_dim)
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
            bounds = kwargs["cu_seqlens"].tolist()
            received = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
            for start, end in zip(bounds[:-1], bounds[1:]):
                received[start:end] = received_from_qk(q[None, :, start:end], k[None, :, start:end], scale)[0]
            found.append((received, similarity_keys(k)))
        return forward(*args, **kwargs)

    return capture_then_attend
