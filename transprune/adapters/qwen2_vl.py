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
Layers of type "sliding_attention" (``use_sliding_window``) get a sliding-window mask of their own.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sliding_window_causal_mask_function

from ..accounting import ArchSpec
from .base import ModelAdapter

# The nominal image of the FLOPs tool and the bench: 448 x 448 pixels (16 x 16 merged tokens with 14-pixel
# patches merged 2 x 2: 256 visual tokens on Qwen2-VL / Qwen2.5-VL-7B).
NOMINAL_GRID = 16


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2-vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_rules = ("original",)
    position_rule_reasons = {
        "compact": "its positions are 3-D multimodal RoPE (t, h, w) rows, where renumbering the kept tokens "
                   "1-D has no meaning; kept tokens keep their own (t, h, w) positions (positions='original', "
                   "the default here)",
    }

    # -- visual tokens ---------------------------------------------------------------------------
    def _visual_ids(self) -> tuple[int, int]:
        config = self.model.config
        return config.image_token_id, config.video_token_id

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        image_id, video_id = self._visual_ids()
        if input_ids is not None:
            return (input_ids == image_id) | (input_ids == video_id)
        if inputs_embeds is None:
            return None
        table = self.multimodal_model.get_input_embeddings()
        mask = None
        for token in (image_id, video_id):
            marker = table(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            hit = (inputs_embeds == marker).all(-1)
            mask = hit if mask is None else mask | hit
        return mask

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
        return self.decoder.rotary_emb(h, positions[1:] if positions.shape[0] == 4 else positions)

    # -- masks: full and sliding-window layers --------------------------------------------------------
    @property
    def _layer_types(self):
        return getattr(self.decoder.config, "layer_types", None) or ["full_attention"] * self.depth

    @property
    def _has_sliding(self) -> bool:
        return "sliding_attention" in self._layer_types[: self.depth]

    def stage_masks(self, h, key_valid: torch.Tensor, q_len: int):
        full = super().stage_masks(h, key_valid, q_len)
        if not self._has_sliding:
            return full
        config = self.decoder.config
        kv_len = key_valid.shape[1]
        # A sliding layer's cache (`DynamicSlidingWindowLayer`) holds only its last ``window - 1`` keys, so after
        # the first call of a stage its layers see those plus the new ones: the mask covers exactly them.
        keys = q_len + min(kv_len - q_len, config.sliding_window - 1)
        sliding = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=h.shape[0], q_length=q_len, kv_length=keys, q_offset=kv_len - q_len, kv_offset=kv_len - keys,
            mask_function=sliding_window_causal_mask_function(config.sliding_window), attention_mask=key_valid,
            allow_is_causal_skip=True, local_size=config.sliding_window, dtype=h.dtype, config=config,
            use_vmap=False, device=h.device,
        )
        return {"full_attention": full, "sliding_attention": sliding}

    def mask_for(self, masks, layer_index: int):
        return masks[self._layer_types[layer_index]] if isinstance(masks, dict) else masks

    def decode_needs_no_mask(self, q_len: int) -> bool:
        return not self._has_sliding and super().decode_needs_no_mask(q_len)

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

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`mm_token_type_ids` of ``input_ids``: 0 text, 1 image, 2 video."""
        image_id, video_id = self._visual_ids()
        return (input_ids == image_id).int() + 2 * (input_ids == video_id).int()

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N is nominal: one 448 x 448 image (``NOMINAL_GRID**2`` = 256 tokens with the 7B's 14-pixel patches
        merged 2 x 2); a real image's count depends on its size."""
        text = getattr(cfg, "text_config", None) or cfg
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return ArchSpec(name, text.hidden_size, text.intermediate_size, text.num_hidden_layers, heads, kv_heads,
                        head_dim, NOMINAL_GRID ** 2)
