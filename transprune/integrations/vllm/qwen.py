"""What the Qwen families (Qwen2.5-VL, Qwen3-VL) share in vLLM: image units are the frames of the patch grid,
VisionZip reads the tower's scored block, kept tokens keep their own mRoPE positions.

The model appends position columns to each kept row (`PrunedQwenModel.with_positions`): the token's own (t, h, w)
and the full grid's ``max + 1``, where the text after the image continues, so positions are those of the unpruned
model (transprune's "original" rule) whatever was kept. vLLM's runner hands the rows of each prefill chunk back to
the model (`recompute_mrope_positions`, the path its EVS video pruning uses), which writes them at their
placeholders; the text's positions are laid out for the full grids beforehand (`layout_positions`).
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
import torch
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ...adapters.qwen2_vl import frame_units, token_order, write_merged
from ...adapters.vision import received_from_qk, similarity_keys
from ...patching import patch
from .common import PrunedModel, PrunedProcessor, rows, served_of

COLUMNS = 8  # position columns appended to each kept row: (t, h, w, text offset), each as (value // 256, value % 256)

# The encoding in flight: the frames' row bounds and the list its scored block appends (received attention, keys)
# to (None: nothing captures).
_CAPTURE: ContextVar["tuple[list[int], list] | None"] = ContextVar("transprune_vllm_capture", default=None)


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
        """``embeds`` (the kept rows) with `COLUMNS` columns: each row's own (t, h, w) relative to the item's start
        and the full grid's ``max + 1`` (the text after the item continues there), each value split into two parts
        below 256, which every embedding dtype holds exactly (bfloat16 holds integers exactly only up to 256)."""
        positions = compute_mrope_for_media(grid, self.visual.spatial_merge_size, **timing)
        positions[:, 3] = positions[:, :3].max() + 1
        if kept is not None:
            embeds, positions = embeds[kept], positions[kept.cpu()]
        if int(positions.max()) >= 256 * 256:
            raise ValueError(f"transprune: an item of grid {grid} has positions beyond {256 * 256 - 1}")
        parts = torch.stack([positions // 256, positions % 256], dim=-1).flatten(1)
        return torch.cat([embeds, parts.to(embeds.device, embeds.dtype)], dim=1)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """What vLLM's runner calls for each prefill chunk, with the rows of the items (or parts of items) the
        chunk holds: strip our columns and write each row's position at its placeholder. The rows fill the prompt's
        media tokens from ``num_computed_tokens`` on, in order; an item's positions count from the position of the
        token before its run of media tokens (its vision-start), plus one, as the unpruned model's do. The text
        positions are already those of the unpruned model (`layout_positions`), so nothing else moves."""
        device = mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        index = torch.arange(ids.numel())
        # each media token's run start: the first media token after the last text token before it
        last_text = torch.cummax(torch.where(media, -1, index), dim=0).values
        run_start = last_text + 1
        slots = index[media & (index >= num_computed_tokens)]
        positions = mrope_positions.clone()
        out, taken, bound = [], 0, -1
        for rows in multimodal_embeddings:
            n = rows.shape[0]
            at = slots[taken:taken + n]
            taken += n
            parts = rows[:, -COLUMNS:].round().long().view(n, 4, 2)
            values = (parts[..., 0] * 256 + parts[..., 1]).T  # (4, n): t, h, w, full grid max + 1
            before = (run_start[at] - 1).to(device)  # the token before the item's run (-1: the prompt starts with it)
            base = torch.where(before >= 0, positions[0, before.clamp(min=0)] + 1, 0)
            positions[:, at.to(device)] = values[:3].to(device) + base
            if n:
                bound = max(bound, int((base + values[3].to(device) - 1).max()))
            out.append(rows[:, :-COLUMNS])
        delta = max(int(positions.max()), bound) + 1 - ids.numel()  # an item last: the text after it starts past
        return out, positions, delta

    # -- the encoder and the selection ---------------------------------------------------------------
    def embed_images(self, inputs, ours) -> tuple:
        served = [served_of(s) for s in rows(ours["transprune_setting"])]
        instructions = rows(ours["transprune_instruction"])
        captured = [] if any(s.scores_tower for s in served) else None
        if captured is not None and inputs["type"] == "image_embeds":
            raise ValueError("transprune: VisionZip scores the vision tower's attention, and precomputed image "
                             "embeddings have none; send pixels, or use divprune / cdpruner")
        grids = inputs["image_grid_thw"].tolist()
        frames = [h * w for t, h, w in grids for _ in range(t)]  # the scored block attends within each frame
        bounds = torch.tensor([0] + frames).cumsum(0).tolist()
        token = _CAPTURE.set(None if captured is None else (bounds, captured))
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
    rotated q and k, each row's attention from the rows of its own frame (the bounds the encoding in flight gives,
    from its grids: the kernel's own ``cu_seqlens`` layout differs between attention backends)."""

    def capture_then_attend(*args, **kwargs):
        found = _CAPTURE.get()
        if found is not None:
            bounds, found = found
            q, k = kwargs["query"], kwargs["key"]  # (1, rows, heads, head_dim)
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
            if bounds[-1] != q.shape[1]:
                raise RuntimeError(f"transprune: the scored vision block ran on {q.shape[1]} rows where the images' "
                                   f"grids have {bounds[-1]}")
            received = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
            for start, end in zip(bounds[:-1], bounds[1:]):
                received[start:end] = received_from_qk(q[None, :, start:end], k[None, :, start:end], scale)[0]
            found.append((received, similarity_keys(k)))
        return forward(*args, **kwargs)

    return capture_then_attend
