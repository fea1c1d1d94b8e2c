"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower, average-pooled to ``mm_tokens_per_image`` tokens
per image (256 on the released models: 64 x 64 patches of an 896-px image pooled 4 x 4), and the Gemma 3 decoder.

What the family brings that the others do not, and where it is handled here:

* **Image tokens attend to each other both ways.** The processor marks them in ``token_type_ids``; each
  contiguous run (one image, or one pan-and-scan crop) is a block whose tokens see each other regardless of
  order. `attention_blocks` reads the blocks from the multimodal call as the model does
  (`get_block_sequence_ids_for_mask`); the runtime gathers them with the kept tokens at every stage, and
  `ModelAdapter.stage_masks` builds full layers as causal OR block, sliding layers as (causal OR block) AND
  window: the composition of transformers' `create_masks_for_vision_model`. Without ``token_type_ids`` the
  model is causal, and so is the pruned model.
* **Sliding-window and global layers alternate** (``layer_types``, 5 : 1 on the released models) with a RoPE
  each (base 10k local, 1M global, linearly scaled on 4B+): `rope` computes one (cos, sin) per layer type for a
  stage and `rope_for` picks a layer's. The window counts tokens of the pruned sequence, as the sliding layers'
  cache does; IGA on a sliding layer sees the same window (`attention_window`).
