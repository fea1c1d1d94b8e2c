"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Visual tokens are the image and video placeholders (`image_token_id`, `video_token_id`); each image or
video becomes ``t * h * w / merge**2`` of them, so counts vary per sample (dynamic resolution).

Positions are multimodal RoPE (mRoPE): ``(3, B, L)`` rows (temporal, height, width) from the model's
`get_rope_index`, or ``(4, B, L)`` from `generate()`, whose row 0 holds the text positions the decoder
hands its layers as `position_ids` (for flash-attention packing) while rows 1-3 drive the rotary
embedding. The runtime holds whichever layout the model gave and never looks inside it. A kept token keeps
its own (t, h, w) position ("original", the rule vLLM's pruning interface uses too): the 1-D "compact"
renumbering has no meaning under mRoPE, so it is refused, and a method left at its default rule runs with
"original" here. The positions of a decode step are the caller's (generate's, or the model's own from its
cached `rope_deltas`): they are those of the unpruned model, because layer 0's cache keeps every token, so
`cache.get_seq_length()` (which the model adds `rope_deltas` to) is the unpruned length. Nothing here reads
or writes `rope_deltas`.

The decoder layer is Llama-style (pre-norm, q/k/v with bias, GQA): the `llama` body and scoring q/k apply
as they are, on the (B, L, head_dim) cos/sin the decoder's rotary embedding returns for 3-row positions.
Layers of type "sliding_attention" (``use_sliding_window``) get a sliding-window mask of their own (`ModelAdapter.stage_masks`).
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "Qwen2VLAdapter", "model_types": ('qwen2_vl', 'qwen2_5_vl'), "since": "5.16.1", "order": 60}

import functools
import sys

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from .. import compat
from ..accounting import ArchSpec
from .base import ModelAdapter
from .vision import VisionHooks, received_from_qk, similarity_keys

# The nominal image of the FLOPs tool and the bench: 448 x 448 pixels (16 x 16 merged tokens with 14-pixel
# patches merged 2 x 2: 256 visual tokens on Qwen2-VL / Qwen2.5-VL-7B).
NOMINAL_GRID = 16


_composes_mrope = functools.lru_cache(maxsize=None)(compat.attention_composes_mrope)


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

# Qwen: the public config.json facts of Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and
# Qwen/Qwen3-VL-8B-Instruct (transformers' defaults are other sizes), written in code; the vision towers'
# depth and widths matter only for the vision cost. Token ids are Qwen's (image 151655, video 151656).
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen_text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, mrope, **overrides):
    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=152064,
                  max_position_embeddings=128000, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope)})
    return {**fields, **overrides}


def _qwen2_5_vl(text, **vision_overrides):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=text["hidden_size"], tokens_per_second=2, hidden_act="silu")
    return Qwen2_5_VLConfig(vision_config={**vision, **vision_overrides}, text_config=text, tie_word_embeddings=False,
                            **QWEN_IDS)


def _qwen2_vl(text):
    from transformers import Qwen2VLConfig

    vision = dict(depth=32, embed_dim=1280, hidden_size=text["hidden_size"], mlp_ratio=4, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **QWEN_IDS)



