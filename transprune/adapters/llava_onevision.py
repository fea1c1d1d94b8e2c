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
* **VisionZip without a CLS token** (`OnevisionVisionHooks`): a patch's dominance is the attention it receives
  in the feature layer, as on Qwen. The packing can downsample a grid bilinearly (and videos pool each frame
  2 x 2), so a packed feature is not always one patch: the scores and keys are packed by the model's own code
  (`pack_image_features`, `apply_pooling`) like features, and each packed feature is ranked by its
  interpolated score.
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "LlavaOnevisionAdapter", "model_types": ('llava_onevision',), "since": "5.16.1", "order": 20}

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from .. import compat
from ..accounting import ArchSpec
from .base import ModelAdapter
from .llama import qwen2_text
from .llava import LlavaAdapter
from .vision import VisionHooks, capture_received, feature_layer, shared_received


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

# LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf, public config.json facts, written in code): SigLIP
# so400m-384/14 (27 x 27 patches per crop, all kept: strategy "full", last layer), the Qwen2-7B decoder, anyres
# grids of 1 x 1 to 6 x 6 crops of 384 px, anyres_max_9 packing. Token ids are its Qwen2 vocabulary's.
ONEVISION_GRID = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _siglip_384(**overrides):
    from transformers import SiglipVisionConfig

    # 26 layers: as llava-hf's OneVision config.json (as known; not read from a file here: no hub)
    fields = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                  image_size=384, patch_size=14, layer_norm_eps=1e-6)
    return SiglipVisionConfig(**{**fields, **overrides})


