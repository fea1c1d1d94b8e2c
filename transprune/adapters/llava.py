"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expand each `<image>` into one placeholder id per image feature (for NeXT: every anyres feature,
newline tokens included), so the image tokens of a sample are exactly `input_ids == image_token_id`.
The text decoder is a Llama-style model at `model.model.language_model`.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from . import llama


class LlavaAdapter:
    family = "llava"
    model_classes = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
    run_layer = staticmethod(llama.run_layer)
    scoring_qk = staticmethod(llama.scoring_qk)

    def __init__(self, model):
        self.model = model

    @property
    def multimodal_model(self):
        """The module whose forward sees `input_ids` and hands `inputs_embeds` to the decoder."""
        return self.model.model

    @property
    def decoder(self):
        return self.model.model.language_model

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        image_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_id
        if inputs_embeds is None:
            return None
        # Embeddings passed directly: placeholders are still the image token's embedding at this point.
        table = self.multimodal_model.get_input_embeddings()
        marker = table(torch.tensor(image_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == marker).all(-1)

    # -- patch geometry and the vision tower, for the uniform baseline and VisionZip -----------------
    @property
    def is_anyres(self) -> bool:
        return isinstance(self.model, LlavaNextForConditionalGeneration)

    def patch_grid_side(self) -> int | None:
        """Side of the square patch grid image tokens come from (None for anyres packing)."""
        if self.is_anyres:
            return None
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def check_visionzip(self, cfg) -> None:
        config = self.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ValueError("VisionZipConfig needs vision_feature_select_strategy='default' and a single int "
                             f"vision_feature_layer, got {config.vision_feature_select_strategy!r} and "
                             f"{config.vision_feature_layer!r}")
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if cfg.tokens > n:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {cfg.tokens} tokens per image (per anyres "
                             f"tile), more than the model's {n} patches per tile")
        self.vision_attention_layer()

    def vision_attention_layer(self):
        """The attention module of the vision layer whose output LLaVA feeds to the projector."""
        tower = self.multimodal_model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel nests it in older layouts
        layers = tower.encoder.layers
        feature = self.model.config.vision_feature_layer  # index into hidden_states (0 = embeddings)
        index = feature if feature >= 0 else len(layers) + 1 + feature
        if not 1 <= index <= len(layers):
            raise ValueError(f"vision_feature_layer={feature} selects no encoder layer")
        return layers[index - 1].self_attn

    @staticmethod
    def vision_cls_attention(attn, hidden):
        """CLS-row attention (mean over heads) and keys of a CLIP attention layer, from its q and k."""
        b, t, _ = hidden.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(hidden[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2).float()
        k = attn.k_proj(hidden).view(b, t, heads, head_dim).transpose(1, 2).float()
        cls = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0]  # (B, H, T)
        return cls.mean(1), k.transpose(1, 2).reshape(b, t, -1)

    def visionzip(self, cfg, image_outputs, captured, image_sizes=None) -> torch.Tensor:
        """Replace contextual slots of each image's features by merged tokens; return which slots stay.

        Per vision tile (the whole image for LLaVA-1.5; the base image and every anyres tile for NeXT):
        the ``dominant`` patches with the most CLS attention stay as they are; of the rest, ``contextual``
        evenly spaced targets absorb every other remaining patch by key similarity and become the mean of
        their group in vision space, projected like any patch. Everything else, NeXT's newline tokens
        included, is dropped before the LLM. Returns a bool over all image tokens of the call, in order.
        """
        from ..scoring import select_top

        cls_attention, keys = captured
        patches = image_outputs.hidden_states[self.model.config.vision_feature_layer][:, 1:]
        cls_attention, keys = cls_attention[:, 1:], torch.nn.functional.normalize(keys[:, 1:], dim=-1)
        tiles, per_tile = patches.shape[:2]
        keep = torch.zeros(tiles, per_tile, dtype=torch.bool, device=patches.device)
        merged_ids, merged = [], []
        for t in range(tiles):
            keep[t, select_top(cls_attention[t], cfg.dominant)] = True
            rest = (~keep[t]).nonzero().squeeze(1)
            c = min(cfg.contextual, rest.numel())
            if c:
                targets = rest[torch.arange(c, device=rest.device) * rest.numel() // c]
                others = rest[~torch.isin(rest, targets)]
                group = (keys[t, others] @ keys[t, targets].T).argmax(1)
                total = patches[t, targets].float().index_add(0, group, patches[t, others].float())
                sizes = torch.ones(c, device=total.device).index_add(0, group, torch.ones_like(group, dtype=torch.float))
                merged.append(total / sizes[:, None])
                merged_ids.append(t * per_tile + targets)
                keep[t, targets] = True
        keep = keep.flatten()
        slot = torch.full((tiles * per_tile,), -1, dtype=torch.long, device=patches.device)
        if merged:
            merged_ids = torch.cat(merged_ids)
            slot[merged_ids] = torch.arange(merged_ids.numel(), device=slot.device)
            merged = self.multimodal_model.multi_modal_projector(torch.cat(merged).to(patches.dtype))
        features, keeps = [], []
        for feats, ids in zip(image_outputs.pooler_output, self._packed_patch_ids(tiles, per_tile, image_sizes)):
            real = ids >= 0  # -1 marks NeXT's newline tokens
            ids = ids.clamp_min(0)
            rows = real & (slot[ids] >= 0)
            if rows.any():
                feats = feats.clone()
                feats[rows] = merged[slot[ids[rows]]].to(feats.dtype)
            features.append(feats)
            keeps.append(real & keep[ids])
        image_outputs.pooler_output = features
        return torch.cat(keeps)

    def _packed_patch_ids(self, tiles, per_tile, image_sizes):
        """For each image, the (tile * per_tile + patch) id of every feature row, -1 for newline rows.

        LLaVA-NeXT packs tiles (unpadding, newline tokens) inside `pack_image_features`; running that
        same function on id "features" gives the exact row order without re-implementing it.
        """
        ids = torch.arange(tiles * per_tile, dtype=torch.float32).view(tiles, per_tile, 1)
        if not self.is_anyres:
            return [row.flatten().long() for row in ids]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in image_sizes]
        packed, _ = self.multimodal_model.pack_image_features(
            list(torch.split(ids, counts)), image_sizes, config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]))
        return [p.flatten().long() for p in packed]
