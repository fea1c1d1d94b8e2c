"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expand each `<image>` into one placeholder id per image feature (for NeXT: every anyres feature,
newline tokens included), so the image tokens of a sample are exactly `input_ids == image_token_id`.
The decoder is Llama-style under 1-D RoPE: the `ModelAdapter` defaults. The vision tower is CLIP with a
CLS token, which is what VisionZip's dominance rule reads.
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "LlavaAdapter", "model_types": ('llava', 'llava_next'), "since": "5.16.1", "order": 10}

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from ..accounting import ArchSpec
from .base import ModelAdapter
from .vision import VisionHooks, cls_row_attention, feature_layer


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

ANYRES_GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT-7B's pinpoints
IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB = 32000, 32001, 32064  # llava-hf's Vicuna-based checkpoints


def _clip_l336(**overrides):
    from transformers import CLIPVisionConfig

    fields = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPVisionConfig(**{**fields, **overrides})


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None, **overrides):
    from transformers import LlamaConfig

    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=VOCAB,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(**{**fields, **overrides})


def _llava(vision, text, anyres: bool):
    from transformers import LlavaConfig, LlavaNextConfig

    common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                  projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=(vision.image_size // vision.patch_size) ** 2, tie_word_embeddings=False)
    if anyres:
        return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in ANYRES_GRID])
    return LlavaConfig(**common)


# Reduced: LLaVA's geometry (336 px / 14 px patches -> 576 image tokens per crop, 32 decoder layers, MHA,
# SwiGLU at ~2.7x) with a small hidden size and a 2-layer vision tower, so it runs on a CPU in seconds.
_REDUCED_TEXT = dict(hidden=128, intermediate=344, layers=32, heads=4)
_REDUCED_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=64)


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_classes = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
    model_types = ("llava", "llava_next")
    archs = {
        "llava-1.5-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=False),
        "llava-1.5-13b": lambda: _llava(_clip_l336(), _llama(5120, 13824, 40, 40), anyres=False),
        "llava-next-7b": lambda: _llava(_clip_l336(), _llama(4096, 11008, 32, 32), anyres=True),
    }
    reduced_archs = {
        "llava-1.5-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=False),
        "llava-next-reduced": lambda: _llava(_clip_l336(**_REDUCED_VISION), _llama(**_REDUCED_TEXT), anyres=True),
    }

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


