"""The model-family seam: everything the runtime asks of a family, with the defaults of a Llama-style
decoder under 1-D RoPE. A family subclasses `ModelAdapter`, overrides what differs, and declares
itself in its file (``FAMILY``, which `adapters.discover` registers); the runtime never looks at a position's shape, a mask's form, a
decoder attribute or a vision tower itself.

Positions keep the token axis last ((B, L) here; (3, B, L) under mRoPE): `surgery` gathers them
without knowing their shape, and the family's position rule says what they are in prefill, what
"compact" (closing up after a drop) means, and what a decode step's positions are.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, and_masks, blockwise_overlay, causal_mask_function,
                                        or_masks, sliding_window_overlay)

from . import llama


def close_up_1d(positions, valid, dropped) -> torch.Tensor:
    """The 1-D "compact" rule: every kept token moves down by the tokens dropped before it (the official
    code's ``arange(L_new)`` renumbering for an unpadded sample)."""
    return positions - dropped.long().cumsum(1)


def image_only_processor(base: type, image_processor, tokenizer, **kwargs):
    """``base`` (a processor class with a video processor) built without one: images and text work. Named as its
    base, so a saved folder names the family's own class and loads back through `ModelAdapter.load_processor`."""
    cls = type(base.__name__, (base,), {"get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"])})
    processor = cls(image_processor, tokenizer, None, **kwargs)
    processor.video_processor = None
    return processor