# Reduced Qwen2.5-VL: the 7B's geometry (28 decoder layers, GQA 7:1, m/d ~ 5.3, 14-pixel patches merged 2 x 2:
# 256 visual tokens for the default 448 x 448 image, window attention with full layers) at hidden 112 and a
# 2-block vision tower, so it runs on a CPU in seconds.
_QWEN_REDUCED_TEXT = (112, 592, 28, 7, 1, (2, 3, 3))
_QWEN_REDUCED_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1])


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2-vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    model_types = ("qwen2_vl", "qwen2_5_vl")
    archs = {"qwen2-vl-7b": lambda: _qwen2_vl(_qwen_text(3584, 18944, 28, 28, 4, (16, 24, 24))),
             "qwen2.5-vl-7b": lambda: _qwen2_5_vl(_qwen_text(3584, 18944, 28, 28, 4, (16, 24, 24)))}
    reduced_archs = {"qwen2.5-vl-reduced": lambda: _qwen2_5_vl(_qwen_text(*_QWEN_REDUCED_TEXT), **_QWEN_REDUCED_VISION)}
    processor_classes = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
    position_rules = ("original",)
    position_rule_reasons = {
        "compact": "its positions are 3-D multimodal RoPE (t, h, w) rows, where renumbering the kept tokens "
                   "1-D has no meaning; kept tokens keep their own (t, h, w) positions (positions='original', "
                   "the default here)",
    }

    # -- visual tokens ---------------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        config = self.model.config
        return {"image": config.image_token_id, "video": config.video_token_id}

    def vision_hooks(self) -> "QwenVisionHooks":
        return QwenVisionHooks(self)

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, 3): each token's own (t, h, w) mRoPE position, i.e. its cell of the merged grid of its image or
        video (offset per image by the text before it, so several images in one prompt stay apart)."""
        return positions[-3:].T.float()

    # -- the position rule (mRoPE) -----------------------------------------------------------------
    @staticmethod
    def _rows(position_ids, batch: int) -> torch.Tensor:
        """3 or 4 position rows, (R, B, L), from what the decoder was given (2-D positions are text: 3 equal rows,
        as the decoder itself expands them)."""
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        return position_ids.expand(position_ids.shape[0], batch, -1)

    def prefill_positions(self, position_ids, batch: int, length: int, past: int, device) -> torch.Tensor:
        if position_ids is None:  # what the text decoder does without positions
            position_ids = (torch.arange(length, device=device) + past).view(1, 1, -1).expand(3, batch, -1)
        return self._rows(position_ids, batch)

    def continuation_positions(self, position_ids, next_position: torch.Tensor, length: int) -> torch.Tensor:
        if position_ids is None:
            steps = torch.arange(length, device=next_position.device)
            return next_position[..., None] + steps
        return self._rows(position_ids, next_position.shape[-1])

    def next_position(self, positions: torch.Tensor) -> torch.Tensor:
        """(R, B): after the largest position of every row, as the model continues after a prompt (its
        `rope_deltas` make the next text position ``max + 1`` even when the prompt ends with an image)."""
        return positions.amax(-1) + 1

    def close_up(self, positions, valid, dropped):
        raise ValueError(f"the {self.family} family keeps every token's mRoPE position; it cannot close them up")

    def shift_positions(self, positions, shift: torch.Tensor) -> torch.Tensor:
        return positions - shift[None, :, None]  # shift is always 0 here ("original" positions)

    def layer_position_ids(self, positions):
        """As the decoder's own loop: row 0 (text positions) when the positions have 4 rows, else None."""
        return positions[0] if positions.shape[0] == 4 else None

    def rope(self, h, positions):
        cos, sin = self.decoder.rotary_emb(h, positions[1:] if positions.shape[0] == 4 else positions)
        if self._attention_composes_mrope:  # one row per mRoPE section (transformers before 5.17): composed here
            cos, sin = compat.composed_mrope(cos, sin, self.decoder.config.rope_parameters["mrope_section"])
        return cos, sin

    def run_layer(self, layer, h, *, position_embeddings, **kwargs):
        if self._attention_composes_mrope:
            position_embeddings = compat.per_section(*position_embeddings)
        return super().run_layer(layer, h, position_embeddings=position_embeddings, **kwargs)

    @property
    def _attention_composes_mrope(self) -> bool:
        return _composes_mrope(sys.modules[type(self.decoder).__module__])

    # -- bench inputs and facts for tools ---------------------------------------------------------------
    def _factor(self) -> int:
        vision = self.model.config.vision_config
        return vision.patch_size * vision.spatial_merge_size

    def default_image_size(self) -> tuple[int, int]:
        side = NOMINAL_GRID * self._factor()
        return side, side

    def image_tokens_for(self, image_size) -> int:
        """Tokens of one image of ``image_size`` (h, w), both multiples of patch * merge pixels (the sizes the
        image processor resizes to)."""
        factor = self._factor()
        height, width = image_size
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be a multiple of {factor} pixels on both sides")
        return (height // factor) * (width // factor)

    def synthetic_vision_inputs(self, batch, image_size, gen) -> dict:
        """Random patches in the image processor's layout: (sum of t*h*w patches, C * tp * p * p), the grid of
        each image, and the token types (text 0, image 1) the model's `get_rope_index` needs."""
        vision = self.model.config.vision_config
        merge, patch = vision.spatial_merge_size, vision.patch_size
        factor = self._factor()
        grid_h, grid_w = image_size[0] // factor * merge, image_size[1] // factor * merge
        self.image_tokens_for(image_size)  # checks the size
        per_image = grid_h * grid_w
        width = vision.in_channels * vision.temporal_patch_size * patch * patch
        return {"pixel_values": torch.randn((batch * per_image, width), generator=gen),
                "image_grid_thw": torch.tensor([[1, grid_h, grid_w]] * batch)}

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict:
        """`mm_token_type_ids` of ``input_ids`` (0 text, 1 image, 2 video): `get_rope_index` reads them."""
        image_id, video_id = self.placeholder_ids().values()
        return {"mm_token_type_ids": (input_ids == image_id).int() + 2 * (input_ids == video_id).int()}

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal: one 448 x 448 image (``NOMINAL_GRID**2`` = 256 tokens with the 7B's 14-pixel patches
        merged 2 x 2); a real image's count depends on its size."""
        text = getattr(cfg, "text_config", None) or cfg
        factor = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
        return ArchSpec.of_decoder(text, name, NOMINAL_GRID ** 2, model_type=cfg.model_type, pixels_per_token=factor,
                                   nominal_image_size=(NOMINAL_GRID * factor,) * 2)


class QwenVisionHooks(VisionHooks):
    """What VisionZip reads from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower.

    The tower has no CLS token, so a token's dominance is the attention it *receives*: the mean over the
    queries of its image (or video frame) and over heads, in the tower's last full-attention block (the
    last block; on Qwen2.5-VL the last of ``fullatt_block_indexes``): the rule VisionZip's own Qwen2.5-VL
    code uses. It is computed here from the block's q and k, whatever attention backend the tower runs.
    Scores and keys are averaged over each merge unit (the ``merge**2`` patches that become one visual
    token), and Qwen2.5-VL's window order is undone, so a unit is one visual token in the LLM's order.

    Units are images and video frames. A merged contextual token is the mean of its group's visual tokens
    after the merger (in the LLM's embedding space: the merger is nonlinear over each 2 x 2 unit, so there
    is no vision-space patch to average and then project, as on CLIP); Qwen3-VL's DeepStack features of the
    group are averaged the same way. An image or frame of fewer tokens than ``dominant + contextual`` keeps
    them all.
    """

    encoders = {"image": "get_image_features", "video": "get_video_features"}
    _grids = {"image": "image_grid_thw", "video": "video_grid_thw"}

    def __init__(self, adapter: Qwen2VLAdapter):
        super().__init__(adapter)
        self.visual = self.mm.visual
        self.merge_unit = self.visual.spatial_merge_size ** 2

    def patches_per_tile(self):
        return None  # dynamic resolution: the count is each image's own

    def attention_layer(self):
        full = getattr(self.visual, "fullatt_block_indexes", None)  # Qwen2.5-VL: the others attend in windows
        return self.visual.blocks[max(full) if full else len(self.visual.blocks) - 1].attn

    @staticmethod
    def capture(attn, args, kwargs):
        """(received attention per row, keys per row) of one vision attention call, from its q and k: each row's
        mean attention from the rows of its own segment (``cu_seqlens``: an image or a frame), over heads."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        rows = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(rows, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (heads, rows, head_dim)
        received = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        bounds = kwargs["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):  # each image / frame attends within itself
            received[start:end] = received_from_qk(q[None, :, start:end], k[None, :, start:end], attn.scaling)[0]
        return received, similarity_keys(k)

    def geometry(self, modality, args, kwargs):
        """The (t, h, w) patch grid of each image or video of the encoder call."""
        return kwargs.get(self._grids[modality], args[1] if len(args) > 1 else None)

    def _token_order(self, grid) -> torch.Tensor:
        windows = isinstance(self.adapter.model, Qwen2_5_VLForConditionalGeneration)
        return token_order(grid, self.visual.spatial_merge_size,
                           (self.visual.window_size, self.visual.patch_size) if windows else None)

    def units(self, image_outputs, captured, grid):
        received, keys = captured
        return frame_units(received, keys, grid, self.merge_unit, self._token_order(grid))

    def merge(self, image_outputs, plans, grid) -> torch.Tensor:
        per_item = [len(x) for x in image_outputs.pooler_output]
        deepstack = getattr(image_outputs, "deepstack_features", None) or []
        sources = [torch.cat(image_outputs.pooler_output)] + [compat.rows_of(f) for f in deepstack]
        written = write_merged(sources, plans)
        image_outputs.pooler_output = written[0].split(per_item)
        if deepstack:
            image_outputs.deepstack_features = [compat.like(f, x, per_item) for f, x in zip(deepstack, written[1:])]
        return torch.cat([plan.keep for plan in plans]), None


# -- VisionZip's units and merge on a Qwen tower, as pure functions: the transformers hooks above and the vLLM
# plugin (transprune.integrations.vllm) both call them, so a served model keeps the tokens this one keeps.

def token_order(grid: torch.Tensor, merge: int, windows: tuple[int, int] | None = None) -> torch.Tensor:
    """For each visual token of the images / videos of ``grid`` ((N, 3) t, h, w patches) in the LLM's order, its
    merge unit's index among the tower's block rows: the identity, or with ``windows`` = (window_size, patch_size)
    (Qwen2.5-VL's window attention) the inverse of the tower's window permutation (its ``merged[argsort(index)]``)."""
    total = int((grid.prod(-1) // merge ** 2).sum())
    if windows is None:
        return torch.arange(total)
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid.cpu(), merge, *windows)
    return torch.argsort(window_index)


def frame_units(received: torch.Tensor, keys: torch.Tensor, grid: torch.Tensor, merge_unit: int,
                order: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """VisionZip's units (one per image and per video frame, in order): each one's dominance score and unit keys
    per visual token, from the scored block's per-row ``received`` attention and ``keys`` (rows in the block's
    order), averaged over each merge unit and put in the LLM's order (``order``: `token_order`)."""
    order = order.to(received.device)
    score = received.view(-1, merge_unit).mean(1)[order]
    keys = torch.nn.functional.normalize(keys.view(-1, merge_unit, keys.shape[-1]).mean(1)[order], dim=-1)
    frames = [h * w // merge_unit for t, h, w in grid.tolist() for _ in range(t)]
    return list(zip(score.split(frames), keys.split(frames)))


def write_merged(sources: list[torch.Tensor], plans: list) -> list[torch.Tensor]:
    """Copies of ``sources`` (each (n_tokens, d): the merged features, DeepStack levels) with each unit's contextual
    targets replaced by their group's merge (`ZipPlan.merged`); ``plans`` cover the rows in order."""
    written = [x.clone() for x in sources]
    offset = 0
    for plan in plans:
        n = plan.keep.numel()
        if plan.targets.numel():
            for source, out in zip(sources, written):
                out[offset + plan.targets] = plan.merged(source[offset:offset + n]).to(out.dtype)
        offset += n
    return written
