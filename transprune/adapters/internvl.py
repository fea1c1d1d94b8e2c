"""InternVL (`InternVLForConditionalGeneration`, the transformers-native InternVL2.5 / InternVL3 checkpoints).

The decoder is a Qwen2 / Qwen2.5 model under ``model.language_model`` with 1-D RoPE, so the `ModelAdapter`
defaults apply: both position rules ("compact" by default), the `llama` layer body and scoring q/k (GQA).
Visual tokens are the ``image_token_id`` placeholders (``<IMG_CONTEXT>``): the processor splits an image into
448-px tiles (a grid plus a thumbnail when there is more than one), and the pixel shuffle (``downsample_ratio``
0.5) turns each tile into ``(image_size / patch_size)**2 * downsample_ratio**2`` tokens (256 on InternVL3).
The ``<img>`` / ``</img>`` markers around them are text tokens and are never pruned.

VisionZip (`InternVLVisionHooks`): the tower has a CLS token, so dominance is CLS attention in the feature
layer (from its q and k, as on LLaVA); the pixel shuffle folds 2 x 2 patches into one visual token, so a visual
token's score and key are the means over its patches (which patches, the model's own `pixel_shuffle` says, run
on patch ids), per tile; a contextual group is averaged after the projector (in the LLM's embedding space).
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "InternVLAdapter", "model_types": ('internvl',), "since": "5.16.1", "order": 40}

import math

import torch
from transformers import InternVLForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter
from .llama import qwen2_text
from .vision import VisionHooks, cls_row_attention, feature_layer


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

# InternVL3-8B (OpenGVLab/InternVL3-8B-hf, public config.json facts as known; written in code): InternViT-300M at
# 448 px (24 layers, hidden 1024, 14-px patches, CLS dropped), pixel shuffle 0.5 (256 tokens per tile), the
# Qwen2.5-7B decoder.
def _internvl(vision_overrides=None, text=None):
    from transformers import InternVLConfig, Qwen2Config

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=[448, 448], patch_size=[14, 14], layer_norm_eps=1e-6)
    return InternVLConfig(vision_config={**vision, **(vision_overrides or {})},
                          text_config=Qwen2Config(**(text or qwen2_text(3584, 18944, 28, 28, 4))).to_dict(),
                          image_token_id=151667, downsample_ratio=0.5, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_classes = (InternVLForConditionalGeneration,)
    model_types = ("internvl",)
    archs = {"internvl3-8b": _internvl}
    reduced_archs = {"internvl-reduced": lambda: _internvl(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                num_attention_heads=4), qwen2_text(112, 592, 28, 7, 1))}
    processor_classes = {"internvl": "InternVLProcessor"}

    def vision_hooks(self) -> "InternVLVisionHooks":
        return InternVLVisionHooks(self)

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
        return ArchSpec.of_decoder(cfg.text_config, name, cls._per_tile(cfg), model_type=cfg.model_type)


class InternVLVisionHooks(VisionHooks):
    """What VisionZip reads from an InternVL tower (InternViT, CLS at row 0) and its pixel shuffle."""

    encoders = {"image": "get_image_features"}

    def __init__(self, adapter: InternVLAdapter):
        super().__init__(adapter)
        self.config = adapter.model.config

    def check(self) -> None:
        if self.config.vision_feature_select_strategy != "default" or not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("VisionZipConfig on InternVL needs vision_feature_select_strategy='default' (the CLS row "
                             "dropped) and a single int vision_feature_layer, got "
                             f"{self.config.vision_feature_select_strategy!r} and {self.config.vision_feature_layer!r}")
        self.attention_layer()

    def patches_per_tile(self) -> int:
        return InternVLAdapter._per_tile(self.config)  # visual tokens per tile: what VisionZip keeps a share of

    def attention_layer(self):
        return feature_layer(self.mm.vision_tower.encoder.layer, self.config.vision_feature_layer).attention

    @staticmethod
    def capture(attn, args, kwargs):
        """CLS-row attention (mean over heads) and keys of the feature layer, from its q and k."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return cls_row_attention(hidden, lambda x: attn.q_norm(attn.q_proj(x)), lambda x: attn.k_norm(attn.k_proj(x)),
                                 attn.num_heads, attn.head_dim, attn.scale)

    def _patches_of_tokens(self, side: int, device) -> torch.Tensor:
        """(tokens, patches per token) patch indices of each visual token, by the model's own pixel shuffle."""
        ids = torch.arange(side * side, dtype=torch.float32, device=device).view(1, side, side, 1)
        shuffled = self.mm.pixel_shuffle(ids, scale_factor=self.config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1]).long()

    def units(self, image_outputs, captured, geometry):
        """One unit per tile: each visual token's CLS attention and key, the means over its patches."""
        cls, keys = captured[0][:, 1:], captured[1][:, 1:]  # CLS dropped, as the model drops it
        side = int(cls.shape[1] ** 0.5)
        members = self._patches_of_tokens(side, cls.device)  # (n, 4)
        score = cls[:, members].mean(-1)  # (tiles, n)
        key = torch.nn.functional.normalize(keys[:, members].mean(-2), dim=-1)  # (tiles, n, d)
        return list(zip(score, key))

    def merge(self, image_outputs, plans, geometry) -> torch.Tensor:
        """Write each contextual target as its group's mean after the projector; keep marks the tokens that stay."""
        features = image_outputs.pooler_output.clone()  # (tiles, n, d)
        for t, plan in enumerate(plans):
            if plan.targets.numel():
                features[t, plan.targets] = plan.merged(features[t]).to(features.dtype)
        image_outputs.pooler_output = features
        return torch.cat([plan.keep for plan in plans]), None