class ClipVisionHooks(VisionHooks):
    """What VisionZip reads from a LLaVA vision tower (CLIP, CLS at row 0) and its projector."""

    encoders = {"image": "get_image_features"}  # modality -> the multimodal model's encoder method
    cls_reaches_llm = True  # the official code keeps each tile's CLS token, counted among the dominant ones

    def __init__(self, adapter: LlavaAdapter):
        super().__init__(adapter)
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
        patches' CLS attention and unit-normalised keys, CLS dropped (it is kept apart: `cls_reaches_llm`)."""
        cls_attention, keys = captured
        keys = torch.nn.functional.normalize(keys[:, 1:], dim=-1)
        return list(zip(cls_attention[:, 1:], keys))

    def merge(self, image_outputs, plans, geometry):
        """Write each image's tokens as the official code does, into the first rows of its features: per tile its
        CLS token, its dominant patches in order and its contextual tokens (target + the mean of its members), in
        the feature layer's space, then the projector; on NeXT the base tile so, then the other tiles' dominant
        patches in reading order over the whole tile grid (no unpadding, no newline tokens), their CLS tokens and
        their contextual tokens. Returns (keep: those rows; source: the row of the unpruned features whose patch
        each row holds, -1 for a CLS token or a patch the unpruned packing unpadded away)."""
        hidden = image_outputs.hidden_states[self.config.vision_feature_layer]  # (tiles, 1 + patches, d)
        per_tile = hidden.shape[1] - 1
        projector = self.adapter.multimodal_model.multi_modal_projector
        tile_rows, tile_patches, sizes = [], [], []  # per tile: rows in the official order, the patch each holds
        for t, plan in enumerate(plans):
            dominant = plan.dominant
            parts, patches = [hidden[t, 1 + dominant].float(), plan.merged(hidden[t, 1:])], [dominant, plan.targets]
            if plan.cls:
                parts.insert(0, hidden[t, :1].float())
                patches.insert(0, dominant.new_full((1,), -1))
            tile_rows.append(torch.cat(parts).to(hidden.dtype))
            tile_patches.append(torch.cat(patches))
            sizes.append((int(plan.cls), dominant.numel()))
        if len({r.shape[0] for r in tile_rows}) == 1:  # the official code projects (tiles, kept, d) at once
            tile_rows = list(projector(torch.stack(tile_rows)))
        else:
            tile_rows = [projector(r[None])[0] for r in tile_rows]
        features, keeps, sources, first_tile, offset = [], [], [], 0, 0
        packed_ids = self.packed_patch_ids(len(plans), per_tile, geometry)
        for i, (feats, ids, tiles) in enumerate(zip(image_outputs.pooler_output, packed_ids,
                                                    self._tiles_per_image(len(plans), geometry))):
            span = range(first_tile, first_tile + tiles)
            rows, patch_ids = self._official_order([tile_rows[t] for t in span], [tile_patches[t] for t in span],
                                                   [sizes[t] for t in span], per_tile,
                                                   geometry[i] if tiles > 1 else None, feats.device)
            n_rows, n = feats.shape[0], rows.shape[0]
            if n > n_rows:
                raise ValueError(f"VisionZip keeps {n} tokens of an image that has {n_rows} image tokens: lower "
                                 "dominant or contextual")
            ids = ids.to(feats.device)
            ids = torch.where(ids >= 0, ids - first_tile * per_tile, -1)  # numbered within this image
            first_tile += tiles
            row_of = torch.full((tiles * per_tile,), -1, dtype=torch.long, device=feats.device)
            real = ids >= 0  # -1 marks rows that are no patch (NeXT's newline tokens)
            row_of[ids[real]] = real.nonzero().squeeze(1)
            source = torch.arange(n_rows, device=feats.device)
            patch_ids = patch_ids.to(feats.device)  # the tower's device; the features may sit elsewhere (device maps)
            source[:n] = torch.where(patch_ids >= 0, row_of[patch_ids.clamp_min(0)], -1)
            feats = feats.clone()
            feats[:n] = rows.to(feats.dtype)
            features.append(feats)
            keeps.append(torch.arange(n_rows, device=feats.device) < n)
            sources.append(torch.where(source >= 0, source + offset, -1))
            offset += n_rows
        image_outputs.pooler_output = features
        return torch.cat(keeps), torch.cat(sources)

    def _official_order(self, rows, patches, sizes, per_tile, image_size, device):
        """One image's rows (k, d) in the official order and the ``tile * per_tile + patch`` each holds (-1: none),
        from its tiles' rows ([CLS], dominant, contextual; ``sizes`` = (CLS rows, dominant rows) of each tile)."""
        ids = [torch.where(p >= 0, p + t * per_tile, -1) for t, p in enumerate(patches)]
        if image_size is None:  # one tile (LLaVA-1.5; NeXT's base-only image also gets its newline token)
            if not self.adapter.is_anyres:
                return rows[0], ids[0]
            newline = self.adapter.multimodal_model.image_newline.to(device, rows[0].dtype)
            return torch.cat([rows[0], newline[None]]), torch.cat([ids[0], ids[0].new_full((1,), -1)])
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        vision = self.config.vision_config
        _, grid_w = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, vision.image_size)
        side = vision.image_size // vision.patch_size
        parts = {"grid": [], "grid_ids": [], "order": [], "cls": [], "cls_ids": [], "ctx": [], "ctx_ids": []}
        for g, (r, i, p, (n_cls, n_dominant)) in enumerate(zip(rows[1:], ids[1:], patches[1:], sizes[1:])):
            dominant = slice(n_cls, n_cls + n_dominant)
            tile_row, tile_col = divmod(g, grid_w)  # the grid tiles in reading order, as the model's packing
            py, px = torch.div(p[dominant], side, rounding_mode="floor"), p[dominant] % side
            parts["order"].append((tile_row * side + py) * (grid_w * side) + tile_col * side + px)
            parts["grid"].append(r[dominant])
            parts["grid_ids"].append(i[dominant])
            parts["cls"].append(r[:n_cls])
            parts["cls_ids"].append(i[:n_cls])
            parts["ctx"].append(r[dominant.stop:])
            parts["ctx_ids"].append(i[dominant.stop:])
        order = torch.cat(parts["order"]).argsort()
        out = [rows[0], torch.cat(parts["grid"])[order], *parts["cls"], *parts["ctx"]]
        out_ids = [ids[0], torch.cat(parts["grid_ids"])[order], *parts["cls_ids"], *parts["ctx_ids"]]
        return torch.cat(out), torch.cat(out_ids)

    def _tiles_per_image(self, tiles, image_sizes) -> list[int]:
        if not self.adapter.is_anyres:
            return [1] * tiles
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                for size in image_sizes]

    def packed_patch_ids(self, tiles, per_tile, image_sizes):
        """For each image, the (tile * per_tile + patch) id of every feature row, -1 for newline rows.

        LLaVA-NeXT packs tiles (unpadding, newline tokens) inside `pack_image_features`; running that
        same function on id "features" gives the exact row order without re-implementing it.
        """
        ids = torch.arange(tiles * per_tile, dtype=torch.float32).view(tiles, per_tile, 1)
        if not self.adapter.is_anyres:
            return [row.flatten().long() for row in ids]
        config = self.config
        counts = self._tiles_per_image(tiles, image_sizes)
        packed, _ = self.adapter.multimodal_model.pack_image_features(
            list(torch.split(ids, counts)), image_sizes, config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]))
        return [p.flatten().long() for p in packed]
