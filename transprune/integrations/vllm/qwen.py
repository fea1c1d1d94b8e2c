"""What the Qwen families share in vLLM with transprune's pre-LLM pruning of their images: the processor and model
halves (`PrunedProcessor`, `PrunedModel`), mixed into vLLM's own classes by `qwen2_5_vl` and `qwen3_vl` (imported by
vLLM where it builds the model).

The processor (prompt processing, in the serving process) reads the setting, gives each image as many
placeholders as the setting keeps of its grid (`ServedMethod.kept_of`), ships the setting with the image (tensor
fields, so they reach the model and the processor cache), and puts the setting (and, for a method that reads it,
the instruction) into the image's hash, which keys vLLM's processor, encoder and prefix caches.

The model runs vLLM's own tower, then the library's selection per image on its output, and appends the four
position columns vLLM's multimodal-pruning path reads (``video_prune/evs.py``): each kept token's own (t, h, w)
and, for the text after the image, the *full* grid's ``max + 1``, so positions are those of the unpruned model
(transprune's "original" rule) whatever was kept. The family files say where the tower's scored block is, how
its rows are ordered, how videos pass, and how the columns are read back.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from contextvars import ContextVar

import numpy as np
import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, recompute_mrope_positions
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ...adapters.qwen2_vl import frame_units, token_order, write_merged
from ...adapters.vision import received_from_qk, similarity_keys
from ...patching import patch
from . import KEY, ServedMethod, from_key, settings

# The setting (and instruction ids) of the prompt the processor is working on, for its helpers below `apply`.
_REQUEST: ContextVar["tuple[ServedMethod, list[int]] | None"] = ContextVar("transprune_vllm_request", default=None)
# The scored block's (received attention, keys) of the encoding in flight (None: nothing captures).
_CAPTURE: ContextVar["list | None"] = ContextVar("transprune_vllm_capture", default=None)

FIELDS = ("transprune_keep", "transprune_setting", "transprune_instruction")


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _rows(value) -> list[torch.Tensor]:
    """A batched field's per-item tensors (vLLM stacks equal shapes, else gives a list)."""
    return list(value) if value is not None else []