* **Four norms per layer.** h' = h + N_post_attn(Attn(N_in(h))); h'' = h' + N_post_ffw(MLP(N_pre_ffw(h'))).
  TTV compares what enters a branch (after its pre-norm) with what the branch adds to the residual stream
  (after its post-norm): the post-norms are part of the branch, as Llama's whole branch output is what it adds.
* **Scoring q/k** apply the attention's per-head ``q_norm`` / ``k_norm`` before RoPE and its scaling
  ``query_pre_attn_scalar ** -0.5`` (not head_dim's); logit soft-capping (absent on Gemma 3) is refused.

1-D RoPE: both position rules apply ("compact" by default). VisionZip's CLS-free rule (`Gemma3VisionHooks`).
"""

from __future__ import annotations

# What the registry reads without importing this module (`adapters.discover`): the adapter class, its model
# types, the transformers release that first has their classes, and its place in the registry's order.
FAMILY = {"adapter": "Gemma3Adapter", "model_types": ('gemma3',), "since": "5.16.1", "order": 50}

from functools import partial

import torch
import torch.nn.functional as F
from transformers import Gemma3ForConditionalGeneration

from ..accounting import ArchSpec
from ..compat import cache_kwargs
from ..devices import execution_device, to_device
from . import llama
from .base import ModelAdapter
from .vision import VisionHooks, capture_received, feature_layer, shared_received


# -- named archs: public config.json facts, written in code (no download), for flops and bench -------------

# Gemma 3 4B (google/gemma-3-4b-it, public config.json facts as known; written in code): SigLIP so400m at 896 px
# (27 layers, hidden 1152, 14-px patches: 64 x 64, average-pooled 4 x 4 to 256 tokens), the Gemma 3 decoder
# (34 layers, 5 sliding layers of window 1024 per global one, RoPE bases 10k local / 1M global scaled 8x).
GEMMA3_IDS = dict(boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)


def _gemma3(vision_overrides=None, **text_overrides):
    from transformers import Gemma3Config

    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                sliding_window_pattern=6, vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    return Gemma3Config(vision_config={"model_type": "siglip_vision_model", **vision, **(vision_overrides or {})},
                        text_config={**text, **text_overrides}, mm_tokens_per_image=256, tie_word_embeddings=False,
                        **GEMMA3_IDS)


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_classes = (Gemma3ForConditionalGeneration,)
    model_types = ("gemma3",)
    archs = {"gemma3-4b": _gemma3}
    reduced_archs = {"gemma3-reduced": lambda: _gemma3(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4), hidden_size=128, intermediate_size=512,
                                                       num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                                       query_pre_attn_scalar=64)}
    images_per_prompt = True  # its processor takes one list of images per prompt

    def check_decoder(self) -> None:
        super().check_decoder()
        config = self.decoder.config
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attn_logit_softcapping is set on this Gemma decoder: transprune's scores compute attention "
                             "rows without soft-capping, so they would not be the model's; Gemma 3 has none")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (an encoder, e.g. EmbeddingGemma): pruning during a "
                             "causal prefill does not apply")

    # -- visual tokens and their blocks --------------------------------------------------------------
    def attention_blocks(self, call_kwargs: dict) -> torch.Tensor | None:
        token_type_ids = call_kwargs.get("token_type_ids")
        if token_type_ids is None:
            return None
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        return get_block_sequence_ids_for_mask(token_type_ids)

    def vision_hooks(self) -> "Gemma3VisionHooks":
        return Gemma3VisionHooks(self)

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, 2): each token's (row, column) on its image's pooled grid, images side by side."""
        side = self._tokens_per_side()
        ranks = ranks.long()
        image, cell = ranks // (side * side), ranks % (side * side)
        return torch.stack([cell // side, image * (side + 1) + cell % side], dim=1).float()

    def _tokens_per_side(self) -> int:
        return int(self.model.config.mm_tokens_per_image ** 0.5)

    # -- RoPE per layer type -------------------------------------------------------------------------
    def rope(self, h, positions):
        return {kind: self.decoder.rotary_emb(h, positions, kind) for kind in set(self.layer_types[: self.depth])}

    def rope_for(self, rope, layer_index: int):
        return rope[self.layer_types[layer_index]]

    @staticmethod
    def rope_rows(rope, b: int, cols: torch.Tensor):
        return {kind: ModelAdapter.rope_rows(pair, b, cols) for kind, pair in rope.items()}

    # -- layers ----------------------------------------------------------------------------------------
    @staticmethod
    def run_layer(layer, h, *, mask, position_embeddings, position_ids, cache, use_cache, capture: bool):
        """One Gemma 3 layer. With ``capture`` also returns (attn_in, attn_out, mlp_in, mlp_out), each output what
        its branch adds to the residual stream (after the branch's post-norm)."""
        if not capture:
            return llama.run_layer(layer, h, mask=mask, position_embeddings=position_embeddings,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache, capture=False)
        device = execution_device(layer, h.device)
        h, mask, position_embeddings = to_device((h, mask, position_embeddings), device)
        attn_in = layer.input_layernorm(h)
        attn_out, _ = layer.self_attn(hidden_states=attn_in, attention_mask=mask, position_ids=position_ids,
                                      **cache_kwargs(cache), use_cache=use_cache, position_embeddings=position_embeddings)
        attn_out = layer.post_attention_layernorm(attn_out)
        h = h + attn_out
        mlp_in = layer.pre_feedforward_layernorm(h)
        mlp_out = layer.post_feedforward_layernorm(layer.mlp(mlp_in))
        return h + mlp_out, (attn_in, attn_out, mlp_in, mlp_out)

    scoring_qk = staticmethod(partial(llama.scoring_qk, head_norms=True))

    # -- bench inputs and facts for tools ----------------------------------------------------------------
    def default_image_size(self) -> tuple[int, int]:
        side = self.model.config.vision_config.image_size
        return side, side

    def image_tokens_for(self, image_size) -> int:
        """``mm_tokens_per_image`` for an image of the tower's size (the processor resizes every image, and every
        pan-and-scan crop, to it)."""
        side = self.model.config.vision_config.image_size
        if tuple(image_size) != (side, side):
            raise ValueError(f"image size {image_size[0]}x{image_size[1]}: Gemma 3's processor resizes every image "
                             f"to the tower's {side}x{side}; give that size")
        return self.model.config.mm_tokens_per_image

    def synthetic_vision_inputs(self, batch, image_size, gen) -> dict:
        self.image_tokens_for(image_size)
        side = self.model.config.vision_config.image_size
        return {"pixel_values": torch.randn((batch, 3, side, side), generator=gen)}

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict:
        """`token_type_ids` (1 on image tokens): the model's bidirectional image blocks come from them."""
        return {"token_type_ids": (input_ids == self.model.config.image_token_id).long()}

    @classmethod
    def arch_spec(cls, cfg, name: str) -> ArchSpec:
        """N = ``mm_tokens_per_image`` (256): one image; pan-and-scan crops add as many each."""
        return ArchSpec.of_decoder(cfg.text_config, name, cfg.mm_tokens_per_image, model_type=cfg.model_type)


class Gemma3VisionHooks(VisionHooks):
    """What VisionZip reads from Gemma 3's SigLIP tower and its pooling projector.

    The tower has no CLS token, so a patch's dominance is the attention it *receives*: the mean over its image's
    queries and over heads in the tower's last layer (whose output the projector pools), computed from that
    layer's q and k, whatever backend the tower runs; VisionZip's CLS-free rule, as on Qwen. A visual token is
    the average of a k x k window of patches (the projector's `avg_pool`), so its score and key are the means
    over its window. A contextual token is the mean of its group after the projector (in the LLM's embedding
    space: the projector's RMSNorm is nonlinear). Units are images (each pan-and-scan crop is one).
    """

    encoders = {"image": "get_image_features"}

    def patches_per_tile(self) -> int:
        return self.adapter.model.config.mm_tokens_per_image  # visual tokens per image

    def attention_layer(self):
        tower = self.mm.vision_tower
        tower = getattr(tower, "vision_model", tower)
        return feature_layer(tower.encoder.layers, -1).self_attn

    # the attention each patch receives in the layer (no mask: one image or crop per row), its first pass shared
    # with the layer's own call where the backend allows (`vision.shared_received`)
    capture = staticmethod(capture_received)
    forward_with_lse = staticmethod(shared_received)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(images, patches, c) -> (images, tokens, c): the projector's k x k average over the patch grid."""
        projector = self.mm.multi_modal_projector
        side = projector.patches_per_image
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return F.avg_pool2d(grid, projector.kernel_size).flatten(2).transpose(1, 2)

    def units(self, image_outputs, captured, geometry):
        received, keys = captured
        score = self._pool(received[..., None])[..., 0]
        keys = F.normalize(self._pool(keys.float()), dim=-1)
        return list(zip(score, keys))

    def merge(self, image_outputs, plans, geometry) -> torch.Tensor:
        features = image_outputs.pooler_output.clone()  # (images, tokens, d)
        for image, plan in enumerate(plans):
            if plan.targets.numel():
                features[image, plan.targets] = plan.merged(features[image]).to(features.dtype)
        image_outputs.pooler_output = features
        return torch.cat([plan.keep for plan in plans]), None