def _llava_onevision(vision, text):
    from transformers import LlavaOnevisionConfig, Qwen2Config

    return LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_index=151646,
                                video_token_index=151647, vision_feature_select_strategy="full",
                                vision_feature_layer=-1, image_grid_pinpoints=ONEVISION_GRID,
                                vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava-onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    model_types = ("llava_onevision",)
    archs = {"llava-onevision-7b": lambda: _llava_onevision(_siglip_384(), qwen2_text(3584, 18944, 28, 28, 4))}
    reduced_archs = {"llava-onevision-reduced": lambda: _llava_onevision(
        _siglip_384(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        qwen2_text(112, 592, 28, 7, 1))}
    processor_classes = {"llava_onevision": "LlavaOnevisionProcessor"}

    # -- visual tokens: image and video placeholders -------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        config = self.model.config
        return {"image": config.image_token_id, "video": config.video_token_id}

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return ModelAdapter.token_coords(self, ranks, positions)  # packed order (base crop, then the grid)

    def vision_hooks(self) -> "OnevisionVisionHooks":
        return OnevisionVisionHooks(self)

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


class OnevisionVisionHooks(VisionHooks):
    """What VisionZip reads from LLaVA-OneVision's SigLIP tower (no CLS token), its projector and its packing.

    A patch's dominance is the attention it receives in the feature layer (the mean over its crop's patches as
    queries and over heads, from that layer's q and k). Scores and keys travel through the model's own packing
    as extra feature channels (unpadding, anyres-max bilinear downsampling, each video frame's 2 x 2 pooling;
    newline rows marked apart), so each packed feature gets the interpolated score and key of the patches it was
    made of. Units: per image its base view and its packed grid (newline tokens are dropped, as VisionZip does
    on LLaVA-NeXT), per video each frame. A contextual token is its group's mean after the projector.
    """

    encoders = {"image": "get_image_features", "video": "get_video_features"}

    def __init__(self, adapter: LlavaOnevisionAdapter):
        super().__init__(adapter)
        self.config = adapter.model.config

    def check(self) -> None:
        if self.config.vision_feature_select_strategy != "full" or not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("VisionZipConfig on LLaVA-OneVision needs vision_feature_select_strategy='full' (every "
                             "patch a feature: SigLIP has no CLS row to drop) and a single int vision_feature_layer, got "
                             f"{self.config.vision_feature_select_strategy!r} and {self.config.vision_feature_layer!r}")
        self.attention_layer()

    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def patches_per_tile(self) -> int:
        return self._side() ** 2

    def attention_layer(self):
        tower = self.mm.vision_tower
        tower = getattr(tower, "vision_model", tower)
        return feature_layer(tower.encoder.layers, self.config.vision_feature_layer).self_attn

    # the attention each patch receives in the layer (no mask: one image or crop per row), its first pass shared
    # with the layer's own call where the backend allows (`vision.shared_received`)
    capture = staticmethod(capture_received)
    forward_with_lse = staticmethod(shared_received)

    def geometry(self, modality, args, kwargs):
        if modality == "video":
            videos = kwargs.get("pixel_values_videos", kwargs.get("pixel_values", args[0] if args else None))
            return {"videos": videos.shape[0], "frames": videos.shape[1]}
        return {"image_sizes": kwargs.get("image_sizes", args[1] if len(args) > 1 else None),
                "batch_num_images": kwargs.get("batch_num_images"),
                "vision_aspect_ratio": kwargs.get("vision_aspect_ratio") or self.config.vision_aspect_ratio}

    def _crops(self, geometry) -> list[int]:
        """Crops per image (as `get_image_features` splits them: images of multi-image samples are not tiled) or
        frames per video."""
        if "videos" in geometry:
            return [geometry["frames"]] * geometry["videos"]
        sizes, counts = geometry["image_sizes"], geometry["batch_num_images"]
        patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts for _ in range(n)]
        return [self.adapter._tiles([int(x) for x in size]) if patch else 1 for size, patch in zip(sizes, patching)]

    def _packed(self, per_crop: torch.Tensor, geometry) -> list[torch.Tensor]:
        """(crops, patches, c) channels packed as the model packs features: per image (or video) its rows, (n, 1 + c),
        a marker channel first (1 on feature rows, 0 on newline rows)."""
        marker = torch.ones(*per_crop.shape[:-1], 1, dtype=per_crop.dtype, device=per_crop.device)
        rows = torch.cat([marker, per_crop], -1)
        newline = torch.zeros(rows.shape[-1], dtype=rows.dtype, device=rows.device)
        if "videos" in geometry:
            pooled = self.mm.apply_pooling(rows).reshape(geometry["videos"], -1, rows.shape[-1])
            return [torch.cat([video, newline[None]]) for video in pooled]
        packed, _ = self.mm.pack_image_features(list(torch.split(rows, self._crops(geometry))), geometry["image_sizes"],
                                                image_newline=newline, vision_aspect_ratio=geometry["vision_aspect_ratio"])
        return packed

    def _unit_rows(self, packed: list[torch.Tensor], geometry) -> list[list[torch.Tensor]]:
        """Per image (video), the row indices of each of its units: base view then grid (frames), newlines left out."""
        units = []
        for rows in packed:
            feature = (rows[:, 0] > 0.5).nonzero().squeeze(1)
            if "videos" in geometry:
                units.append(list(feature.chunk(geometry["frames"])))
            else:
                base = self.patches_per_tile()
                units.append([feature[:base]] + ([feature[base:]] if feature.numel() > base else []))
        return units

    def units(self, image_outputs, captured, geometry):
        received, keys = captured
        packed = self._packed(torch.cat([received[..., None], keys], -1).float(), geometry)
        return [(rows[idx, 1], torch.nn.functional.normalize(rows[idx, 2:], dim=-1))
                for rows, unit_rows in zip(packed, self._unit_rows(packed, geometry)) for idx in unit_rows]

    def merge(self, image_outputs, plans, geometry) -> torch.Tensor:
        features = image_outputs.pooler_output  # per image (rows, d), or (videos, rows, d)
        device = features[0].device
        markers = self._packed(torch.zeros(sum(self._crops(geometry)), self.patches_per_tile(), 0, device=device),
                               geometry)
        written, keeps, pending = [], [], iter(plans)
        for feats, unit_rows, packed in zip(features, self._unit_rows(markers, geometry), markers):
            # the packing ends a video with its newline row; an encoder that leaves that row to the forward
            # (compat.newline_rows_left_to_the_forward: releases before 5.18) returns one row fewer
            missing = compat.newline_rows_left_to_the_forward(packed.shape[0], feats.shape[0])
            feats, keep = feats.clone(), torch.zeros(feats.shape[0] + missing, dtype=torch.bool, device=device)
            for idx in unit_rows:
                plan = next(pending)
                keep[idx] = plan.keep
                if plan.targets.numel():
                    feats[idx[plan.targets]] = plan.merged(feats[idx]).to(feats.dtype)
            written.append(feats)
            keeps.append(keep)
        image_outputs.pooler_output = torch.stack(written) if "videos" in geometry else written
        return torch.cat(keeps), None
