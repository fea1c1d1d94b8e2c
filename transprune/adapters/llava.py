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
        if self.is_anyres:
            raise ValueError("VisionZipConfig supports LlavaForConditionalGeneration (LLaVA-1.5) only; LLaVA-NeXT's "
                             "anyres packing (tiles + newline tokens) is not handled yet")
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ValueError("VisionZipConfig needs vision_feature_select_strategy='default' and a single int "
                             f"vision_feature_layer, got {config.vision_feature_select_strategy!r} and "
                             f"{config.vision_feature_layer!r}")
        n = self.patch_grid_side() ** 2
        if cfg.tokens > n:
            raise ValueError(f"VisionZipConfig keeps dominant + contextual = {cfg.tokens} tokens per image, more than "
                             f"the model's {n} image tokens")
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

    def visionzip(self, cfg, image_outputs, captured) -> torch.Tensor:
        """Replace contextual slots of each image's features by merged tokens; return which slots stay.

        Per image: the ``dominant`` patches with the most CLS attention stay as they are; of the rest,
        ``contextual`` evenly spaced targets absorb every other remaining patch by key similarity and
        become the mean of their group in vision space, projected like any patch. All other slots are
        dropped before the LLM. Returns a bool over all image tokens of the call, in input order.
        """
        from ..scoring import select_top

        cls_attention, keys = captured
        patches = image_outputs.hidden_states[self.model.config.vision_feature_layer][:, 1:]
        cls_attention, keys = cls_attention[:, 1:], torch.nn.functional.normalize(keys[:, 1:], dim=-1)
        projector = self.multimodal_model.multi_modal_projector
        features, keeps = [], []
        for i, feats in enumerate(image_outputs.pooler_output):
            n = feats.shape[0]
            keep = torch.zeros(n, dtype=torch.bool, device=feats.device)
            keep[select_top(cls_attention[i], cfg.dominant)] = True
            rest = (~keep).nonzero().squeeze(1)
            c = min(cfg.contextual, rest.numel())
            if c:
                targets = rest[torch.arange(c, device=rest.device) * rest.numel() // c]
                others = rest[~torch.isin(rest, targets)]
                group = (keys[i, others] @ keys[i, targets].T).argmax(1)
                merged = patches[i, targets].float().index_add(0, group, patches[i, others].float())
                sizes = torch.ones(c, device=merged.device).index_add(0, group, torch.ones_like(group, dtype=torch.float))
                feats = feats.clone()
                feats[targets] = projector((merged / sizes[:, None]).to(patches.dtype)).to(feats.dtype)
                keep[targets] = True
            features.append(feats)
            keeps.append(keep)
        image_outputs.pooler_output = features
        return torch.cat(keeps)