class PrunedProcessor:
    """The processor half, mixed in before a vLLM Qwen processor class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._server_setting = getattr(self.info.get_hf_config(), KEY, None)
        self.served = settings(self._server_setting)  # a wrong server setting fails here, at start-up

    def check_items(self, inputs) -> None:
        """Raise for an item this family's served path does not take (none here)."""

    def apply(self, inputs, timing_ctx=None, **kwargs):
        kw = dict(inputs.hf_processor_mm_kwargs)
        request = kw.pop(KEY, None)  # the HF processor never sees it
        served = self.served if request is None else settings(request, base=self._server_setting)
        self.check_items(inputs)
        image_id = self.info.get_hf_config().image_token_id
        prompt = list(inputs.prompt) if not isinstance(inputs.prompt, str) else []
        last = max((i for i, t in enumerate(prompt) if t == image_id), default=len(prompt) - 1)
        instruction = prompt[last + 1:] if served.reads_instruction else []  # the text after the last image
        token = _REQUEST.set((served, instruction))
        try:
            return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kw), timing_ctx, **kwargs)
        finally:
            _REQUEST.reset(token)

    def _request(self) -> tuple[ServedMethod, list[int]]:
        return _REQUEST.get() or (self.served, [])

    def _get_mm_hashes(self, inputs):
        served, instruction = self._request()  # the setting is part of every image's identity
        kw = {**inputs.hf_processor_mm_kwargs, KEY: served.key}
        if served.reads_instruction:
            kw["transprune_instruction"] = instruction
        return super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=kw))

    def _finalize_hf_mm_data(self, *args, **kwargs):
        out = super()._finalize_hf_mm_data(*args, **kwargs)  # the HF processor's outputs, every family's path
        if "image_grid_thw" in out:
            served, instruction = self._request()
            merge = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
            grids = out["image_grid_thw"].tolist()
            out["transprune_keep"] = torch.tensor([served.kept_of([h * w // merge] * t) for t, h, w in grids])
            out["transprune_setting"] = torch.stack([_bytes(served.key)] * len(grids))
            out["transprune_instruction"] = torch.tensor([instruction] * len(grids), dtype=torch.int64).view(
                len(grids), len(instruction))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        ours = {name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in FIELDS}
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs), **ours}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_id = self.info.get_hf_config().image_token_id

        def kept(item: int) -> list[int]:  # the grid and the setting alone: known before the encoder runs
            return [image_id] * int(out_mm_kwargs["image"][item]["transprune_keep"].data)

        return [PromptReplacement("image", [image_id], kept) if u.modality == "image" else u for u in updates]


class PrunedModel:
    """The model half, mixed in before a vLLM Qwen model class: the library's selection on the tower's output."""

    transprune_served = True  # read by `runner.enable_pruning_path_on_cpu`
    windows = False  # whether the tower's rows are in window order (Qwen2.5-VL)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.served = settings(getattr(self.config, KEY, None))
        # vLLM's runner takes its multimodal-pruning path (positions recomputed from the columns we append) where
        # the model supports it and this config method says so; it says so only for video pruning (EVS): answer
        # for this engine's config instance.
        mm_config = vllm_config.model_config.get_multimodal_config()
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
        self.is_multimodal_pruning_enabled = True
        self.selections = deque(maxlen=256)  # the last images' choices, for inspection (`selections`)
        attention = self.scored_block().attn.attn
        patch(attention, "forward", _capturing(attention.forward, attention.scale))

    def scored_block(self):
        """The vision block whose attention VisionZip reads (as `QwenVisionHooks.attention_layer`)."""
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return self.visual.blocks[max(full) if full else len(self.visual.blocks) - 1]

    def visual_width(self) -> int:
        """The width of the LLM's input embeddings among an image feature row's columns (Qwen3-VL's rows carry the
        DeepStack levels after them)."""
        return self.config.text_config.hidden_size

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
        served = [from_key(bytes(s.tolist()).decode()) for s in _rows(ours["transprune_setting"])]
        keep = [int(k) for k in _rows(ours["transprune_keep"])]
        instructions = _rows(ours["transprune_instruction"])
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
        rows = 0  # the scored block's rows before this image (merge**2 per visual token)
        out = []
        for i, (e, grid) in enumerate(zip(embeds, inputs["image_grid_thw"])):
            kept, e = self._select(served[i], e, grid, captured, rows, instructions[i] if instructions else None)
            rows += e.shape[0] * merge ** 2
            if kept is not None and kept.numel() != keep[i]:
                raise RuntimeError(f"transprune: {served[i].name} kept {kept.numel()} tokens of an image where its "
                                   f"prompt holds {keep[i]} placeholders")
            self.selections.append({"grid": grid.tolist(), "setting": served[i].key, "tokens": e.shape[0],
                                    "kept": None if kept is None else kept.tolist()})
            out.append(self.with_positions(e, grid.tolist(), kept))
        return tuple(out)

    def _select(self, served: ServedMethod, embeds, grid, captured, rows: int, instruction):
        """(kept indices in order, or None for all; the rows to take them from) of one image's feature rows."""
        config = served.config
        if config is None:
            return None, embeds
        merge = self.visual.spatial_merge_size
        if served.scores_tower:  # VisionZip: its plan per frame on the scored block's rows of this image
            received, keys = (torch.cat(parts) for parts in zip(*captured))
            span = slice(rows, rows + embeds.shape[0] * merge ** 2)
            grid = grid.view(1, 3).cpu()
            order = token_order(grid, merge, (self.visual.window_size, self.visual.patch_size) if self.windows else None)
            plans = [config.plan(score, k) for score, k in frame_units(received[span], keys[span], grid, merge ** 2, order)]
            merged = write_merged([embeds], plans)[0]  # every column: the DeepStack levels merge as the features
            return torch.cat([p.keep for p in plans]).nonzero().squeeze(1).to(embeds.device), merged
        ids = (instruction if instruction is not None else torch.zeros(0, dtype=torch.int64)).to(embeds.device)
        image = embeds[:, :self.visual_width()]
        text = self.get_language_model().embed_input_ids(ids) if ids.numel() else image[:0]
        chosen = config.order(image.float(), text.float(), config.count(embeds.shape[0]))
        return chosen.sort().values, embeds


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


def pop_fields(kwargs) -> dict:
    """Our per-image fields, taken out of the model's multimodal inputs (its parser knows only its own)."""
    return {name: kwargs.pop(name, None) for name in FIELDS}


def selections(model) -> list[dict]:
    """The last images' choices on a served model (for ``LLM.apply_model(selections)``): grid, setting, the tokens
    of the full image and the kept indices (None: all)."""
    return list(getattr(model, "selections", []))
