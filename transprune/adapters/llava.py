"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expand each `<image>` into one placeholder id per image feature (for NeXT: every anyres feature,
newline tokens included), so the image tokens of a sample are exactly `input_ids == image_token_id`.
The decoder is Llama-style under 1-D RoPE: the `ModelAdapter` defaults. The vision tower is CLIP with a
CLS token, which is what VisionZip's dominance rule reads.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter
from .vision import cls_row_attention, feature_layer


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_classes = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
    model_types = ("llava", "llava_next")

    @property
    def is_anyres(self) -> bool:
        return isinstance(self.model, LlavaNextForConditionalGeneration)

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(row, col) on LLaVA-1.5's square patch grid; position along the sequence for anyres packing."""
        if self.is_anyres:
            return super().token_coords(ranks, positions)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        ranks = ranks.float()
        return torch.stack([torch.div(ranks, side, rounding_mode="floor"), ranks % side], dim=1)

    # -- bench inputs ------------------------------------------------------------------------------
    def default_image_size(self) -> tuple[int, int]:
        side = self.model.config.vision_config.image_size * (2 if self.is_anyres else 1)  # NeXT: a 2x2 grid
        return side, side

    def _tiles(self, image_size) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)

    def image_tokens_for(self, image_size) -> int:
        """By the model's own packing (NeXT: tiles, unpadding and newline tokens)."""
        vision = self.model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2
        if not self.is_anyres:
            return per_tile
        ids = self.vision_hooks().packed_patch_ids(self._tiles(image_size), per_tile, torch.tensor([list(image_size)]))
        return int(ids[0].numel())

    def synthetic_vision_inputs(self, batch, image_size, gen) -> dict:
        side = self.model.config.vision_config.image_size
        if not self.is_anyres:
            return {"pixel_values": torch.randn((batch, 3, side, side), generator=gen)}
        return {"pixel_values": torch.randn((batch, self._tiles(image_size), 3, side, side), generator=gen),
                "image_sizes": torch.tensor([list(image_size)] * batch)}

    def vision_hooks(self) -> "ClipVisionHooks":
        return ClipVisionHooks(self)

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal, as in the paper: ``(image_size // patch_size)**2`` per crop (+1 for the CLS token
        when ``vision_feature_select_strategy == "full"``); LLaVA-NeXT counts 5 crops (base image + a 2x2
        anyres grid) and leaves out the per-row newline tokens, which gives the paper's 2880 for the 7B.
        The real count of a NeXT sample depends on its image size and is known only at run time."""
        vision, text = cfg.vision_config, cfg.text_config
        per_crop = (vision.image_size // vision.patch_size) ** 2
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            per_crop += 1  # CLS token kept
        crops = 1 if cfg.model_type == "llava" else 5
        return ArchSpec.of_decoder(text, name, crops * per_crop, crops=crops, model_type=cfg.model_type)


class ClipVisionHooks:
    """What VisionZip reads from a LLaVA vision tower (CLIP, CLS at row 0) and its projector."""

    encoders = {"image": "get_image_features"}  # modality -> the multimodal model's encoder method

    def __init__(self, adapter: LlavaAdapter):
        self.adapter = adapter
        self.model = adapter.model
        self.config = adapter.model.config

    def check(self) -> None:
        if self.config.vision_feature_select_strategy != "default" or not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("VisionZipConfig needs vision_feature_select_strategy='default' and a single int "
                             f"vision_feature_layer, got {self.config.vision_feature_select_strategy!r} and "
                             f"{self.config.vision_feature_layer!r}")
        self.attention_layer()

    def patches_per_tile(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def attention_layer(self):
        """The attention module of the vision layer whose output LLaVA feeds to the projector."""
        tower = self.adapter.multimodal_model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel nests it in older layouts
        return feature_layer(tower.encoder.layers, self.config.vision_feature_layer).self_attn

    @staticmethod
    def capture(attn, args, kwargs):
        """CLS-row attention (mean over heads) and keys of a CLIP attention layer, from its q and k."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return cls_row_attention(hidden, attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim, attn.scale)

    @staticmethod
    def geometry(modality, args, kwargs):
        """The image sizes of a `get_image_features(pixel_values, image_sizes, ...)` call (NeXT's tiling)."""
        return kwargs.get("image_sizes", args[1] if len(args) > 1 else None)

    def units(self, image_outputs, captured, geometry):
        """One unit per vision tile (the image for LLaVA-1.5; base image and anyres tiles for NeXT): its
        patches' CLS attention and unit-normalised keys, CLS dropped."""
        cls_attention, keys = captured
        keys = torch.nn.functional.normalize(keys[:, 1:], dim=-1)
        return list(zip(cls_attention[:, 1:], keys))

    def merge(self, image_outputs, plans, geometry) -> torch.Tensor:
        """Write each contextual target as the mean of its group in vision space (the feature layer's patches),
        projected like any patch; returns the kept rows of every image's packed features (NeXT's newline rows
        are dropped)."""
        patches = image_outputs.hidden_states[self.config.vision_feature_layer][:, 1:]  # (tiles, patches, d)
        tiles, per_tile = patches.shape[:2]
        keep = torch.stack([p.keep for p in plans]).flatten()
        merged_ids, merged = [], []
        for t, plan in enumerate(plans):
            if plan.targets.numel():
                merged.append(plan.mean_into_targets(patches[t]))
                merged_ids.append(t * per_tile + plan.targets)
        slot = torch.full((tiles * per_tile,), -1, dtype=torch.long, device=patches.device)
        if merged:
            merged_ids = torch.cat(merged_ids)
            slot[merged_ids] = torch.arange(merged_ids.numel(), device=slot.device)
            merged = self.adapter.multimodal_model.multi_modal_projector(torch.cat(merged).to(patches.dtype))
        features, keeps = [], []
        for feats, ids in zip(image_outputs.pooler_output, self.packed_patch_ids(tiles, per_tile, geometry)):
            ids = ids.to(patches.device)
            real = ids >= 0  # -1 marks rows that are no patch (NeXT's newline tokens)
            ids = ids.clamp_min(0)
            rows = real & (slot[ids] >= 0)
            if rows.any():
                feats = feats.clone()
                feats[rows] = merged[slot[ids[rows]]].to(feats.dtype)
            features.append(feats)
            keeps.append(real & keep[ids])
        image_outputs.pooler_output = features
        return torch.cat(keeps)

    def packed_patch_ids(self, tiles, per_tile, image_sizes):
        """For each image, the (tile * per_tile + patch) id of every feature row, -1 for newline rows.

        LLaVA-NeXT packs tiles (unpadding, newline tokens) inside `pack_image_features`; running that
        same function on id "features" gives the exact row order without re-implementing it.
        """
        ids = torch.arange(tiles * per_tile, dtype=torch.float32).view(tiles, per_tile, 1)
        if not self.adapter.is_anyres:
            return [row.flatten().long() for row in ids]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in image_sizes]
        packed, _ = self.adapter.multimodal_model.pack_image_features(
            list(torch.split(ids, counts)), image_sizes, config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]))
        return [p.flatten().long() for p in packed]
