"""SmolVLM (`SmolVLMForConditionalGeneration`) and Idefics3 (`Idefics3ForConditionalGeneration`).

The decoder is a Llama model under ``model.text_model`` (found through `get_decoder()`) with 1-D RoPE, so the
`ModelAdapter` defaults apply: both position rules ("compact" by default), the `llama` layer body and scoring
q/k (GQA: SmolVLM-256M has 9 query / 3 KV heads). Visual tokens are the ``image_token_id`` placeholders: the
processor splits an image into crops (a grid plus a downscaled global view) and the connector's pixel shuffle
turns each crop into ``(image_size / patch_size)**2 / scale_factor**2`` tokens (64 on SmolVLM-256M), so a
512 x 512 image, which the processor upscales to 2048 px, is 16 + 1 crops: 1088 tokens. The crop and row
markers between them are text tokens and are never pruned.

No VisionZip yet: the tower has no CLS token (VisionZip would need the CLS-free rule, the attention each patch
receives), and the pixel shuffle folds 4 x 4 patches (SmolVLM-256M) into one visual token.
"""

from __future__ import annotations

import math

import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter

NOMINAL_SCALE = 4  # the bench's default image: 4 x 4 crops (the 512 px of SmolVLM-256M upscaled to 2048) + global


class SmolVLMAdapter(ModelAdapter):
    family = "smolvlm"
    model_classes = (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)
    model_types = ("smolvlm", "idefics3")
    processor_classes = {"smolvlm": "SmolVLMProcessor"}
    images_per_prompt = True
    vision_hooks_missing = ("its vision tower has no CLS token (VisionZip would need the CLS-free rule: the attention "
                            "each patch receives) and its pixel shuffle folds several patches into one visual token; "
                            "not written yet")

    # -- bench inputs and facts for tools -------------------------------------------------------------
    @staticmethod
    def _per_crop(cfg) -> int:
        vision = cfg.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // cfg.scale_factor ** 2

    def _crops(self, image_size) -> int:
        """Crops of an image of ``image_size`` (h, w) *as the processor resized it* (the processor upscales first:
        SmolVLM-256M's makes 2048 px of a 512 x 512 image), each side a multiple of the tower's: a grid of
        tower-sized crops plus the global view (one crop alone when the image is the tower's size)."""
        side = self.model.config.vision_config.image_size
        if image_size[0] % side or image_size[1] % side:
            raise ValueError(f"image size {image_size[0]}x{image_size[1]}: on SmolVLM give the size the image processor "
                             f"resizes to, each side a multiple of the {side}-px crop (e.g. {4 * side}x{4 * side})")
        grid = math.ceil(image_size[0] / side) * math.ceil(image_size[1] / side)
        return grid + 1 if grid > 1 else 1

    def default_image_size(self) -> tuple[int, int]:
        side = self.model.config.vision_config.image_size * NOMINAL_SCALE
        return side, side

    def image_tokens_for(self, image_size) -> int:
        return self._crops(image_size) * self._per_crop(self.model.config)

    def synthetic_vision_inputs(self, batch, image_size, gen) -> dict:
        side = self.model.config.vision_config.image_size
        crops = self._crops(image_size)
        return {"pixel_values": torch.randn((batch, crops, 3, side, side), generator=gen),
                "pixel_attention_mask": torch.ones((batch, crops, side, side), dtype=torch.bool)}

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal: one image upscaled to ``NOMINAL_SCALE`` x the tower's side, 4 x 4 crops + the global view
        (17 x 64 = 1088 tokens on SmolVLM-256M, for a 512 x 512 image); real counts follow the processor's split."""
        crops = NOMINAL_SCALE ** 2 + 1
        return ArchSpec.of_decoder(cfg.text_config, name, crops * cls._per_crop(cfg), crops=crops,
                                   model_type=cfg.model_type)