def image_only_processor_from(folder, base: type):
    """`image_only_processor` from a saved folder: its image processor, tokenizer, chat template and the
    processor's own settings (``processor_config.json``)."""
    import json
    from pathlib import Path

    import transformers

    folder = Path(folder)
    settings = {}
    if (folder / "processor_config.json").is_file():
        settings = {k: v for k, v in json.loads((folder / "processor_config.json").read_text()).items()
                    if k not in ("processor_class", "image_processor", "video_processor", "tokenizer", "auto_map")}
    template = folder / "chat_template.jinja"
    if template.is_file():
        settings["chat_template"] = template.read_text()
    elif (folder / "chat_template.json").is_file():  # the older layout
        settings["chat_template"] = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    from ..compat import load_image_processor

    image_processor = load_image_processor(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if "video_processor" not in base.get_attributes():  # nothing to leave out (Idefics3's processor has no videos)
        return base(image_processor=image_processor, tokenizer=tokenizer, **settings)
    return image_only_processor(base, image_processor, tokenizer, **settings)


class ModelAdapter:
    family: str = "?"
    model_classes: tuple[type, ...] = ()
    model_types: tuple[str, ...] = ()  # HF config.model_type values (tools read configs before any model exists)
    position_rules: tuple[str, ...] = ("compact", "original")  # what this family can honour; the first is its default
    # Why a rule this family does not honour cannot be honoured (rule -> reason), for `apply`'s error message.
    position_rule_reasons: dict[str, str] = {}
    # Attention backends for which "no mask" means "attend to every cached key" (a 1-token decode step with no
    # padding needs nothing else): sdpa (HF returns None itself there), eager (its mask would be all zeros), flash.
    mask_free_decode: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")

    def __init__(self, model):
        self.model = model

    # -- the decoder's parts ---------------------------------------------------------------------
    @property
    def multimodal_model(self):
        """The module whose forward sees `input_ids` and hands `inputs_embeds` to the decoder."""
        return self.model.model

    @functools.cached_property
    def decoder(self):
        """The text decoder (looked up once: the runtime reads it on every decode step)."""
        return self.model.get_decoder()

    @property
    def depth(self) -> int:
        return self.decoder.config.num_hidden_layers

    @property
    def layers(self):
        return self.decoder.layers[: self.depth]

    def embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids)

    def final_norm(self, h):
        return self.decoder.norm(h)

    def new_cache(self):
        return DynamicCache(config=self.decoder.config)

    def check_decoder(self) -> None:
        if not isinstance(getattr(self.decoder, "layers", None), torch.nn.ModuleList):
            raise TypeError(f"{type(self.decoder).__name__} has no `layers` ModuleList; transprune cannot run it")
        other = sorted(set(self.layer_types[: self.depth]) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(f"{type(self.decoder).__name__} has layers of type {other}: transprune builds full and "
                             "sliding-window attention masks only")

    # -- visual tokens ---------------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        """Per modality ("image", "video"), the placeholder token id the model expands each one into."""
        return {"image": self.model.config.image_token_id}

    def visual_token_masks(self, input_ids, inputs_embeds) -> dict[str, torch.Tensor] | None:
        """Per modality, the (B, L) bool mask of its placeholders (a pre-LLM method chooses among each modality's
        tokens apart: one encoder call per modality); None when the call has no way to tell."""
        ids = self.placeholder_ids()
        if input_ids is not None:
            return {modality: input_ids == token for modality, token in ids.items()}
        if inputs_embeds is None:
            return None
        # Embeddings passed directly: placeholders are still their token's embedding at this point.
        table = self.multimodal_model.get_input_embeddings()
        return {modality: (inputs_embeds == table(torch.tensor(token, device=inputs_embeds.device))
                           .to(inputs_embeds.dtype)).all(-1) for modality, token in ids.items()}

    def image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        """(B, L) bool: the visual tokens of this call, every modality (None when the call has no way to tell)."""
        masks = self.visual_token_masks(input_ids, inputs_embeds)
        if masks is None:
            return None
        masks = list(masks.values())
        return masks[0] if len(masks) == 1 else functools.reduce(torch.logical_or, masks)

    def token_coords(self, ranks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, c) float coordinates of one sample's image tokens for the uniform baseline, from their indices
        among the sample's image tokens (``ranks``, (n,)) or their positions (``positions``, any layout with
        the token axis last); default: index along the sequence."""
        ranks = ranks.float()
        return torch.stack([ranks, torch.zeros_like(ranks)], dim=1)

    # The family's processor takes one list of images per prompt (SmolVLM), not one flat list.
    images_per_prompt: bool = False

    # Why this family has no vision hooks (for the error a pre-LLM method gives); None: not written yet.
    vision_hooks_missing: str | None = None
    # This family's named archs for flops and bench, each a builder of its transformers config from the public
    # config.json facts (no download): full-size models, and the reduced bench archs (the family's geometry at small
    # widths, for a CPU). A family declares its own; `named_archs` does not inherit them.
    archs: dict = {}
    reduced_archs: dict = {}

    def vision_hooks(self):
        """The vision-tower hooks a pre-LLM method needs (`adapters.vision.VisionHooks`); None: none."""
        return None

    @classmethod
    def lacks(cls, need: str) -> str | None:
        """Why this family cannot give a method what it declares it needs (`methods.base.NEEDS`), or None."""
        if need == "vision_hooks":
            if cls.vision_hooks_missing:
                return cls.vision_hooks_missing
            return None if cls.vision_hooks is not ModelAdapter.vision_hooks else "it has none"
        raise ValueError(f"unknown need {need!r}")

    # -- the position rule (1-D) -----------------------------------------------------------------
    def prefill_positions(self, position_ids, batch: int, length: int, past: int, device) -> torch.Tensor:
        """Positions of a prefill's tokens: the caller's, else counted from the cache length."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None] + past
        return position_ids.expand(batch, -1)

    def continuation_positions(self, position_ids, next_position: torch.Tensor, length: int) -> torch.Tensor:
        """Positions of the tokens of a call after a pruned prefill, in the unpruned numbering (layer 0's cache
        may be shorter than the sequence, so they are counted from the generation's state)."""
        if position_ids is None:
            position_ids = next_position[:, None] + torch.arange(length, device=next_position.device)[None]
        return position_ids.expand(next_position.shape[0], -1)

    def next_position(self, positions: torch.Tensor) -> torch.Tensor:
        """(B,) the position that follows ``positions``."""
        return positions[..., -1] + 1

    close_up = staticmethod(close_up_1d)

    def shift_positions(self, positions, shift: torch.Tensor) -> torch.Tensor:
        """Decode positions in a stage whose earlier drops were closed up by ``shift`` (B,) tokens."""
        return positions - shift[:, None]

    def layer_position_ids(self, positions):
        """What a layer's `position_ids` argument receives."""
        return positions

    @classmethod
    def resolve_position_rule(cls, requested: str, defaulted: bool) -> str:
        """The position rule a method runs with on this family: ``requested`` when the family honours it; a
        rule the method left at its default (``defaulted``) becomes the family's default rule (its first);
        an explicit rule the family cannot honour raises, saying why."""
        if requested in cls.position_rules:
            return requested
        if defaulted:
            return cls.position_rules[0]
        reason = cls.position_rule_reasons.get(requested)
        raise ValueError(f"positions={requested!r} is not supported on the {cls.family} family"
                         f"{': ' + reason if reason else ''}; it supports {', '.join(map(repr, cls.position_rules))}")

    # -- per stage: RoPE and masks ---------------------------------------------------------------
    def rope(self, h, positions):
        """The stage's rotary embedding: per-token (cos, sin), each (B, L, head_dim). A family whose layer types
        rotate differently (Gemma 3) returns what `rope_for` picks each layer's from."""
        return self.decoder.rotary_emb(h, positions)

    def rope_for(self, rope, layer_index: int):
        """Layer ``layer_index``'s (cos, sin) out of the stage's `rope`."""
        return rope

    @staticmethod
    def rope_rows(rope, b: int, cols: torch.Tensor):
        """(cos, sin) of sample ``b``'s tokens ``cols``, kept as a 1-row batch."""
        cos, sin = rope
        return cos[b:b + 1, cols], sin[b:b + 1, cols]

    @functools.cached_property
    def layer_types(self) -> list[str]:
        """Each layer's attention type ("full_attention", "sliding_attention"), read as the model's cache reads it:
        ``config.layer_types``, else inferred from ``sliding_window`` (a Mistral decoder slides in every layer)."""
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(self.decoder.config)[0])

    @functools.cached_property
    def _has_sliding(self) -> bool:
        return "sliding_attention" in self.layer_types[: self.depth]

    def attention_window(self, layer_index: int) -> int | None:
        """How many keys back (the query's own included) layer ``layer_index`` attends; None: all of them."""
        return self.decoder.config.sliding_window if self.layer_types[layer_index] == "sliding_attention" else None

    def attention_blocks(self, call_kwargs: dict) -> torch.Tensor | None:
        """(B, L) long from the multimodal call's keyword arguments: tokens sharing an id >= 0 attend to each other
        both ways (Gemma 3's image blocks), -1 elsewhere; None: the model's attention is causal for this call."""
        return None

    def stage_masks(self, h, key_valid: torch.Tensor, q_len: int, blocks: torch.Tensor | None = None):
        """The attention masks of one stage (every layer holds the same tokens), in whatever form the model's
        backend wants; `mask_for` picks a layer's. ``key_valid``: (B, kv_len) real keys; ``blocks``: (B, kv_len)
        `attention_blocks` ids of the keys (the queries are the last ``q_len``), None: causal. One mask serves
        every layer, or one per layer type when some layers slide: a sliding layer's cache
        (`DynamicSlidingWindowLayer`) holds only its last ``window - 1`` keys, so after the first call of a stage
        its layers see those plus the new ones, and the mask covers exactly them."""
        config = self.decoder.config
        kv_len = key_valid.shape[1]

        def build(mask_function, keys, local_size=None):
            if blocks is not None:  # image blocks see each other both ways: the causal shortcut no longer holds
                mask_function = or_masks(mask_function, blockwise_overlay(blocks))
            if local_size is not None:
                mask_function = and_masks(mask_function, sliding_window_overlay(local_size))
            return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
                batch_size=h.shape[0], q_length=q_len, kv_length=keys, q_offset=kv_len - q_len, kv_offset=kv_len - keys,
                mask_function=mask_function, attention_mask=key_valid, allow_is_causal_skip=blocks is None,
                local_size=local_size, dtype=h.dtype, config=config, use_vmap=False, device=h.device,
            )

        full = build(causal_mask_function, kv_len)
        if not self._has_sliding:
            return full
        window = config.sliding_window
        sliding = build(causal_mask_function, q_len + min(kv_len - q_len, window - 1), local_size=window)
        return {"full_attention": full, "sliding_attention": sliding}

    def mask_for(self, masks, layer_index: int):
        return masks[self.layer_types[layer_index]] if isinstance(masks, dict) else masks

    def decode_needs_no_mask(self, q_len: int) -> bool:
        """A 1-token step over unpadded keys needs no mask in this backend (not so when some layers slide)."""
        return (q_len == 1 and not self._has_sliding
                and self.decoder.config._attn_implementation in self.mask_free_decode)

    # -- layers ----------------------------------------------------------------------------------
    run_layer = staticmethod(llama.run_layer)
    scoring_qk = staticmethod(llama.scoring_qk)

    # -- what the decoder's own loop does between layers -----------------------------------------
    # A family whose decoder changes the hidden states between layers from inputs of its own (Qwen3-VL's
    # DeepStack adds vision features at the visual positions after the first layers) overrides both.
    # The defaults do nothing, and the runtime then installs nothing and calls nothing.
    def layer_extras(self, decoder_kwargs: dict):
        """What this decoder call adds between layers, from the keyword arguments the decoder's forward received
        beyond the runtime's own (input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache);
        None: nothing for this call. Read once per decoder call, before the pruned prefill."""
        return None

    def after_layer(self, layer_index: int, h: torch.Tensor, layout, extras) -> torch.Tensor:
        """The hidden states after layer ``layer_index`` (0-based) of a pruned prefill, as the decoder's own loop
        would hand them to the next layer; ``layout`` (`surgery.Layout`) says which tokens are present now
        (``orig_index``: their columns in the caller's input; ``valid``), so what is added follows the
        tokens kept so far. Called before the layer's pruning step, only when ``extras`` is not None."""
        return h

    # -- facts for tools (no model needed) -------------------------------------------------------
    @classmethod
    def model_class_for(cls, model_type: str) -> type:
        """The transformers class that builds a model of this ``model_type``."""
        return dict(zip(cls.model_types, cls.model_classes))[model_type]

    # model_type -> the name of its transformers processor class, for families whose processor has a video
    # processor (which needs torchvision): without torchvision, `load_processor` builds it for images only.
    processor_classes: dict[str, str] = {}

    @classmethod
    def load_processor(cls, folder, model_type: str):
        """The processor of a local checkpoint folder of this family (never downloads); for a family with a video
        processor that cannot be built here (it needs torchvision), the same processor for images only."""
        import transformers

        try:
            processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            if hasattr(processor, "image_processor") or model_type not in cls.processor_classes:
                return processor
        except (ImportError, OSError, ValueError) as error:
            if model_type not in cls.processor_classes or not any(
                    word in str(error).lower() for word in ("video", "torchvision")):
                raise
        return image_only_processor_from(folder, getattr(transformers, cls.processor_classes[model_type]))

    def default_image_size(self) -> tuple[int, int]:
        """(height, width) of the synthetic images the bench feeds this family by default."""
        raise NotImplementedError

    def image_tokens_for(self, image_size: tuple[int, int]) -> int:
        """Visual tokens one image of ``image_size`` (h, w) becomes in this model."""
        raise NotImplementedError

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict:
        """The per-token type inputs the model needs besides ``input_ids`` (mRoPE families: `mm_token_type_ids`;
        Gemma 3: `token_type_ids`), for bench inputs built without a processor."""
        return {}

    def synthetic_vision_inputs(self, batch: int, image_size: tuple[int, int], gen: torch.Generator) -> dict:
        """The vision tensors of ``batch`` random images of ``image_size`` (bench inputs without a processor)."""
        raise NotImplementedError

    @classmethod
    def arch_spec(cls, hf_config, name: str):
        """The `flops.ArchSpec` (decoder dimensions, nominal image tokens) of an HF config of this family."""
        raise NotImplementedError
