"""InternVL (`InternVLForConditionalGeneration`, the transformers-native InternVL2.5 / InternVL3 checkpoints).

The decoder is a Qwen2 / Qwen2.5 model under ``model.language_model`` with 1-D RoPE, so the `ModelAdapter`
defaults apply: both position rules ("compact" by default), the `llama` layer body and scoring q/k (GQA).
Visual tokens are the ``image_token_id`` placeholders (``<IMG_CONTEXT>``): the processor splits an image into
448-px tiles (a grid plus a thumbnail when there is more than one), and the pixel shuffle (``downsample_ratio``
0.5) turns each tile into ``(image_size / patch_size)**2 * downsample_ratio**2`` tokens (256 on InternVL3).
The ``<img>`` / ``</img>`` markers around them are text tokens and are never pruned.

No VisionZip yet: the tower has a CLS token, but the pixel shuffle folds 2 x 2 patches into one visual token,
so a patch's CLS attention does not rank a visual token without a pooling rule of its own.
"""

from __future__ import annotations

import math

import torch
from transformers import InternVLForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_classes = (InternVLForConditionalGeneration,)
    model_types = ("internvl",)
    processor_classes = {"internvl": "InternVLProcessor"}
    vision_hooks_missing = ("its pixel shuffle folds 2 x 2 patches into one visual token, so the tower's CLS attention "
                            "ranks patches, not visual tokens; not written yet")

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        image_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_id
        if inputs_embeds is None:
            return None
        table = self.multimodal_model.get_input_embeddings()
        return (inputs_embeds == table(torch.tensor(image_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)).all(-1)

    # -- bench inputs and facts for tools -------------------------------------------------------------
    @staticmethod
    def _per_tile(cfg) -> int:
        vision = cfg.vision_config
        side, patch = vision.image_size, vision.patch_size
        side, patch = (side[0] if isinstance(side, (list, tuple)) else side), (patch[0] if isinstance(patch, (list, tuple)) else patch)
        return int((side // patch) ** 2 * cfg.downsample_ratio ** 2)

    def _side(self) -> int:
        side = self.model.config.vision_config.image_size
        return side[0] if isinstance(side, (list, tuple)) else side

    def _tiles(self, image_size) -> int:
        """Tiles of an image of ``image_size`` (h, w) *as the processor resized it* to a tile grid (each side a
        multiple of the tile; the processor's ``max_patches``, 12 on InternVL3, bounds the grid): the grid plus a
        thumbnail when there is more than one tile."""
        side = self._side()
        if image_size[0] % side or image_size[1] % side:
            raise ValueError(f"image size {image_size[0]}x{image_size[1]}: on InternVL give the size the image processor "
                             f"resizes to, each side a multiple of the {side}-px tile (e.g. {2 * side}x{2 * side})")
        grid = math.ceil(image_size[0] / side) * math.ceil(image_size[1] / side)
        return grid + 1 if grid > 1 else 1

    def default_image_size(self) -> tuple[int, int]:
        side = self._side()
        return side, side

    def image_tokens_for(self, image_size) -> int:
        return self._tiles(image_size) * self._per_tile(self.model.config)

    def synthetic_vision_inputs(self, batch, image_size, gen) -> dict:
        side = self._side()
        return {"pixel_values": torch.randn((batch * self._tiles(image_size), 3, side, side), generator=gen)}

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal: one image of one tile (448 x 448 on InternVL3: 256 tokens); larger images take more tiles."""
        text = cfg.text_config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return ArchSpec(name, text.hidden_size, text.intermediate_size, text.num_hidden_layers, heads, kv_heads,
                        head_dim, cls._per_tile(cfg), model_type=cfg.model_type)
