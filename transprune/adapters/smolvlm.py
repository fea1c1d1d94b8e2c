"""SmolVLM (`SmolVLMForConditionalGeneration`) and Idefics3 (`Idefics3ForConditionalGeneration`).

The decoder is a Llama model under ``model.text_model`` (found through `get_decoder()`) with 1-D RoPE, so the
`ModelAdapter` defaults apply: both position rules ("compact" by default), the `llama` layer body and scoring
q/k (GQA: SmolVLM-256M has 9 query / 3 KV heads). Visual tokens are the ``image_token_id`` placeholders: the
processor splits an image into crops (a grid plus a downscaled global view) and the connector's pixel shuffle
turns each crop into ``(image_size / patch_size)**2 / scale_factor**2`` tokens (64 on SmolVLM-256M), so a
512 x 512 image, which the processor upscales to 2048 px, is 16 + 1 crops: 1088 tokens. The crop and row
markers between them are text tokens and are never pruned.

VisionZip (`SmolVLMVisionHooks`): the tower has no CLS token, so a visual token is ranked by the attention its
patches receive (the pixel shuffle folds 4 x 4 patches into one token on SmolVLM-256M), per crop.
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "SmolVLMAdapter", "model_types": ('smolvlm', 'idefics3'), "since": "5.16.1", "order": 30}

import math

import torch
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from .. import compat
from ..accounting import ArchSpec
from .base import ModelAdapter
from .vision import VisionHooks, capture_received, feature_layer, shared_received

NOMINAL_SCALE = 4  # the bench's default image: 4 x 4 crops (the 512 px of SmolVLM-256M upscaled to 2048) + global


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

# SmolVLM-256M-Instruct (public config.json facts, as known; written in code): SigLIP-B/16 at 512 px (12 layers,
# hidden 768), pixel shuffle x4 (64 tokens per crop), the 30-layer SmolLM2 decoder (d 576, 9 / 3 heads).
def _smolvlm(vision_overrides=None, **text_overrides):
    from transformers import LlamaConfig, SmolVLMConfig

    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16)
    text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, vocab_size=49280, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                tie_word_embeddings=False)
    return SmolVLMConfig(vision_config={**vision, **(vision_overrides or {})},
                         text_config=LlamaConfig(**{**text, **text_overrides}).to_dict(), image_token_id=49190,
                         scale_factor=4, tie_word_embeddings=False)


class SmolVLMAdapter(ModelAdapter):
    family = "smolvlm"
    model_classes = (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)
    model_types = ("smolvlm", "idefics3")
    archs = {"smolvlm-256m": _smolvlm}
    reduced_archs = {"smolvlm-reduced": lambda: _smolvlm(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                              num_attention_heads=4), hidden_size=144, intermediate_size=384)}
    processor_classes = {"smolvlm": "SmolVLMProcessor", "idefics3": "Idefics3Processor"}
    images_per_prompt = True

    def vision_hooks(self) -> "SmolVLMVisionHooks":
        return SmolVLMVisionHooks(self)

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


class SmolVLMVisionHooks(VisionHooks):
    """What VisionZip reads from a SmolVLM / Idefics3 tower (SigLIP-style, no CLS token) and its connector.

    A patch's dominance is the attention it receives in the tower's last layer (whose output the connector
    shuffles): the mean over its crop's patches as queries and over heads, from that layer's q and k (padded
    patches, hidden by the tower's mask, neither pay nor receive). A visual token is ``scale_factor**2``
    patches folded by the connector's pixel shuffle (the model's own, run on patch ids, says which), so its
    score and key are the means over them. Units are crops (padding crops never reach the tower); a contextual
    token is its group's mean after the connector's projection (in the LLM's embedding space).
    """

    encoders = {"image": "get_image_features"}

    def patches_per_tile(self) -> int:
        return SmolVLMAdapter._per_crop(self.adapter.model.config)  # visual tokens per crop

    def attention_layer(self):
        return feature_layer(self.mm.vision_model.encoder.layers, -1).self_attn

    @staticmethod
    def capture(attn, args, kwargs):
        """The attention each patch receives in the layer, under the mask of the batch's padded crops."""
        return capture_received(attn, args, kwargs, mask=True)

    @staticmethod
    def forward_with_lse(attn, args, kwargs):
        return shared_received(attn, args, kwargs, mask=True)

    def units(self, image_outputs, captured, geometry):
        received, keys = captured  # (crops, patches), (crops, patches, d)
        ids = torch.arange(received.shape[1], dtype=torch.float32, device=received.device)[None, :, None]
        members = self.mm.connector.pixel_shuffle(ids, self.mm.connector.scale_factor)[0].long()  # (tokens, s*s)
        score = received[:, members].mean(-1)
        key = torch.nn.functional.normalize(keys[:, members].mean(-2), dim=-1)
        return list(zip(score, key))

    def merge(self, image_outputs, plans, geometry) -> torch.Tensor:
        pooled = image_outputs.pooler_output  # one (crops, tokens, d) tensor, or per sample (compat 3)
        features = compat.rows_of(pooled).reshape(len(plans), -1, pooled[0].shape[-1]).clone()
        for crop, plan in enumerate(plans):
            if plan.targets.numel():
                features[crop, plan.targets] = plan.merged(features[crop]).to(features.dtype)
        image_outputs.pooler_output = compat.like(pooled, features.flatten(0, 1))
        return torch.cat([plan.keep for plan in plans]), None
