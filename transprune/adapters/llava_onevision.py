"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA's layout on a Qwen2 decoder.

What is the same as LLaVA-NeXT (`LlavaAdapter`, subclassed here): every packed feature is one placeholder
token, so a sample's visual tokens are exactly its placeholders; 1-D RoPE, so both position rules apply
("compact" by default, as LLaVA's official code). The Qwen2 decoder is Llama-style with q/k/v biases and GQA:
the `llama` body and scoring q/k apply as they are.

What differs:

* **Images and videos.** Placeholders are ``image_token_id`` and ``video_token_id``; both are pruned by the
  same rules (a video's frames are pooled 2x2 by the model before the LLM).
* **anyres-max packing.** A base crop plus a grid of tiles, unpadded to the image's aspect ratio, bilinearly
  downsampled when it holds more than ``anyres_max_N`` crops' worth, with a newline token per row; the
  adapter counts tokens by running the model's own `pack_image_features`.
* **No VisionZip yet.** The SigLIP tower has no CLS token, so VisionZip would need the CLS-free rule (the
  attention each patch receives, as on Qwen), and the packing's bilinear downsampling mixes patches, so a
  kept feature no longer maps to one patch. Both are refused with that reason until written.
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter
from .llava import LlavaAdapter


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava-onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    model_types = ("llava_onevision",)
    processor_classes = {"llava_onevision": "LlavaOnevisionProcessor"}
    vision_hooks_missing = ("its SigLIP tower has no CLS token (VisionZip would need the CLS-free rule: the "
                            "attention each patch receives) and its anyres-max packing downsamples features "
                            "bilinearly, so a kept feature is not one patch; not written yet")

    # -- visual tokens: image and video placeholders -------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        config = self.model.config
        return {"image": config.image_token_id, "video": config.video_token_id}

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return ModelAdapter.token_coords(self, ranks, positions)  # packed order (base crop, then the grid)

    def vision_hooks(self):
        return None

    # -- bench inputs and facts for tools -------------------------------------------------------------
    @property
    def is_anyres(self) -> bool:
        return True

    def _tiles(self, image_size) -> int:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        config = self.model.config
        return image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)

    def image_tokens_for(self, image_size) -> int:
        """By the model's own packing (tiles, unpadding, anyres-max downsampling, newline tokens)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        features = torch.zeros(self._tiles(image_size), side * side, 1)
        packed, _ = self.multimodal_model.pack_image_features(
            [features], torch.tensor([list(image_size)]), image_newline=torch.zeros(1),
            vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return int(packed[0].shape[0])

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal: one image of the tower's own size (384 x 384 on the 7B), which takes the 1 x 1 grid: the
        base crop plus one tile with a newline token per row (729 + 27 x 28 = 1485 tokens on the 7B). Real
        images take larger grids (up to anyres_max_9's worth), so their counts are larger."""
        vision, text = cfg.vision_config, cfg.text_config
        side = vision.image_size // vision.patch_size
        return ArchSpec.of_decoder(text, name, side * side + side * (side + 1), crops=2, model_type=cfg.model_type)
